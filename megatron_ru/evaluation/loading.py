"""A model to score with: inference/loading.open_model (the flags of generate.py), rows independent of their batch."""
from __future__ import annotations

from typing import Optional

from ..inference.loading import ModelOptions, OpenedModel, open_model, parallel_state
from ..inference.quantize import set_per_token
from ..parallel.state import ParallelState

__all__ = ["open_for_scoring", "parallel_state"]


def open_for_scoring(options: ModelOptions, ps: ParallelState, *,
                     untrained_seed: Optional[int] = None) -> OpenedModel:
    """open_model on the given ParallelState; quantized layers map each row onto its own grid
    (as the server does), so a window's or an item's numbers never depend on its batch.
    `untrained_seed`: the checkpoint's model at initialisation (the baseline training starts from)."""
    opened = open_model(options, ps, untrained_seed=untrained_seed)
    set_per_token(opened.model)
    return opened
