"""One logits-processor chain for every place that chooses tokens: Generator, speculative judge, serving scheduler.

The chain takes a batch of full-vocabulary logits (B, V), each row with its own `Rules` (sampling
settings, min new tokens, the ids that would end it) and state (tokens produced so far, ids
seen), and runs, in Hugging Face's order:

  process:        ids the tokenizer cannot print (>= token_limit) → -inf
                  repetition penalty on each row's seen ids
                  end ids → -inf while a row is under its min new tokens
  distributions / choose:
                  temperature, top-k, top-p (sampling.warp), then argmax (greedy rows), a keyed
                  exponential race (sampling.draw: serving) or a multinomial draw on a torch
                  Generator (generate.py)

The primitives are sampling.py's pure functions; this module only decides which rows get which
setting. Rows that share a setting are processed together with that setting as a Python number,
so a row's numbers are bit-identical whether it is processed alone or batched with rows of other
settings (elementwise ops with the same scalar; the warpers reduce within a row).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Optional, Sequence, Union

import torch

from .sampling import (GREEDY, NEG_INF, SamplingParams, apply_repetition_penalty, draw,
                       logits_to_probs, sample, seen_mask)


@dataclass(frozen=True)
class Rules:
    """How one row's next token is chosen: its sampling settings, and `ends` (ids that end the
    row, e.g. end of text and a chat's end of turn) blocked until it has `min_new_tokens`."""

    sampling: SamplingParams = GREEDY
    min_new_tokens: int = 0
    ends: tuple[int, ...] = ()


RowRules = Union[Rules, Sequence[Rules]]  # one for every row, or one per row
# seen ids per row: a (B, V) bool tensor, or one (V,) tensor (or None) per row
Seen = Union[torch.Tensor, Sequence[Optional[torch.Tensor]]]


def rows_of(rules: RowRules, batch: int) -> list[Rules]:
    """One Rules per row."""
    if isinstance(rules, Rules):
        return [rules] * batch
    if len(rules) != batch:
        raise ValueError(f"{len(rules)} rules for {batch} rows of logits")
    return list(rules)


def groups(keys: Iterable[Hashable]) -> dict:
    """Rows by key, in order of first appearance: {key: [row, ...]}."""
    out: dict = {}
    for row, key in enumerate(keys):
        out.setdefault(key, []).append(row)
    return out


def _select(rows: list[int], batch: int, device) -> Union[slice, torch.Tensor]:
    """An index of `rows`: a plain slice when the group is the whole batch (no copy)."""
    return slice(None) if len(rows) == batch else torch.tensor(rows, device=device)


def needs_seen(rules: RowRules) -> bool:
    """Whether any row applies a repetition penalty (only then is a seen mask kept)."""
    rows = [rules] if isinstance(rules, Rules) else rules
    return any(r.sampling.repetition_penalty != 1.0 for r in rows)


def seen_of(prompts: Sequence[Sequence[int]], vocab_size: int,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, V) bool: the ids of each prompt (the repetition penalty's starting state)."""
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    valid = torch.arange(longest) < torch.tensor([len(p) for p in prompts]).unsqueeze(1)
    return seen_mask(ids.to(device), vocab_size, valid.to(device))


def _seen_rows(seen: Seen, rows: list[int], index) -> torch.Tensor:
    if isinstance(seen, torch.Tensor):
        return seen[index]
    missing = [i for i in rows if seen[i] is None]
    if missing:
        raise ValueError(f"rows {missing} apply a repetition penalty but have no seen ids")
    return torch.stack([seen[i] for i in rows])


def process(logits: torch.Tensor, rules: RowRules, *,
            produced: Union[int, Sequence[int], torch.Tensor] = 0, seen: Optional[Seen] = None,
            token_limit: Optional[int] = None) -> torch.Tensor:
    """Logits (B, V) → processed float32 logits (B, V), a new tensor (the input is not changed).

    `produced`: tokens each row has produced so far (one int for all rows, or one per row), for
    the min-new-tokens rule; `seen`: ids each row has seen, needed where a row's repetition
    penalty is not 1; `token_limit`: ids from there on are never chosen."""
    x = logits.to(torch.float32, copy=True)
    b = x.shape[0]
    rows = rows_of(rules, b)
    if token_limit is not None:
        x[:, token_limit:] = NEG_INF
    for penalty, members in groups(r.sampling.repetition_penalty for r in rows).items():
        if penalty == 1.0:
            continue
        if seen is None:
            raise ValueError("a repetition penalty needs the seen ids of its rows")
        index = _select(members, b, x.device)
        x[index] = apply_repetition_penalty(x[index], _seen_rows(seen, members, index), penalty)
    if isinstance(produced, torch.Tensor):
        produced = produced.tolist()
    counts = [produced] * b if isinstance(produced, int) else list(produced)
    blocked = groups(r.ends if r.ends and counts[i] < r.min_new_tokens else None
                     for i, r in enumerate(rows))
    blocked.pop(None, None)
    for ends, members in blocked.items():
        if len(members) == b:
            x[:, list(ends)] = NEG_INF
        else:
            x[torch.tensor(members, device=x.device).unsqueeze(1),
              torch.tensor(ends, device=x.device).unsqueeze(0)] = NEG_INF
    return x


def distributions(x: torch.Tensor, rules: RowRules) -> torch.Tensor:
    """Processed logits (B, V) → the distribution each row's token is drawn from (B, V):
    one-hot at the argmax for greedy rows, softmax of the warped logits otherwise."""
    b = x.shape[0]
    out = None
    for params, members in groups(r.sampling for r in rows_of(rules, b)).items():
        index = _select(members, b, x.device)
        if params.is_greedy:
            probs = torch.nn.functional.one_hot(x[index].argmax(-1), x.shape[-1]).float()
        else:
            probs = logits_to_probs(x[index], params)
        if len(members) == b:
            return probs
        if out is None:
            out = torch.empty(x.shape, dtype=probs.dtype, device=x.device)
        out[index] = probs
    return out if out is not None else x.clone()


def choose(x: torch.Tensor, rules: RowRules, *, keys: Optional[torch.Tensor] = None,
           generator: Optional[torch.Generator] = None,
           on_failure: Optional[Callable[[list[int], RuntimeError], None]] = None) -> torch.Tensor:
    """Processed logits (B, V) → the next id of every row (B,): argmax for greedy rows; for the
    others an exponential race keyed by `keys` (B,) int64 (sampling.race_key) when given, else a
    multinomial draw on `generator`, one call per group of rows with the same settings.

    A group whose draw fails (no probability mass left) raises, or with `on_failure` is reported
    as on_failure(its rows, the error) and gets id -1, so the other rows still get their tokens."""
    b = x.shape[0]
    out = None
    for params, members in groups(r.sampling for r in rows_of(rules, b)).items():
        index = _select(members, b, x.device)
        try:
            if keys is not None and not params.is_greedy:
                ids = draw(logits_to_probs(x[index], params), keys[members])
            else:
                ids = sample(x[index], params, generator)
        except RuntimeError as exc:
            if on_failure is None:
                raise
            on_failure(members, exc)
            ids = torch.full((len(members),), -1, dtype=torch.long, device=x.device)
        if len(members) == b:
            return ids
        if out is None:
            out = torch.empty(b, dtype=torch.long, device=x.device)
        out[index] = ids
    return out if out is not None else torch.empty(0, dtype=torch.long, device=x.device)
