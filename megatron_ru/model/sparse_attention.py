"""Block-sparse causal attention executing a DeepSpeed layout exactly, without an S×S mask.

The function: each query at position p attends to the keys j <= p whose block
layout[h, p // block, j // block] is 1, softmax over exactly those keys.

Paths (all equal to `reference` to fp32 rounding; tests check it):
  reference  dense SDPA with the expanded S×S mask; for tests and tiny inputs only.
  gather     query tiles of `tile` blocks; each tile gathers the union of the key blocks its
             rows keep, and one fused SDPA call per (head, tile) runs with a small mask.
             Pure PyTorch ops: trains everywhere (CPU included); memory ~ S × kept keys.
  flex       FlexAttention with a BlockMask built from the layout (compiled); skips empty
             (q-tile, k-block) pairs. GPU training/inference, CPU inference (no CPU backward).
  auto       flex on CUDA, gather elsewhere.
Sequences that are not a multiple of the block are padded internally; longer than the
layout's maximum is an error. `key_mask` gives decode steps (KV cache) their exact key sets.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

IMPLS = ("auto", "gather", "flex", "reference")
MAX_PLANS = 4  # cached (length, device, dtype) plans per layout


def expand_layout(layout: torch.Tensor, block: int, seq: int) -> torch.Tensor:
    """(H, nb, nb) block layout → (H, seq, seq) bool mask including causality."""
    mask = layout.bool().repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :seq, :seq]
    return mask & torch.ones(seq, seq, dtype=torch.bool, device=layout.device).tril()


class BlockSparseAttention(nn.Module):
    """Causal block-sparse attention for the local heads of one layer."""

    def __init__(self, layout: torch.Tensor, block: int, *, impl: str = "auto",
                 tile_blocks: Optional[int] = None) -> None:
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"sparse attention impl {impl!r} is unknown; expected one of {IMPLS}")
        if layout.dim() != 3 or layout.shape[1] != layout.shape[2]:
            raise ValueError(f"layout must be [heads, blocks, blocks], got {tuple(layout.shape)}")
        diag = layout.diagonal(dim1=1, dim2=2)
        if not bool(diag.bool().all()):
            h, r = (diag == 0).nonzero()[0].tolist()
            raise ValueError(f"layout head {h} block row {r} does not keep its own diagonal block: "
                             "the first query of that block would attend to nothing")
        self.block, self.impl = block, impl
        self.max_seq = layout.shape[1] * block
        self.register_buffer("layout", layout.bool(), persistent=False)  # (H, nb, nb)
        self.tile_blocks = tile_blocks or self._choose_tile()
        self._plans: OrderedDict = OrderedDict()  # a few recent lengths (LRU): masks are big

    def _cached(self, key, build):
        if key in self._plans:
            self._plans.move_to_end(key)
            return self._plans[key]
        value = self._plans[key] = build()
        while len(self._plans) > MAX_PLANS:
            self._plans.popitem(last=False)
        return value

    @property
    def heads(self) -> int:
        return self.layout.shape[0]

    def check_length(self, seq: int) -> None:
        if seq > self.max_seq:
            raise ValueError(f"sequence of {seq} tokens exceeds the block-sparse layout's maximum of "
                             f"{self.max_seq} (max_position_embeddings rounded up to the block "
                             f"size {self.block}); shorten the input or rebuild with longer positions")

    # ---- full causal attention over positions 0..S-1 --------------------------------------
    def forward(self, q, k, v, dropout_p: float = 0.0) -> torch.Tensor:
        """q (B, H, S, D); k, v (B, H or H_kv, S, D) → (B, H, S, D)."""
        seq = q.shape[2]
        self.check_length(seq)
        if k.shape[1] != q.shape[1]:  # GQA: each query head reads its group's KV head
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        impl = self.impl
        if impl == "auto":
            impl = "flex" if q.is_cuda else "gather"
        if impl == "reference":
            mask = expand_layout(self.layout, self.block, seq)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(0),
                                                  dropout_p=dropout_p)
        if impl == "flex":
            if dropout_p > 0.0:
                raise ValueError("the flex sparse path has no attention dropout; use impl='gather'")
            return self._flex(q, k, v)
        return self._gather(q, k, v, dropout_p)

    def _choose_tile(self) -> int:
        """Query-tile size (in blocks) that minimises gathered keys per query, preferring big
        tiles (fewer, larger SDPA problems): cost = union blocks × (1 + 1 / tile)."""
        best, best_cost = 1, float("inf")
        nb = self.layout.shape[1]
        causal = torch.ones(nb, nb, dtype=torch.bool, device=self.layout.device).tril()
        kept = self.layout & causal
        for tile in (1, 2, 4, 8, 16):
            if tile > nb:
                break
            u = self._union(kept, tile).sum(-1).max().item()
            cost = u * (1.0 + 1.0 / tile)
            if cost <= best_cost:
                best, best_cost = tile, cost
        return best

    @staticmethod
    def _union(kept: torch.Tensor, tile: int) -> torch.Tensor:
        """(H, nb, nb) kept blocks → (H, n_tiles, nb): blocks any row of the tile keeps."""
        h, nb, _ = kept.shape
        pad = (-nb) % tile
        if pad:
            kept = torch.cat([kept, kept.new_zeros(h, pad, nb)], dim=1)
        return kept.view(h, -1, tile, nb).any(dim=2)

    def _plan(self, padded: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Key-block indices (H, nt, U) and the additive token mask (1, H*nt, tile*block,
        U*block) in the compute dtype (0 keep / -inf drop: ~25% faster in SDPA than a bool
        mask, which it would convert on every call). Shared by all sparse layers."""
        return self._cached((padded, str(device), dtype),
                            lambda: self._build_plan(padded, device, dtype))

    def _build_plan(self, padded: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        blk, tile = self.block, self.tile_blocks
        nb = padded // blk
        lay = torch.zeros(self.heads, nb, nb, dtype=torch.bool, device=self.layout.device)
        n = min(nb, self.layout.shape[1])
        lay[:, :n, :n] = self.layout[:, :n, :n]
        kept = lay & torch.ones(nb, nb, dtype=torch.bool, device=lay.device).tril()
        union = self._union(kept, tile)  # (H, nt, nb)
        u = int(union.sum(-1).max())
        order = torch.sort(union.to(torch.int8), dim=-1, descending=True, stable=True)
        idx, valid = order.indices[..., :u], order.values[..., :u].bool()  # (H, nt, U)
        h_ar = torch.arange(self.heads, device=lay.device)[:, None, None, None]
        rows = torch.arange(nb, device=lay.device).view(1, -1, tile, 1)  # (1, nt, tile, 1)
        block_ok = kept[h_ar, rows, idx.unsqueeze(2)] & valid.unsqueeze(2)  # (H, nt, tile, U)
        tok = block_ok.repeat_interleave(blk, 2).repeat_interleave(blk, 3)  # (H, nt, tile*b, U*b)
        q_pos = torch.arange(padded, device=lay.device).view(1, -1, tile * blk, 1)
        k_pos = (idx.unsqueeze(-1) * blk + torch.arange(blk, device=lay.device)).flatten(2)
        tok &= k_pos.unsqueeze(2) <= q_pos  # causal inside the diagonal block
        bias = torch.zeros(tok.shape, dtype=dtype, device=tok.device).masked_fill_(~tok, float("-inf"))
        return idx.to(device), bias.flatten(0, 1).unsqueeze(0).to(device)

    def _gather(self, q, k, v, dropout_p):
        b, h, seq, d = q.shape
        unit = self.block * self.tile_blocks
        padded = -(-seq // unit) * unit
        if padded != seq:  # padded keys sit after every real query: causality hides them
            pad = (0, 0, 0, padded - seq)
            q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
        idx, mask = self._plan(padded, q.device, q.dtype)  # (H, nt, U), (1, H*nt, Tq, Tk)
        nt, u = idx.shape[1], idx.shape[2]
        h_ar = torch.arange(h, device=q.device)[:, None, None]
        kb = k.view(b, h, -1, self.block, d)[:, h_ar, idx]  # (B, H, nt, U, blk, D)
        vb = v.view(b, h, -1, self.block, d)[:, h_ar, idx]
        kb = kb.reshape(b, h * nt, u * self.block, d)
        vb = vb.reshape(b, h * nt, u * self.block, d)
        qt = q.reshape(b, h * nt, unit, d)
        out = F.scaled_dot_product_attention(qt, kb, vb, attn_mask=mask, dropout_p=dropout_p)
        return out.view(b, h, padded, d)[:, :, :seq]

    def _flex(self, q, k, v):
        from torch.nn.attention.flex_attention import create_block_mask
        seq = q.shape[2]
        q_tile = 128 if q.is_cuda or seq >= 128 else self.block
        padded = -(-seq // q_tile) * q_tile
        if padded != seq:
            pad = (0, 0, 0, padded - seq)
            q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
        layout, blk = self.layout.to(q.device), self.block
        nb = layout.shape[1]

        def mask_mod(b, h, q_idx, kv_idx):
            qb, kb = (q_idx // blk).clamp(max=nb - 1), (kv_idx // blk).clamp(max=nb - 1)
            return (q_idx >= kv_idx) & layout[h, qb, kb]

        block_mask = self._cached(("flex", padded, str(q.device)), lambda: create_block_mask(
            mask_mod, B=None, H=self.heads, Q_LEN=padded, KV_LEN=padded, device=q.device,
            BLOCK_SIZE=(q_tile, blk)))
        out = _compiled_flex()(q, k, v, block_mask=block_mask)
        return out[:, :, :seq]

    def pair_mask(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, H, T, T) bool: may query i attend key j by the layout at their own positions
        (B, T) (no causality: the caller combines it with its mask). Used for packed rows, where
        positions restart per document, so each document sees the layout it would see alone."""
        self.check_length(int(positions.max()) + 1)
        blocks = positions // self.block  # (B, T)
        return self.layout[:, blocks[:, :, None], blocks[:, None, :]].transpose(0, 1)

    # ---- decode / chunked prefill with a KV cache -----------------------------------------
    def key_mask(self, q_pos: torch.Tensor, n_keys: int) -> torch.Tensor:
        """Allowed keys (B, H, T, n_keys) for queries at positions q_pos (B, T)."""
        if not torch.compiler.is_compiling():  # compiled decode checks positions up front
            self.check_length(int(q_pos.max()) + 1)
        rows = self.layout[:, q_pos // self.block]  # (H, B, T, nb)
        allowed = rows.permute(1, 0, 2, 3).repeat_interleave(self.block, -1)[..., :n_keys]
        k_pos = torch.arange(n_keys, device=q_pos.device)
        return allowed & (k_pos <= q_pos.unsqueeze(-1)).unsqueeze(1)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)
