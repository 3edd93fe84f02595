"""Bytes a live DeepSpeed engine holds on this rank, by kind: weights, gradients, fp32 master copies, optimizer state.

Every tensor reachable from the engine's module (parameters, their `.grad`, ZeRO-3's `ds_tensor` /
`ds_secondary_tensor`) and from its optimizer wrapper's attributes (flat groups, partitions,
gradient buffers; the inner torch optimizer's state) is counted once per storage, under the
first kind that claims it (weights, master, grads, optimizer, then "other" for what no rule
names: norms, overflow flags). Measured after backward and before the optimizer step, this is
what the planner's model-state prediction (planning/states.py) must equal.
"""
from __future__ import annotations

import torch

WEIGHT_ATTRS = ("bit16_groups_flat", "fp16_partitioned_groups_flat", "bf16_groups_flat", "fp16_groups",
                "bit16_groups", "bf16_groups", "fp16_groups_flat", "fp16_partitioned_groups")
MASTER_ATTRS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups",
                "fp32_groups_flat", "fp32_groups_flat_partition")
GRAD_ATTRS = ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer",
              "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition", "fp32_groups_gradients_flat",
              "fp32_groups_gradients", "ipg_buffer", "all_grad_tensors")
KINDS = ("weights", "master", "grads", "optimizer", "other")


def _tensors(obj, depth: int = 0):
    """Every tensor inside lists / tuples / dicts (values) of `obj`, a few levels deep."""
    if torch.is_tensor(obj):
        yield obj
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x, depth + 1)
    elif depth < 4 and isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x, depth + 1)


class _Ledger:
    def __init__(self):
        self.seen, self.bytes = set(), dict.fromkeys(KINDS, 0)

    def add(self, kind: str, tensors) -> None:
        for t in tensors:
            if t is None or t.device.type == "meta" or t.numel() == 0:
                continue
            storage = t.untyped_storage()
            key = (t.device, storage.data_ptr())
            if key not in self.seen:
                self.seen.add(key)
                self.bytes[kind] += storage.nbytes()


def held_bytes(engine) -> dict:
    """{"weights", "grads", "master", "optimizer", "other", "total"} bytes on this rank."""
    ledger = _Ledger()
    params = list(engine.module.parameters())
    opt = engine.optimizer
    ledger.add("weights", params)
    for attr in ("ds_tensor", "ds_secondary_tensor"):
        ledger.add("weights", (getattr(p, attr, None) for p in params))
    for attr in WEIGHT_ATTRS:
        ledger.add("weights", _tensors(getattr(opt, attr, None)))
    for attr in MASTER_ATTRS:
        ledger.add("master", _tensors(getattr(opt, attr, None)))
    ledger.add("grads", (p.grad for p in params))
    for attr in GRAD_ATTRS:
        ledger.add("grads", _tensors(getattr(opt, attr, None)))
    inner = getattr(opt, "optimizer", None) or opt
    for state in getattr(inner, "state", {}).values():
        ledger.add("optimizer", _tensors(state))
    if opt is not inner:
        for value in vars(opt).values():
            ledger.add("other", _tensors(value))
    out = dict(ledger.bytes)
    out["total"] = sum(out.values())
    return out
