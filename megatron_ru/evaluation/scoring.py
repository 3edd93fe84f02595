"""Log-likelihood of continuations with one forward per unique context, and batched generation.

`score_continuations(model, items)`: items are (context ids, continuation ids). Requests that
share a context (the choices of a multiple-choice question) share its forward: the contexts of
a batch are prefilled once into a KV cache (logits only at each context's last token, which
score every continuation's first token); the cache rows are then copied once per continuation
that has more tokens, and one batched forward over those continuation tokens (at their own
positions after the context) scores the rest. A question with four five-token choices thus
costs its context once plus 4 x 4 continuation tokens, where scoring each (context +
continuation) separately costs four full contexts. Every TP rank calls these functions with the
same arguments (tp_worker.py arranges that); results are the same on every rank.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..inference.generator import Generator
from ..inference.sampling import SamplingParams
from ..inference.text import StopStrings

Item = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


def _expand_cache(model, cache, rows: torch.Tensor, length: int, max_length: int):
    """A cache of len(rows) rows holding `max_length` positions, row i a copy of the first
    `length` slots of `cache` row rows[i]."""
    new = model.new_cache(len(rows), max_length)
    new.k[:, :, :, :length] = cache.k[:, rows, :, :length]
    new.v[:, :, :, :length] = cache.v[:, rows, :, :length]
    new.length = length
    return new


def _log_probs(model, logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model.gather_logits(logits).float(), dim=-1)


@torch.inference_mode()
def score_continuations(model, items: Sequence[Item], *, batch_size: int = 8
                        ) -> list[tuple[float, bool]]:
    """(sum of log-probabilities of the continuation, whether greedy decoding produces it) per
    item. Contexts must be non-empty and len(context) + len(continuation) - 1 must fit the
    model's positions (callers truncate contexts on the left, as lm-eval's backends do)."""
    limit = model.config.max_position_embeddings
    device = model.embed.weight.device
    groups: dict[tuple, list[int]] = {}
    for i, (ctx, cont) in enumerate(items):
        if not ctx or not cont or len(ctx) + len(cont) - 1 > limit:
            raise ValueError(f"item {i}: context {len(ctx)} + continuation {len(cont)} tokens do "
                             f"not fit {limit} positions")
        groups.setdefault(tuple(ctx), []).append(i)
    contexts = sorted(groups, key=len, reverse=True)  # similar lengths batch together
    results: list[Optional[tuple[float, bool]]] = [None] * len(items)
    for b in range(0, len(contexts), batch_size):
        batch = contexts[b:b + batch_size]
        lens = torch.tensor([len(c) for c in batch], device=device)
        cache = model.new_cache(len(batch), int(lens.max()))
        tokens = torch.zeros(len(batch), int(lens.max()), dtype=torch.long, device=device)
        for r, c in enumerate(batch):  # (G, C) right-padded
            tokens[r, : len(c)] = torch.tensor(c)
        first = _log_probs(model, model(tokens, None, cache, logits_index=lens - 1))  # (G, V)
        longer = []  # (item, group row) of continuations with more than one token
        for r, c in enumerate(batch):
            for i in groups[c]:
                cont = items[i][1]
                lp = first[r, cont[0]]
                results[i] = (float(lp), bool(first[r].argmax() == cont[0]))
                if len(cont) > 1:
                    longer.append((i, r))
        # longest continuations first: a chunk's first entry sets its width, and a row joins
        # only if its padded positions stay inside the model's positions
        longer.sort(key=lambda x: len(items[x[0]][1]), reverse=True)
        chunk: list = []
        for i, r in longer:
            if chunk:
                width = len(items[chunk[0][0]][1]) - 1
                if len(chunk) == batch_size or len(batch[r]) + width > limit:
                    _score_rest(model, cache, batch, items, chunk, results)
                    chunk = []
            chunk.append((i, r))
        if chunk:
            _score_rest(model, cache, batch, items, chunk, results)
    return results  # type: ignore[return-value]


def _score_rest(model, cache, batch, items, chunk, results) -> None:
    """Continuation tokens 1.. of the chunk's items, from copies of their contexts' cache rows."""
    device = model.embed.weight.device
    conts = [items[i][1] for i, _ in chunk]
    width = max(len(c) for c in conts) - 1
    rows = torch.tensor([r for _, r in chunk], device=device)
    ctx_len = torch.tensor([len(batch[r]) for _, r in chunk], device=device)
    tokens = torch.zeros(len(chunk), width, dtype=torch.long, device=device)  # (R, L)
    for k, c in enumerate(conts):
        tokens[k, : len(c) - 1] = torch.tensor(c[:-1])
    positions = ctx_len.unsqueeze(1) + torch.arange(width, device=device)  # (R, L)
    longest_ctx = int(ctx_len.max())
    sub = _expand_cache(model, cache, rows, longest_ctx, longest_ctx + width)
    logp = _log_probs(model, model(tokens, positions, sub))  # (R, L, V)
    for k, (i, _) in enumerate(chunk):
        target = torch.tensor(conts[k][1:], device=device)
        n = len(target)
        lp = logp[k, :n].gather(-1, target.unsqueeze(-1)).sum()
        greedy = bool((logp[k, :n].argmax(-1) == target).all())
        first_lp, first_greedy = results[i]
        results[i] = (first_lp + float(lp), first_greedy and greedy)


def generate(generator: Generator, detokenize, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, sampling: SamplingParams, stops: Sequence[str],
             rng: Optional[torch.Generator]) -> list[str]:
    """Continuations as text, cut before the first stop string (every TP rank calls this; only
    TP rank 0 needs `rng`)."""
    stop = StopStrings(list(stops), detokenize)
    out = generator.generate(prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                             generator=rng, stop=stop if stop else None)
    texts = []
    for c in out:
        text = detokenize(c.tokens)
        texts.append(stop.truncate(text) if stop else text)
    return texts
