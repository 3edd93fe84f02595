"""Causal self-attention, tensor-parallel by heads: fused QKV (column), output projection (row).

Dense layers call scaled_dot_product_attention; block-sparse layers call a
BlockSparseAttention holding this rank's heads of the DeepSpeed layout. With a KV cache the
keys come from the cache, and the mask is a function of positions (causal, and the layout).
With context parallelism (training, no cache) x holds this CP rank's slice of the sequence;
core attention runs on the whole sequence for a share of the heads (parallel/context.py).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..parallel.context import heads_to_sequence, sequence_to_heads
from ..parallel.layers import ColumnParallelLinear, RowParallelLinear, scaled_init_std
from ..parallel.state import ParallelState
from .kv_cache import KVCache
from .rotary import apply_rope
from .sparse_attention import BlockSparseAttention


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, ps: ParallelState, layer_idx: int, *,
                 sparse: Optional[BlockSparseAttention] = None, device=None, dtype=None) -> None:
        super().__init__()
        tp = ps.tp_size
        d, nh, nkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
        self.ps, self.layer_idx, self.head_dim = ps, layer_idx, d
        self.heads, self.kv_heads = nh // tp, nkv // tp  # local to this TP rank
        self.dropout = config.attention_dropout
        self.sparse = sparse
        self.qkv = ColumnParallelLinear(config.hidden_size, (nh + 2 * nkv) * d, parallel_state=ps,
                                        bias=config.use_bias, sections=(nh * d, nkv * d, nkv * d),
                                        init_std=config.init_method_std, device=device, dtype=dtype)
        self.dense = RowParallelLinear(nh * d, config.hidden_size, parallel_state=ps,
                                       bias=config.use_bias,
                                       init_std=scaled_init_std(config.init_method_std,
                                                                config.num_layers),
                                       device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, rope: Optional[tuple] = None,
                cache: Optional[KVCache] = None, positions: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, T, H). Without a cache the T tokens sit at positions 0..T-1. With a cache they
        sit at `positions` (B, T) (None: right after the cached ones)."""
        hd, kd = self.heads * self.head_dim, self.kv_heads * self.head_dim
        qkv = self.qkv(x)  # (B, T, (H + 2 Hkv) D); sequence parallel: x was (B, T/TP, H)
        b, t = qkv.shape[:2]
        q, k, v = qkv.split([hd, kd, kd], dim=-1)
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        p = self.dropout if self.training else 0.0
        if self.ps.cp_size > 1 and cache is None:  # Ulysses: whole sequence, 1/C of the heads
            q, k, v = (sequence_to_heads(y, self.ps) for y in (q, k, v))  # (B, H/C, S, D)
            out = heads_to_sequence(self._causal(q, k, v, p), self.ps)  # (B, H, S/C, D)
        elif cache is None or (cache.length == 0 and positions is None):
            if cache is not None:
                cache.update(self.layer_idx, k, v)
            out = self._causal(q, k, v, p, attention_mask, positions)  # (B, H, T, D)
        else:
            start = cache.length
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, S, D), slot j = position j
            if positions is None:
                positions = torch.arange(start, start + t, device=x.device).expand(b, t)
            out = self._masked(q, k, v, positions, p)
        out = out.transpose(1, 2).reshape(b, t, hd)  # (B, T, H*D)
        return self.dense(out)

    def _causal(self, q, k, v, p: float, attention_mask=None, positions=None) -> torch.Tensor:
        gqa = self.kv_heads != self.heads
        if attention_mask is not None:  # (B, 1, T, T), True = masked out
            keep = ~attention_mask
            if self.sparse is not None:
                # Block-sparse layer with a mask (packed rows): the layout at each token's own
                # position (restarted per document), run as masked dense attention (T x T).
                if positions is None:
                    positions = torch.arange(q.shape[2], device=q.device).expand(q.shape[0], -1)
                keep = keep & self.sparse.pair_mask(positions)
            with self._dropout_stream(p):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p,
                                                      enable_gqa=gqa)
        with self._dropout_stream(p):
            if self.sparse is not None:
                return self.sparse(q, k, v, dropout_p=p)
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True,
                                                  enable_gqa=gqa)

    def _masked(self, q, k, v, positions: torch.Tensor, p: float) -> torch.Tensor:
        n_keys = k.shape[2]
        if self.sparse is not None:
            mask = self.sparse.key_mask(positions, n_keys)  # (B, H, T, S)
        else:
            key_pos = torch.arange(n_keys, device=q.device)
            mask = (key_pos <= positions.unsqueeze(-1)).unsqueeze(1)  # (B, 1, T, S)
        gqa = self.kv_heads != self.heads
        with self._dropout_stream(p):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                  enable_gqa=gqa)

    def _dropout_stream(self, p: float):
        # Attention probabilities of the local heads differ per TP rank: per-rank RNG stream.
        return self.ps.rng.fork() if p > 0.0 else contextlib.nullcontext()
