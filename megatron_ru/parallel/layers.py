"""Tensor-parallel layers: ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding.

Every parameter is tagged with how it is cut (`shard_spec`) and how its *full* tensor is
initialised (`init_spec`), so `initialize_parameters` can draw the full tensor from a generator
seeded by (seed, parameter name) and keep this rank's slice: weights do not depend on TP size.
At TP=1 each layer is a single plain PyTorch call with no communication.

Sequence parallelism (`layer.sequence_parallel = True`, set by the model for a training
forward at TP > 1): the activations between the layers are split along the sequence, so a
column-parallel layer all-gathers its input along the sequence (its backward reduce-scatters)
instead of copying it -- keeping only the shard for backward and all-gathering it again there for
the weight gradient (`gather_sequence_linear`), and a row-parallel layer / the embedding reduce-scatters its partial sums
to sequence shards instead of all-reducing them. Same bytes on the wire as the all-reduce
(= reduce-scatter + all-gather), 1/TP of the activations in between.
"""
from __future__ import annotations

import math
import zlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .mappings import (copy_to_region, gather_from_region, gather_sequence_linear, reduce_from_region,
                       reduce_scatter_to_sequence, scatter_to_region, sum_grad_over_group)
from .sharding import ShardSpec, local_shape, shard, vocab_range
from .state import ParallelState


def tag(param: nn.Parameter, shard_spec: Optional[ShardSpec], init_spec: tuple) -> nn.Parameter:
    """init_spec: ("normal", std) | ("normal_rows", std, real_rows) | ("zeros",) | ("ones",).
    Sharded parameters also get the Megatron attributes DeepSpeed reads (gradient-norm
    clipping counts them on every TP rank, replicated ones on TP rank 0 only)."""
    param.shard_spec = shard_spec
    param.init_spec = init_spec
    sharded = shard_spec is not None
    param.tensor_model_parallel = param.model_parallel = sharded
    param.partition_dim = shard_spec.dim if sharded else -1
    param.partition_stride = 1
    return param


def _new_param(shape, device, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device=device, dtype=dtype))


def param_seed(seed: int, name: str) -> int:
    """The generator seed of parameter `name` under run seed `seed` (the same at every TP size)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def full_init_tensor(init_spec: tuple, full_shape, seed: int, name: str) -> torch.Tensor:
    """The full (unsharded) fp32 initial value of a parameter, drawn on the CPU: the same numbers
    on every machine and at every TP size."""
    kind = init_spec[0]
    if kind == "zeros":
        return torch.zeros(full_shape)
    if kind == "ones":
        return torch.ones(full_shape)
    gen = torch.Generator().manual_seed(param_seed(seed, name))
    if kind == "normal":
        return torch.empty(full_shape).normal_(0.0, init_spec[1], generator=gen)
    if kind == "normal_rows":  # vocabulary: real rows random, padding rows zero
        std, real_rows = init_spec[1], init_spec[2]
        full = torch.zeros(full_shape)
        full[:real_rows].normal_(0.0, std, generator=gen)
        return full
    raise ValueError(f"unknown init spec {init_spec!r}")


@torch.no_grad()
def initialize_parameters(module: nn.Module, seed: int, tp_rank: int, tp_size: int) -> None:
    """Fill every tagged parameter with this rank's slice of its TP-independent full value."""
    for name, param in module.named_parameters():
        if param.is_meta:
            continue
        spec = getattr(param, "init_spec", None)
        if spec is None:
            raise ValueError(f"parameter {name} has no init_spec; create it through tag()")
        shard_spec = getattr(param, "shard_spec", None)
        full_shape = list(param.shape)
        if shard_spec is not None:
            full_shape[shard_spec.dim] *= tp_size
        full = full_init_tensor(spec, full_shape, seed, name)
        param.copy_(shard(full, shard_spec, tp_rank, tp_size))


class ColumnParallelLinear(nn.Module):
    """Y = X A^T + b with A split by output rows: rank r computes Y[..., cols of r].
    Input is copied into the region (all-reduce of its gradient); output stays split unless
    `gather_output` (all-gather). `sections`: fused weights whose parts are split separately.
    Sequence parallel: the input (B, T/TP, H) is all-gathered along the sequence instead; only
    the shard is kept for backward, which all-gathers it again for the weight gradient."""

    sequence_parallel = False

    def __init__(self, in_features: int, out_features: int, *, parallel_state: ParallelState,
                 bias: bool = True, gather_output: bool = False,
                 sections: Optional[tuple[int, ...]] = None, init_std: float = 0.02,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.ps, self.gather_output = parallel_state, gather_output
        spec = ShardSpec(0, tuple(sections) if sections else None)
        world = parallel_state.tp_size
        out_local = local_shape((out_features, in_features), spec, world)[0]
        self.in_features, self.out_features, self.out_local = in_features, out_features, out_local
        self.weight = tag(_new_param((out_local, in_features), device, dtype), spec, ("normal", init_std))
        self.bias = tag(_new_param((out_local,), device, dtype), spec, ("zeros",)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.ps.tp_comm
        if self.sequence_parallel:  # (B, T/TP, H) → (B, T, out_local); keeps only the shard
            y = gather_sequence_linear(x, self.weight, self.bias, group)
        else:
            y = F.linear(copy_to_region(x, group), self.weight, self.bias)
        return gather_from_region(y, group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """Y = X A^T + b with A split by input columns: rank r multiplies its slice of X, then the
    partial products are all-reduced; the bias (replicated) is added once, after the reduce.
    Sequence parallel: reduce-scattered to (B, T/TP, H) instead; the bias then sees one shard
    of the sequence, so its gradient is summed over the TP group."""

    sequence_parallel = False

    def __init__(self, in_features: int, out_features: int, *, parallel_state: ParallelState,
                 bias: bool = True, input_is_parallel: bool = True, init_std: float = 0.02,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.ps, self.input_is_parallel = parallel_state, input_is_parallel
        spec = ShardSpec(1)
        in_local = local_shape((out_features, in_features), spec, parallel_state.tp_size)[1]
        self.in_features, self.out_features, self.in_local = in_features, out_features, in_local
        self.weight = tag(_new_param((out_features, in_local), device, dtype), spec, ("normal", init_std))
        self.bias = tag(_new_param((out_features,), device, dtype), None, ("zeros",)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.ps.tp_comm
        if group is None:
            return F.linear(x, self.weight, self.bias)
        if not self.input_is_parallel:
            x = scatter_to_region(x, group)
        y = F.linear(x, self.weight)  # (B, T, H) partial sums
        bias = self.bias
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence(y, group)  # (B, T/TP, H)
            bias = None if bias is None else sum_grad_over_group(bias, group)
        else:
            y = reduce_from_region(y, group)
        return y if bias is None else y + bias


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; each rank looks up the ids it owns, zeroes the
    others, and the partial results are all-reduced (sequence parallel: reduce-scattered to
    this rank's shard of the sequence, (B, T/TP, H)). Rows >= `real_rows` are padding (zero)."""

    sequence_parallel = False

    def __init__(self, num_embeddings: int, embedding_dim: int, *, parallel_state: ParallelState,
                 real_rows: Optional[int] = None, init_std: float = 0.02, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.ps = parallel_state
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.real_rows = num_embeddings if real_rows is None else real_rows
        self.vocab_start, self.vocab_end = vocab_range(num_embeddings, parallel_state.tp_rank,
                                                       parallel_state.tp_size)
        shape = (self.vocab_end - self.vocab_start, embedding_dim)
        self.weight = tag(_new_param(shape, device, dtype), ShardSpec(0),
                          ("normal_rows", init_std, self.real_rows))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        group = self.ps.tp_comm
        if group is None:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence(out, group)
        return reduce_from_region(out, group)


def scaled_init_std(std: float, num_layers: int) -> float:
    """GPT-2/Megatron: output projections of each block start at std / sqrt(2 L)."""
    return std / math.sqrt(2.0 * num_layers)
