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
Each takes the process group explicitly; with a group of size 1 (or None) they are no-ops.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


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


# Summing the gradient of a replicated parameter is the copy's backward.
sum_grad_over_group = copy_to_region
