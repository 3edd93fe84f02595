"""From samples to model inputs: data-parallel sampler, collate, and tokens/labels/masks/positions.

The sampler walks the (already shuffled) dataset in order, starting at `consumed_samples`, and
gives data-parallel rank r the r-th micro-batch of every `micro_batch_size * dp_size` indices:
shards are disjoint and resuming from a consumed-sample count replays exactly the same batches.
"""
import numpy as np
import torch


class DataParallelSampler:
    """Batch sampler: yields lists of `micro_batch_size` dataset indices for one DP rank."""

    def __init__(self, total_samples, consumed_samples, micro_batch_size, dp_rank, dp_size, drop_last=True):
        if total_samples <= 0:
            raise ValueError(f"no samples to consume (total_samples={total_samples})")
        if micro_batch_size <= 0:
            raise ValueError(f"--micro-batch-size must be positive, got {micro_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"data-parallel rank {dp_rank} is outside [0, {dp_size})")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(f"consumed_samples {consumed_samples} is outside [0, {total_samples}]")
        self.total_samples, self.consumed_samples = total_samples, consumed_samples
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.drop_last = drop_last

    def __len__(self):
        """Micro-batches this rank will yield."""
        step = self.micro_batch_size * self.dp_size
        remaining = self.total_samples - self.consumed_samples
        full, rest = divmod(remaining, step)
        if self.drop_last or rest <= self.dp_rank * self.micro_batch_size:
            return full
        return full + 1

    def __iter__(self):
        step = self.micro_batch_size * self.dp_size
        lo = self.dp_rank * self.micro_batch_size
        for start in range(self.consumed_samples, self.total_samples, step):
            end = min(start + step, self.total_samples)
            if end - start < step and self.drop_last:
                return
            batch = list(range(start + lo, min(start + lo + self.micro_batch_size, end)))
            if batch:
                yield batch


def collate(samples):
    """List of sample dicts -> dict of stacked int64 tensors (B, ...)."""
    return {k: torch.as_tensor(np.stack([np.asarray(s[k]) for s in samples])) for k in samples[0]}


def build_data_loader(dataset, *, consumed_samples, micro_batch_size, dp_rank, dp_size, num_workers=0,
                      seed=0):
    """A torch DataLoader over `dataset` for one DP rank, resumable from `consumed_samples`.
    It has its own generator: creating its iterator must not draw from the global RNG, or a
    resumed run would see other dropout masks than an uninterrupted one."""
    sampler = DataParallelSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       collate_fn=collate, pin_memory=False,
                                       generator=torch.Generator().manual_seed(seed))


def get_batch(text, eod, *, eod_mask_loss=False, reset_position_ids=False, reset_attention_mask=False):
    """(B, S + 1) token ids -> model inputs, with Megatron's semantics for the three EOD flags.

    Returns tokens (B, S), labels (B, S) = tokens shifted by one, loss_mask (B, S) float,
    position_ids (B, S) int64 and attention_mask: None (plain causal) unless
    `reset_attention_mask`, then a (B, 1, S, S) bool tensor, True = masked out (Megatron's
    convention), that also forbids attending across an EOD.
    eod_mask_loss: drop the loss where the *input* token is EOD (the first token of the next
    document cannot be predicted). reset_position_ids: positions restart after every EOD.
    """
    text = torch.as_tensor(text, dtype=torch.long)
    tokens, labels = text[:, :-1].contiguous(), text[:, 1:].contiguous()
    batch, seq = tokens.shape
    is_eod = tokens == eod  # (B, S)
    loss_mask = torch.ones(batch, seq, dtype=torch.float32)
    if eod_mask_loss:
        loss_mask[is_eod] = 0.0
    arange = torch.arange(seq, dtype=torch.long).expand(batch, seq)
    # doc_start[b, j]: first position of the document containing j (the EOD ends its own doc).
    after_eod = torch.zeros_like(arange)
    after_eod[:, 1:] = torch.where(is_eod[:, :-1], arange[:, 1:], 0)
    doc_start = torch.cummax(after_eod, dim=1).values
    position_ids = arange - doc_start if reset_position_ids else arange.clone()
    attention_mask = None
    if reset_attention_mask:
        doc_id = torch.cumsum(is_eod.long(), dim=1) - is_eod.long()  # (B, S)
        causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool))  # (S, S)
        same_doc = doc_id[:, :, None] == doc_id[:, None, :]  # (B, S, S)
        attention_mask = ~(causal & same_doc)[:, None]  # (B, 1, S, S), True = masked
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
            "position_ids": position_ids, "attention_mask": attention_mask}


def context_parallel_slice(batch: dict, cp_rank: int, cp_size: int) -> dict:
    """`get_batch`'s output → context-parallel rank `cp_rank`'s consecutive 1/cp_size of every
    sequence: tokens, labels, loss_mask and (global) position_ids (B, S / cp_size). The model's
    loss averages over the whole sequences (parallel/context.py)."""
    if cp_size == 1:
        return batch
    if batch.get("attention_mask") is not None:
        raise ValueError("context parallelism does not take an attention mask (--reset-attention-mask)")
    seq = batch["tokens"].shape[1]
    if seq % cp_size:
        raise ValueError(f"sequence length {seq} is not divisible by context_parallel_size={cp_size}")
    part = seq // cp_size
    out = {k: v[:, cp_rank * part:(cp_rank + 1) * part].contiguous()
           for k, v in batch.items() if k != "attention_mask"}
    out["attention_mask"] = None
    return out
