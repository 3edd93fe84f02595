"""Measured activation memory: the bytes autograd keeps for backward, counted with saved_tensors_hooks.

Each storage counts once, at its full size (a saved view keeps its whole storage alive), and is
identified by its data pointer; the counter holds a reference to every storage it saw, so no
address can be reused during the count. Constants are not activations: storages of the model's
parameters and buffers and of the sparse layers' cached masks are left out (computed after the
forward, so masks built during it are excluded too). Tensors packed inside a non-reentrant
activation checkpoint are invisible to outer hooks (PyTorch hides them: they are recomputed), but
the checkpoint's saved inputs are seen, which is exactly what full recompute keeps; tensors it
keeps by reference inside tuple arguments (the RoPE (cos, sin) pair) are added by hand.

Per-layer split (`measure_activation_bytes`): a storage saved inside exactly one transformer
block belongs to it (a checkpointed block's inputs, saved just before the block runs, too); one
saved inside several blocks (RoPE cos/sin) counts once, under "embedding" (computed there);
the rest is "embedding" (before the first block) or "logits_loss" (after the last).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn


def _storage(t: torch.Tensor):
    return t.untyped_storage()


def constant_storages(model: nn.Module) -> set[int]:
    """Data pointers of storages the model holds between steps (parameters, buffers, sparse masks)."""
    ptrs = {_storage(p).data_ptr() for p in model.parameters()}
    ptrs |= {_storage(b).data_ptr() for b in model.buffers()}
    stack = [plans for m in model.modules() for plans in getattr(m, "_plans", {}).values()]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            ptrs.add(_storage(item).data_ptr())
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
    ptrs.discard(0)
    return ptrs


class SavedBytesCounter:
    """Context manager recording every tensor saved for backward, tagged with the current segment
    (`counter.segment = ...` switches it). `bytes(exclude)` is the distinct storage total."""

    def __init__(self) -> None:
        self.segment: object = None
        self.records: list[tuple[object, int]] = []  # (segment, data_ptr)
        self.storages: dict[int, object] = {}  # data_ptr -> storage (kept alive while counting)
        self._hooks = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            st = _storage(t)
            ptr = st.data_ptr()
            if ptr and st.nbytes():
                self.storages.setdefault(ptr, st)
                self.records.append((self.segment, ptr))
        return t

    def __enter__(self) -> "SavedBytesCounter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def nbytes(self, ptr: int) -> int:
        return self.storages[ptr].nbytes()

    def total(self, exclude: set[int] = frozenset()) -> int:
        return sum(self.nbytes(p) for p in self.storages if p not in exclude)


def measure_activation_bytes(model: nn.Module, tokens: torch.Tensor,
                             labels: Optional[torch.Tensor] = None, **forward_kwargs) -> dict:
    """One training-mode forward of a GPTModel (`model.blocks`) on `tokens` (labels: the loss too);
    returns {"layers": [bytes per block], "embedding", "logits_loss", "total"} of this process.
    The graph is dropped afterwards (no backward)."""
    blocks = list(model.blocks)
    counter = SavedBytesCounter()
    inputs: dict[int, set[int]] = {}
    handles = []

    checkpointed = bool(getattr(model, "checkpoint_activations", False))
    held: dict[int, object] = {}  # tensors a checkpoint keeps by reference (inside tuples)

    def pre(i):
        def hook(_module, args):
            inputs[i] = {_storage(a).data_ptr() for a in args if isinstance(a, torch.Tensor)}
            if checkpointed:
                for a in args:
                    for t in (a if isinstance(a, (tuple, list)) else ()):
                        if isinstance(t, torch.Tensor) and _storage(t).data_ptr():
                            held.setdefault(_storage(t).data_ptr(), _storage(t))
            counter.segment = ("block", i)
        return hook

    def post(i):
        def hook(_module, _args, _out):
            counter.segment = ("after", i)
        return hook

    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(pre(i)))
        handles.append(block.register_forward_hook(post(i)))
    was_training = model.training
    model.train()
    try:
        counter.segment = ("before", -1)
        with counter, torch.enable_grad():
            out = model(tokens, labels=labels, **forward_kwargs)
        del out
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    constants = constant_storages(model)
    owners: dict[int, set] = {}
    for (kind, i), ptr in counter.records:
        if ptr in constants:
            continue
        if kind in ("before", "after") and ptr in inputs.get(i + 1, ()):
            kind, i = "block", i + 1  # a checkpointed block's inputs, saved just before it runs
        owners.setdefault(ptr, set()).add((kind, i))
    for ptr, st in held.items():  # e.g. RoPE (cos, sin): shared by every block, like below
        if ptr not in constants and ptr not in owners:
            counter.storages[ptr] = st
            owners[ptr] = {("block", -1), ("block", -2)}
    out = {"layers": [0] * len(blocks), "embedding": 0, "logits_loss": 0}
    for ptr, where in owners.items():
        in_blocks = sorted(i for kind, i in where if kind == "block")
        size = counter.nbytes(ptr)
        if len(in_blocks) == 1:
            out["layers"][in_blocks[0]] += size
        elif in_blocks or ("before", -1) in where:
            out["embedding"] += size  # shared by several blocks (RoPE tables) or the embedding's
        else:
            out["logits_loss"] += size
    out["total"] = sum(out["layers"]) + out["embedding"] + out["logits_loss"]
    return out


@contextlib.contextmanager
def count_saved_bytes(model: Optional[nn.Module] = None):
    """`with count_saved_bytes(model) as result: loss = model(...)`; afterwards result["bytes"] is
    the distinct saved-for-backward storage total, the model's constants left out."""
    result: dict = {}
    counter = SavedBytesCounter()
    with counter:
        yield result
    result["bytes"] = counter.total(constant_storages(model) if model is not None else set())
