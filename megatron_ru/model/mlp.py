"""Feed-forward blocks: tanh-GELU MLP (ruGPT-3) and SwiGLU (Llama / T-lite), tensor-parallel.

Both are column-parallel up, row-parallel down: one all-reduce per block in forward.
SwiGLU fuses gate and up into one column-parallel weight with two sections.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..parallel.layers import ColumnParallelLinear, RowParallelLinear, scaled_init_std
from ..parallel.state import ParallelState


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, ps: ParallelState, device=None, dtype=None) -> None:
        super().__init__()
        h, f, std = config.hidden_size, config.ffn_hidden_size, config.init_method_std
        self.swiglu = config.is_llama
        sections = (f, f) if self.swiglu else None
        self.up = ColumnParallelLinear(h, 2 * f if self.swiglu else f, parallel_state=ps,
                                       bias=config.use_bias, sections=sections, init_std=std,
                                       device=device, dtype=dtype)
        self.down = RowParallelLinear(f, h, parallel_state=ps, bias=config.use_bias,
                                      init_std=scaled_init_std(std, config.num_layers),
                                      device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(x)  # (B, T, F_local) or (B, T, 2*F_local)
        if self.swiglu:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        else:
            y = F.gelu(y, approximate="tanh")
        return self.down(y)
