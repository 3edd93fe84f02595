"""Data pipeline: tokenizers, Megatron .bin/.idx datasets, packing, blending, batches (torch-free import)."""
from .blended import BlendedDataset, build_blend_indices, parse_data_path, parse_split, split_boundaries
from .builder import build_train_valid_test_datasets
from .gpt_dataset import GPTDataset
from .indexed_dataset import (IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError, best_fitting_dtype,
                              write_index)
from .order import DatasetConfigError, build_indices
from .tokenizers import (GPT2BPETokenizer, HFTokenizer, SentencePieceTokenizer, TokenizerError,
                         build_tokenizer)

_BATCH_NAMES = ("DataParallelSampler", "build_data_loader", "collate", "get_batch")


def __getattr__(name):
    # batch.py needs torch; preprocessing workers import this package without paying for it.
    if name in _BATCH_NAMES:
        from . import batch
        return getattr(batch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BlendedDataset", "DatasetConfigError", "GPT2BPETokenizer", "GPTDataset", "HFTokenizer",
           "IndexedDataset", "IndexedDatasetBuilder", "IndexedDatasetError", "SentencePieceTokenizer",
           "TokenizerError", "best_fitting_dtype", "build_blend_indices", "build_indices", "build_tokenizer",
           "build_train_valid_test_datasets", "parse_data_path", "parse_split", "split_boundaries",
           "write_index", *_BATCH_NAMES]
