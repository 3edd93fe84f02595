"""Shared test helpers: relative-error checks and a launcher for N gloo ranks on this machine."""
from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| (inf-norm relative error; a whole-tensor measure, so tiny entries
    of a gradient do not need an absolute tolerance)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_rel_close(actual, expected, tol: float = 1e-5, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        fn(rank, world, *args)
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args) -> None:
    """Run fn(rank, world, *args) in `world` spawned processes with RANK/WORLD_SIZE set (the
    torchrun convention); a failure in any rank fails the caller with that rank's traceback."""
    mp.spawn(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True)
