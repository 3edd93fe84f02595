"""Megatron's memory-mapped indexed dataset (`PREFIX.bin` + `PREFIX.idx`): reader and writer.

Layout of `PREFIX.idx` (all little-endian), identical to Megatron-LM's `_IndexWriter`:
    b"MMIDIDX\\x00\\x00"  9-byte magic
    <Q  version = 1
    <B  dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
    <Q  sequence count S
    <Q  document-index count D (= number of documents + 1; it starts with 0)
    int32[S]  sequence lengths (tokens)
    int64[S]  sequence pointers (byte offsets into .bin)
    int64[D]  document index: sequence ranges [doc_idx[i], doc_idx[i+1]) form document i
    (int8[S]  sequence modes, only in Megatron's multimodal files; tolerated, ignored)
`PREFIX.bin` is the tokens of all sequences back to back in the dtype above.
"""
import faulthandler
import os
import struct
import sys
import weakref

import numpy as np

from ..errors import UsageError
from ..files import commit, discard, temp_sibling

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
               6: np.float64, 7: np.float32, 8: np.uint16}
CODE_OF_DTYPE = {np.dtype(t): c for c, t in DTYPE_CODES.items()}
_HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # 34 bytes


class IndexedDatasetError(UsageError):
    """A .bin/.idx pair is missing, truncated or not in Megatron's mmap format; names the file."""


def best_fitting_dtype(vocab_size):
    """uint16 when every id fits (Megatron's rule: vocab < 65500), else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def data_file_path(prefix):
    return prefix + ".bin"


def index_file_path(prefix):
    return prefix + ".idx"


def dataset_exists(prefix):
    return os.path.isfile(data_file_path(prefix)) and os.path.isfile(index_file_path(prefix))


def write_index(idx_path, sizes, document_indices, dtype):
    """Writes an .idx file from per-sequence sizes and the document index (starting with 0)."""
    sizes = np.asarray(sizes, dtype=np.int32)
    document_indices = np.asarray(document_indices, dtype=np.int64)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(len(sizes), dtype=np.int64)
    np.cumsum(sizes[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    with open(idx_path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", CODE_OF_DTYPE[np.dtype(dtype)]))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(document_indices)))
        f.write(sizes.astype("<i4").tobytes(order="C"))
        f.write(pointers.astype("<i8").tobytes(order="C"))
        f.write(document_indices.astype("<i8").tobytes(order="C"))


class IndexedDatasetBuilder:
    """Streams token arrays into `PREFIX.bin` and writes `PREFIX.idx` on `finalize`.

    Writes go to temporary names that are renamed only by `finalize`, so an interrupted run never
    leaves a half-written pair; `abort` (or leaving a `with` block by an exception) deletes them.
    """

    def __init__(self, prefix, dtype=np.int32):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise IndexedDatasetError(f"dtype {self.dtype} has no Megatron code")
        self._bin_tmp = temp_sibling(data_file_path(prefix))
        self._idx_tmp = temp_sibling(index_file_path(prefix))
        self._bin = open(self._bin_tmp, "wb")
        self.sizes = []
        self.document_indices = [0]

    def _as_dtype(self, tokens):
        arr = np.asarray(tokens)
        if arr.dtype != self.dtype and arr.size and np.issubdtype(self.dtype, np.integer):
            info = np.iinfo(self.dtype)
            if arr.min() < info.min or arr.max() > info.max:
                raise IndexedDatasetError(f"token id out of range for {self.dtype} while writing {self.prefix}")
        return arr.astype(self.dtype, copy=False)

    def add_document(self, tokens, lengths=None):
        """Appends one document; `lengths` splits it into several sequences (default: one)."""
        arr = self._as_dtype(tokens)
        self._bin.write(arr.tobytes(order="C"))
        self.sizes.extend([arr.size] if lengths is None else list(lengths))
        self.document_indices.append(len(self.sizes))

    def add_documents(self, tokens, lengths, empty_documents=False):
        """Appends many one-sequence documents at once: `tokens` back to back, `lengths` each.
        `empty_documents`: a length 0 is an empty document with no sequence, as Megatron's
        preprocess_data.py writes one (a repeated document-index entry; .bin unchanged)."""
        self._bin.write(self._as_dtype(tokens).tobytes(order="C"))
        start = len(self.sizes)
        lengths = np.asarray(lengths, dtype=np.int64)
        if empty_documents:
            self.sizes.extend(lengths[lengths > 0].tolist())
            self.document_indices.extend((start + np.cumsum(lengths > 0)).tolist())
            return
        self.sizes.extend(lengths.tolist())
        self.document_indices.extend(range(start + 1, len(self.sizes) + 1))

    def add_index(self, other_prefix):
        """Appends a whole existing dataset (same dtype), e.g. to merge per-worker shards."""
        other = IndexedDataset(other_prefix)
        if other.dtype != self.dtype:
            raise IndexedDatasetError(f"{other_prefix} has dtype {other.dtype}, expected {self.dtype}")
        offset = len(self.sizes)
        self.sizes.extend(other.sizes.tolist())
        self.document_indices.extend((other.document_indices[1:] + offset).tolist())
        with open(data_file_path(other_prefix), "rb") as f:
            while chunk := f.read(1 << 24):
                self._bin.write(chunk)

    def finalize(self):
        self._bin.close()
        write_index(self._idx_tmp, self.sizes, self.document_indices, self.dtype)
        commit(self._bin_tmp, data_file_path(self.prefix))
        commit(self._idx_tmp, index_file_path(self.prefix))

    def abort(self):
        self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp):
            discard(path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finalize()
        else:
            self.abort()
        return False


def _check_dtype_fits(idx_path, bin_path, code, tokens, bin_size):
    """A .bin too short for the token count at the index's dtype but exactly right at a narrower
    one: the .idx dtype byte (or the pairing of the files) is wrong; say so rather than 'truncated'.
    (A .bin too long is left to data/validate.py, which reports a narrower dtype code.)"""
    itemsize = np.dtype(DTYPE_CODES[code]).itemsize
    if not tokens or bin_size >= tokens * itemsize or bin_size % tokens:
        return
    fits = [f"{c} ({np.dtype(t).name})" for c, t in DTYPE_CODES.items()
            if c != code and np.dtype(t).itemsize * tokens == bin_size]
    if fits:
        raise IndexedDatasetError(
            f"{idx_path}: dtype code {code} ({np.dtype(DTYPE_CODES[code]).name}, {itemsize} bytes per token) "
            f"disagrees with the size of {bin_path}: {tokens} tokens need {tokens * itemsize} bytes, the file "
            f"has {bin_size} = {bin_size // tokens} bytes per token (dtype code {' or '.join(fits)}); the "
            "index's dtype byte is wrong or the .bin belongs to another index")


class FileWatch:
    """(size, mtime_ns, inode) of files recorded when opened, re-checked with os.fstat on demand
    (about a microsecond per file): a memory-mapped file truncated or rewritten under a run would
    otherwise end it with a bare SIGBUS (or feed it other tokens). Picklable: the descriptors are
    reopened by path in a new process."""

    def __init__(self, paths):
        self.paths = list(paths)
        self._fds = [os.open(p, os.O_RDONLY) for p in self.paths]
        self.stamps = [self._stamp(os.fstat(fd)) for fd in self._fds]
        self._finalizer = weakref.finalize(self, _close_all, list(self._fds))
        _enable_faulthandler()

    @staticmethod
    def _stamp(st):
        return st.st_size, st.st_mtime_ns, st.st_ino

    def check(self):
        if self._fds is None:  # unpickled in another process
            self._fds = [os.open(p, os.O_RDONLY) for p in self.paths]
            self._finalizer = weakref.finalize(self, _close_all, list(self._fds))
        for path, fd, stamp in zip(self.paths, self._fds, self.stamps):
            now = self._stamp(os.fstat(fd))
            if now != stamp:
                what = (f"size {stamp[0]} → {now[0]} bytes" if now[0] != stamp[0]
                        else "rewritten in place, same size")
                raise IndexedDatasetError(
                    f"{path} changed under the run ({what}): a memory-mapped data file must stay as "
                    "it was when the run opened it; restore it, or restart the run on the new data")

    def __getstate__(self):
        return {"paths": self.paths, "stamps": self.stamps, "_fds": None, "_finalizer": None}


def _close_all(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _enable_faulthandler():
    """Last resort for the race the check cannot close (a file cut while a sample is copied): a
    SIGBUS then prints the Python stack, naming this module, instead of only 'Bus error'."""
    if not faulthandler.is_enabled():
        try:
            faulthandler.enable(file=sys.__stderr__)
        except (AttributeError, ValueError, RuntimeError, OSError):
            pass


class IndexedDataset:
    """Read-only, memory-mapped view of a Megatron `.bin/.idx` pair; `ds[i]` is sequence i."""

    def __init__(self, prefix):
        self.prefix = prefix
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise IndexedDatasetError(f"dataset file not found: {path} "
                                          f"(prefix {prefix!r} needs both .bin and .idx)")
        idx_size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            header = f.read(_HEADER_SIZE)
        if len(header) < _HEADER_SIZE or header[:len(MAGIC)] != MAGIC:
            raise IndexedDatasetError(f"{idx_path} is not a Megatron mmap index (bad magic {header[:9]!r})")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != VERSION:
            raise IndexedDatasetError(f"{idx_path} has index version {version}, expected {VERSION}")
        code = header[17]
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{idx_path} has unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        n_seq, n_doc = struct.unpack("<QQ", header[18:34])
        expected = _HEADER_SIZE + n_seq * (4 + 8) + n_doc * 8
        if idx_size not in (expected, expected + n_seq):  # + n_seq: Megatron multimodal modes
            raise IndexedDatasetError(f"{idx_path} is truncated or corrupt: {idx_size} bytes, "
                                      f"expected {expected} for {n_seq} sequences and {n_doc} document entries")
        self._idx = np.memmap(idx_path, mode="r", dtype=np.uint8)
        off = _HEADER_SIZE
        self.sizes = np.frombuffer(self._idx, dtype="<i4", count=n_seq, offset=off)
        self.pointers = np.frombuffer(self._idx, dtype="<i8", count=n_seq, offset=off + 4 * n_seq)
        self.document_indices = np.frombuffer(self._idx, dtype="<i8", count=n_doc, offset=off + 12 * n_seq)
        tokens = int(self.sizes.sum(dtype=np.int64))
        total_bytes = tokens * self.dtype.itemsize
        bin_size = os.path.getsize(bin_path)
        _check_dtype_fits(idx_path, bin_path, code, tokens, bin_size)
        if bin_size < total_bytes:
            raise IndexedDatasetError(f"{bin_path} is truncated: {bin_size} bytes, index {idx_path} "
                                      f"needs {total_bytes}")
        self._watch = FileWatch([idx_path, bin_path])
        # np.memmap refuses empty files; an empty dataset gets an empty array instead.
        self._bin = np.memmap(bin_path, mode="r", dtype=self.dtype) if bin_size else np.empty(0, self.dtype)

    def __len__(self):
        return len(self.sizes)

    @property
    def num_tokens(self):
        return int(self.sizes.sum(dtype=np.int64))

    @property
    def tokens(self):
        """The whole .bin as one read-only array (memory-mapped; sequences back to back)."""
        return self._bin

    def get(self, idx, offset=0, length=None):
        """Tokens [offset, offset+length) of sequence `idx` as a view (no copy); first checks that
        neither file changed since it was opened (a truncated memory map would kill the process)."""
        self._watch.check()
        start = int(self.pointers[idx]) // self.dtype.itemsize + offset
        size = int(self.sizes[idx]) - offset if length is None else length
        return self._bin[start:start + size]

    def __getitem__(self, idx):
        return self.get(idx)

    def document(self, doc):
        """All tokens of document `doc` (its sequences concatenated)."""
        self._watch.check()
        lo, hi = self.document_indices[doc], self.document_indices[doc + 1]
        return np.concatenate([self.get(i) for i in range(lo, hi)]) if hi > lo else self._bin[:0]
