"""Weighted blending of datasets (our low-discrepancy order) and `--data-path` / `--split` parsing.

Blending is deterministic and low-discrepancy: the k-th sample of dataset d is "due" at time
(k + 1/2) / w_d; merging all due times in order gives, after any n samples, a count per dataset
within (D + 1) / 2 of w_d * n, so every window of the blend matches the weights to +-(D + 1)
samples. It is one vectorised sort, no Python loop per sample. data/builder.py puts the
train/valid/test datasets together from these parts.
"""
import math

import numpy as np

from .indexed_dataset import dataset_exists
from .order import DatasetConfigError

SPLIT_NAMES = ("train", "valid", "test")


def parse_data_path(data_path):
    """`["0.85", "ru", "0.15", "en"]` or `["ru"]` -> [(weight, prefix)] with weights normalised."""
    if isinstance(data_path, str):
        data_path = data_path.split()
    items = list(data_path)
    if not items:
        raise DatasetConfigError("--data-path is empty")
    if all(isinstance(x, (tuple, list)) for x in items):
        pairs = [(float(w), str(p)) for w, p in items]
    elif len(items) == 1:
        pairs = [(1.0, str(items[0]))]
    else:
        if len(items) % 2:
            raise DatasetConfigError(f"--data-path needs 'WEIGHT PREFIX' pairs, got {len(items)} items: {items}")
        pairs = []
        for w, p in zip(items[::2], items[1::2]):
            try:
                pairs.append((float(w), str(p)))
            except ValueError:
                raise DatasetConfigError(f"--data-path weight {w!r} (before {p!r}) is not a number") from None
    weights = [w for w, _ in pairs]
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise DatasetConfigError(f"--data-path weights must be non-negative and sum to a positive number, "
                                 f"got {weights}")
    for _, prefix in pairs:
        if not dataset_exists(prefix):
            raise DatasetConfigError(f"--data-path prefix {prefix!r} does not exist "
                                     f"(need {prefix}.bin and {prefix}.idx)")
    total = sum(weights)
    return [(w / total, p) for w, p in pairs if w > 0]


def parse_split(split):
    """`"969,30,1"` (or `"0.9/0.1"`, `"100"`) -> three fractions summing to 1."""
    try:
        parts = [float(x) for x in str(split).replace("/", ",").split(",") if x.strip()]
    except ValueError:
        raise DatasetConfigError(f"--split {split!r} must be comma-separated numbers like 969,30,1") from None
    parts = (parts + [0.0, 0.0, 0.0])[:3]
    if len(str(split).replace("/", ",").split(",")) > 3 or any(x < 0 for x in parts) or sum(parts) <= 0:
        raise DatasetConfigError(f"--split {split!r} must be up to three non-negative numbers with a positive sum")
    total = sum(parts)
    return [x / total for x in parts]


def split_boundaries(fractions, num_documents):
    """Document boundaries [0, a, b, n] as Megatron-Core rounds them: round(cumulative fraction
    x documents), e.g. 90,5,5 over 389 documents -> [0, 350, 370, 389]."""
    bounds, cumulative = [0], 0.0
    for f in fractions:
        cumulative += f
        bounds.append(int(round(cumulative * float(num_documents))))
    bounds[-1] = num_documents  # the fractions sum to 1 up to float rounding
    return bounds


def build_blend_indices(weights, size):
    """(dataset_index[size], dataset_sample_index[size]) interleaving datasets by `weights`."""
    weights = np.asarray(weights, dtype=np.float64)
    weights = weights / weights.sum()
    num = len(weights)
    times, ids, ks = [], [], []
    for d, w in enumerate(weights):
        if w <= 0:
            continue
        k = np.arange(int(math.ceil(w * size)) + num + 1, dtype=np.int64)
        times.append((k + 0.5) / w)
        ids.append(np.full(k.size, d, dtype=np.int16))
        ks.append(k)
    times, ids, ks = np.concatenate(times), np.concatenate(ids), np.concatenate(ks)
    order = np.lexsort((ids, times))[:size]  # by due time, ties by dataset id
    return ids[order], ks[order]


def blend_sample_counts(weights, size):
    """Samples each dataset must provide for a blend of `size` (exact upper bound of the scheme)."""
    return [int(math.ceil(w * size)) + len(weights) + 1 if w > 0 else 0 for w in weights]


class BlendedDataset:
    """Serves `size` samples drawn from `datasets` in the proportions of `weights`."""

    def __init__(self, datasets, weights, size):
        self.datasets, self.weights, self.size = datasets, list(weights), size
        self.dataset_index, self.dataset_sample_index = build_blend_indices(self.weights, size)
        for d, ds in enumerate(datasets):
            used = int((self.dataset_index == d).sum())
            if used and len(ds) <= int(self.dataset_sample_index[self.dataset_index == d].max()):
                raise DatasetConfigError(f"dataset {d} has {len(ds)} samples, the blend needs {used}")

    def __len__(self):
        return self.size

    def __getitem__(self, idx):
        d = int(self.dataset_index[idx])
        sample = dict(self.datasets[d][int(self.dataset_sample_index[idx])])
        sample["dataset_id"] = np.int64(d)
        return sample
