"""DeepSpeed-compatible `sparse_attention` configs -> block layouts [heads, S/block, S/block], and sparse-layer choice."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..sparse_config import (DEFAULT_LAYOUT_SEED, SPARSE_LAYER_MODES, SparsityConfigError, fail, is_sparse_layer,
                             normalize_sparse_attention, sparse_layer_indices)

__all__ = [
    "DEFAULT_LAYOUT_SEED", "SPARSE_LAYER_MODES", "SparsityConfigError", "normalize_sparse_attention",
    "make_layout", "split_heads", "layout_for_tp_rank", "is_sparse_layer", "sparse_layer_indices",
    "causal_block_total", "causal_block_count", "causal_density", "layout_to_mask",
]

def make_layout(sparse_attention: Mapping[str, Any], num_heads: int, seq_length: int, *,
                seed: int = DEFAULT_LAYOUT_SEED) -> torch.Tensor:
    """Block layout of a `sparse_attention` section: int64 0/1 tensor [num_heads, S/block, S/block].

    Identical to DeepSpeed's `<Mode>SparsityConfig(num_heads, **section).make_layout(seq_length)`, with head index =
    *global* head index: fixed-mode head h uses global pattern h % num_different_global_patterns; with
    different_layout_per_head false head 0 is built and copied to every head. Random blocks (variable, bigbird)
    have DeepSpeed's structure (distinct columns per row; causal columns for unidirectional bigbird) but are drawn
    from a torch generator seeded with `seed`, so every rank builds the same layout. A layout is not necessarily
    lower triangular even for unidirectional attention (DeepSpeed sets some blocks above the diagonal); causal
    execution must still mask them. Raises SparsityConfigError where DeepSpeed raises.
    """
    cfg = normalize_sparse_attention(sparse_attention)
    for name, value in (("num_heads", num_heads), ("seq_length", seq_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SparsityConfigError(f"{name} must be a positive integer, got {value!r}")
    block = cfg["block"]
    if seq_length % block:
        fail("block", f"sequence length {seq_length} must be divisible by block size {block} (pad elsewhere)")
    nb = seq_length // block
    for key in ("num_random_blocks", "num_sliding_window_blocks", "num_global_blocks"):
        limit_applies = key != "num_global_blocks" or cfg["mode"] == "bigbird"
        if key in cfg and limit_applies and cfg[key] > nb:
            fail(key, f"({cfg[key]}) must be <= the number of blocks in a row, {seq_length} / {block} = {nb}")
    causal = cfg.get("attention") == "unidirectional"
    if cfg["mode"] == "bigbird" and causal and cfg["num_random_blocks"] > 1:
        fail("num_random_blocks", "must be <= 1 for unidirectional bigbird: row 0 has a single causal block to "
                                   "sample from (DeepSpeed's random.sample fails)")
    n_layout = num_heads if cfg.get("different_layout_per_head") else 1
    generator = torch.Generator().manual_seed(seed)
    rows = torch.arange(nb).unsqueeze(1)  # (nb, 1)
    cols = torch.arange(nb).unsqueeze(0)  # (1, nb)
    mode = cfg["mode"]
    if mode == "dense":
        layout = torch.ones(1, nb, nb, dtype=torch.bool)
    elif mode == "fixed":
        patterns = torch.stack([_fixed_pattern(cfg, p, nb, rows)
                                for p in range(min(cfg["num_different_global_patterns"], n_layout))])
        layout = patterns[torch.arange(n_layout) % patterns.shape[0]]  # (n_layout, nb, nb)
    elif mode == "variable":
        base = _window_mask(_variable_window_ids(cfg["local_window_blocks"], nb), causal)
        base |= _index_globals(cfg, nb, causal, horizontal=cfg["horizontal_global_attention"])
        layout = base | _random_blocks(generator, n_layout, nb, cfg["num_random_blocks"], causal=False)
    elif mode == "bigbird":
        glob = (rows < cfg["num_global_blocks"]) | (cols < cfg["num_global_blocks"])
        base = _band(rows, cols, cfg["num_sliding_window_blocks"] // 2, causal=False) | glob
        layout = base | _random_blocks(generator, n_layout, nb, cfg["num_random_blocks"], causal=causal)
    elif mode == "bslongformer":
        base = _band(rows, cols, cfg["num_sliding_window_blocks"] // 2, causal=False)
        layout = (base | _index_globals(cfg, nb, causal=False, horizontal=True)).unsqueeze(0)
    else:  # local_sliding_window
        layout = _band(rows, cols, cfg["num_sliding_window_blocks"] // 2, causal=causal).unsqueeze(0)
    if causal and mode in ("bigbird", "bslongformer"):
        layout = layout & (cols <= rows)  # DeepSpeed applies torch.tril after the global blocks
    return layout.to(torch.int64).expand(num_heads, nb, nb).contiguous()  # (num_heads, nb, nb)


def _window_mask(window_id: torch.Tensor, causal: bool) -> torch.Tensor:
    """Blocks attend within their local window (lower triangle of it when causal); id -1 = no window."""
    same = (window_id.unsqueeze(1) == window_id.unsqueeze(0)) & (window_id >= 0).unsqueeze(1)  # (nb, nb)
    return same.tril() if causal else same


def _fixed_pattern(cfg: dict, pattern: int, nb: int, rows: torch.Tensor) -> torch.Tensor:
    """Fixed layout of one global pattern: local windows + the pattern's global columns (and rows)."""
    local, glob = cfg["num_local_blocks"], cfg["num_global_blocks"]
    bidir, horizontal = cfg["attention"] == "bidirectional", cfg["horizontal_global_attention"]
    out = _window_mask(torch.arange(nb) // local, causal=not bidir)
    first = local - (1 + pattern) * glob  # offset of the global blocks inside each window (last window: last)
    full_end = nb - nb % local  # global blocks of complete windows; the short last window is handled below
    idx = torch.arange(nb)
    offset = idx % local
    in_global = (offset >= first) & (offset < first + glob) & (idx < full_end)  # (nb,) global columns / rows
    reach = rows >= idx - offset + first  # (nb, nb): when causal a global column starts at its group's first row
    out |= in_global & (True if bidir else reach)
    if horizontal:
        out |= in_global.unsqueeze(1)
    if full_end < nb:  # plain slices on purpose: DeepSpeed's arithmetic, negative starts included
        start = min(full_end + first, nb - glob)
        out[(0 if bidir else start):, start:start + glob] = True
        if horizontal:
            out[start:start + glob, :] = True
    return out


def _variable_window_ids(sizes: list[int], nb: int) -> torch.Tensor:
    """Window index per block: the listed window sizes in order, then the last size repeated to the end."""
    ids = torch.full((nb,), -1, dtype=torch.long)
    start = 0
    for k, size in enumerate(sizes):
        ids[start:min(start + size, nb)] = k
        start += size
    if start < nb:
        ids[start:] = len(sizes) + torch.arange(nb - start) // sizes[-1]
    return ids


def _index_globals(cfg: dict, nb: int, causal: bool, horizontal: bool) -> torch.Tensor:
    """Global blocks given by index (variable, bslongformer): their columns, and their rows if horizontal."""
    out = torch.zeros(nb, nb, dtype=torch.bool)
    ends = cfg["global_block_end_indices"] or [s + 1 for s in cfg["global_block_indices"]]
    for start, end in zip(cfg["global_block_indices"], ends):
        if start < nb:  # indices past the sequence are skipped, as in DeepSpeed
            out[(start if causal else 0):, start:end] = True
            if horizontal:
                out[start:end, :] = True
    return out


def _band(rows: torch.Tensor, cols: torch.Tensor, half_width: int, causal: bool) -> torch.Tensor:
    """Sliding window: |col - row| <= half_width, or row - half_width <= col <= row when causal."""
    upper = 0 if causal else half_width
    return (cols >= rows - half_width) & (cols <= rows + upper)


def _random_blocks(generator: torch.Generator, heads: int, nb: int, count: int, causal: bool) -> torch.Tensor:
    """`count` distinct random columns per row and head, uniform; among columns <= row when causal."""
    out = torch.zeros(heads, nb, nb, dtype=torch.bool)
    if count == 0:
        return out
    scores = torch.rand(heads, nb, nb, generator=generator)  # (heads, nb, nb) in [0, 1)
    if causal:
        scores = scores.masked_fill(torch.ones(nb, nb, dtype=torch.bool).triu(1), 2.0)
    return out.scatter_(-1, scores.argsort(dim=-1)[..., :count], True)


def split_heads(layout: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The heads tensor-parallel rank `tp_rank` owns: layout[rank * H/tp : (rank + 1) * H/tp] (a copy)."""
    local = _local_heads(layout.shape[0], tp_rank, tp_size)
    return layout[tp_rank * local:(tp_rank + 1) * local].clone()


def layout_for_tp_rank(sparse_attention: Mapping[str, Any], num_heads: int, seq_length: int, tp_rank: int,
                       tp_size: int, *, ru_gpts_compat: bool = False, seed: int = DEFAULT_LAYOUT_SEED) -> torch.Tensor:
    """Layout of the num_heads / tp_size heads a TP rank owns.

    Default: the rank's slice of the global layout, so the model is the same function at every TP size.
    `ru_gpts_compat=True` reproduces ru-gpts, where every rank built the layout for its *local* head count: local
    head i used fixed pattern i % num_different_global_patterns (and, with random blocks, every rank drew the same
    ones). Use it only to run checkpoints trained that way at their original TP size; the layout then depends on TP.
    """
    local = _local_heads(num_heads, tp_rank, tp_size)
    if ru_gpts_compat:
        return make_layout(sparse_attention, local, seq_length, seed=seed)
    return split_heads(make_layout(sparse_attention, num_heads, seq_length, seed=seed), tp_rank, tp_size)


def _local_heads(num_heads: int, tp_rank: int, tp_size: int) -> int:
    if tp_size < 1 or num_heads % tp_size:
        raise ValueError(f"number of heads {num_heads} must be divisible by tensor-parallel size {tp_size}")
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tensor-parallel rank {tp_rank} must be in [0, {tp_size})")
    return num_heads // tp_size


def causal_block_total(num_blocks: int) -> int:
    """Blocks on or below the diagonal of a num_blocks x num_blocks layout: what dense causal attention computes."""
    return num_blocks * (num_blocks + 1) // 2


def causal_block_count(layout: torch.Tensor) -> torch.Tensor:
    """Per head, kept blocks on or below the block diagonal: int64 [heads]."""
    return (layout != 0).tril().sum(dim=(-2, -1))


def causal_density(layout: torch.Tensor) -> float:
    """Fraction of the causal blocks kept, averaged over heads (the sparse-layer attention FLOP factor)."""
    return causal_block_count(layout).double().mean().item() / causal_block_total(layout.shape[-1])


def layout_to_mask(layout: torch.Tensor, block: int) -> torch.Tensor:
    """Token-level bool mask [heads, S, S] of a block layout (reference / dense execution; no causal masking)."""
    return (layout != 0).repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)
