"""`--data-order megatron` equals megatron.core's GPTDataset + BlendedDataset (the installed
megatron-core, run as a peer) sample for sample: 3 seeds, under / at / over one epoch, a
two-prefix blend, empty documents; and the split boundaries round as Megatron-Core's."""
import numpy as np
import pytest

from megatron_ru.data.blended import parse_split, split_boundaries
from megatron_ru.data.builder import build_train_valid_test_datasets
from megatron_ru.data.indexed_dataset import IndexedDatasetBuilder

mcore = pytest.importorskip("megatron.core.datasets.blended_megatron_dataset_builder")
SEQ, SPLIT = 16, "90,5,5"


def write(prefix, num_docs, seed):
    rng = np.random.default_rng(seed)
    with IndexedDatasetBuilder(str(prefix), np.int32) as builder:
        for i, n in enumerate(rng.integers(1, 40, size=num_docs)):
            builder.add_document(rng.integers(0, 5000, size=0 if i % 17 == 5 else n))  # some empty
    return str(prefix)


class Tok:  # what GPTDatasetConfig needs from a tokenizer
    eod, pad, vocab_size, unique_identifiers = 0, -1, 5000, {"class": "Tok"}


def megatron_splits(blend, seed, sizes, cache):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    config = GPTDatasetConfig(random_seed=seed, sequence_length=SEQ, blend=blend, split=SPLIT,
                              path_to_cache=cache and str(cache), tokenizer=Tok(), reset_position_ids=False,
                              reset_attention_mask=False, eod_mask_loss=False,
                              create_attention_mask=False)
    return BlendedMegatronDatasetBuilder(GPTDataset, list(sizes), lambda: True, config).build()


def tokens(ds, i):
    return np.asarray(ds[i]["text"])


def megatron_tokens(ds, i):
    sample = ds[i]
    return np.concatenate([sample["tokens"].numpy(), sample["labels"].numpy()[-1:]])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mo")
    return write(root / "a", 389, 1), write(root / "b", 150, 2), root


def test_split_rounding_is_megatron_cores():
    assert split_boundaries(parse_split("90,5,5"), 389) == [0, 350, 370, 389]
    assert split_boundaries(parse_split("969,30,1"), 1000) == [0, 969, 999, 1000]


@pytest.mark.parametrize("seed", [0, 7, 1234])
def test_single_prefix_order_matches_megatron_core(data, seed):
    a, _, root = data
    from megatron_ru.data.indexed_dataset import IndexedDataset
    tokens_train = int(IndexedDataset(a).sizes[:350].sum())
    per_epoch = (tokens_train - 1) // SEQ
    # under, at, over one epoch; last epoch separated (0.1, 0.75 of an epoch) or not (0.9)
    for n in (per_epoch // 3, per_epoch, per_epoch + per_epoch // 10, per_epoch + 3 * per_epoch // 4,
              2 * per_epoch + 9 * per_epoch // 10):
        ours = build_train_valid_test_datasets([a], SPLIT, SEQ, seed, (n, 20, 10), cache_path=str(root / "c1"),
                                               data_order="megatron")
        theirs = megatron_splits([[a], None], seed, (n, 20, 10), root / "m1")
        for o, t in zip(ours, theirs):
            np.testing.assert_array_equal(o.doc_index, t.document_index)
            np.testing.assert_array_equal(o.sample_index, t.sample_index)
            np.testing.assert_array_equal(o.shuffle_index, t.shuffle_index)
            assert len(o) == len(t)
        train = ours[0]
        for i in list(range(0, n, max(1, n // 25))) + [n - 1]:
            np.testing.assert_array_equal(tokens(train, i), megatron_tokens(theirs[0], i))


@pytest.mark.parametrize("seed", [3, 11])
def test_blend_order_matches_megatron_core(data, seed):
    a, b, root = data
    n = 700  # over one epoch of b's training split
    ours = build_train_valid_test_datasets(["0.3", a, "0.7", b], SPLIT, SEQ, seed, (n, 30, 12),
                                           cache_path=str(root / "c2"), data_order="megatron")
    theirs = megatron_splits([[a, b], [0.3, 0.7]], seed, (n, 30, 12), None)  # (a cache needs a process group)
    for o, t in zip(ours, theirs):
        assert len(o) == len(t)
        np.testing.assert_array_equal(o.dataset_index, t.dataset_index)
        np.testing.assert_array_equal(o.dataset_sample_index, t.dataset_sample_index)
        for om, tm in zip(o.datasets, t.datasets):
            np.testing.assert_array_equal(om.sample_index, tm.sample_index)
            np.testing.assert_array_equal(om.shuffle_index, tm.shuffle_index)
    for i in range(0, n, 7):
        np.testing.assert_array_equal(tokens(ours[0], i), megatron_tokens(theirs[0], i))


def test_preprocess_keeps_empty_documents_as_megatron_does(tmp_path):
    """Our .bin/.idx equal the files Megatron's own IndexedDatasetBuilder writes for the documents
    its preprocess_data.py emits (an empty document: add_document([], []), no EOD)."""
    import json
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder as MegatronBuilder
    from tests.helpers import TOKENIZER_FLAGS, load_tool
    from megatron_ru.data.tokenizers import GPT2BPETokenizer
    docs = ["Привет, мир!", "", "hello world", "   ", "Ещё один документ.", ""]
    with open(tmp_path / "in.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
    assert load_tool("preprocess_data").main(["--input", str(tmp_path / "in.jsonl"), *TOKENIZER_FLAGS, "--append-eod",
                      "--output-prefix", str(tmp_path / "ours")]) == 0
    tok = GPT2BPETokenizer(TOKENIZER_FLAGS[3], TOKENIZER_FLAGS[5])
    builder = MegatronBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for d in docs:
        ids = tok.tokenize(d)
        ids = ids + [tok.eod] if ids else ids
        builder.add_document(ids, [len(ids)] if ids else [])
    builder.finalize(str(tmp_path / "theirs.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours_text_document.{ext}").read_bytes() == (tmp_path / f"theirs.{ext}").read_bytes()


def test_data_order_flag_reaches_the_dataset_builder():
    from megatron_ru.training.arguments import parse_pretrain_args
    argv = ["--train-iters", "2", "--data-path", "x", "--preset", "tiny-gpt3"]
    assert parse_pretrain_args(argv).data_order == "ours"
    assert parse_pretrain_args(argv + ["--data-order", "megatron"]).data_order == "megatron"
    from megatron_ru.training.guards import data_args_diff  # a resume with another order is refused
    assert data_args_diff({"data_order": "ours"}, {"data_order": "megatron"}) == \
        ["--data-order: checkpoint 'ours' vs now 'megatron'"]
