"""GPTDataset: packs documents into `seq_length + 1`-token samples via document/sample/shuffle indices.

Three integer arrays, built once (vectorised numpy, seconds for 10 M documents) and cached:
  doc_index      (E * n_docs,)   document ids in reading order: one seeded permutation per epoch
  sample_index   (M + 1, 2)      (position in doc_index, token offset) where sample i starts;
                                 sample i is the token stream [i*s, i*s + s] (s + 1 tokens, the
                                 last one shared with sample i + 1, as in Megatron)
  shuffle_index  (N,)            the order samples are served in

The order extends: epoch e's document permutation and the shuffle of its samples ("block" e:
the samples whose last token lies in epoch e) are seeded by (seed, e) alone, and blocks are
served one after another. So the first K samples never depend on how many are asked for
(`--train-iters`): a longer run sees the shorter run's samples first, in the same order, across
epoch boundaries too. (Megatron shuffles all full epochs together, so its order changes with
the epoch count; see the README.)
"""
import hashlib
import json
import os
import warnings

import numpy as np

from .indexed_dataset import IndexedDataset
from ..errors import UsageError

INDEX_VERSION = 2  # bump when the index layout or algorithm changes: invalidates caches


class DatasetConfigError(UsageError):
    """Inconsistent dataset settings (flag values, sizes); the message names the flag or file."""


def block_ends(tokens_per_epoch, seq_length, num_epochs):
    """cum[e] = samples in blocks 0..e = samples whose last token lies in epochs 0..e."""
    e = np.arange(1, num_epochs + 1, dtype=np.int64)
    return (e * tokens_per_epoch - 1) // seq_length


def num_epochs_needed(tokens_per_epoch, seq_length, num_samples):
    """Smallest E whose blocks 0..E-1 hold at least `num_samples` samples."""
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def _epoch_rng(seed, epoch, stream):
    return np.random.default_rng([seed % 2**32, epoch, stream])


def build_doc_index(documents, num_epochs, seed):
    """One independent permutation of `documents` per epoch, seeded by (seed, epoch): (E * n,)."""
    documents = np.asarray(documents)
    dtype = np.int32 if documents.size == 0 or documents.max() < 2**31 - 1 else np.int64
    return np.concatenate([_epoch_rng(seed, e, 0).permutation(documents).astype(dtype)
                           for e in range(num_epochs)])


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


def build_shuffle_index(cum, num_samples, seed):
    """Blocks served in order, each shuffled by its own (seed, epoch) stream; first N kept."""
    parts, lo = [], 0
    for e, hi in enumerate(cum):
        parts.append(lo + _epoch_rng(seed, e, 1).permutation(int(hi - lo)).astype(np.int64))
        lo = int(hi)
    return np.concatenate(parts)[:num_samples]


def build_indices(sizes, documents, seq_length, num_samples, seed):
    """All three indices for `documents` (ids into `sizes`); see the module docstring.

    `num_samples=None` means one epoch's worth. Deterministic in (sizes, documents, seed), and
    the first K entries of the order do not depend on `num_samples`.
    """
    documents = np.asarray(documents, dtype=np.int64)
    tokens_per_epoch = int(np.asarray(sizes, dtype=np.int64)[documents].sum())
    if tokens_per_epoch < seq_length + 1:
        raise DatasetConfigError(f"--seq-length {seq_length} needs {seq_length + 1} tokens per sample but "
                                 f"the data has only {tokens_per_epoch} tokens")
    if num_samples is None:
        num_samples = (tokens_per_epoch - 1) // seq_length
    num_epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    cum = block_ends(tokens_per_epoch, seq_length, num_epochs)
    doc_index = build_doc_index(documents, num_epochs, seed)
    sample_index = build_sample_index(sizes, doc_index, seq_length, int(cum[-1]))
    shuffle_index = build_shuffle_index(cum, num_samples, seed)
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

    def __init__(self, indexed, documents, *, name, seq_length, num_samples, seed, cache_path=None,
                 order="ours"):
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
        if order != "ours":  # --data-order megatron (data/megatron_order.py)
            self.description["order"] = order
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
            build = build_indices
            if self.description.get("order") == "megatron":
                from .megatron_order import build_indices as build
            doc_index, sample_index, shuffle_index, epochs = build(
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
