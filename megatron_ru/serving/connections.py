"""Connection limits of the HTTP server: a cap on open connections, a deadline for each request head, the open-file limit, bounded logs.

uvicorn alone keeps a connection that never finishes its request head open for ever and accepts
until the process runs out of file handles (then logs the failure on every accept). Here a
connection beyond `--max-connections` is answered 503 (OpenAI error JSON) and closed at once; a
connection whose request head is not complete `--header-timeout` seconds after it opened (or
after its last response) is closed; the soft open-file limit is raised to fit the cap; and a
message logged over and over is printed a few times per minute with a count of the rest.
"""
from __future__ import annotations

import json
import logging
import resource
import time
from typing import Optional

from ..errors import UsageError

RESERVED_FILES = 256  # handles kept for the model, the tokenizer, logs and the listener
LOGGERS = ("uvicorn", "uvicorn.error", "asyncio")


def fit_open_files(max_connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE to hold `max_connections` plus a reserve; UsageError when
    the hard limit cannot. Returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max_connections + RESERVED_FILES
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise UsageError(f"--max-connections {max_connections} needs {need} open files but "
                             f"the hard limit is {hard} (ulimit -Hn); lower --max-connections")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        soft = need
    return soft


def refusal(status: int, message: str, code: str) -> bytes:
    """A complete HTTP/1.1 response with an OpenAI error body, for a connection we close."""
    body = json.dumps({"error": {"message": message, "type": "server_error", "param": None,
                                 "code": code}}).encode()
    reason = {503: b"Service Unavailable", 408: b"Request Timeout"}.get(status, b"Error")
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, reason, len(body))) + body


def guarded_protocol(max_connections: int, header_timeout_s: float, on_refused=None):
    """uvicorn's h11 protocol class with the connection cap and the request-head deadline."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    full = refusal(503, f"the server holds its limit of {max_connections} connections; retry "
                        "later", "too_many_connections")

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            if len(self.connections) >= max_connections:
                self.transport, self.flow, self.refused = transport, None, True
                transport.write(full)
                transport.close()
                if on_refused is not None:
                    on_refused()
                return
            self.refused = False
            super().connection_made(transport)
            self._arm_head_deadline()

        def connection_lost(self, exc) -> None:
            if self.refused:
                return
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if not self.refused:
                super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_deadline()

        def _arm_head_deadline(self) -> None:
            self.loop.call_later(header_timeout_s, self._head_deadline, self.cycle)

        def _head_deadline(self, cycle) -> None:
            """No new request head since the timer was armed: close the connection."""
            if self.cycle is cycle and not self.transport.is_closing() and \
                    (cycle is None or cycle.response_complete):
                self.transport.close()

    return GuardedH11Protocol


class RepeatFilter(logging.Filter):
    """Lets a message through at most `burst` times per `window_s` seconds; the next one that
    passes says how many were held back."""

    def __init__(self, burst: int = 5, window_s: float = 60.0) -> None:
        super().__init__()
        self.burst, self.window_s = burst, window_s
        self.seen: dict[str, list] = {}  # key → [window start, count in window, held back]

    def filter(self, record: logging.LogRecord) -> bool:
        key = f"{record.name}:{record.msg}"[:200]
        now = time.monotonic()
        entry = self.seen.get(key)
        if entry is None or now - entry[0] > self.window_s:
            held = entry[2] if entry else 0
            if len(self.seen) > 1000:
                self.seen.clear()
            self.seen[key] = [now, 1, 0]
            if held:
                record.msg = f"{record.msg} ({held} similar messages held back)"
            return True
        entry[1] += 1
        if entry[1] <= self.burst:
            return True
        entry[2] += 1
        return False


def bound_logs(filter_: Optional[RepeatFilter] = None) -> RepeatFilter:
    """Install one RepeatFilter on uvicorn's and asyncio's loggers (and their handlers)."""
    filter_ = filter_ or RepeatFilter()
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if filter_ not in logger.filters:
            logger.addFilter(filter_)
    return filter_
