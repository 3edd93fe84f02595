"""Normalisation layers: LayerNorm (ruGPT-3) and RMSNorm (Llama / T-lite), replicated on TP ranks.

With sequence parallelism a norm sees one shard of the sequence per TP rank, so its weight (and
bias) gradient is summed over the TP group inside autograd (`sequence_parallel_group`, set by
GPTModel): every rank gets the whole sequence's gradient, the same number, before DeepSpeed
(any ZeRO stage) ever sees it -- the weights cannot drift apart across TP ranks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..parallel.layers import tag
from ..parallel.mappings import sum_grad_over_group


class LayerNorm(nn.Module):
    sequence_parallel_group = None  # the TP group while the input is a sequence shard

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = tag(nn.Parameter(torch.empty(dim, device=device, dtype=dtype)), None, ("ones",))
        self.bias = tag(nn.Parameter(torch.empty(dim, device=device, dtype=dtype)), None, ("zeros",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.sequence_parallel_group
        weight, bias = sum_grad_over_group(self.weight, group), sum_grad_over_group(self.bias, group)
        return F.layer_norm(x, self.weight.shape, weight, bias, self.eps)


class RMSNorm(nn.Module):
    """x / rms(x) * w, computed in fp32 and cast back before the weight (as Llama does)."""

    sequence_parallel_group = None  # the TP group while the input is a sequence shard

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = tag(nn.Parameter(torch.empty(dim, device=device, dtype=dtype)), None, ("ones",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused kernel for x * rsqrt(mean(x^2) + eps) in fp32
        normed = F.rms_norm(x.float(), self.weight.shape, None, self.eps)
        return sum_grad_over_group(self.weight, self.sequence_parallel_group) * normed.to(x.dtype)
