"""One request's side of serving: its sequences' events on the event loop, and OpenAI response/chunk bodies."""
from __future__ import annotations

import asyncio
import collections
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Optional

from ..inference.text import StopStrings, TextStream
from .scheduler import Seq

FINISH = {"eod": "stop", "stop": "stop", "length": "length"}  # others pass through as they are
SHUTDOWN_ERROR = {"error": {"message": "the server shut down before the request finished",
                            "type": "server_error", "param": None, "code": "shutting_down"}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Choice:
    """What one sequence produced, as seen by the HTTP side."""

    def __init__(self, index: int, seq: Seq, detokenize: Callable, stops: list[str],
                 streaming: bool = True) -> None:
        self.index, self.seq, self.detokenize = index, seq, detokenize
        self.stops = StopStrings(stops, detokenize)
        self.tokens: list[int] = []
        self.logprobs: list[Optional[tuple]] = []  # per token: (lp, [(id, lp), ...]) or None
        self.prompt_logprobs: Optional[list] = None
        self.finish: Optional[str] = None
        self.stream = TextStream(detokenize, self.stops if self.stops else None) if streaming \
            else None  # incremental text only when it is sent incrementally

    @property
    def finish_reason(self) -> Optional[str]:
        return None if self.finish is None else FINISH.get(self.finish, self.finish)

    def text(self) -> str:
        text = self.detokenize(self.tokens)
        return self.stops.truncate(text) if self.finish == "stop" else text

    def take(self, event: tuple) -> str:
        """Record an event; returns newly printable text (streaming)."""
        kind = event[0]
        if kind == "token":
            self.tokens.append(event[1])
            self.logprobs.append(event[2])
            return self.stream.push(event[1]) if self.stream is not None else ""
        if kind == "prompt_logprobs":
            self.prompt_logprobs = event[1]
        elif kind == "done":
            self.finish = event[1]
            return self.stream.finish(self.text()) if self.stream is not None else ""
        return ""


@dataclass
class Update:
    """New output of one choice: text safe to send, tokens with their logprob entries, prompt
    scores (echo), and whether the choice finished."""

    choice: Choice
    text: str = ""
    tokens: list = field(default_factory=list)
    entries: list = field(default_factory=list)
    prompt_scores: Optional[list] = None
    done: bool = False


class Handle:
    """A request's sequences and their events. The scheduler thread appends to `inbox` and wakes
    the event loop at most once per batch of events (not once per token)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.inbox: collections.deque = collections.deque()  # (choice index, event)
        self.ready = asyncio.Event()
        self._wake_pending = False
        self.choices: list[Choice] = []
        self.t0 = time.monotonic()

    def sink(self, index: int) -> Callable[[tuple], None]:
        def put(event: tuple) -> None:  # on the scheduler thread
            self.inbox.append((index, event))
            if not self._wake_pending:
                self._wake_pending = True
                self.loop.call_soon_threadsafe(self._wake)
        return put

    def _wake(self) -> None:
        self._wake_pending = False
        self.ready.set()

    @property
    def all_done(self) -> bool:
        return all(c.finish is not None for c in self.choices)

    @property
    def seqs(self) -> list[Seq]:
        return [c.seq for c in self.choices]

    async def updates(self) -> AsyncIterator[list["Update"]]:
        """Everything that arrived since the last look, merged per choice, until every sequence
        is done (the scheduler ends each one: finished, timed out or cancelled). A slow reader
        gets several tokens per update: fewer, larger chunks instead of a growing backlog."""
        pending = sum(c.finish is None for c in self.choices)
        while pending:
            if not self.inbox:
                self.ready.clear()
                if not self.inbox:
                    await self.ready.wait()
                continue
            merged: dict[int, Update] = {}
            while self.inbox:
                index, event = self.inbox.popleft()
                choice = self.choices[index]
                u = merged.setdefault(index, Update(choice))
                u.text += choice.take(event)
                if event[0] == "token":
                    u.tokens.append(event[1])
                    u.entries.append(event[2])
                elif event[0] == "prompt_logprobs":
                    u.prompt_scores = event[1]
                elif event[0] == "done":
                    u.done = True
                    pending -= 1
            yield list(merged.values())

    def usage(self, prompt_tokens: int) -> dict:
        done = sum(len(c.tokens) for c in self.choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": done,
                "total_tokens": prompt_tokens + done}

    def ttft_ms(self) -> Optional[float]:
        firsts = [c.seq.t_first - c.seq.t_submit for c in self.choices if c.seq.t_first]
        return 1000 * min(firsts) if firsts else None


def sse(data) -> str:
    return "data: " + (data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)) + "\n\n"


async def event_stream(handle: Handle, head: Callable[[list], dict], entry: Callable[[Update], dict],
                       *, opening: list[dict], prompt_tokens: int,
                       include_usage: bool) -> AsyncIterator[str]:
    """A streamed request's server-sent events (completions and chat alike): a chunk per choice
    of `opening`, then a chunk per update with `entry(update)` as its one choice (skipped when it
    has no text, no logprobs and is not the end), then "[DONE]". The usage rides on the chunk that
    ends the last choice, or with include_usage in a chunk of its own with no choices. A stream
    the server cuts (a forced shutdown) ends with an error event, then "[DONE]"."""
    for choice in opening:
        yield sse(head([choice]))
    async for updates in handle.updates():
        if any(u.done and u.choice.finish == "shutdown" for u in updates):
            yield sse(SHUTDOWN_ERROR)
            break
        for i, u in enumerate(updates):
            choice = entry(u)
            if not u.text and choice["logprobs"] is None and not u.done:
                continue
            chunk = head([choice])
            if i == len(updates) - 1 and handle.all_done and not include_usage:
                chunk["usage"] = handle.usage(prompt_tokens)
            yield sse(chunk)
    if include_usage:
        yield sse({**head([]), "usage": handle.usage(prompt_tokens)})
    yield sse("[DONE]")


# ---- log-probabilities -----------------------------------------------------------------------
def legacy_logprobs(tokens: list[int], entries: list, detokenize: Callable, offset: int = 0) -> dict:
    """The completions API's {tokens, token_logprobs, top_logprobs, text_offset}."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, entry in zip(tokens, entries):
        piece = detokenize([token])
        out["tokens"].append(piece)
        out["text_offset"].append(offset)
        offset += len(piece)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
        else:
            out["token_logprobs"].append(entry[0])
            out["top_logprobs"].append({detokenize([i]): lp for i, lp in entry[1]})
    return out


def chat_logprobs(tokens: list[int], entries: list, detokenize: Callable) -> dict:
    """The chat API's {content: [{token, logprob, bytes, top_logprobs}]}."""
    def one(token, lp):
        piece = detokenize([token])
        return {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}

    return {"content": [{**one(t, e[0]), "top_logprobs": [one(i, lp) for i, lp in e[1]]}
                        for t, e in zip(tokens, entries) if e is not None]}
