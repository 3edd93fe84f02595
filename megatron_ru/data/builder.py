"""The train/valid/test dataset builder: validates prefixes, picks the sample order, splits, blends, builds GPTDatasets.

It sits on top of the data modules and nothing below imports it: index math per order in
order.py (ours) and megatron_order.py (Megatron-Core's), blending and `--data-path` / `--split`
parsing in blended.py, index caching and sample reading in gpt_dataset.py.
"""
import os
import warnings

import numpy as np

from .blended import (SPLIT_NAMES, BlendedDataset, blend_sample_counts, parse_data_path, parse_split,
                      split_boundaries)
from .gpt_dataset import GPTDataset
from .indexed_dataset import IndexedDataset
from .megatron_order import SURPLUS, blend_indices, sizes_per_dataset, split_ranges
from .order import DatasetConfigError
from .validate import validate_dataset


def build_train_valid_test_datasets(data_path, split, seq_length, seed, num_samples, cache_path=None,
                                    vocab_size=None, tokenizer_fingerprint=None, warn=None,
                                    data_order="ours"):
    """The training loop's entry point: (train, valid, test) datasets, each None when empty.

    data_path: `--data-path` items (`["0.85", "ru", "0.15", "en"]`) or [(weight, prefix)].
    split: `--split` ("969,30,1"), applied to the documents of every prefix separately.
    num_samples: (train, valid, test) sample counts; None in a slot = one epoch of that split
    (single prefix only). Each sample is {"text": int64[seq_length + 1]} (+ "dataset_id" in blends).
    Every prefix is validated first (data/validate.py; ids checked against `vocab_size` if given).
    data_order: "ours" (default) or "megatron" (Megatron-Core's indices and blend, data/megatron_order.py).
    """
    if seq_length < 1:
        raise DatasetConfigError(f"--seq-length must be positive, got {seq_length}")
    blend = parse_data_path(data_path)
    fractions = parse_split(split)
    indexed = [(w, IndexedDataset(p)) for w, p in blend]
    for _, ds in indexed:
        validate_dataset(ds, vocab_size=vocab_size, fingerprint=tokenizer_fingerprint,
                         cache_path=cache_path, warn=warn)
    if data_order == "megatron":
        return build_megatron_datasets(blend, fractions, [ds for _, ds in indexed], seq_length, seed,
                                       num_samples, cache_path)
    bounds = {p: split_boundaries(fractions, len(ds)) for (_, p), (_, ds) in zip(blend, indexed)}
    result = []
    for s, name in enumerate(SPLIT_NAMES):
        wanted = num_samples[s]
        parts = [(w, ds) for w, ds in indexed if bounds[ds.prefix][s + 1] > bounds[ds.prefix][s]]
        if wanted == 0 or not parts:
            result.append(None)
            continue
        if len(parts) < len(indexed):
            warnings.warn(f"the {name} split is empty for some --data-path prefixes; blending the others")
        if len(parts) == 1:
            ds = parts[0][1]
            lo, hi = bounds[ds.prefix][s:s + 2]
            result.append(GPTDataset(ds, np.arange(lo, hi), name=name, seq_length=seq_length,
                                     num_samples=wanted, seed=seed, cache_path=cache_path))
            continue
        if wanted is None:
            raise DatasetConfigError(f"blending several --data-path prefixes needs a sample count for {name}")
        weights = [w for w, _ in parts]
        counts = blend_sample_counts([w / sum(weights) for w in weights], wanted)
        members = []
        for (w, ds), count in zip(parts, counts):
            lo, hi = bounds[ds.prefix][s:s + 2]
            members.append(GPTDataset(ds, np.arange(lo, hi), name=name, seq_length=seq_length,
                                      num_samples=count, seed=seed, cache_path=cache_path))
        result.append(BlendedDataset(members, weights, wanted))
    return tuple(result)


def describe_datasets(datasets):
    """One line per split for logs: sample counts and blend members."""
    lines = []
    for name, ds in zip(SPLIT_NAMES, datasets):
        if ds is None:
            lines.append(f"{name}: none")
        elif isinstance(ds, BlendedDataset):
            members = ", ".join(f"{w:.3f} {os.path.basename(m.indexed.prefix)}"
                                for w, m in zip(ds.weights, ds.datasets))
            lines.append(f"{name}: {len(ds)} samples blended from {members}")
        else:
            lines.append(f"{name}: {len(ds)} samples from {ds.indexed.prefix} ({ds.num_epochs} epochs)")
    return lines


def build_megatron_datasets(blend, fractions, indexed, seq_length, seed, num_samples, cache_path=None):
    """(train, valid, test) as Megatron-Core's BlendedMegatronDatasetBuilder builds them from one
    blend: `blend` [(normalised weight, prefix)], `indexed` the matching IndexedDatasets."""
    weights = [w for w, _ in blend]
    result = []
    for s, name in enumerate(SPLIT_NAMES):
        wanted = num_samples[s]
        ranges = [split_ranges(fractions, len(ds))[s] for ds in indexed]
        if wanted == 0 or ranges[0] is None:
            result.append(None)
            continue
        if any(lo >= hi for lo, hi in ranges):
            raise DatasetConfigError(f"the {name} split rounds to no documents for some --data-path "
                                     "prefixes; Megatron-Core cannot build it either")
        make = lambda ds, lo, hi, n: GPTDataset(ds, np.arange(lo, hi), name=name,  # noqa: E731
                                                seq_length=seq_length, num_samples=n, seed=seed,
                                                cache_path=cache_path, order="megatron")
        if len(indexed) == 1:
            result.append(make(indexed[0], *ranges[0], wanted))
            continue
        if wanted is None:
            raise DatasetConfigError(f"blending several --data-path prefixes needs a sample count for {name}")
        build = sizes_per_dataset(weights, wanted, SURPLUS)
        members = [make(ds, lo, hi, n) for ds, (lo, hi), n in zip(indexed, ranges, build)]
        result.append(MegatronBlendedDataset(members, weights, sum(sizes_per_dataset(weights, wanted))))
    return tuple(result)


class MegatronBlendedDataset(BlendedDataset):
    """BlendedDataset whose indices follow Megatron-Core's greedy blending."""

    def __init__(self, datasets, weights, size):
        self.datasets, self.weights, self.size = datasets, list(weights), size
        self.dataset_index, self.dataset_sample_index = blend_indices(self.weights, size)
        for d, ds in enumerate(datasets):
            mine = self.dataset_sample_index[self.dataset_index == d]
            if mine.size and len(ds) <= int(mine.max()):
                raise DatasetConfigError(f"dataset {d} has {len(ds)} samples, the blend needs {mine.size}")
