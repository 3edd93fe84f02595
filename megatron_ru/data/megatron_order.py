"""`--data-order megatron`: index math giving the sample order of Megatron-Core's GPTDataset + BlendedDataset.

Our default order (order.py, blended.py) differs from Megatron-Core's on purpose: one
document permutation per epoch and a low-discrepancy blend. This module rebuilds Megatron-Core's
arrays instead (written from its documented algorithms, megatron-core 0.16), so a run can move
between Megatron-LM and us without repeating or skipping data:

  document index  tile(split documents, E) as int32, ONE shuffle over all E epochs; when the last
                  epoch is needed for < int(0.8 * samples per epoch) samples, the first E - 1
                  epochs and the last one are shuffled separately
  sample index    (doc index position, offset) of each sample start, as helpers.build_sample_idx
  shuffle index   uint32 permutation of all samples (first E - 1 epochs and the last apart)
  blend           each prefix builds ceil(ceil(N * w) * 1.005) samples; the blend has
                  sum(ceil(N * w)) entries chosen greedily: sample i goes to the dataset with the
                  largest w * max(i, 1) - used (ties: lowest id), as helpers.build_blending_indices
One RandomState(seed) serves the document and shuffle indices of each dataset, in that order.
data/builder.py builds the datasets of this order from these arrays.
"""
import math

import numpy as np

from .order import DatasetConfigError, num_epochs_needed

SURPLUS = 0.005  # Megatron-Core's mid_level_dataset_surplus
THRESHOLD = 0.80


def _doc_index(documents, num_epochs, rng, separate_last):
    if separate_last and num_epochs > 1:
        return np.concatenate([_doc_index(documents, num_epochs - 1, rng, False),
                               _doc_index(documents, 1, rng, False)])
    index = np.tile(np.asarray(documents, dtype=np.int64), num_epochs).astype(np.int32)
    rng.shuffle(index)
    return index


def _sample_index(sizes, doc_index, seq_length, num_samples):
    """Rows 0..N: where each sample starts. Row j >= 1 is the document holding stream token j*s
    (the last token of sample j - 1); row 0 is (0, 0) even when that document is empty."""
    lengths = np.asarray(sizes, dtype=np.int64)[doc_index]
    ends = np.cumsum(lengths)
    starts = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
    pos = np.searchsorted(ends, starts, side="right")
    offsets = starts - np.where(pos > 0, ends[np.maximum(pos - 1, 0)], 0)
    rows = np.concatenate([np.zeros((1, 2), np.int64), np.stack([pos, offsets], axis=1)])
    big = max(doc_index.shape[0], int(np.max(sizes)) if len(sizes) else 0) > np.iinfo(np.int32).max
    return rows.astype(np.int64 if big else np.int32)


def _shuffle_index(first, total, rng):
    dtype = np.int64 if total >= np.iinfo(np.uint32).max - 1 else np.uint32
    head = np.arange(first, dtype=dtype)
    rng.shuffle(head)
    if first == total:
        return head
    tail = np.arange(first, total, dtype=dtype)
    rng.shuffle(tail)
    return np.concatenate([head, tail])


def build_indices(sizes, documents, seq_length, num_samples, seed):
    """(doc_index, sample_index, shuffle_index, epochs) as Megatron-Core's GPTDataset builds them
    (add_extra_token_to_sequence, drop_last_partial_sequence); `num_samples=None` = one epoch."""
    tokens = int(np.asarray(sizes, dtype=np.int64)[np.asarray(documents, dtype=np.int64)].sum())
    if tokens < seq_length + 1:
        raise DatasetConfigError(f"--seq-length {seq_length} needs {seq_length + 1} tokens per sample "
                                 f"but the data has only {tokens} tokens")
    epochs = 1 if num_samples is None else num_epochs_needed(tokens, seq_length, num_samples)
    separate = False
    if epochs > 1:
        sans_last = ((epochs - 1) * tokens - 1) // seq_length
        per_epoch = (tokens - 1) // seq_length
        separate = num_samples - sans_last < int(THRESHOLD * per_epoch)
    rng = np.random.RandomState(seed)
    doc_index = _doc_index(documents, epochs, rng, separate)
    total = (epochs * tokens - 1) // seq_length
    sample_index = _sample_index(sizes, doc_index, seq_length, total)
    shuffle_index = _shuffle_index(sans_last if separate else total, total, rng)
    return doc_index, sample_index, shuffle_index, epochs


def blend_indices(weights, size):
    """(dataset_index int16, dataset_sample_index int64) of Megatron's greedy blending."""
    weights = [float(w) for w in weights]
    used = [0] * len(weights)
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    for i in range(size):
        t = max(float(i), 1.0)
        best, best_err = 0, weights[0] * t - used[0]
        for d in range(1, len(weights)):
            err = weights[d] * t - used[d]
            if err > best_err:
                best, best_err = d, err
        dataset_index[i], sample_index[i] = best, used[best]
        used[best] += 1
    return dataset_index, sample_index


def split_ranges(fractions, num_documents):
    """[(begin, end)] document ranges per split: round(cumulative fraction x documents), or None
    for a split whose fraction is 0 (Megatron-Core's split matrix)."""
    cumulative = [0.0]
    for f in fractions:
        cumulative.append(cumulative[-1] + f)
    return [(int(round(lo * float(num_documents))), int(round(hi * float(num_documents))))
            if hi > lo else None for lo, hi in zip(cumulative[:-1], cumulative[1:])]


def sizes_per_dataset(weights, size, surplus=0.0):
    return [int(math.ceil(math.ceil(size * w) * (1 + surplus))) for w in weights]
