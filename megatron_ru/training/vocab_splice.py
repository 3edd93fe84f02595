"""Grows a model's vocabulary rows for an extended tokenizer: old rows kept bit for bit, new rows from what they spell.

Every new token is split by the base tokenizer into pieces (ids of the old vocabulary). Its row is
  mean           the mean of its pieces' rows (input embedding; the untied head's rows likewise),
  mean-rescaled  that mean scaled to the mean norm of the pieces' rows (averaging shortens vectors),
  freq           the pieces' rows weighted by how often each piece occurs in the corpus (+1),
  random         normal(0, init_method_std), as a fresh model's rows (the baseline to beat).
Tied embeddings (gpt3) have one matrix, initialised once; an untied head (llama) gets its own rows
from its own rows. Rows of ids the base model had but no token used (vocabulary padding a
checkpoint carried) that a new token takes are rewritten; rows of the base tokenizer's ids never,
but those of tokens --replace-unused removed, which are initialised as new rows.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

INIT_METHODS = ("mean", "mean-rescaled", "freq", "random")
VOCAB_PARAMS = ("embed.weight", "lm_head.weight")


def new_rows(weight: torch.Tensor, pieces: Sequence[Sequence[int]], method: str, *,
             counts: Optional[dict] = None, std: float = 0.02,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(len(pieces), H) rows for new tokens from `weight` (V_old, H), in float32 then `weight`'s dtype."""
    w = weight.float()
    if method == "random":
        out = torch.randn(len(pieces), w.shape[1], generator=generator) * std
        return out.to(weight.dtype)
    out = torch.empty(len(pieces), w.shape[1])
    for i, ids in enumerate(pieces):
        rows = w[list(ids)]  # (P, H)
        if method == "freq":
            f = torch.tensor([float((counts or {}).get(j, 0) + 1) for j in ids])  # (P,)
            out[i] = (f[:, None] * rows).sum(0) / f.sum()
        else:
            out[i] = rows.mean(0)
            if method == "mean-rescaled":
                norm = out[i].norm()
                if norm > 0:
                    out[i] *= rows.norm(dim=1).mean() / norm
    if method not in INIT_METHODS:
        raise ValueError(f"unknown init method {method!r}")
    return out.to(weight.dtype)


def splice(full: dict, first_new: int, new_vocab_size: int, pieces: Sequence[Sequence[int]], method: str, *,
           counts: Optional[dict] = None, std: float = 0.02, seed: int = 1234,
           ids: Optional[Sequence[int]] = None) -> dict:
    """`full` (our names, real vocabulary rows) with every vocabulary matrix grown to `new_vocab_size`
    rows: row ids[i] (default first_new + i) from pieces[i] (ids of kept tokens, < first_new), every
    other row as it was (--replace-unused: ids holds the removed tokens' rows first, re-initialised
    like new rows). Rows the base carried past its tokenizer's ids and no new token takes keep their values."""
    out = dict(full)
    gen = torch.Generator().manual_seed(seed)
    ids = list(range(first_new, first_new + len(pieces))) if ids is None else list(ids)
    for name in VOCAB_PARAMS:
        if name not in full:
            continue
        old = full[name]
        grown = old.new_zeros(new_vocab_size, *old.shape[1:])
        grown[:old.shape[0]] = old[:new_vocab_size]
        grown[ids] = new_rows(old[:first_new], pieces, method, counts=counts, std=std, generator=gen)
        out[name] = grown
    return out
