"""Checks a dataset before any compute: .idx structure vs .bin, dtype vs vocabulary, token ids in range.

One vectorised pass per dataset (structure: a few array comparisons over the index; token ids: a
chunked min/max over the memory-mapped .bin, measured 6 GB/s from the page cache on the 2-vCPU
dev VM, so ~1.5 s for 4 B uint16 tokens (8 GB) when cached, otherwise the time to read 8 GB). The result (min/max id) is cached next to the
dataset indices under a key of the files' paths, sizes and modification times, so later runs pay
nothing; the vocabulary comparison is redone every run. A failure is one line naming the prefix,
the first bad sequence or document and what is wrong (exit 2), before any model is built.

`tools/preprocess_data.py` writes `PREFIX.tokenizer.json` (tokenizer type, vocabulary size,
fingerprint of its files); a run whose tokenizer has another fingerprint is warned, and stopped
when the data also holds ids outside its vocabulary.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings

import numpy as np

from ..files import atomic_open
from .indexed_dataset import IndexedDataset, IndexedDatasetError, data_file_path, index_file_path

VALIDATE_VERSION = 1
TOKENIZER_RECORD = ".tokenizer.json"  # PREFIX.tokenizer.json, beside PREFIX.bin / PREFIX.idx
SCAN_CHUNK = 1 << 25  # tokens per min/max pass: bounded memory, vectorised


class DataValidationError(IndexedDatasetError):
    """The data cannot be trained on as given; the message names the prefix and the first bad item."""


# ---- tokenizer record ---------------------------------------------------------------------------
def tokenizer_fingerprint(files: dict) -> str:
    """sha256 over the contents of the tokenizer's files (keys sorted), first 16 hex digits."""
    h = hashlib.sha256()
    for key in sorted(k for k, v in files.items() if v):
        h.update(key.encode() + b"\0")
        with open(files[key], "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def tokenizer_files(vocab_file=None, merge_file=None, tokenizer_model=None) -> dict:
    return {k: v for k, v in (("vocab_file", vocab_file), ("merge_file", merge_file),
                              ("tokenizer_model", tokenizer_model)) if v}


def write_tokenizer_record(prefix: str, *, tokenizer_type: str, vocab_size: int, files: dict) -> str:
    path = prefix + TOKENIZER_RECORD
    record = {"tokenizer_type": tokenizer_type, "vocab_size": int(vocab_size),
              "fingerprint": tokenizer_fingerprint(files),
              "files": {k: os.path.basename(v) for k, v in files.items()}}
    with atomic_open(path) as f:
        json.dump(record, f, indent=1, sort_keys=True)
    return path


def read_tokenizer_record(prefix: str):
    try:
        with open(prefix + TOKENIZER_RECORD, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


# ---- structure ----------------------------------------------------------------------------------
def _document_of(ds: IndexedDataset, seq: int) -> int:
    return int(np.searchsorted(ds.document_indices, seq, side="right")) - 1


def check_structure(ds: IndexedDataset) -> None:
    """Sizes, pointers and document index agree with each other and with the .bin size."""
    idx, bin_path = index_file_path(ds.prefix), data_file_path(ds.prefix)
    if not np.issubdtype(ds.dtype, np.integer):
        raise DataValidationError(f"{idx}: dtype code says {ds.dtype}, token ids must be integers")
    sizes = np.asarray(ds.sizes, dtype=np.int64)
    item = ds.dtype.itemsize
    bad = np.flatnonzero(sizes < 0)
    if bad.size:
        i = int(bad[0])
        raise DataValidationError(f"{idx}: sequence {i} (document {_document_of(ds, i)}) has negative "
                                  f"size {int(sizes[i])}")
    tokens = int(sizes.sum())
    bin_size = os.path.getsize(bin_path)
    if bin_size != tokens * item:
        hint = ""
        if tokens and bin_size % tokens == 0 and bin_size // tokens in (1, 2, 4, 8):
            hint = (f"; the .bin holds {bin_size // tokens} bytes per token but the dtype code says "
                    f"{ds.dtype} ({item} byte{'s' if item > 1 else ''}): the dtype byte of the .idx is wrong")
        raise DataValidationError(f"{ds.prefix}: {bin_path} has {bin_size} bytes, the index {idx} "
                                  f"describes {tokens} tokens of {ds.dtype} = {tokens * item} bytes{hint}")
    expected = np.zeros(sizes.size, dtype=np.int64)
    np.cumsum(sizes[:-1] * item, out=expected[1:])
    bad = np.flatnonzero(np.asarray(ds.pointers, dtype=np.int64) != expected)
    if bad.size:
        i = int(bad[0])
        raise DataValidationError(f"{idx}: pointer of sequence {i} (document {_document_of(ds, i)}) is "
                                  f"{int(ds.pointers[i])}, the sizes before it put it at byte {int(expected[i])}")
    doc = np.asarray(ds.document_indices, dtype=np.int64)
    if doc.size == 0 or doc[0] != 0 or doc[-1] != sizes.size:
        first, last = (int(doc[0]), int(doc[-1])) if doc.size else (None, None)
        raise DataValidationError(f"{idx}: the document index must run from 0 to the sequence count "
                                  f"{sizes.size}, it runs from {first} to {last}")
    bad = np.flatnonzero(np.diff(doc) < 0)
    if bad.size:
        d = int(bad[0])
        raise DataValidationError(f"{idx}: document index decreases at document {d} "
                                  f"({int(doc[d])} then {int(doc[d + 1])})")


# ---- token ids ----------------------------------------------------------------------------------
def scan_token_ids(ds: IndexedDataset) -> tuple[int, int]:
    """(min id, max id) over the whole .bin, chunk by chunk; (0, -1) when empty."""
    data = ds.tokens
    lo, hi = None, None
    for start in range(0, data.size, SCAN_CHUNK):
        chunk = data[start:start + SCAN_CHUNK]
        cmin, cmax = int(chunk.min()), int(chunk.max())
        lo = cmin if lo is None else min(lo, cmin)
        hi = cmax if hi is None else max(hi, cmax)
    return (0, -1) if lo is None else (lo, hi)


def first_token_outside(ds: IndexedDataset, vocab_size: int) -> tuple[int, int, int]:
    """(document, token position in it, id) of the first id < 0 or >= vocab_size."""
    data = ds.tokens
    for start in range(0, data.size, SCAN_CHUNK):
        chunk = np.asarray(data[start:start + SCAN_CHUNK]).astype(np.int64)
        bad = np.flatnonzero((chunk < 0) | (chunk >= vocab_size))
        if bad.size:
            pos = start + int(bad[0])  # token position in the .bin
            seq = int(np.searchsorted(np.asarray(ds.pointers) // ds.dtype.itemsize, pos, side="right")) - 1
            doc = _document_of(ds, seq)
            first_seq = int(ds.document_indices[doc])
            offset = pos - int(ds.pointers[first_seq]) // ds.dtype.itemsize
            return doc, offset, int(chunk[bad[0]])
    raise AssertionError("no id outside the vocabulary")


# ---- the whole check, cached --------------------------------------------------------------------
def _cache_key(ds: IndexedDataset) -> str:
    parts = [VALIDATE_VERSION, os.path.abspath(ds.prefix)]
    for path in (index_file_path(ds.prefix), data_file_path(ds.prefix)):
        st = os.stat(path)
        parts += [st.st_size, st.st_mtime_ns]
    return hashlib.md5(json.dumps(parts).encode()).hexdigest()


def _scan_cached(ds: IndexedDataset, cache_dir: str) -> dict:
    path = os.path.join(cache_dir, f"{os.path.basename(ds.prefix)}-validated-{_cache_key(ds)}.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    check_structure(ds)
    lo, hi = scan_token_ids(ds)
    stats = {"prefix": os.path.abspath(ds.prefix), "min_id": lo, "max_id": hi,
             "num_tokens": ds.num_tokens, "dtype": ds.dtype.name}
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with atomic_open(path) as f:
            json.dump(stats, f)
    except OSError as exc:
        warnings.warn(f"cannot cache the validation of {ds.prefix} in {cache_dir} ({exc})")
    return stats


def validate_dataset(ds: IndexedDataset, *, vocab_size=None, fingerprint=None, cache_path=None,
                     warn=None) -> dict:
    """Raise DataValidationError when `ds` cannot be trained with a `vocab_size`-token vocabulary."""
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    cache_dir = cache_path or os.path.join(os.path.dirname(os.path.abspath(ds.prefix)), "cache")
    stats = _scan_cached(ds, cache_dir)
    if vocab_size is None:
        return stats
    record = read_tokenizer_record(ds.prefix)
    other = ""
    if record and fingerprint and record.get("fingerprint") != fingerprint:
        other = (f"{ds.prefix} was tokenized with another tokenizer ({record.get('tokenizer_type')}, "
                 f"vocabulary {record.get('vocab_size')}, fingerprint {record.get('fingerprint')}) than "
                 f"this run's (vocabulary {vocab_size}, fingerprint {fingerprint})")
    if ds.dtype.kind in "iu" and vocab_size - 1 > np.iinfo(ds.dtype).max:
        raise DataValidationError(f"{ds.prefix}: dtype {ds.dtype} cannot hold the ids of a "
                                  f"{vocab_size}-token vocabulary (max {np.iinfo(ds.dtype).max}); "
                                  "the data was written for a smaller tokenizer")
    if stats["max_id"] >= vocab_size or stats["min_id"] < 0:
        doc, offset, value = first_token_outside(ds, vocab_size)
        raise DataValidationError(
            f"{ds.prefix}: token id {value} in document {doc} (token {offset}) is outside the "
            f"tokenizer's vocabulary of {vocab_size} (ids in the data: {stats['min_id']}..{stats['max_id']})"
            + (f"; {other}" if other else "; was it tokenized with another --vocab-file / --tokenizer-model?"))
    if other:
        warn(f"warning: {other}; its ids fit this vocabulary, training goes on")
    return stats
