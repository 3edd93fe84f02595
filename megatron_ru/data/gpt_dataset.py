"""GPTDataset: serves `seq_length + 1`-token samples of one split from cached document/sample/shuffle indices.

The index math lives per order: data/order.py (ours, the default) and data/megatron_order.py
(`--data-order megatron`). This module picks the order's `build_indices`, caches its three arrays
next to the data, and reads samples through them.
"""
import hashlib
import json
import os
import warnings

import numpy as np

from ..files import atomic_open
from .indexed_dataset import IndexedDataset
from .megatron_order import build_indices as build_megatron_indices
from .order import DatasetConfigError, build_indices

INDEX_VERSION = 2  # bump when the index layout or algorithm changes: invalidates caches


def _save_npy_atomic(path, array):
    with atomic_open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


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
            build = build_megatron_indices if self.description.get("order") == "megatron" else build_indices
            doc_index, sample_index, shuffle_index, epochs = build(
                self.indexed.sizes, documents, self.seq_length, self.description["num_samples"], self.seed)
        except DatasetConfigError as e:
            raise DatasetConfigError(f"{self.name} split of {self.indexed.prefix}: {e}") from None
        self.num_epochs = epochs
        try:
            os.makedirs(cache_dir, exist_ok=True)
            for n, arr in zip(names, (doc_index, sample_index, shuffle_index)):
                _save_npy_atomic(n, arr)
            with atomic_open(base + ".json") as f:  # written last: marks complete
                json.dump(dict(self.description, num_epochs=epochs), f, indent=1)
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
