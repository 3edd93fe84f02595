"""Generator: prefill, then one-token decode steps over a static KV cache, for a batch of prompts.

Prompts of different lengths are right-padded for the prefill; afterwards every row decodes at
its own next position (the cache masks by position, so padding junk in a row's later slots is
never attended and is overwritten as the row grows). Each row stops on its own at the
end-of-document token, a stop criterion, its token budget or the end of the context.

Tensor parallelism: every rank runs the forward on its heads and vocabulary slice; the full
logits are gathered, and only rank 0 of the TP group processes them, draws the next ids and
decides which rows are finished. It broadcasts ids and decisions in one (2, B) tensor, so the
other ranks never depend on matching random streams or on detokenising.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..model.gpt import GPTModel
from ..model.kv_cache import KVCache
from . import logits as logits_chain
from .logits import Rules, needs_seen, seen_of
from .sampling import GREEDY, SamplingParams
from ..errors import UsageError

ACTIVE, EOD, STOP, LENGTH = 0, 1, 2, 3
FINISH_REASONS = {EOD: "eod", STOP: "stop", LENGTH: "length"}

# stop(row, continuation_so_far) -> True when the row must finish (evaluated on TP rank 0 only)
StopCriterion = Callable[[int, Sequence[int]], bool]
# on_token(row, token): called on every rank for each token kept in a row's continuation
TokenCallback = Callable[[int, int], None]


class PromptError(UsageError):
    """A prompt does not fit: empty, or too long for the context; the message says by how much."""


@dataclass
class Completion:
    """A row's continuation (prompt excluded; the end-of-document token is not included) and
    why it ended: "eod", "stop" or "length". `logits` (N, V): the raw full-vocabulary logits each
    step chose from, when asked for (tests compare them with a full recompute)."""

    tokens: list[int]
    finish_reason: str
    logits: Optional[torch.Tensor] = None


class Generator:
    """Samples continuations from a GPTModel (any TP size) with a KV cache.

    `max_length`: the context (prompt + continuation) in positions, at most the model's
    `max_position_embeddings`. `compile=True` wraps the decode step in torch.compile over a
    static-window cache (useful on GPU; the first steps pay the compile time; dense layers
    compile into one graph, sparse layers still read positions on the host).
    """

    def __init__(self, model: GPTModel, *, eod: Optional[int] = None,
                 max_length: Optional[int] = None, compile: bool = False,
                 compile_backend: str = "inductor", end_ids: Sequence[int] = ()) -> None:
        self.model = model.eval()
        self.ps = model.ps
        self.config = model.config
        self.eod = eod
        # every id that ends a row like the end of text (not kept; finish reason "eod"): eod and
        # e.g. a chat template's end-of-turn token
        self.ends = tuple(dict.fromkeys(([eod] if eod is not None else []) + list(end_ids)))
        limit = self.config.max_position_embeddings
        self.max_length = min(max_length or limit, limit)
        self.static = compile
        self._decode = self.forward
        if compile:
            self._decode = torch.compile(self.forward, backend=compile_backend, dynamic=False)
        self.device = model.embed.weight.device

    # ---- checks ---------------------------------------------------------------------------
    def check_prompt(self, tokens: Sequence[int], name: str = "prompt") -> None:
        """PromptError unless the prompt leaves room for at least one new token."""
        limit = self.max_length - 1
        if len(tokens) == 0:
            raise PromptError(f"{name} is empty: give at least one token")
        if len(tokens) > limit:
            raise PromptError(
                f"{name} is {len(tokens)} tokens, {len(tokens) - limit} over the limit of "
                f"{limit} (context of {self.max_length} positions, --seq-length, minus one for "
                "the first new token)")

    # ---- the two phases -------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        return self.model.new_cache(batch_size, max_length, static_window=self.static)

    def prefill(self, cache: KVCache, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Right-padded prompts (B, T) with real lengths (B,) → full logits (B, V) at each
        row's last prompt token. Fills cache slots [0, T)."""
        return self.model.gather_logits(self.forward(tokens, None, cache, last=lengths - 1))

    def decode_one_token(self, cache: KVCache, tokens: torch.Tensor,
                         positions: Optional[torch.Tensor]) -> torch.Tensor:
        """Tokens (B, 1) at per-row positions (B, 1) (None: right after the cache) → (B, V)."""
        return self.model.gather_logits(self._decode(tokens, positions, cache))

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor], cache: KVCache,
                last: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The model's forward → this rank's logits (B, V_local) at each row's last token, or at
        index `last` (B,); only there is the vocabulary projection computed."""
        return self.model(tokens, positions, cache, logits_index="last" if last is None else last)

    def check_request(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> bool:
        """Check a generate() call (also the speculative decoder's); False: no prompts."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        for i, p in enumerate(prompts):
            self.check_prompt(p, f"prompt {i}")
        return bool(prompts)

    # ---- the loop -------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampling: SamplingParams = GREEDY, min_new_tokens: int = 0,
                 seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 stop: Optional[StopCriterion] = None, on_token: Optional[TokenCallback] = None,
                 keep_logits: bool = False) -> list[Completion]:
        """Continue every prompt (lists of ids) by up to `max_new_tokens` (fewer where the
        context ends). `generator` (or a new one from `seed`) drives the draws on TP rank 0."""
        if not self.check_request(prompts, max_new_tokens):
            return []
        b, dev = len(prompts), self.device
        lens = [len(p) for p in prompts]
        longest = max(lens)
        budget = torch.tensor([min(max_new_tokens, self.max_length - n) for n in lens], device=dev)
        cache = self.new_cache(b, min(self.max_length, longest + max_new_tokens))
        pad = self.eod if self.eod is not None else 0
        tokens = torch.full((b, longest), pad, dtype=torch.long, device=dev)  # (B, T) right-padded
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        lengths = torch.tensor(lens, device=dev)
        # No padding: plain contiguous decode. The static window always needs positions.
        contiguous = len(set(lens)) == 1 and not self.static
        sampler = _Sampler(self, sampling, min_new_tokens, budget, stop, generator, seed,
                           prompts) if self.ps.tp_rank == 0 else None

        logits = self.prefill(cache, tokens, lengths)
        pos = lengths.clone()  # (B,) position of each row's next token
        state = torch.zeros(b, dtype=torch.long, device=dev)  # finish code per row
        codes = [ACTIVE] * b
        out: list[list[int]] = [[] for _ in range(b)]
        kept: list[list[torch.Tensor]] = [[] for _ in range(b)]
        for step in range(int(budget.max())):
            if keep_logits:
                for i in range(b):
                    if codes[i] == ACTIVE:
                        kept[i].append(logits[i].float().clone())
            choice = (sampler.choose(logits, step, state, out) if sampler is not None
                      else torch.empty(2, b, dtype=torch.long, device=dev))  # (2, B): ids, codes
            self.ps.broadcast_from_tp_source(choice)
            ids, new_codes = choice.tolist()  # the one host sync of a step
            for i in range(b):
                if codes[i] == ACTIVE and new_codes[i] != EOD:
                    out[i].append(ids[i])
                    if on_token is not None:
                        on_token(i, ids[i])
            codes, state = new_codes, choice[1]
            if ACTIVE not in codes:
                break
            logits = self.decode_one_token(cache, choice[0].unsqueeze(1),
                                           None if contiguous else pos.unsqueeze(1))
            pos += (state == ACTIVE).long()  # finished rows stay put (their slots are junk)
        return [Completion(out[i], FINISH_REASONS[codes[i]],
                           torch.stack(kept[i]) if keep_logits and kept[i] else None)
                for i in range(b)]


class _Sampler:
    """TP rank 0's side of a generate call: the logits chain (logits.py), draws and stop decisions."""

    def __init__(self, gen: Generator, params: SamplingParams, min_new_tokens: int,
                 budget: torch.Tensor, stop: Optional[StopCriterion],
                 generator: Optional[torch.Generator], seed: Optional[int],
                 prompts: Sequence[Sequence[int]]) -> None:
        self.rules = Rules(params, min_new_tokens, gen.ends)
        self.min_new, self.budget, self.stop = min_new_tokens, budget, stop
        self.ends = list(gen.ends)
        if generator is None and seed is not None:
            generator = torch.Generator(device=gen.device).manual_seed(seed)
        self.generator = generator
        self.seen = None  # (B, V): ids of the prompts, then the new ones
        if needs_seen(self.rules):
            self.seen = seen_of(prompts, gen.config.vocab_size, gen.device)

    def choose(self, logits: torch.Tensor, step: int, state: torch.Tensor,
               out: list[list[int]]) -> torch.Tensor:
        """(2, B): the next ids and every row's finish code after taking them."""
        x = logits_chain.process(logits, self.rules, produced=step, seen=self.seen)
        nxt = logits_chain.choose(x, self.rules, generator=self.generator)  # (B,)
        active = state == ACTIVE
        new = state.clone()
        if self.ends:
            new[active & torch.isin(nxt, torch.tensor(self.ends, device=nxt.device))] = EOD
        if self.stop is not None and step + 1 >= self.min_new:
            for i in (active & (new == ACTIVE)).nonzero().flatten().tolist():
                if self.stop(i, out[i] + [int(nxt[i])]):
                    new[i] = STOP
        new[active & (new == ACTIVE) & (self.budget <= step + 1)] = LENGTH
        if self.seen is not None:
            rows = active.nonzero().flatten()
            self.seen[rows, nxt[rows]] = True
        return torch.stack([nxt, new])
