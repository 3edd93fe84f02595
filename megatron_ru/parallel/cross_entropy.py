"""Vocab-parallel cross entropy: the loss over logits split by vocabulary across TP ranks.

Each rank holds logits[..., vocab_start:vocab_end]. The softmax needs three all-reduces over
the TP group (max, target logit, sum of exponentials), never the full logits. Computed in fp32.
Targets equal to `ignore_index` give loss 0 and no gradient, like F.cross_entropy.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, ignore_index):
        in_dtype = logits.dtype
        logits = logits.float()  # (N, V_local)
        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)
        v_local = logits.size(-1)
        in_range = (target >= vocab_start) & (target < vocab_start + v_local)
        local_target = (target - vocab_start).masked_fill(~in_range, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(~in_range, 0.0)
        dist.all_reduce(target_logit, group=group)
        exp = shifted.exp_()  # reuse the buffer: shifted is not needed any more
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        valid = target != ignore_index
        loss = (sum_exp.log() - target_logit).masked_fill(~valid, 0.0)
        exp.div_(sum_exp.unsqueeze(-1))  # softmax, kept for backward
        ctx.save_for_backward(exp, in_range, local_target, valid)
        ctx.in_dtype = in_dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, in_range, local_target, valid = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -in_range.to(grad.dtype).unsqueeze(-1))
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group=None,
                                 vocab_start: int = 0,
                                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-token loss (fp32, shape of `target`) from this rank's vocabulary slice of the logits.
    With `group=None` (TP=1) this is F.cross_entropy(reduction="none")."""
    shape = target.shape
    flat_logits, flat_target = logits.reshape(-1, logits.size(-1)), target.reshape(-1)
    if group is None or dist.get_world_size(group) == 1:
        loss = F.cross_entropy(flat_logits.float(), flat_target, ignore_index=ignore_index,
                               reduction="none")
    else:
        loss = _VocabParallelCrossEntropy.apply(flat_logits, flat_target, group, vocab_start,
                                                ignore_index)
    return loss.view(shape)
