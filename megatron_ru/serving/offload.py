"""CPU-heavy request work (tokenising prompts, rendering chat templates) on worker threads, never on the event loop.

A request's work runs on a daemon thread (one of at most `workers` at a time) while the event loop
goes on answering `/health` and streaming other requests. The request waits at most `timeout_s`
for a slot and its result; past that it gets a 400 (the work was too big) or a 503 (every slot
was busy), and the slot stays taken until the thread really ends, so an abusive request can hold
at most its own slot. Daemon threads never delay the process's exit (SIGTERM still stops the
server). Chat templates stop themselves at the deadline (chat_templates' time limit); prompts are
bounded in size before they are tokenised (`prompt_bytes_limit`).
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Callable, Optional

from .protocol import ApiError


class Offload:
    def __init__(self, workers: int = 4, timeout_s: float = 10.0) -> None:
        self.workers, self.timeout_s = workers, timeout_s
        self.busy = 0
        self._freed: Optional[asyncio.Event] = None

    async def run(self, fn: Callable, *args, what: str = "the request's prompt",
                  code: str = "prompt_too_long"):
        """fn(*args) on a worker thread; ApiError from it passes through."""
        loop = asyncio.get_running_loop()
        if self._freed is None:
            self._freed = asyncio.Event()
        deadline = time.monotonic() + self.timeout_s
        while self.busy >= self.workers:
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                raise ApiError(503, "the server is busy preparing other prompts; retry later",
                               code="busy", headers={"Retry-After": "1"}) from None
        self.busy += 1
        future = loop.create_future()
        # A request that gave up at its deadline no longer awaits this future: its late exception is
        # read here, or asyncio logs "exception was never retrieved" with a traceback at shutdown.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())

        def settle(ok: bool, value) -> None:  # on the event loop
            self.busy -= 1
            self._freed.set()
            if not future.done():
                future.set_result(value) if ok else future.set_exception(value)

        def work() -> None:
            try:
                result, ok = fn(*args), True
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
                result, ok = exc, False
            try:
                loop.call_soon_threadsafe(settle, ok, result)
            except RuntimeError:  # the loop is closed: the server is gone
                pass

        threading.Thread(target=work, name="megatron_ru-prompt", daemon=True).start()
        try:
            return await asyncio.wait_for(asyncio.shield(future),
                                          max(deadline - time.monotonic(), 0.001))
        except asyncio.TimeoutError:
            raise ApiError(400, f"{what} took too long to prepare (over {self.timeout_s:g} s)",
                           code=code) from None


def prompt_bytes_limit(tokenizer, max_tokens: int) -> Optional[int]:
    """UTF-8 bytes beyond which a text surely has more than `max_tokens` tokens, for tokenizers
    whose tokens each cover a bounded number of bytes of the text as given (GPT-2 byte-level
    BPE: every token is at most its longest vocabulary entry); None for others (their compiled
    tokenizers are fast, and their normalisers may shrink the text)."""
    encoder = getattr(tokenizer, "encoder", None)
    if encoder is None or not hasattr(tokenizer, "byte_decoder"):
        return None
    return max(len(t.encode("utf-8")) for t in encoder) * max_tokens
