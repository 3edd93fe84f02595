"""Autograd functions that move activations in and out of a tensor-parallel region over a given group.

copy:    forward identity,          backward all-reduce   (entering a column-parallel layer)
reduce:  forward all-reduce,        backward identity     (leaving a row-parallel layer)
scatter: forward split last dim,    backward all-gather
gather:  forward all-gather last dim, backward split
Sequence parallelism (Megatron's --sequence-parallel; activations (B, T, H), sequence = dim 1):
gather_from_sequence:         forward all-gather T,     backward reduce-scatter T (entering a
                              column-parallel layer whose input is split along the sequence)
reduce_scatter_to_sequence:   forward reduce-scatter T, backward all-gather T (leaving a
                              row-parallel layer / the vocab-parallel embedding)
scatter_to_sequence:          forward split T,          backward all-gather T (a replicated
                              activation, e.g. learned position embeddings, cut to the shard)
sum_grad_over_group:          forward identity, backward all-reduce: a replicated parameter used on
                              a sequence shard (norms, row-parallel biases) gets the whole
                              sequence's gradient on every rank -- the same number everywhere.
gather_sequence_linear:       gather_from_sequence followed by F.linear, in one function that keeps
                              only the (B, T/world, H) shard for backward and all-gathers it again
                              there for the weight gradient (Megatron-LM's way: one more
                              all-gather per layer, 1/world of the input's memory)
Each takes the process group explicitly; with a group of size 1 (or None) they are no-ops.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    world = _size(group)
    return torch.chunk(x, world, dim=-1)[dist.get_rank(group)].contiguous()


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    world = _size(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


SEQ_DIM = 1  # activations are (B, T, H)


def _split_seq(x: torch.Tensor, group) -> torch.Tensor:
    return torch.chunk(x, _size(group), dim=SEQ_DIM)[dist.get_rank(group)].contiguous()


def _gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=SEQ_DIM)  # (B, T_local * world, H)


def _reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    world = _size(group)
    if x.shape[SEQ_DIM] % world:
        raise ValueError(f"sequence length {x.shape[SEQ_DIM]} is not divisible by the "
                         f"tensor-parallel size {world} (sequence parallelism)")
    chunks = [c.contiguous() for c in torch.chunk(x, world, dim=SEQ_DIM)]  # world x (B, T/world, H)
    out = torch.empty_like(chunks[0])
    dist.reduce_scatter(out, chunks, group=group)
    return out


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq(grad, ctx.group), None


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


class _ScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


class _GatherSeqLinear(torch.autograd.Function):
    """y = all_gather_T(x) W^T + b, saving x (B, T/world, H) rather than the gathered (B, T, H)."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.group, ctx.bias_dtype = group, None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight)
        return F.linear(_gather_seq(x, group), weight, bias)  # (B, T, out_local)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if need_x:  # (B, T, out_local) @ (out_local, H) → (B, T, H) partial sums → this rank's shard
            grad_x = _reduce_scatter_seq(grad.matmul(weight.to(grad.dtype)), ctx.group).to(x.dtype)
        if need_w:  # gather the shard again: the weight sees the whole sequence
            x_full = _gather_seq(x, ctx.group).to(grad.dtype)  # (B, T, H)
            grad_w = grad.reshape(-1, grad.shape[-1]).t().mm(x_full.reshape(-1, x_full.shape[-1]))
            grad_w = grad_w.to(weight.dtype)  # (out_local, H)
        if need_b and ctx.bias_dtype is not None:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None


def copy_to_region(x: torch.Tensor, group: Optional[object]) -> torch.Tensor:
    return x if _size(group) == 1 else _Copy.apply(x, group)


def reduce_from_region(x: torch.Tensor, group: Optional[object]) -> torch.Tensor:
    return x if _size(group) == 1 else _Reduce.apply(x, group)


def scatter_to_region(x: torch.Tensor, group: Optional[object]) -> torch.Tensor:
    return x if _size(group) == 1 else _Scatter.apply(x, group)


def gather_from_region(x: torch.Tensor, group: Optional[object]) -> torch.Tensor:
    return x if _size(group) == 1 else _Gather.apply(x, group)


def gather_from_sequence(x: torch.Tensor, group: Optional[object]) -> torch.Tensor:
    """(B, T/world, H) on every rank → (B, T, H); the backward reduce-scatters the gradient."""
    return x if _size(group) == 1 else _GatherSeq.apply(x, group)


def reduce_scatter_to_sequence(x: torch.Tensor, group: Optional[object]) -> torch.Tensor:
    """Partial sums (B, T, H) → this rank's sequence shard of their sum (B, T/world, H)."""
    return x if _size(group) == 1 else _ReduceScatterSeq.apply(x, group)


def scatter_to_sequence(x: torch.Tensor, group: Optional[object]) -> torch.Tensor:
    """(B, T, H), the same on every rank → this rank's shard (B, T/world, H); the backward
    all-gathers, so whatever produced x gets the whole sequence's gradient on every rank."""
    return x if _size(group) == 1 else _ScatterSeq.apply(x, group)


def gather_sequence_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           group: Optional[object]) -> torch.Tensor:
    """F.linear(gather_from_sequence(x, group), weight, bias) for x (B, T/world, H), keeping only x
    for backward (not the gathered input); pass the weight in use (ZeRO-3 gathers it per forward)."""
    if _size(group) == 1:
        return F.linear(x, weight, bias)
    return _GatherSeqLinear.apply(x, weight, bias, group)


# Summing the gradient of a replicated parameter is the copy's backward.
sum_grad_over_group = copy_to_region
