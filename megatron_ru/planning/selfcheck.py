"""Training checks the plan: predicted per-rank memory (and tokens/s on a known GPU) before the model is built, measured after the first step.

Predicted = this rank's model states (states.py, exact for DeepSpeed's layout) + one micro-batch's
saved-for-backward activations (activations.py; the first pipeline stage keeps PP micro-batches in
flight). Measured on the CPU = the bytes DeepSpeed holds on the rank (held.py, taken inside the
first optimizer step: gradients before it, the lazily created optimizer state after it) + the first micro-batch's saved-for-backward bytes
(measure.py); on CUDA = torch.cuda.max_memory_allocated().
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .activations import activation_bytes
from .held import held_bytes
from .measure import count_saved_bytes
from .states import BYTES, PERSISTENCE_THRESHOLD, model_state_bytes, rank_params

GB = 1e9


class SelfCheck:
    """Built before the model (warns when the prediction exceeds the device); `arm(engine, model)`
    after deepspeed.initialize; `report(step_s)` after the first step."""

    def __init__(self, config, ds: dict, ps, seq_length: int, precision: str,
                 pp_counts: Optional[list], log: Callable) -> None:
        self.ps, self.log, self.ds = ps, log, ds
        zero = ds.get("zero_optimization", {})
        self.micro = ds["train_micro_batch_size_per_gpu"]
        self.accum = ds["gradient_accumulation_steps"]
        stage = ps.pp_rank if ps.pp_size > 1 else 0
        params = rank_params(config, ps.tp_size, pp_counts if ps.pp_size > 1 else None, stage)
        self.states = model_state_bytes(
            params, zero=zero.get("stage", 0), dp=ps.dp_cp_size,  # DeepSpeed partitions over DP x CP
            dp_rank=ps.dp_rank * ps.cp_size + ps.cp_rank, precision=precision,
            hpz=zero.get("zero_hpz_partition_size", 1), pipeline=ps.pp_size > 1,
            persistence_threshold=zero.get("stage3_param_persistence_threshold", PERSISTENCE_THRESHOLD))
        if pp_counts and ps.pp_size > 1:
            start = sum(pp_counts[:stage])
            layers = range(start, start + pp_counts[stage])
        else:
            layers = None
        device = "cuda" if ps.device.type == "cuda" else "cpu"
        self.activations = activation_bytes(
            config, micro_batch=self.micro, seq_length=seq_length, tp=ps.tp_size,
            sp=bool(config.sequence_parallel) and ps.tp_size > 1, cp=ps.cp_size, layers=layers,
            first_stage=ps.is_first_stage, last_stage=ps.is_last_stage,
            recompute="full" if config.checkpoint_activations else "none",
            dtype_bytes=BYTES[precision], device=device)["total"]
        self.inflight = min(self.accum, ps.pp_size - ps.pp_rank) if ps.pp_size > 1 else 1
        self.predicted = self.states["total"] + self.inflight * self.activations
        self.tokens_per_s = self._predict_speed(config, seq_length, precision, pp_counts)
        self.held: Optional[dict] = None
        self.saved: Optional[int] = None
        if device == "cuda":
            total = torch.cuda.get_device_properties(ps.device).total_memory
            if self.predicted > total:
                log(f"warning: the plan predicts {self.predicted / GB:.1f} GB per rank (model states "
                    f"{self.states['total'] / GB:.1f} + activations {self.inflight * self.activations / GB:.1f})"
                    f" but the device has {total / GB:.1f} GB: expect out-of-memory (tools/plan.py "
                    "lists layouts that fit)")

    def _predict_speed(self, config, seq_length, precision, pp_counts) -> Optional[float]:
        if self.ps.device.type != "cuda":
            return None
        from .accelerators import detect
        from .search import Layout, evaluate
        acc = detect(torch.cuda.get_device_name(self.ps.device))
        if acc is None:
            return None
        zero = self.ds.get("zero_optimization", {})
        lay = Layout(tp=self.ps.tp_size, pp=self.ps.pp_size, dp=self.ps.dp_size, zero=zero.get("stage", 0),
                     hpz=zero.get("zero_hpz_partition_size", 1) or 1,
                     recompute="full" if config.checkpoint_activations else "none",
                     micro_batch=self.micro, accum=self.accum)
        res = evaluate(config, lay, acc, seq_length=seq_length, global_batch=self.ds["train_batch_size"],
                       gpus=self.ps.world_size, gpus_per_node=max(1, torch.cuda.device_count()),
                       precision=precision, zero_options=zero)
        return res.time["tokens_per_s_per_gpu"] * self.ps.world_size

    def arm(self, engine, model) -> None:
        """Measure inside the first optimizer step (before it updates) and around the first
        micro-batch's forward (CPU; not under pipeline parallelism)."""
        if self.ps.device.type == "cuda":
            return
        opt, step = engine.optimizer, engine.optimizer.step

        def measured_step(*args, **kwargs):
            # gradients exist before the step, optimizer state (created lazily) after it
            opt.step = step
            before = held_bytes(engine)
            out = step(*args, **kwargs)
            after = held_bytes(engine)
            self.held = {k: max(before[k], after[k]) for k in before if k != "total"}
            self.held["total"] = sum(self.held.values())
            return out

        opt.step = measured_step
        if self.ps.pp_size > 1:
            return
        forward = model.forward

        def counted_forward(*args, **kwargs):
            model.forward = forward
            with count_saved_bytes(model) as result:
                out = forward(*args, **kwargs)
            self.saved = result["bytes"]
            return out

        model.forward = counted_forward

    def report(self, step_s: float, tokens_per_step: int) -> Optional[dict]:
        """One log line (rank 0) and the figures, after the first step (None if it failed:
        a check never stops training)."""
        try:
            return self._report(step_s, tokens_per_step)
        except Exception as exc:  # noqa: BLE001
            self.log(f"plan check skipped: {exc}")
            return None

    def _report(self, step_s: float, tokens_per_step: int) -> dict:
        if self.ps.device.type == "cuda":
            measured = torch.cuda.max_memory_allocated(self.ps.device)
            how = "max_memory_allocated"
        else:
            held = (self.held or {}).get("total", 0)
            measured = held + (self.saved or 0) * self.inflight
            how = f"DeepSpeed holds {held / 1e6:.2f} MB + saved for backward {(self.saved or 0) / 1e6:.2f} MB"
        speed = tokens_per_step / step_s if step_s > 0 else 0.0
        predicted_speed = ("n/a (no accelerator entry for this device)" if self.tokens_per_s is None
                           else f"{self.tokens_per_s:,.0f}")
        self.log(f"plan check (rank {self.ps.rank}): memory predicted {self.predicted / 1e6:.2f} MB "
                 f"(model states {self.states['total'] / 1e6:.2f} + activations "
                 f"{self.inflight * self.activations / 1e6:.2f}), measured {measured / 1e6:.2f} MB ({how}), "
                 f"{100 * (measured - self.predicted) / max(self.predicted, 1):+.1f}%; tokens/s predicted "
                 f"{predicted_speed}, measured {speed:,.0f} (first step, includes warm-up)")
        return {"predicted_bytes": self.predicted, "measured_bytes": measured,
                "predicted_tokens_per_s": self.tokens_per_s, "measured_tokens_per_s": speed}
