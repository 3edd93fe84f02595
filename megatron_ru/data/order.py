"""Our sample order: document / sample / shuffle index math for packing documents into samples (numpy only).

Three integer arrays (vectorised numpy, seconds for 10 M documents); data/gpt_dataset.py caches
them and serves samples from them:
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
the epoch count; data/megatron_order.py rebuilds that order; see the README.)
"""
import numpy as np

from ..errors import UsageError


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
