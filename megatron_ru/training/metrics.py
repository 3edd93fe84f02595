"""Training metrics: FLOPs per token, TFLOP/s, MFU, grad norm, loss scale; JSON-lines / TensorBoard sinks.

FLOPs per token = 6·N + 12·L·h·s (N parameters incl. embeddings; L layers, h hidden, s sequence
length); the attention term of a block-sparse layer is scaled by the fraction of causal blocks
its layout keeps. MFU = achieved FLOP/s per device / peak, where peak is the dense bf16/fp16
spec of the device (never the 2:4-sparse figure) or --peak-tflops.
"""
from __future__ import annotations

import json
import math
import os
import resource
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

from ..files import atomic_write_text
from ..planning.timing import attention_fraction, flops_per_token  # one formula: the planner's

if TYPE_CHECKING:
    from ..model.gpt import GPTModel
    from ..parallel.state import ParallelState

__all__ = ["PEAK_TFLOPS", "attention_fraction", "flops_per_token", "device_peak_tflops", "memory_gb",
           "truncate_after", "MetricsSink",
           "loss_scale", "tp_grad_norm", "fmt_time"]

PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "A800": 312.0,
               "L40S": 362.0, "A10G": 125.0, "V100": 125.0}


def device_peak_tflops(override: Optional[float] = None) -> Optional[float]:
    if override:
        return override
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB


def truncate_after(path: Path, iteration: int) -> int:
    """Drop the JSON-lines rows of `path` whose "iteration" is above `iteration` (atomic
    rewrite; a line cut short by a crash goes too); returns how many were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if line.strip():  # a line cut by a crash: drop it, it would break readers
                    dropped += 1
                continue
            if isinstance(row, dict) and isinstance(row.get("iteration"), int) \
                    and row["iteration"] > iteration:
                dropped += 1
                continue
            kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        atomic_write_text(path, "".join(kept))
    return dropped


class MetricsSink:
    """Rank 0 writes one JSON object per record to --metrics-file and scalars to TensorBoard.

    A run that starts at iteration `start_iteration` (0, or the one it resumed from) first drops
    the file's rows after that iteration (rewritten atomically), so a resumed run never leaves
    duplicate iterations; TensorBoard purges its later events the same way (`purge_step`)."""

    def __init__(self, metrics_file: Optional[str], tensorboard_dir: Optional[str], active: bool,
                 start_iteration: int = 0):
        self.active = active
        self.file = None
        self.tb = None
        self.dropped = 0
        if not active:
            return
        if metrics_file:
            Path(metrics_file).parent.mkdir(parents=True, exist_ok=True)
            self.dropped = truncate_after(Path(metrics_file), start_iteration)
            self.file = open(metrics_file, "a", encoding="utf-8")
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise RuntimeError(f"--tensorboard-dir needs the tensorboard package ({exc}); "
                                   "pip install tensorboard") from None
            self.tb = SummaryWriter(log_dir=tensorboard_dir, purge_step=start_iteration + 1)

    def write(self, record: dict) -> None:
        if not self.active:
            return
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            os.fsync(self.file.fileno())
        if self.tb:
            step = record.get("iteration", 0)
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


def loss_scale(optimizer) -> Optional[float]:
    for obj in (optimizer, getattr(optimizer, "loss_scaler", None)):
        for attr in ("cur_scale", "loss_scale"):
            value = getattr(obj, attr, None) if obj is not None else None
            if isinstance(value, (int, float)) or torch.is_tensor(value):
                return float(value)
    return None


def tp_grad_norm(model: GPTModel, ps: ParallelState) -> float:
    """Global L2 norm of the (DP-averaged) gradients: sharded parameters summed over the TP
    group, replicated ones counted once."""
    total = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is None:
            continue
        if getattr(p, "shard_spec", None) is not None or ps.tp_rank == 0:
            total += p.grad.detach().double().pow(2).sum().cpu()
    if ps.tp_comm is not None:
        dist.all_reduce(total, group=ps.tp_comm)
    return math.sqrt(total.item())


def fmt_time(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
