"""Tensor-parallel evaluation: TP rank 0 drives (lm-eval, the training hook) and the other ranks
of its TP group serve the same calls, so every collective inside a forward has all its ranks.

The driver broadcasts each call as a small picklable (op, payload) over the TP group, then runs
it; a server loops receiving calls and running them until the driver sends "close". Only the
driver reads task data; servers see token ids. With TP=1 a call is a plain function call.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

CLOSE = "close"


class TPWorker:
    """`handlers[op](payload)` runs on every rank of the TP group; the driver gets the result."""

    def __init__(self, ps, handlers: dict[str, Callable[[Any], Any]]) -> None:
        self.ps, self.handlers = ps, handlers
        self.is_driver = ps.tp_rank == 0
        self.closed = False

    def _exchange(self, message):
        return self.ps.broadcast_from_tp_source(message)

    def call(self, op: str, payload: Any = None) -> Any:
        """Driver only: run `op` on every rank of the TP group; returns the driver's result."""
        if not self.is_driver:
            raise RuntimeError("TPWorker.call is for TP rank 0; the other ranks run serve()")
        if self.closed:
            raise RuntimeError("TPWorker is closed")
        self._exchange((op, payload))
        return self.handlers[op](payload)

    def serve(self) -> None:
        """Servers: run the driver's calls until it closes the worker."""
        while True:
            op, payload = self._exchange(None)
            if op == CLOSE:
                self.closed = True
                return
            self.handlers[op](payload)

    def close(self) -> None:
        """Driver: release the servers (idempotent)."""
        if self.is_driver and not self.closed:
            self._exchange((CLOSE, None))
        self.closed = True


def no_grad_handlers(handlers: dict) -> dict:
    """Wrap handlers in inference mode."""
    def wrap(fn):
        def run(payload):
            with torch.inference_mode():
                return fn(payload)
        return run
    return {k: wrap(v) for k, v in handlers.items()}
