"""Causal self-attention, tensor-parallel by heads: fused QKV (column), output projection (row).

Dense layers call scaled_dot_product_attention. Block-sparse layers (DeepSpeed layouts) plug
into `self.sparse` (see model/sparsity.py); a KV cache, when given, extends keys and values.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..parallel.layers import ColumnParallelLinear, RowParallelLinear, scaled_init_std
from ..parallel.state import ParallelState
from .kv_cache import KVCache
from .rotary import apply_rope


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, ps: ParallelState, layer_idx: int, *,
                 sparse: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        tp = ps.tp_size
        d, nh, nkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
        self.ps, self.layer_idx, self.head_dim = ps, layer_idx, d
        self.heads, self.kv_heads = nh // tp, nkv // tp  # local to this TP rank
        self.dropout = config.attention_dropout
        self.is_sparse = sparse
        self.qkv = ColumnParallelLinear(config.hidden_size, (nh + 2 * nkv) * d, parallel_state=ps,
                                        bias=config.use_bias, sections=(nh * d, nkv * d, nkv * d),
                                        init_std=config.init_method_std, device=device, dtype=dtype)
        self.dense = RowParallelLinear(nh * d, config.hidden_size, parallel_state=ps,
                                       bias=config.use_bias,
                                       init_std=scaled_init_std(config.init_method_std,
                                                                config.num_layers),
                                       device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, rope: Optional[tuple] = None,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        b, t, _ = x.shape
        hd, kd = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([hd, kd, kd], dim=-1)
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, start + T, D)
        out = self.attend(q, k, v, start)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(b, t, hd)  # (B, T, H*D)
        return self.dense(out)

    def attend(self, q, k, v, start: int) -> torch.Tensor:
        if self.is_sparse:
            raise NotImplementedError(
                f"layer {self.layer_idx} is block-sparse (sparse_attention in the model config), "
                "and block-sparse execution is not available yet; drop sparse_attention to run "
                "the model dense")
        p = self.dropout if self.training else 0.0
        gqa = self.kv_heads != self.heads
        t_q, t_k = q.shape[2], k.shape[2]
        mask, causal = None, True
        if start > 0:  # queries sit at positions start..start+T-1 of the keys
            causal = False
            if t_q > 1:
                q_pos = torch.arange(start, start + t_q, device=q.device).unsqueeze(1)
                mask = torch.arange(t_k, device=q.device).unsqueeze(0) <= q_pos  # (T, S)
        if p > 0.0:
            with self.ps.rng.fork():  # per-TP-rank stream: heads differ between ranks
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                      is_causal=causal, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              enable_gqa=gqa)
