"""Context parallelism (Ulysses): all-to-all between sequence-split and head-split attention inputs.

Each of the C context-parallel ranks holds S/C consecutive tokens of every sequence (CP rank c:
tokens c*S/C .. (c+1)*S/C - 1) everywhere except inside core attention. Before attention, one
all-to-all turns q / k / v from (B, H_local, S/C, D) into (B, H_local/C, S, D): every rank then
attends over the whole sequence for its share of the heads (CP rank c: local heads
c*H_local/C .. (c+1)*H_local/C - 1, and the same share of the KV heads), and a second all-to-all
turns the output back. Both are autograd functions whose backward is the opposite all-to-all
(the design of DeepSpeed's `DistributedAttention`; the code here is our own).

The loss is the mean over the whole sequence: `sequence_mean` sums each rank's slice over the CP
group. DeepSpeed averages gradients over DP x CP ranks (ParallelState's `mpu` group), so each CP
rank's share of the gradient is scaled by C in the backward of that sum: the average then equals
the gradient of the full-sequence mean, as at CP = 1.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import ConfigError
from .state import ParallelState


def _all_to_all(x: torch.Tensor, group, world: int, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split `x` into `world` chunks along scatter_dim, send chunk j to rank j of `group`, and
    concatenate the chunks received (in rank order) along gather_dim."""
    send = torch.stack(x.chunk(world, dim=scatter_dim)).contiguous()  # (C, ..., n/C, ...)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, world, scatter_dim, gather_dim):
        ctx.args = (group, world, gather_dim, scatter_dim)  # the backward's: the opposite exchange
        return _all_to_all(x, group, world, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, *ctx.args), None, None, None, None


def sequence_to_heads(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """(B, H_local, S/C, D) sequence slice of all local heads → (B, H_local/C, S, D) whole
    sequence of this CP rank's heads."""
    return _AllToAll.apply(x, ps.cp_group, ps.cp_size, 1, 2)


def heads_to_sequence(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """(B, H_local/C, S, D) → (B, H_local, S/C, D): the inverse of `sequence_to_heads`."""
    return _AllToAll.apply(x, ps.cp_group, ps.cp_size, 2, 1)


class _SumOverSlices(torch.autograd.Function):
    """Forward: the sum over the CP group. Backward: this rank's own share, times C (DeepSpeed
    divides the summed gradients by DP x CP; the CP ranks together hold one sequence's gradient)."""

    @staticmethod
    def forward(ctx, x, group, world):
        ctx.world = world
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.world, None, None


def sequence_mean(local_sum: torch.Tensor, local_weight: torch.Tensor,
                  ps: ParallelState) -> torch.Tensor:
    """Mean loss over the whole sequences (and batch): this rank's weighted loss sum and weight
    sum of its slice → the same full-sequence mean on every CP rank."""
    weight = local_weight.detach().clone()
    dist.all_reduce(weight, group=ps.cp_group)
    return _SumOverSlices.apply(local_sum, ps.cp_group, ps.cp_size) / weight.clamp(min=1.0)


def local_slice(x: torch.Tensor, ps: ParallelState, dim: int = 1) -> torch.Tensor:
    """This CP rank's consecutive share of dimension `dim` (the sequence) of a full tensor."""
    if ps.cp_size == 1:
        return x
    n = x.shape[dim]
    if n % ps.cp_size:
        raise ValueError(f"sequence length {n} is not divisible by context_parallel_size={ps.cp_size}")
    part = n // ps.cp_size
    return x.narrow(dim, ps.cp_rank * part, part)


def check_sequence_length(seq_length: int, cp: int) -> None:
    """One line when the training sequence cannot be split evenly over the CP ranks."""
    if cp > 1 and seq_length % cp:
        raise ConfigError(f"--seq-length={seq_length} is not divisible by --context-parallel-size="
                          f"{cp}: every context-parallel rank holds an equal slice of each sequence")
