"""Optimizer parameter groups (no decay on biases and norms) and the warmup + decay LR schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decoupled weight decay on matrices (incl. embeddings); none on biases, norm weights and
    parameters marked `no_weight_decay` (train_only.py)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or getattr(p, "no_weight_decay", False) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class LRSchedule:
    """Linear warmup to `lr` over `warmup` steps, then constant / linear / cosine to `min_lr`
    at `decay_iters`, constant `min_lr` after (Megatron's AnnealingLR)."""
    lr: float
    min_lr: float
    warmup: int
    decay_iters: int
    style: str = "cosine"

    def __call__(self, step: int) -> float:
        if self.warmup > 0 and step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.style == "constant":
            return self.lr
        if step >= self.decay_iters:
            return self.min_lr
        span = max(1, self.decay_iters - self.warmup)
        frac = (step - self.warmup) / span
        if self.style == "linear":
            coeff = 1.0 - frac
        elif self.style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * frac) + 1.0)
        else:
            raise ValueError(f"--lr-decay-style {self.style!r} is unknown")
        return self.min_lr + coeff * (self.lr - self.min_lr)


class ScheduledLR:
    """The LR scheduler handed to DeepSpeed: sets every group's lr from `LRSchedule` at each
    optimizer step; its state (the step count) is saved in checkpoints."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: LRSchedule) -> None:
        self.optimizer, self.schedule, self.num_steps = optimizer, schedule, 0
        self._apply()

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule(self.num_steps)

    def step(self, increment: int = 1) -> None:
        self.num_steps += increment
        self._apply()

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self.get_lr()

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        self.num_steps = int(state["num_steps"])
        self._apply()
