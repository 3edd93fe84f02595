"""Continuous batching: sequences join a running batch at the next step in a free KV-cache row, leave when done.

One thread owns the model. Each step it drops cancelled and timed-out sequences (their rows are
free at once), admits waiting sequences into free rows (lowest first, so the decoded block of
rows [0, hi) stays short), runs the step plan (decode of the running rows, then the joiners'
prefills), and samples one token per row through the logits chain (inference/logits.py:
processing batched by settings; the scheduler never edits logits itself), then an
exponential-race draw (argmax p / E, one Exp(1) variate per id still in play, from a
counter-based stream keyed by the sequence's seed and step). So with a fixed seed a sequence
draws the same tokens whatever else shares the batch: the logits it draws from agree only to fp32
rounding (the decode's batch width and key length vary with the batch), and unlike an
inverse-CDF draw the race does not flip on such differences (see sampling.draw). Greedy rows
take the argmax exactly as Generator does.

The HTTP side talks to this thread through `submit`, `cancel` and each sequence's `sink`,
which receives events: ("token", id, logprob), ("prompt_logprobs", [None, lp, ...]),
("done", finish_reason); `logprob` is (chosen log-probability, [(id, lp), ...] top
alternatives) from the model's raw distribution, or None when not asked for.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .. import runtime
from ..inference import logits as logits_chain
from ..inference.logits import Rules, needs_seen, seen_of
from ..inference.sampling import SamplingParams, race_key
from ..inference.text import StopStrings, TextStream
from .engine import BatchEngine, StepPlan

IDLE_BEAT_S = 2.0  # an idle scheduler still sends an empty plan this often (TP ranks wait in it)

Event = tuple
Sink = Callable[[Event], None]


class QueueFull(Exception):
    """No room: every row is busy and the waiting queue is full."""


@dataclass(frozen=True)
class SeqOptions:
    sampling: SamplingParams
    max_tokens: int  # 0: only score the prompt (echo)
    min_tokens: int = 0
    stops: tuple[str, ...] = ()
    logprobs: Optional[int] = None  # alternatives per token (0: the chosen one only)
    prompt_logprobs: bool = False
    timeout_s: float = 600.0
    stop_ids: tuple[int, ...] = ()  # tokens that end it like the end of text (a chat end of turn)


class Seq:
    """One choice of one request: a prompt, its options and seed, and what it produced."""

    def __init__(self, prompt: Sequence[int], options: SeqOptions, seed: int, sink: Sink) -> None:
        self.prompt, self.options, self.seed, self.sink = list(prompt), options, seed, sink
        self.out: list[int] = []
        self.row: Optional[int] = None
        self.budget = options.max_tokens
        self.finish: Optional[str] = None
        self.cancelled = False
        self.cancel_reason = "cancelled"  # "shutdown" when the server aborts it
        self.t_submit = time.monotonic()
        self.deadline = self.t_submit + options.timeout_s
        self.t_first: Optional[float] = None
        self.rules: Optional[Rules] = None  # how its tokens are chosen (set at admission)
        self.seen: Optional[torch.Tensor] = None  # (V,) ids seen, for the repetition penalty
        self.stopper: Optional[TextStream] = None  # its text so far, scanned for stop strings

    @property
    def position(self) -> int:
        """Position of the last sampled token: the decode's input."""
        return len(self.prompt) + len(self.out) - 1


class Scheduler:
    """Rank 0's loop around a BatchEngine; start() runs it in a thread, stop() ends it."""

    def __init__(self, engine: BatchEngine, *, eod: Optional[int], vocab_size: int,
                 detokenize: Callable, max_queue: int, metrics=None,
                 token_limit: Optional[int] = None) -> None:
        self.engine, self.eod, self.vocab_size = engine, eod, vocab_size
        # ids >= token_limit (model rows the tokenizer has no piece for) are never drawn
        self.token_limit = token_limit if token_limit is not None and token_limit < vocab_size else None
        self.detokenize, self.max_queue, self.metrics = detokenize, max_queue, metrics
        self.max_batch, self.max_length = engine.max_batch, engine.max_length
        self.pad = eod if eod is not None else 0
        self.rows: list[Optional[Seq]] = [None] * self.max_batch
        self.waiting: deque[Seq] = deque()
        self.cv = threading.Condition()
        self.stopping = False
        self.thread: Optional[threading.Thread] = None
        self.steps = 0

    # ---- the HTTP side --------------------------------------------------------------------
    @property
    def running(self) -> int:
        return sum(s is not None for s in self.rows)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def submit(self, seqs: list[Seq]) -> None:
        """Queue all of a request's sequences, or none (QueueFull)."""
        with self.cv:
            if self.stopping or self.running + len(self.waiting) + len(seqs) > \
                    self.max_batch + self.max_queue:
                raise QueueFull(f"{self.running} rows busy and {len(self.waiting)} sequences "
                                f"waiting (--max-batch-size {self.max_batch}, --max-queue "
                                f"{self.max_queue})")
            for s in seqs:
                s.budget = min(s.options.max_tokens, self.max_length - len(s.prompt))
            self.waiting.extend(seqs)
            self.cv.notify()

    def cancel(self, seqs: Sequence[Seq]) -> None:
        """The client went away: the rows are freed at the next step."""
        with self.cv:
            for s in seqs:
                if s.finish is None:
                    s.cancelled = True
            self.cv.notify()

    def abort_all(self, reason: str = "shutdown") -> int:
        """End every waiting and running sequence at the next step (finish `reason`); returns
        how many."""
        with self.cv:
            seqs = [s for s in self.rows if s is not None] + list(self.waiting)
            for s in seqs:
                s.cancelled, s.cancel_reason = True, reason
            self.cv.notify()
        return len(seqs)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="megatron_ru-scheduler", daemon=True)
        self.thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Cancel what is left, tell the other TP ranks to stop, end the thread."""
        with self.cv:
            self.stopping = True
            self.cv.notify()
        if self.thread is not None:
            self.thread.join(timeout_s)

    # ---- the loop -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                runtime.heartbeat("a serving step")  # idle beats too: idle is not a hang
                with self.cv:
                    if not self.stopping and not self.waiting and not self.running:
                        self.cv.wait(IDLE_BEAT_S)
                    if self.stopping:
                        break
                    self._drop_finished()
                    joins = self._admit()
                plan, running = self._plan(joins)
                self.engine.share(plan)  # also the idle heartbeat of the other TP ranks
                if plan.empty:
                    continue
                decoded, prefilled = self.engine.execute(plan)
                first = [(seq, self._take_prefilled(seq, logits))
                         for seq, logits in zip(joins, prefilled)]
                first = [(seq, row) for seq, row in first if row is not None]
                seqs = running + [seq for seq, _ in first]
                rows = [decoded[seq.row] for seq in running] + [row for _, row in first]
                self._choose(seqs, torch.stack(rows) if rows else None)  # (N, V)
                self.steps += 1
                if self.metrics is not None:
                    self.metrics.count_step(len(running), len(joins))
            with self.cv:
                for s in [s for s in self.rows if s is not None] + list(self.waiting):
                    self._finish(s, "cancelled")
                self.waiting.clear()
            self.engine.share(StepPlan(stop=True))
        except BaseException as exc:  # noqa: BLE001 - a broken model step ends the job
            runtime.hard_exit(runtime.report(exc))

    def _drop_finished(self) -> None:
        now = time.monotonic()
        for s in list(self.waiting):
            if s.cancelled or now > s.deadline:
                self.waiting.remove(s)
                self._finish(s, s.cancel_reason if s.cancelled else "timeout")
        for s in self.rows:
            if s is not None and (s.cancelled or now > s.deadline):
                self._finish(s, s.cancel_reason if s.cancelled else "timeout")

    def _admit(self) -> list[Seq]:
        joins = []
        for row in range(self.max_batch):
            if not self.waiting:
                break
            if self.rows[row] is None:
                seq = self.waiting.popleft()
                seq.row, self.rows[row] = row, seq
                self._prepare(seq)
                joins.append(seq)
        return joins

    def _prepare(self, seq: Seq) -> None:
        opts = seq.options
        ends = ((self.eod,) if self.eod is not None else ()) + tuple(opts.stop_ids)
        seq.rules = Rules(opts.sampling, opts.min_tokens, ends)
        if needs_seen(seq.rules):
            seq.seen = seen_of([seq.prompt], self.vocab_size, self.engine.device)[0]
        if seq.options.stops:
            seq.stopper = TextStream(self.detokenize, StopStrings(seq.options.stops, self.detokenize))

    def _plan(self, joins: list[Seq]) -> tuple[StepPlan, list[Seq]]:
        running = [s for s in self.rows if s is not None and s not in joins]
        plan = StepPlan(joins=[(s.row, s.prompt, s.options.prompt_logprobs) for s in joins])
        if running:
            hi = max(s.row for s in running) + 1
            plan.decode_tokens, plan.decode_positions = [self.pad] * hi, [0] * hi
            for s in running:
                plan.decode_tokens[s.row], plan.decode_positions[s.row] = s.out[-1], s.position
        return plan, running

    # ---- sampling -------------------------------------------------------------------------
    def _take_prefilled(self, seq: Seq, logits: torch.Tensor) -> Optional[torch.Tensor]:
        """Emit prompt scores; → the (V,) logits to draw the first token from, or None."""
        if seq.options.prompt_logprobs:  # logits (T, V): row i predicts prompt[i + 1]
            logp = torch.log_softmax(logits[:-1].float(), dim=-1)
            k = seq.options.logprobs or 0
            scores = [None] + [_entry(logp[i], seq.prompt[i + 1], k) for i in range(len(seq.prompt) - 1)]
            self._emit(seq, ("prompt_logprobs", scores))
        if seq.budget <= 0:
            self._finish(seq, "length")
            return None
        return logits[-1]

    def _choose(self, seqs: list[Seq], logits: torch.Tensor) -> None:
        """Draw every sequence's next token from its row of logits (N, V) through the logits
        chain (batched by settings); each row's draw is keyed by its seed and step."""
        if not seqs:
            return
        raw = torch.log_softmax(logits.float(), dim=-1) \
            if any(s.options.logprobs is not None for s in seqs) else None
        rules = [s.rules for s in seqs]
        x = logits_chain.process(logits, rules, produced=[len(s.out) for s in seqs],
                                 seen=[s.seen for s in seqs], token_limit=self.token_limit)
        keys = torch.tensor([race_key(s.seed, len(s.out)) for s in seqs])
        failed: set[int] = set()

        def failure(rows: list[int], exc: RuntimeError) -> None:  # e.g. no probability mass left
            runtime.say(f"error: sampling failed for {len(rows)} sequence(s): {exc}")
            failed.update(rows)

        tokens = logits_chain.choose(x, rules, keys=keys, on_failure=failure)
        for i, (s, token) in enumerate(zip(seqs, tokens.tolist())):
            if i in failed:
                self._finish(s, "error")
            else:
                self._record(s, token, None if s.options.logprobs is None
                             else _entry(raw[i], token, s.options.logprobs))

    def _record(self, seq: Seq, token: int, logprob) -> None:
        """Append a drawn token, emit it, and finish the sequence when due."""
        opts = seq.options
        if seq.seen is not None:
            seq.seen[token] = True
        if seq.t_first is None:
            seq.t_first = time.monotonic()
            if self.metrics is not None:
                self.metrics.observe_ttft(seq.t_first - seq.t_submit)
        if token == self.eod or token in opts.stop_ids:
            self._finish(seq, "eod")
            return
        seq.out.append(token)
        if self.metrics is not None:
            self.metrics.count_tokens(1)
        self._emit(seq, ("token", token, logprob))
        # the stop strings see each new character once (a stop string that ended before
        # min_tokens does not count)
        ended = seq.stopper is not None and seq.stopper.scan.feed(seq.stopper.add(token))
        if ended and len(seq.out) >= opts.min_tokens:
            self._finish(seq, "stop")
        elif len(seq.out) >= seq.budget:
            self._finish(seq, "length")

    def _finish(self, seq: Seq, reason: str) -> None:
        if seq.finish is not None:
            return
        seq.finish = reason
        if seq.row is not None and self.rows[seq.row] is seq:
            self.rows[seq.row] = None
        if self.metrics is not None:
            self.metrics.count_finish(reason)
        self._emit(seq, ("done", reason))

    @staticmethod
    def _emit(seq: Seq, event: Event) -> None:
        try:
            seq.sink(event)
        except Exception:  # noqa: BLE001 - a gone client must not stop the batch
            seq.cancelled = True


def _entry(logp: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """(log-probability of `token`, the k most likely (id, log-probability)) from (V,) logp."""
    top = []
    if k:
        values, ids = torch.topk(logp, k)
        top = list(zip(ids.tolist(), values.tolist()))
    return float(logp[token]), top
