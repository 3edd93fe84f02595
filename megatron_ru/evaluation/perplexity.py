"""Sliding-window perplexity and bits per byte of a token stream, at any TP size (and split over DP).

A corpus is a list of documents. Its stream is one end-of-document token followed by every
document's tokens and an end-of-document token (what `preprocess_data.py --append-eod` writes
and training sees). Windows of `seq_length` inputs start every `stride` tokens; each window
scores only the targets no earlier window scored, so every token after the leading EOD is scored
exactly once, with at least `seq_length - stride` tokens of context (the first window: whatever
precedes it). `stride == seq_length` gives disjoint windows, smaller strides more context.

Bits per byte = total negative log-likelihood in bits / UTF-8 bytes of the documents' text. The
EOD tokens are scored too (the cost of marking where documents end) and count no bytes, so the
number is comparable between tokenizers: it is what the model needs to compress the text.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from ..parallel.cross_entropy import IGNORE_INDEX, vocab_parallel_cross_entropy
from ..errors import UsageError


class EvalInputError(UsageError):
    """A flag or an evaluation input breaks a rule; the message names it."""


@dataclass
class Window:
    """Inputs stream[start:start + length], targets shifted by one; only the last `scored`
    targets count."""

    start: int
    length: int
    scored: int


def sliding_windows(num_tokens: int, seq_length: int, stride: int) -> list[Window]:
    """Windows over a stream of `num_tokens` ids that score targets 1..num_tokens-1 once each."""
    if not 1 <= stride <= seq_length:
        raise EvalInputError(f"--stride {stride} must be in [1, --seq-length {seq_length}]")
    windows, done, start = [], 0, 0  # done: targets 1..done are scored
    while done < num_tokens - 1:
        end = min(start + seq_length, num_tokens - 1)  # inputs [start, end), targets up to end
        if end > done:
            windows.append(Window(start, end - start, end - done))
            done = end
        start += stride
    return windows


@dataclass
class Score:
    """Sums over scored tokens: negative log-likelihood in nats, token count, text bytes."""

    nll: float = 0.0
    tokens: int = 0
    bytes: int = 0
    windows: int = 0

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / max(self.bytes, 1)

    def add(self, other: "Score") -> "Score":
        return Score(self.nll + other.nll, self.tokens + other.tokens, self.bytes + other.bytes,
                     self.windows + other.windows)

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "bytes": self.bytes, "windows": self.windows,
                "loss": self.loss, "perplexity": self.perplexity,
                "bits_per_byte": self.bits_per_byte, "nll_nats": self.nll}


def build_stream(documents: Sequence[Sequence[int]], eod: int) -> list[int]:
    """[EOD] + doc_1 + [EOD] + doc_2 + [EOD] ...; documents that already end in EOD keep one."""
    stream = [eod]
    for doc in documents:
        stream.extend(doc)
        if not doc or doc[-1] != eod:
            stream.append(eod)
    return stream


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.inference_mode()
def score_stream(model, stream: Sequence[int], *, seq_length: int, stride: int,
                 batch_size: int = 8, dp_rank: int = 0, dp_size: int = 1,
                 on_batch: Optional[Callable[[int, int], None]] = None) -> Score:
    """NLL sum and token count of `stream` under `model` (a GPTModel at any TP size; every TP
    rank calls this with the same arguments). Windows are dealt round-robin over `dp_size`
    replicas; the caller sums the replicas' scores (`reduce_score`). `on_batch(windows, tokens)`
    is called after every forward (progress)."""
    limit = model.config.max_position_embeddings
    if seq_length > limit:
        raise EvalInputError(f"--seq-length {seq_length} exceeds the model's "
                             f"max_position_embeddings={limit}")
    windows = sliding_windows(len(stream), seq_length, stride)[dp_rank::dp_size]
    ids = torch.as_tensor(list(stream), dtype=torch.long)
    device = model.embed.weight.device
    score = Score()
    # windows of one length batch together (all but the last of a stream have seq_length)
    by_length: dict[int, list[Window]] = {}
    for w in windows:
        by_length.setdefault(w.length, []).append(w)
    for length, group in by_length.items():
        for batch in _batches(group, batch_size):
            x = torch.stack([ids[w.start:w.start + length] for w in batch]).to(device)  # (B, T)
            y = torch.stack([ids[w.start + 1:w.start + length + 1] for w in batch]).to(device)
            for row, w in enumerate(batch):
                y[row, : length - w.scored] = IGNORE_INDEX  # context only: scored earlier
            logits = model(x)  # (B, T, V_local)
            nll = vocab_parallel_cross_entropy(logits, y, model.ps.tp_comm, model.vocab_start)
            score.nll += float(nll.double().sum())
            score.tokens += sum(w.scored for w in batch)
            score.windows += len(batch)
            if on_batch is not None:
                on_batch(len(batch), sum(w.scored for w in batch))
    return score


def reduce_score(score: Score, ps) -> Score:
    """Sum a replica's score over the data-parallel group (no-op with one replica)."""
    if ps is None or ps.dp_size == 1:
        return score
    t = torch.tensor([score.nll, score.tokens, score.windows], dtype=torch.float64)
    if ps.device.type == "cuda":
        t = t.to(ps.device)
    dist.all_reduce(t, group=ps.dp_group)
    nll, tokens, windows = t.tolist()
    return Score(nll, int(round(tokens)), score.bytes, int(round(windows)))


@dataclass
class Corpus:
    """One evaluation input: its name, documents as token ids, and the bytes of their text."""

    name: str
    documents: list = field(default_factory=list)
    bytes: int = 0


def count_windows(corpora: Sequence[Corpus], eod: int, *, seq_length: int, stride: int,
                  dp_rank: int = 0, dp_size: int = 1) -> int:
    """How many windows this replica scores in `evaluate_corpora` (the progress total)."""
    total = 0
    for c in corpora:
        n = 1 + sum(len(d) + (0 if len(d) and d[-1] == eod else 1) for d in c.documents)  # build_stream's
        total += len(sliding_windows(n, seq_length, stride)[dp_rank::dp_size])
    return total


def evaluate_corpora(model, corpora: Sequence[Corpus], eod: int, *, seq_length: int, stride: int,
                     batch_size: int = 8, ps=None,
                     on_batch: Optional[Callable[[int, int], None]] = None) -> tuple[dict[str, Score], Score]:
    """Per-corpus scores and the overall score (sums over corpora)."""
    dp_rank, dp_size = (ps.dp_rank, ps.dp_size) if ps is not None else (0, 1)
    per, total = {}, Score()
    for corpus in corpora:
        s = score_stream(model, build_stream(corpus.documents, eod), seq_length=seq_length,
                         stride=stride, batch_size=batch_size, dp_rank=dp_rank, dp_size=dp_size,
                         on_batch=on_batch)
        s = reduce_score(s, ps)
        s.bytes = corpus.bytes
        per[corpus.name] = s
        total = total.add(s)
    return per, total


def check_ids(corpus: Corpus, vocab_size: int, what: Optional[str] = None) -> None:
    """EvalInputError when a token id does not exist in the model's vocabulary."""
    top = max((max(d) for d in corpus.documents if len(d)), default=-1)
    if top >= vocab_size:
        raise EvalInputError(f"{what or corpus.name} holds token id {top} but the model's vocabulary "
                             f"has {vocab_size} ids: the data was tokenized for another model")
