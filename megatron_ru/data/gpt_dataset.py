"""GPTDataset: packs documents into `seq_length + 1`-token samples via document/sample/shuffle indices.

Three integer arrays, built once (vectorised numpy, seconds for 10 M documents) and cached:
  doc_index      (E * n_docs,)   document ids in reading order: one seeded permutation per epoch
  sample_index   (N + 1, 2)      (position in doc_index, token offset) where sample i starts;
                                 sample i is the token stream [i*s, i*s + s] (s + 1 tokens, the
                                 last one shared with sample i + 1, as in Megatron)
  shuffle_index  (N,)            the order samples are served in; when the last epoch is needed
                                 for < 80 % of an epoch it is shuffled apart (Megatron's
                                 "separate final epoch") so earlier epochs stay complete
"""
import hashlib
import json
import os
import warnings

import numpy as np

from .indexed_dataset import IndexedDataset
from ..runtime import UsageError

INDEX_VERSION = 1  # bump when the index layout or algorithm changes: invalidates caches
SEPARATE_LAST_EPOCH_THRESHOLD = 0.8


class DatasetConfigError(UsageError):
    """Inconsistent dataset settings (flag values, sizes); the message names the flag or file."""


def num_epochs_needed(tokens_per_epoch, seq_length, num_samples):
    """Smallest E with E * tokens_per_epoch >= num_samples * seq_length + 1."""
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def build_doc_index(documents, num_epochs, rng):
    """One independent permutation of `documents` per epoch, concatenated: (E * n,) int32/int64."""
    documents = np.asarray(documents)
    dtype = np.int32 if documents.size == 0 or documents.max() < 2**31 - 1 else np.int64
    return np.concatenate([rng.permutation(documents).astype(dtype) for _ in range(num_epochs)])


def build_sample_index(sizes, doc_index, seq_length, num_samples):
    """Start (doc_index position, offset) of samples 0..N; row N marks where sample N-1 ends.

    The token stream is the documents in `doc_index` order; sample i starts at token i*s. A
    `searchsorted` on the cumulative document lengths finds each start without a Python loop.
    """
    lengths = np.asarray(sizes, dtype=np.int64)[doc_index]
    ends = np.cumsum(lengths)  # ends[k] = stream position just past doc_index[k]
    total = int(ends[-1]) if ends.size else 0
    if num_samples * seq_length + 1 > total:
        raise DatasetConfigError(f"{num_samples} samples of {seq_length + 1} tokens need "
                                 f"{num_samples * seq_length + 1} tokens, the stream has {total}")
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    pos = np.searchsorted(ends, starts, side="right")  # first doc ending after the start
    offsets = starts - np.where(pos > 0, ends[np.maximum(pos - 1, 0)], 0)
    return np.stack([pos, offsets], axis=1).astype(np.int64)


def build_shuffle_index(num_samples, num_full_epoch_samples, rng):
    """Permutation of samples; [0, full) and [full, N) are shuffled apart when they differ."""
    first = rng.permutation(num_full_epoch_samples).astype(np.int64)
    rest = num_full_epoch_samples + rng.permutation(num_samples - num_full_epoch_samples).astype(np.int64)
    return np.concatenate([first, rest])


def build_indices(sizes, documents, seq_length, num_samples, seed):
    """All three indices for `documents` (ids into `sizes`); see the module docstring.

    `num_samples=None` means one epoch's worth. Deterministic in (sizes, documents, seed).
    """
    documents = np.asarray(documents, dtype=np.int64)
    tokens_per_epoch = int(np.asarray(sizes, dtype=np.int64)[documents].sum())
    if tokens_per_epoch < seq_length + 1:
        raise DatasetConfigError(f"--seq-length {seq_length} needs {seq_length + 1} tokens per sample but "
                                 f"the data has only {tokens_per_epoch} tokens")
    per_epoch = (tokens_per_epoch - 1) // seq_length
    if num_samples is None:
        num_samples = per_epoch
    num_epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    rng = np.random.RandomState(seed % 2**32)
    doc_index = build_doc_index(documents, num_epochs, rng)
    sample_index = build_sample_index(sizes, doc_index, seq_length, num_samples)
    full = num_samples
    if num_epochs > 1:
        before_last = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        if num_samples - before_last < SEPARATE_LAST_EPOCH_THRESHOLD * per_epoch:
            full = before_last
    shuffle_index = build_shuffle_index(num_samples, full, rng)
    return doc_index, sample_index, shuffle_index, num_epochs


def _save_npy_atomic(path, array):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


class GPTDataset:
    """Fixed-length samples from a document range of one indexed dataset.

    `ds[i]` -> {"text": int64 array of seq_length + 1 tokens}. Indices are cached under
    `cache_path` (default `<data dir>/cache`) in files named by a hash of everything they depend
    on, written atomically, so concurrent ranks may build them at once and reruns load in ms.
    """

    def __init__(self, indexed, documents, *, name, seq_length, num_samples, seed, cache_path=None):
        self.indexed = indexed if isinstance(indexed, IndexedDataset) else IndexedDataset(indexed)
        self.name, self.seq_length, self.seed = name, seq_length, seed
        documents = np.asarray(documents, dtype=np.int64)
        if documents.size == 0:
            raise DatasetConfigError(f"the {name} split of {self.indexed.prefix} has no documents")
        self.description = {
            "class": "GPTDataset", "version": INDEX_VERSION, "prefix": os.path.abspath(self.indexed.prefix),
            "num_sequences": len(self.indexed), "num_tokens": self.indexed.num_tokens, "split": name,
            "documents": [int(documents[0]), int(documents[-1]) + 1, int(documents.size)],
            "seq_length": seq_length, "num_samples": num_samples, "seed": seed,
        }
        contiguous = documents[-1] - documents[0] + 1 == documents.size
        if not contiguous:  # a hand-picked document set: hash its members as well
            self.description["documents_md5"] = hashlib.md5(documents.tobytes()).hexdigest()
        self.doc_index, self.sample_index, self.shuffle_index = self._load_or_build(documents, cache_path)

    def _load_or_build(self, documents, cache_path):
        key = hashlib.md5(json.dumps(self.description, sort_keys=True).encode()).hexdigest()
        cache_dir = cache_path or os.path.join(os.path.dirname(os.path.abspath(self.indexed.prefix)), "cache")
        base = os.path.join(cache_dir, f"{os.path.basename(self.indexed.prefix)}-{self.name}-{key}")
        names = [f"{base}-{part}.npy" for part in ("doc_index", "sample_index", "shuffle_index")]
        if all(os.path.isfile(n) for n in names) and os.path.isfile(base + ".json"):
            self.loaded_from_cache = True
            with open(base + ".json") as f:
                self.num_epochs = json.load(f)["num_epochs"]
            return tuple(np.load(n, mmap_mode="r", allow_pickle=False) for n in names)
        self.loaded_from_cache = False
        try:
            doc_index, sample_index, shuffle_index, epochs = build_indices(
                self.indexed.sizes, documents, self.seq_length, self.description["num_samples"], self.seed)
        except DatasetConfigError as e:
            raise DatasetConfigError(f"{self.name} split of {self.indexed.prefix}: {e}") from None
        self.num_epochs = epochs
        try:
            os.makedirs(cache_dir, exist_ok=True)
            for n, arr in zip(names, (doc_index, sample_index, shuffle_index)):
                _save_npy_atomic(n, arr)
            with open(f"{base}.json.tmp-{os.getpid()}", "w") as f:
                json.dump(dict(self.description, num_epochs=epochs), f, indent=1)
            os.replace(f"{base}.json.tmp-{os.getpid()}", base + ".json")  # written last: marks complete
        except OSError as e:
            warnings.warn(f"cannot cache dataset indices in {cache_dir} ({e}); set --data-cache-path")
        return doc_index, sample_index, shuffle_index

    def __len__(self):
        return len(self.shuffle_index)

    def __getitem__(self, idx):
        j = int(self.shuffle_index[idx])
        (d0, o0), (d1, o1) = self.sample_index[j], self.sample_index[j + 1]
        if d0 == d1:
            tokens = self.indexed.get(int(self.doc_index[d0]), int(o0), int(o1 - o0 + 1))
        else:  # the sample spans documents d0..d1 of the stream
            parts = [self.indexed.get(int(self.doc_index[d0]), int(o0))]
            parts += [self.indexed.get(int(self.doc_index[d])) for d in range(d0 + 1, d1)]
            parts.append(self.indexed.get(int(self.doc_index[d1]), 0, int(o1 + 1)))
            tokens = np.concatenate(parts)
        return {"text": np.asarray(tokens, dtype=np.int64)}
