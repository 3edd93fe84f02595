"""Where this process sits in the job: rank, world size and local rank as the launcher published them.

torchrun / the deepspeed launcher (RANK, WORLD_SIZE; the latter also passes --local_rank), Open MPI
(OMPI_COMM_WORLD_*), MPICH Hydra (PMI_*), Slurm `srun` steps (SLURM_*); read from the environment only
(no MPI calls, no process group). A bottom module: the runtime reads it before `main` runs,
`parallel/state.py` builds the process groups on it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

from .errors import ConfigError


@dataclass(frozen=True)
class LaunchInfo:
    launcher: str  # "torchrun", "openmpi", "mpich", "slurm" or "single"
    rank: int
    world_size: int
    local_rank: int


def _int(environ: Mapping[str, str], key: str, default: Optional[int] = None) -> int:
    value = environ.get(key)
    if value is None:
        if default is None:
            raise ConfigError(f"environment variable {key} is missing")
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {key}={value!r} is not an integer") from None


def discover_launch(environ: Optional[Mapping[str, str]] = None) -> LaunchInfo:
    """Rank, world size and local rank as the launcher published them (no MPI calls)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchInfo("torchrun", _int(env, "RANK"), _int(env, "WORLD_SIZE"),
                          _int(env, "LOCAL_RANK", 0))
    if "OMPI_COMM_WORLD_RANK" in env:
        return LaunchInfo("openmpi", _int(env, "OMPI_COMM_WORLD_RANK"),
                          _int(env, "OMPI_COMM_WORLD_SIZE"),
                          _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0))
    if "PMI_RANK" in env:
        return LaunchInfo("mpich", _int(env, "PMI_RANK"), _int(env, "PMI_SIZE"),
                          _int(env, "MPI_LOCALRANKID", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        # SLURM_STEP_ID is only set inside an `srun` step; a batch script run by hand is one process.
        return LaunchInfo("slurm", _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"),
                          _int(env, "SLURM_LOCALID", 0))
    return LaunchInfo("single", 0, 1, 0)


def local_world_size(environ: Optional[Mapping[str, str]] = None) -> int:
    """How many ranks of this job run on this node, as the launcher published it (1 when unknown)."""
    env = os.environ if environ is None else environ
    # torchrun, Open MPI, MPICH Hydra, the deepspeed launcher (LOCAL_SIZE)
    for key in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "LOCAL_SIZE"):
        if key in env:
            return max(1, _int(env, key))
    if "SLURM_STEP_ID" in env and "SLURM_STEP_TASKS_PER_NODE" in env:  # e.g. "4" or "4(x2)" or "3,2"
        node = env.get("SLURM_NODEID", "0")
        counts = []
        for part in env["SLURM_STEP_TASKS_PER_NODE"].split(","):
            n, _, rep = part.partition("(x")
            counts += [int(n)] * (int(rep.rstrip(")")) if rep else 1)
        return max(1, counts[min(int(node), len(counts) - 1)]) if counts else 1
    return 1
