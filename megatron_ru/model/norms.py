"""Normalisation layers: LayerNorm (ruGPT-3) and RMSNorm (Llama / T-lite), replicated on TP ranks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..parallel.layers import tag


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = tag(nn.Parameter(torch.empty(dim, device=device, dtype=dtype)), None, ("ones",))
        self.bias = tag(nn.Parameter(torch.empty(dim, device=device, dtype=dtype)), None, ("zeros",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """x / rms(x) * w, computed in fp32 and cast back before the weight (as Llama does)."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = tag(nn.Parameter(torch.empty(dim, device=device, dtype=dtype)), None, ("ones",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused kernel for x * rsqrt(mean(x^2) + eps) in fp32
        normed = F.rms_norm(x.float(), self.weight.shape, None, self.eps)
        return self.weight * normed.to(x.dtype)
