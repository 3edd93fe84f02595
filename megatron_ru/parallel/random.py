"""RNG tracker: dropout inside tensor-parallel regions differs per TP rank, reproducibly.

Activations outside TP regions are replicated on every TP rank, so their dropout must use the
same stream everywhere (the default generator, seeded identically on all ranks). Activations
inside a TP region (attention probabilities of the local heads) are different data on every
rank and get their own stream, `seed + 2718 + tp_rank`, entered with `tracker.fork()`.
`checkpoint_context()` lets activation checkpointing replay the tracker's stream exactly.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

TP_SEED_OFFSET = 2718


def _get_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RNGTracker:
    """A named RNG stream for the current device that can be swapped in around an operation."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._state: torch.Tensor | None = None

    def seed(self, seed: int) -> None:
        saved = _get_state(self.device)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        self._state = _get_state(self.device)
        _set_state(saved, self.device)

    @property
    def is_seeded(self) -> bool:
        return self._state is not None

    def get_state(self) -> torch.Tensor | None:
        return None if self._state is None else self._state.clone()

    def set_state(self, state: torch.Tensor | None) -> None:
        self._state = None if state is None else state.clone()

    @contextlib.contextmanager
    def fork(self):
        """Run the body on this tracker's stream; the default stream is left untouched."""
        if self._state is None:  # unseeded: behave like the default stream
            yield
            return
        saved = _get_state(self.device)
        _set_state(self._state, self.device)
        try:
            yield
        finally:
            self._state = _get_state(self.device)
            _set_state(saved, self.device)

    def checkpoint_context(self) -> Callable[[], tuple]:
        """`context_fn` for torch.utils.checkpoint: recomputation replays the tracker state."""

        def context_fn():
            snapshot = self.get_state()

            @contextlib.contextmanager
            def recompute():
                current = self.get_state()
                self.set_state(snapshot)
                try:
                    yield
                finally:
                    self.set_state(current)

            return contextlib.nullcontext(), recompute()

        return context_fn


def model_parallel_seed(seed: int, tp_rank: int) -> int:
    return seed + TP_SEED_OFFSET + tp_rank
