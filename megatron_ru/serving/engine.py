"""The forwards of one serving step over a static KV cache of max-batch rows, and the TP step plan.

A step plan says what every rank computes in one step: a decode of rows [0, hi) (each row's
last token at its own position; free rows get a pad token at position 0, which only writes
junk into their own slot 0) and then the prefill of the joining prompts into their free rows
(one forward for all of them, right-padded; a lone prompt is prefilled exactly as
generate.py does). The decode runs first, so a row that joins in this step is never written by
it.

Tensor parallelism: rank 0 of the TP group runs the HTTP server and the scheduler; it
broadcasts each plan (a small pickled object) and all ranks run the same forwards, whose
collectives need every rank. Only rank 0 samples; the next plan carries the sampled tokens,
so the other ranks never need the random streams, the tokenizer or the requests.
"""
from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import runtime
from ..inference.generator import Generator


@dataclass
class StepPlan:
    decode_tokens: list[int] = field(default_factory=list)  # (hi,) row r's input token
    decode_positions: list[int] = field(default_factory=list)  # (hi,) its position
    joins: list[tuple[int, list[int], bool]] = field(default_factory=list)  # (row, prompt, all logits)
    stop: bool = False

    @property
    def empty(self) -> bool:
        return not self.decode_tokens and not self.joins


class BatchEngine:
    """Runs step plans on every rank; `execute` returns the full logits (rank 0 uses them)."""

    def __init__(self, generator: Generator, max_batch: int, max_length: int) -> None:
        self.gen, self.ps = generator, generator.ps
        self.max_batch, self.max_length = max_batch, max_length
        self.cache = generator.new_cache(max_batch, max_length)  # (L, rows, H_kv, S, D) buffers
        self.device = generator.device

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> tuple[Optional[torch.Tensor], list[torch.Tensor]]:
        """→ decode logits (hi, V) or None, and per join: (1, V) at the last prompt token, or
        (T, V) at every prompt position when all logits were asked for (prompt scoring)."""
        decoded = None
        if plan.decode_tokens:
            hi = len(plan.decode_tokens)
            tokens = torch.tensor(plan.decode_tokens, device=self.device).unsqueeze(1)  # (hi, 1)
            pos = torch.tensor(plan.decode_positions, device=self.device).unsqueeze(1)  # (hi, 1)
            decoded = self.gen.decode_one_token(self.cache.rows(0, hi), tokens, pos)
        prefilled: list = [None] * len(plan.joins)
        batch = [i for i, (_, _, all_logits) in enumerate(plan.joins) if not all_logits]
        if len(batch) > 1:  # several prompts joined: one padded forward, then copy into rows
            for i, logits in zip(batch, self._prefill_together([plan.joins[i] for i in batch])):
                prefilled[i] = logits
        for i, (row, ids, all_logits) in enumerate(plan.joins):
            if prefilled[i] is not None:
                continue
            view = self.cache.rows(row, row + 1)
            x = torch.tensor([ids], device=self.device)  # (1, T)
            if all_logits:
                logits = self.gen.model.gather_logits(self.gen.model(x, None, view))[0]  # (T, V)
            else:  # the same call generate.py makes: identical numbers for a lone prompt
                logits = self.gen.prefill(view, x, torch.tensor([len(ids)], device=self.device))
            prefilled[i] = logits
        return decoded, prefilled

    def _prefill_together(self, joins: list) -> list[torch.Tensor]:
        """Right-padded prompts in a scratch cache (the Generator's batched prefill), whose
        slots are then copied into each prompt's row; → (1, V) logits per prompt."""
        lengths = [len(ids) for _, ids, _ in joins]
        longest = max(lengths)
        pad = self.gen.eod if self.gen.eod is not None else 0
        tokens = torch.full((len(joins), longest), pad, dtype=torch.long, device=self.device)
        for j, (_, ids, _) in enumerate(joins):
            tokens[j, :len(ids)] = torch.tensor(ids, device=self.device)  # (J, T)
        scratch = self.gen.new_cache(len(joins), longest)
        logits = self.gen.prefill(scratch, tokens, torch.tensor(lengths, device=self.device))
        rows = torch.tensor([row for row, _, _ in joins], device=self.device)
        self.cache.k[:, rows, :, :longest] = scratch.k  # (L, J, H_kv, T, D); padding slots are
        self.cache.v[:, rows, :, :longest] = scratch.v  # junk, overwritten before being read
        return [logits[j:j + 1] for j in range(len(joins))]

    # ---- tensor parallelism ---------------------------------------------------------------
    def share(self, plan: StepPlan) -> None:
        """Rank 0: send the plan to the other ranks of the TP group (no-op at TP=1)."""
        self.ps.broadcast_from_tp_source(plan)

    def receive(self) -> StepPlan:
        """The other TP ranks: the plan rank 0 shares next."""
        return self.ps.broadcast_from_tp_source(None)

    def follow(self) -> int:
        """TP ranks other than 0: run every plan rank 0 sends until it says stop. Signals are
        rank 0's business (it finishes the requests, then sends stop), so they are only noted."""
        stopping = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stopping.set())
        while True:
            plan = self.receive()
            if plan.stop:
                return 0
            if not plan.empty:
                self.execute(plan)
            runtime.heartbeat("a serving step")
