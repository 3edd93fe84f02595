"""Autograd functions that move activations in and out of a tensor-parallel region over a given group.

copy:    forward identity,          backward all-reduce   (entering a column-parallel layer)
reduce:  forward all-reduce,        backward identity     (leaving a row-parallel layer)
scatter: forward split last dim,    backward all-gather
gather:  forward all-gather last dim, backward split
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


def copy_to_region(x: torch.Tensor, group: Optional[object]) -> torch.Tensor:
    return x if _size(group) == 1 else _Copy.apply(x, group)


def reduce_from_region(x: torch.Tensor, group: Optional[object]) -> torch.Tensor:
    return x if _size(group) == 1 else _Reduce.apply(x, group)


def scatter_to_region(x: torch.Tensor, group: Optional[object]) -> torch.Tensor:
    return x if _size(group) == 1 else _Scatter.apply(x, group)


def gather_from_region(x: torch.Tensor, group: Optional[object]) -> torch.Tensor:
    return x if _size(group) == 1 else _Gather.apply(x, group)
