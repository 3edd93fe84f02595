"""GPTDataset packing: every token lands in the expected samples, splits, epochs, caching, errors."""
import os
import time

import numpy as np
import pytest

from megatron_ru.data.blended import parse_split, split_boundaries
from megatron_ru.data.builder import build_train_valid_test_datasets
from megatron_ru.data.gpt_dataset import GPTDataset
from megatron_ru.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_ru.data.order import DatasetConfigError, build_indices


def unique_token_dataset(prefix, num_docs=60, seed=0, first_id=0):
    """Documents of random length whose token ids are all distinct: id = global token position."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 40, size=num_docs)
    lengths[min(7, num_docs - 1)] = 0  # an empty document must not disturb packing
    with IndexedDatasetBuilder(str(prefix), np.int32) as builder:
        start = first_id
        for n in lengths:
            builder.add_document(np.arange(start, start + n))
            start += n
    return IndexedDataset(str(prefix))


def _stream_order(ds):
    """Samples in the order they were packed (undo the shuffle)."""
    inverse = np.argsort(np.asarray(ds.shuffle_index))
    return [ds[int(i)]["text"] for i in inverse]


def test_every_token_in_expected_number_of_samples_one_epoch(tmp_path):
    indexed = unique_token_dataset(tmp_path / "u")
    docs = np.arange(10, 50)  # a middle range of documents, like a split
    seq = 16
    ds = GPTDataset(indexed, docs, name="train", seq_length=seq, num_samples=None, seed=3,
                    cache_path=str(tmp_path / "cache"))
    split_tokens = np.concatenate([indexed.document(d) for d in docs])
    n = len(ds)
    assert n == (split_tokens.size - 1) // seq
    samples = [ds[i]["text"] for i in range(n)]
    assert all(s.dtype == np.int64 and s.shape == (seq + 1,) for s in samples)
    counts = np.bincount(np.concatenate(samples), minlength=indexed.num_tokens)
    assert counts[np.setdiff1d(np.arange(indexed.num_tokens), split_tokens)].sum() == 0  # no other split
    # In the packed stream, position g is in sample g // seq, and also in the previous sample when
    # it is a sample boundary (the shared last token); positions past n * seq are in none.
    stream = np.concatenate([indexed.document(int(d)) for d in ds.doc_index])
    g = np.arange(stream.size)
    expected = np.where(g <= n * seq, 1 + ((g % seq == 0) & (g > 0) & (g < n * seq)), 0)
    np.testing.assert_array_equal(counts[stream], expected)
    assert sorted(np.asarray(ds.doc_index).tolist()) == docs.tolist()  # each document once per epoch


def test_multi_epoch_stream_and_epoch_blocks(tmp_path):
    indexed = unique_token_dataset(tmp_path / "m", num_docs=30, seed=1)
    docs = np.arange(30)
    seq = 8
    tokens = indexed.num_tokens
    num_samples = 2 * ((tokens - 1) // seq) + 3  # reaches a little into the third epoch
    ds = GPTDataset(indexed, docs, name="train", seq_length=seq, num_samples=num_samples, seed=5,
                    cache_path=str(tmp_path / "cache"))
    assert len(ds) == num_samples and ds.num_epochs == 3
    doc_index = np.asarray(ds.doc_index)
    for e in range(3):  # every epoch is a full permutation of the documents
        assert sorted(doc_index[e * 30:(e + 1) * 30].tolist()) == docs.tolist()
    stream = np.concatenate([indexed.document(int(d)) for d in doc_index])
    shuffle = np.asarray(ds.shuffle_index)
    for k in range(num_samples):  # sample i is the stream's tokens [i*s, i*s + s]
        i = int(shuffle[k])
        np.testing.assert_array_equal(ds[k]["text"], stream[i * seq:i * seq + seq + 1])
    # block e = samples whose last token lies in epoch e; blocks are served one after another
    cum = [(e * tokens - 1) // seq for e in (1, 2)]
    assert sorted(shuffle[:cum[0]].tolist()) == list(range(cum[0]))
    assert sorted(shuffle[cum[0]:cum[1]].tolist()) == list(range(cum[0], cum[1]))
    assert shuffle[cum[1]:].min() >= cum[1] and len(set(shuffle.tolist())) == num_samples


@pytest.mark.parametrize("seq", [8, 13])
def test_order_prefix_does_not_depend_on_sample_count(tmp_path, seq):
    """The first K samples are the same whatever N a run asks for, across epoch boundaries."""
    indexed = unique_token_dataset(tmp_path / "p", num_docs=25, seed=2)
    per_epoch = (indexed.num_tokens - 1) // seq
    counts = [3, per_epoch - 1, per_epoch, per_epoch + 2, 3 * per_epoch + 5]
    built = [build_indices(indexed.sizes, np.arange(25), seq, n, 9) for n in counts]
    longest = GPTDataset(indexed, np.arange(25), name="train", seq_length=seq, num_samples=counts[-1],
                         seed=9, cache_path=str(tmp_path / "c"))
    for n, (doc_index, sample_index, shuffle_index, _) in zip(counts, built):
        assert len(shuffle_index) == n
        np.testing.assert_array_equal(shuffle_index, longest.shuffle_index[:n])
        shorter = GPTDataset(indexed, np.arange(25), name="train", seq_length=seq, num_samples=n, seed=9,
                             cache_path=str(tmp_path / "c"))
        for k in range(n):
            np.testing.assert_array_equal(shorter[k]["text"], longest[k]["text"])


def test_indices_deterministic_cached_and_seeded(tmp_path):
    indexed = unique_token_dataset(tmp_path / "d")
    kw = dict(name="train", seq_length=10, num_samples=100, cache_path=str(tmp_path / "cache"))
    a = GPTDataset(indexed, np.arange(60), seed=1, **kw)
    b = GPTDataset(indexed, np.arange(60), seed=1, **kw)
    c = GPTDataset(indexed, np.arange(60), seed=2, **kw)
    assert not a.loaded_from_cache and b.loaded_from_cache and not c.loaded_from_cache
    assert b.num_epochs == a.num_epochs
    for x, y in zip((a.doc_index, a.sample_index, a.shuffle_index), (b.doc_index, b.sample_index, b.shuffle_index)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.shuffle_index, c.shuffle_index)
    np.testing.assert_array_equal(a[17]["text"], b[17]["text"])
    files = os.listdir(tmp_path / "cache")
    assert len(files) == 8 and not [f for f in files if ".tmp-" in f]


def test_default_cache_next_to_data(tmp_path):
    indexed = unique_token_dataset(tmp_path / "n")
    GPTDataset(indexed, np.arange(60), name="valid", seq_length=4, num_samples=5, seed=0)
    assert any(f.startswith("n-valid-") for f in os.listdir(tmp_path / "cache"))


def test_seq_length_larger_than_corpus(tmp_path):
    indexed = unique_token_dataset(tmp_path / "small", num_docs=3)
    with pytest.raises(DatasetConfigError, match=r"train split of .*small: --seq-length 5000 needs 5001 tokens"):
        GPTDataset(indexed, np.arange(3), name="train", seq_length=5000, num_samples=1, seed=0,
                   cache_path=str(tmp_path / "c"))


def test_split_parsing_and_boundaries():
    assert split_boundaries(parse_split("969,30,1"), 1000) == [0, 969, 999, 1000]
    assert split_boundaries(parse_split("969,30,1"), 44) == [0, 43, 44, 44]
    assert split_boundaries(parse_split("100"), 7) == [0, 7, 7, 7]
    assert parse_split("0.8/0.2") == pytest.approx([0.8, 0.2, 0.0])
    for bad in ("a,b", "1,2,3,4", "0,0,0", "-1,2"):
        with pytest.raises(DatasetConfigError, match="--split"):
            parse_split(bad)


def test_train_valid_test_are_disjoint_document_ranges(tmp_path):
    indexed = unique_token_dataset(tmp_path / "s", num_docs=100, seed=4)
    train, valid, test = build_train_valid_test_datasets(
        [str(tmp_path / "s")], "80,15,5", seq_length=8, seed=1, num_samples=(50, None, None),
        cache_path=str(tmp_path / "cache"))
    assert len(train) == 50
    seen = []
    for ds, (lo, hi) in zip((train, valid, test), ((0, 80), (80, 95), (95, 100))):
        tokens = np.unique(np.concatenate([ds[i]["text"] for i in range(len(ds))]))
        allowed = np.concatenate([indexed.document(d) for d in range(lo, hi)])
        assert np.isin(tokens, allowed).all()
        seen.append(set(tokens.tolist()))
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])


def test_empty_split_is_none(tmp_path):
    unique_token_dataset(tmp_path / "e", num_docs=20)
    train, valid, test = build_train_valid_test_datasets([str(tmp_path / "e")], "100,0,0", 4, 0, (10, 10, 10),
                                                         cache_path=str(tmp_path / "c"))
    assert len(train) == 10 and valid is None and test is None


def test_index_build_ten_million_documents_is_fast():
    """The vectorised build must stay well inside the 10 s budget; here 1 M documents, < 3 s."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 1000, size=1_000_000).astype(np.int32)
    start = time.perf_counter()
    doc_index, sample_index, shuffle_index, epochs = build_indices(sizes, np.arange(sizes.size), 2048, None, 1)
    assert time.perf_counter() - start < 3.0
    assert epochs == 1 and len(shuffle_index) == (int(sizes.sum(dtype=np.int64)) - 1) // 2048
    assert sample_index.shape == (len(shuffle_index) + 1, 2)


def test_blend_prefix_does_not_depend_on_sample_count(tmp_path):
    unique_token_dataset(tmp_path / "a", num_docs=30, seed=1)
    unique_token_dataset(tmp_path / "b", num_docs=30, seed=2, first_id=10**6)
    path = ["0.7", str(tmp_path / "a"), "0.3", str(tmp_path / "b")]
    short, _, _ = build_train_valid_test_datasets(path, "100,0,0", 8, 3, (30, 0, 0), cache_path=str(tmp_path / "c"))
    long, _, _ = build_train_valid_test_datasets(path, "100,0,0", 8, 3, (400, 0, 0), cache_path=str(tmp_path / "c"))
    assert len(short) == 30 and len(long) == 400  # the long one runs through several epochs of both
    for k in range(30):
        np.testing.assert_array_equal(short[k]["text"], long[k]["text"])
