"""How many intra-op threads a process takes: its usable cores divided by the ranks on its node.

Like torchrun: the cores this process may run on (os.sched_getaffinity) divided by the ranks of the job on
this node (megatron_ru/launch.py), and (except for training) no more than the cores the load average leaves
free; at least 1. `--threads N` overrides; OMP_NUM_THREADS set by the user is
respected (and said so). Without this every rank of an mpirun job, or a sampler next to another busy job,
takes every core and decoding runs tens of times slower. A bottom module: the runtime calls `apply`
before an entry point's main runs, and prints the choice once.
"""
from __future__ import annotations

import os
import sys
from typing import Mapping, Optional, Sequence

from .errors import UsageError
from .launch import local_world_size

_printed = False


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS / Windows
        return os.cpu_count() or 1


def threads_flag(words: Sequence[str]) -> Optional[int]:
    """The value of --threads N / --threads=N among the command-line words, or None."""
    value = None
    for i, word in enumerate(words):
        if word == "--threads" and i + 1 < len(words):
            value = words[i + 1]
        elif word.startswith("--threads="):
            value = word.split("=", 1)[1]
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise UsageError(f"--threads {value!r} is not an integer") from None
    if n < 1:
        raise UsageError(f"--threads {n} must be at least 1")
    return n


def choose(words: Sequence[str], environ: Optional[Mapping[str, str]] = None, *,
           follow_load: bool = True) -> tuple[Optional[int], str]:
    """(threads to set or None to leave as is, the reason in words). `follow_load`: also leave the cores the
    load average says are busy (sampling, serving, evaluation); training keeps the fixed share so that a
    resumed run uses the same thread count as the straight run (CPU reductions depend on it, bit for bit)."""
    env = os.environ if environ is None else environ
    flag = threads_flag(words)
    if flag is not None:
        return flag, f"{flag} (--threads)"
    if env.get("OMP_NUM_THREADS", "").strip():
        return None, f"{env['OMP_NUM_THREADS']} (OMP_NUM_THREADS set in the environment)"
    cores, ranks, busy = usable_cores(), local_world_size(env), (busy_cores() if follow_load else 0)
    n = max(1, min(cores // ranks, cores - busy))
    share = f"{cores} usable cores / {ranks} ranks on this node" if ranks > 1 else f"{cores} usable cores"
    if busy:
        share += f", {busy} busy with other work (load average)"
    return n, f"{n} ({share}; --threads N overrides)"


def busy_cores() -> int:
    """Cores other work keeps busy: the 1-minute load average, rounded (0 where unknown). OpenMP threads
    that share a core with another busy process spin and wait: decoding then runs tens of times slower
    than on one thread, so a busy machine gets fewer threads."""
    try:
        return max(0, int(os.getloadavg()[0] + 0.5))
    except (AttributeError, OSError):
        return 0


def apply(words: Sequence[str], *, rank: int = 0, stream=None, follow_load: bool = True) -> Optional[int]:
    """Set torch's intra-op threads as `choose` says; rank 0 prints the choice once per process on a
    terminal (in logs and pipes the one-line error contract keeps stderr to the error alone)."""
    global _printed
    n, reason = choose(words, follow_load=follow_load)
    if n is not None:
        import torch
        torch.set_num_threads(n)
    stream = stream or sys.stderr
    if rank == 0 and not _printed and "--quiet" not in words and getattr(stream, "isatty", lambda: False)():
        _printed = True
        print(f"threads: {reason}", file=stream, flush=True)
    return n


def add_argument(group) -> None:
    group.add_argument("--threads", type=int, default=None, metavar="N",
                       help="intra-op CPU threads per process (default: usable cores / ranks on this node, "
                            "or OMP_NUM_THREADS when set)")
