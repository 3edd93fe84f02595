"""Megatron .bin/.idx: writer/reader round trip, byte-exact layout, and clear errors on bad files."""
import os
import struct

import numpy as np
import pytest

from megatron_ru.data.indexed_dataset import (IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError,
                                              best_fitting_dtype)


def _docs(seed=0, n=20, vocab=5000):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=rng.integers(0 if i == 3 else 1, 50)) for i in range(n)]


def _write(prefix, docs, dtype=np.uint16):
    with IndexedDatasetBuilder(str(prefix), dtype) as builder:
        for doc in docs:
            builder.add_document(doc)
    return str(prefix)


def _megatron_style_files(prefix, sequences, document_indices, dtype, code):
    """An independent writer following Megatron-LM's _IndexWriter field by field."""
    with open(prefix + ".bin", "wb") as f:
        for seq in sequences:
            f.write(np.asarray(seq, dtype=dtype).tobytes())
    lengths = [len(s) for s in sequences]
    pointers, pos = [], 0
    for n in lengths:
        pointers.append(pos)
        pos += n * np.dtype(dtype).itemsize
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(document_indices)))
        f.write(np.array(lengths, dtype=np.int32).tobytes())
        f.write(np.array(pointers, dtype=np.int64).tobytes())
        f.write(np.array(document_indices, dtype=np.int64).tobytes())


def test_round_trip(tmp_path):
    docs = _docs()
    ds = IndexedDataset(_write(tmp_path / "rt", docs))
    assert len(ds) == len(docs) and ds.dtype == np.uint16
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ds[i], doc)
        np.testing.assert_array_equal(ds.document(i), doc)
    np.testing.assert_array_equal(ds.get(5, offset=2, length=3), docs[5][2:5])
    assert ds.num_tokens == sum(len(d) for d in docs)
    np.testing.assert_array_equal(ds.document_indices, np.arange(len(docs) + 1))


def test_bytes_match_megatron_layout(tmp_path):
    docs = [np.array([5, 6, 7]), np.array([8]), np.array([9, 10])]
    prefix = _write(tmp_path / "fmt", docs)
    raw = open(prefix + ".idx", "rb").read()
    expected = (b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 3, 4) + struct.pack("<3i", 3, 1, 2)
                + struct.pack("<3q", 0, 6, 8) + struct.pack("<4q", 0, 1, 2, 3))
    assert raw == expected
    assert open(prefix + ".bin", "rb").read() == struct.pack("<6H", 5, 6, 7, 8, 9, 10)


def test_reads_megatron_written_files_with_multi_sequence_documents(tmp_path):
    prefix = str(tmp_path / "meg")
    seqs = [[1, 2, 3], [4, 5], [70000, 7], [8]]
    _megatron_style_files(prefix, seqs, [0, 2, 4], np.int32, 4)  # 2 documents of 2 sequences
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.int32 and len(ds) == 4
    np.testing.assert_array_equal(ds[2], [70000, 7])
    np.testing.assert_array_equal(ds.document(0), [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(ds.document(1), [70000, 7, 8])
    # Megatron's multimodal files append one mode byte per sequence; readable too.
    with open(prefix + ".idx", "ab") as f:
        f.write(bytes(4))
    assert len(IndexedDataset(prefix)) == 4


def test_our_files_equal_megatron_style_files(tmp_path):
    docs = _docs(seed=1)
    ours = _write(tmp_path / "ours", docs)
    ref = str(tmp_path / "ref")
    _megatron_style_files(ref, docs, list(range(len(docs) + 1)), np.uint16, 8)
    for ext in (".bin", ".idx"):
        assert open(ours + ext, "rb").read() == open(ref + ext, "rb").read()


def test_add_documents_in_bulk_equals_one_by_one(tmp_path):
    docs = _docs(seed=4)
    one = _write(tmp_path / "one", docs)
    with IndexedDatasetBuilder(str(tmp_path / "bulk"), np.uint16) as builder:
        builder.add_documents(np.concatenate(docs[:9]), [len(d) for d in docs[:9]])
        builder.add_documents(np.concatenate(docs[9:]).astype(np.int64), [len(d) for d in docs[9:]])
    for ext in (".bin", ".idx"):
        assert open(one + ext, "rb").read() == open(str(tmp_path / "bulk") + ext, "rb").read()


def test_best_fitting_dtype_and_range_check(tmp_path):
    assert best_fitting_dtype(50257) == np.uint16 and best_fitting_dtype(65500) == np.int32
    builder = IndexedDatasetBuilder(str(tmp_path / "r"), np.uint16)
    with pytest.raises(IndexedDatasetError, match="out of range"):
        builder.add_document(np.array([70000]))
    builder.abort()
    assert os.listdir(tmp_path) == []


def test_builder_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(str(tmp_path / "x"), np.int32) as builder:
            builder.add_document(np.arange(10))
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_merge_shards(tmp_path):
    a, b = _docs(seed=2, n=5), _docs(seed=3, n=4)
    pa, pb = _write(tmp_path / "a", a), _write(tmp_path / "b", b)
    with IndexedDatasetBuilder(str(tmp_path / "ab"), np.uint16) as builder:
        builder.add_index(pa)
        builder.add_index(pb)
    ds = IndexedDataset(str(tmp_path / "ab"))
    for i, doc in enumerate(a + b):
        np.testing.assert_array_equal(ds.document(i), doc)


def test_empty_dataset(tmp_path):
    ds = IndexedDataset(_write(tmp_path / "empty", []))
    assert len(ds) == 0 and ds.num_tokens == 0


@pytest.mark.parametrize("corrupt, message", [
    (lambda raw: b"NOTANIDX\x00" + raw[9:], "not a Megatron mmap index.*bad magic"),
    (lambda raw: raw[:9] + struct.pack("<Q", 2) + raw[17:], "index version 2, expected 1"),
    (lambda raw: raw[:17] + bytes([9]) + raw[18:], "unknown dtype code 9"),
    (lambda raw: raw[:-5], "truncated or corrupt"),
    (lambda raw: raw[:20], "bad magic|truncated"),
])
def test_bad_index_files(tmp_path, corrupt, message):
    prefix = _write(tmp_path / "bad", _docs())
    raw = open(prefix + ".idx", "rb").read()
    with open(prefix + ".idx", "wb") as f:
        f.write(corrupt(raw))
    with pytest.raises(IndexedDatasetError, match=message) as err:
        IndexedDataset(prefix)
    assert "bad.idx" in str(err.value)


def test_truncated_and_missing_bin(tmp_path):
    prefix = _write(tmp_path / "trunc", _docs())
    size = os.path.getsize(prefix + ".bin")
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(size - 2)
    with pytest.raises(IndexedDatasetError, match=r"trunc.bin is truncated: \d+ bytes.*needs %d" % size):
        IndexedDataset(prefix)
    os.remove(prefix + ".bin")
    with pytest.raises(IndexedDatasetError, match="not found: .*trunc.bin"):
        IndexedDataset(prefix)
