"""Speculative decoding: a small draft model proposes K tokens, the target checks them in one
forward over its KV cache, and rejection sampling keeps the target's exact distribution.

Per round and row (Leviathan et al. 2023, Chen et al. 2023): the draft samples d_1..d_K from
q_1..q_K; the target computes p_1..p_{K+1} for the same prefixes in one forward. d_j is accepted
with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection the row takes a token from
norm(max(0, p_j - q_j)) and the round ends; when all K are accepted it adds a bonus token from
p_{K+1}. Every committed token is then distributed exactly as under p. Greedy: d_j is accepted
iff it is the argmax of p_j, the correction is that argmax: the same tokens as plain greedy.
p and q are the *processed* distributions (repetition penalty, min-new-tokens, temperature,
top-k, top-p), computed per position with the drafted tokens counted as seen.

Cache bookkeeping (slot j = position j, masks by position, see model/kv_cache.py): a row that
has committed n tokens (prompt included) has valid target keys for positions < n - 1; the round
feeds the target [last committed, d_1..d_K] at positions n-1..n-1+K. The draft feeds whatever
committed tokens it has not seen (1 or 2 after the first round) and then d_1..d_{K-1}. Rows sit
at different positions (they accept different counts); finished rows feed junk into their own
slots. Tensor parallelism: TP rank 0 draws and decides; drafted ids and each round's decisions
are broadcast, so other ranks never need matching random streams.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .generator import ACTIVE, EOD, FINISH_REASONS, LENGTH, STOP, Completion, Generator
from . import logits as logits_chain
from .logits import Rules, needs_seen, seen_of
from .sampling import GREEDY, SamplingParams
from ..errors import UsageError


class SpeculativeError(UsageError):
    """The draft model does not fit the target (vocabulary, tokenizer, TP) or K is invalid."""


@dataclass
class Stats:
    drafted: int = 0  # draft tokens proposed to active rows
    accepted: int = 0  # of those, accepted by the target
    rounds: int = 0  # target forwards after the prefill
    per_row: list = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class SpeculativeGenerator:
    """`generate(...)` with Generator.generate's signature and results; `stats` after a call."""

    def __init__(self, target: Generator, draft_model, draft_tokens: int) -> None:
        if draft_tokens < 1:
            raise SpeculativeError(f"--draft-tokens {draft_tokens} must be >= 1")
        tcfg, dcfg = target.config, draft_model.config
        if dcfg.vocab_size != tcfg.vocab_size:
            raise SpeculativeError(f"the draft model has a vocabulary of {dcfg.vocab_size} ids, the "
                                   f"target {tcfg.vocab_size}: a draft must share the tokenizer")
        if draft_model.ps.tp_size != target.ps.tp_size:
            raise SpeculativeError("the draft model must run at the target's TP size")
        self.target, self.draft = target, draft_model.eval()
        self.k = draft_tokens
        self.ps, self.config, self.eod = target.ps, tcfg, target.eod
        self.device, self.max_length = target.device, min(target.max_length,
                                                          dcfg.max_position_embeddings)
        self.stats = Stats()

    def summary(self) -> str:
        s = self.stats
        return (f", speculative K={self.k}: {s.accepted}/{s.drafted} drafted tokens accepted "
                f"({100 * s.acceptance_rate:.1f}%), {s.rounds} target rounds")

    def check_prompt(self, tokens: Sequence[int], name: str = "prompt") -> None:
        self.target.check_prompt(tokens, name)

    # ---- forwards (every rank) ---------------------------------------------------------------
    def _feed(self, model, cache, rows: list[list[int]], starts: list[int], limit: int,
              all_logits: bool = False) -> torch.Tensor:
        """Feed row i the tokens rows[i] at positions starts[i]...; right-padded, positions
        clamped below `limit`. → full logits at each row's last token (B, V), or at every
        position (B, T, V)."""
        b, t = len(rows), max(len(r) for r in rows)
        tokens = torch.zeros(b, t, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        pos = (torch.tensor(starts).unsqueeze(1) + torch.arange(t)).clamp(max=limit - 1)  # (B, T)
        last = torch.tensor([len(r) - 1 for r in rows], device=self.device)
        logits = model(tokens.to(self.device), pos.to(self.device), cache,
                       logits_index=None if all_logits else last)
        return model.gather_logits(logits).float()

    # ---- the loop ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampling: SamplingParams = GREEDY, min_new_tokens: int = 0,
                 seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 stop=None, on_token=None, keep_logits: bool = False) -> list[Completion]:
        if keep_logits:
            raise ValueError("keep_logits is not available with speculative decoding")
        if not self.target.check_request(prompts, max_new_tokens):
            return []
        b = len(prompts)
        budget = [min(max_new_tokens, self.max_length - len(p)) for p in prompts]
        limit = min(self.max_length, max(len(p) for p in prompts) + max_new_tokens)
        tcache = self.target.model.new_cache(b, limit)
        dcache = self.draft.new_cache(b, limit)
        judge = _Judge(self, sampling, min_new_tokens, budget, stop, generator, seed, prompts) \
            if self.ps.tp_rank == 0 else None
        seqs = [list(p) for p in prompts]
        out: list[list[int]] = [[] for _ in range(b)]
        codes = [ACTIVE] * b
        dseen = [0] * b  # draft cache valid below this position
        # target prefill exactly as Generator does: the first new token of every row
        tokens = torch.full((b, max(len(p) for p in prompts)), self.eod or 0, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        logits = self.target.prefill(tcache, tokens.to(self.device), lengths).float()
        proposals = torch.zeros(b, 0, dtype=torch.long)
        target_logits = logits.unsqueeze(1)  # (B, 1, V)
        self.stats.per_row = [[0, 0] for _ in range(b)]
        while True:
            decision = judge.decide(target_logits, proposals, out, codes) if judge else \
                torch.empty(b, proposals.shape[1] + 3, dtype=torch.long)
            decision = self.ps.broadcast_from_tp_source(decision.to(self.device)).cpu()
            self._commit(decision, proposals, seqs, out, codes, dseen, on_token)
            if ACTIVE not in codes:
                break
            left = [budget[i] - len(out[i]) for i in range(b) if codes[i] == ACTIVE]
            k = max(0, min(self.k, min(left) - 1))
            proposals, draft_probs = self._draft(k, seqs, codes, dseen, dcache, limit, judge, out)
            rows = [[s[-1]] + proposals[i].tolist() for i, s in enumerate(seqs)]
            starts = [len(s) - 1 for s in seqs]
            target_logits = self._feed(self.target.model, tcache, rows, starts, limit,
                                       all_logits=True)  # (B, k+1, V)
            self.stats.rounds += 1
            if judge is not None:
                judge.draft_probs = draft_probs
        return [Completion(out[i], FINISH_REASONS[codes[i]]) for i in range(b)]

    def _draft(self, k, seqs, codes, dseen, dcache, limit, judge, out):
        """K draft steps → proposals (B, k) on every rank, and q (B, k, V) on TP rank 0."""
        b = len(seqs)
        if k == 0:
            return torch.zeros(b, 0, dtype=torch.long), None
        rows = [s[dseen[i]:] if codes[i] == ACTIVE else s[-1:] for i, s in enumerate(seqs)]
        starts = [dseen[i] if codes[i] == ACTIVE else len(s) - 1 for i, s in enumerate(seqs)]
        logits = self._feed(self.draft, dcache, rows, starts, limit)
        ids, probs = [], []
        for j in range(k):
            if judge is not None:
                d, q = judge.draft_step(logits, torch.stack(ids, 1) if ids else None, out)
                probs.append(q)
            else:
                d = torch.empty(b, dtype=torch.long)
            d = self.ps.broadcast_from_tp_source(d.to(self.device)).cpu()
            ids.append(d)
            if j < k - 1:
                logits = self._feed(self.draft, dcache, [[int(x)] for x in d],
                                    [len(s) + j for s in seqs], limit)
        for i, s in enumerate(seqs):
            dseen[i] = len(s) + k - 1
        return torch.stack(ids, 1), (torch.stack(probs, 1) if probs else None)

    def _commit(self, decision, proposals, seqs, out, codes, dseen, on_token) -> None:
        """decision (B, k+3): [count, tokens (k+1), code]; count tokens are kept per row."""
        k = proposals.shape[1]
        for i in range(len(seqs)):
            if codes[i] != ACTIVE:
                continue
            count, code = int(decision[i, 0]), int(decision[i, -1])
            new = decision[i, 1: 1 + count].tolist()
            accepted = 0
            while accepted < min(count, k) and new[accepted] == int(proposals[i, accepted]):
                accepted += 1
            if k:
                self.stats.drafted += k
                self.stats.accepted += accepted
                self.stats.per_row[i][0] += k
                self.stats.per_row[i][1] += accepted
            for t in new:
                seqs[i].append(t)
                out[i].append(t)
                if on_token is not None:
                    on_token(i, t)
            dseen[i] = min(dseen[i], len(seqs[i]) - 1) if k else dseen[i]
            codes[i] = code


class _Judge:
    """TP rank 0: processed distributions, draws, acceptance and finish decisions."""

    def __init__(self, spec: SpeculativeGenerator, params: SamplingParams, min_new: int,
                 budget: list[int], stop, generator, seed, prompts) -> None:
        self.params, self.min_new, self.budget, self.stop = params, min_new, budget, stop
        self.ends = spec.target.ends
        self.rules = Rules(params, min_new, tuple(self.ends))
        if generator is None:
            generator = torch.Generator().manual_seed(seed if seed is not None else 0)
        self.gen = generator
        self.draft_probs = None
        self.seen = seen_of(prompts, spec.config.vocab_size) if needs_seen(self.rules) else None

    def _probs(self, logits: torch.Tensor, steps: torch.Tensor,
               extra: Optional[torch.Tensor]) -> torch.Tensor:
        """Logits (B, V) of each row's step `steps` (B,), `extra` (B, j) drafted ids counted as
        seen → the distributions (B, V) the plain sampler would draw from (logits.py's chain)."""
        seen = self.seen
        if seen is not None and extra is not None and extra.numel():
            seen = seen.clone().scatter_(1, extra, True)
        x = logits_chain.process(logits.cpu(), self.rules, produced=steps, seen=seen)
        return logits_chain.distributions(x, self.rules)

    def draft_step(self, logits, drafted, out):
        steps = torch.tensor([len(o) for o in out]) + (0 if drafted is None else drafted.shape[1])
        q = self._probs(logits, steps, drafted)  # (B, V)
        if self.params.is_greedy:
            return q.argmax(-1), q
        return torch.multinomial(q, 1, generator=self.gen).squeeze(-1), q

    def decide(self, target_logits, proposals, out, codes) -> torch.Tensor:
        """(B, k+3): how many tokens each row keeps, the tokens, its finish code after them."""
        b, k = proposals.shape
        base = torch.tensor([len(o) for o in out])
        p = torch.stack([self._probs(target_logits[:, j], base + j, proposals[:, :j])
                         for j in range(k + 1)], 1)  # (B, k+1, V)
        result = torch.zeros(b, k + 3, dtype=torch.long)
        for i in range(b):
            if codes[i] != ACTIVE:
                result[i, -1] = codes[i]
                continue
            tokens = []
            for j in range(k):
                d = int(proposals[i, j])
                if self._accept(p[i, j], self.draft_probs[i, j], d):
                    tokens.append(d)
                    continue
                tokens.append(self._residual(p[i, j], self.draft_probs[i, j]))
                break
            else:
                tokens.append(self._draw(p[i, k]))
            kept, code = self._finish(i, tokens, out[i])
            result[i, 0], result[i, -1] = len(kept), code
            result[i, 1: 1 + len(kept)] = torch.tensor(kept, dtype=torch.long)
            if self.seen is not None:
                self.seen[i, kept] = True
        return result

    def _accept(self, p, q, d) -> bool:
        if self.params.is_greedy:
            return bool(p[d] > 0)
        u = torch.rand((), generator=self.gen)
        return bool(u * q[d] < p[d])  # u < p/q, written without dividing

    def _residual(self, p, q) -> int:
        if self.params.is_greedy:
            return int(p.argmax())
        r = (p - q).clamp(min=0)
        r = r if float(r.sum()) > 0 else p
        return int(torch.multinomial(r / r.sum(), 1, generator=self.gen))

    def _draw(self, p) -> int:
        if self.params.is_greedy:
            return int(p.argmax())
        return int(torch.multinomial(p, 1, generator=self.gen))

    def _finish(self, i: int, tokens: list[int], done: list[int]):
        """The plain sampler's rules token by token: EOD (not kept), stop, budget."""
        kept = []
        for t in tokens:
            step = len(done) + len(kept)
            if t in self.ends:
                return kept, EOD
            kept.append(t)
            if self.stop is not None and step + 1 >= self.min_new and self.stop(i, done + kept):
                return kept, STOP
            if step + 1 >= self.budget[i]:
                return kept, LENGTH
        return kept, ACTIVE


def add_arguments(group) -> None:
    group.add_argument("--draft-load", metavar="DIR",
                       help="speculative decoding: a small checkpoint with the same tokenizer "
                            "(or the target itself with --draft-quantize) drafts tokens")
    group.add_argument("--draft-tokens", type=int, default=None,
                       help="tokens the draft proposes per target forward (default 4)")
    group.add_argument("--draft-quantize", choices=("int8", "int4"), default=None,
                       help="quantize the draft model at load")


def check_args(args) -> None:
    if args.draft_tokens is not None and args.draft_tokens < 1:
        raise SpeculativeError(f"--draft-tokens {args.draft_tokens} must be >= 1")
    if args.draft_load is None and (args.draft_tokens is not None or args.draft_quantize):
        raise SpeculativeError("--draft-tokens / --draft-quantize need --draft-load")
    if args.draft_load is not None and args.draft_tokens is None:
        args.draft_tokens = 4
    if args.draft_load is not None and getattr(args, "compile", False):
        raise SpeculativeError("--draft-load and --compile exclude each other")
