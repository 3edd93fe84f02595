"""ParallelState: rank discovery for every launcher, TP/DP process groups, and DeepSpeed's `mpu` API.

Launchers understood (first match wins, so `mpirun` inside a Slurm allocation is not mistaken
for Slurm): torchrun / deepspeed (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`), OpenMPI
(`OMPI_COMM_WORLD_*`), MPICH / Hydra (`PMI_RANK`, `PMI_SIZE`), Slurm `srun` (`SLURM_PROCID`,
`SLURM_NTASKS`, `SLURM_LOCALID`). Under MPI the ranks come from mpi4py itself and rank 0 chooses
MASTER_ADDR / MASTER_PORT and broadcasts them, so nothing needs to be set by hand.

Layout of ranks (Megatron-core's order): tensor-parallel innermost (consecutive ranks), then
context parallel, then data parallel, then pipeline stages:
rank = pp_rank * (DP * CP * TP) + dp_rank * (CP * TP) + cp_rank * TP + tp_rank. With TP=2 of
4 ranks: TP groups [0,1], [2,3], DP groups [0,2], [1,3]; with TP=2, PP=2 of 8: stage 0 holds
ranks 0-3, stage 1 ranks 4-7, pipeline groups [0,4], [1,5], [2,6], [3,7]; with TP=2, CP=2 of 4:
TP groups [0,1], [2,3], CP groups [0,2], [1,3]. CP ranks hold slices of the same sequences, so
DeepSpeed (through the `mpu` methods) averages gradients and shards ZeRO state over DP x CP.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from ..config import ConfigError, ModelConfig
from ..launch import LaunchInfo, discover_launch  # noqa: F401 (re-exported)
from .random import RNGTracker, model_parallel_seed


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _routable_address() -> str:
    """An address of this host that other hosts can reach (not a loopback alias)."""
    host = socket.gethostname()
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET)
    except socket.gaierror:
        infos = []
    for info in infos:
        addr = info[4][0]
        if not addr.startswith("127."):
            return addr
    raise ConfigError(
        f"cannot find a non-loopback address for host {host!r} to use as MASTER_ADDR in a "
        "multi-node run; set MASTER_ADDR (and MASTER_PORT) to rank 0's address by hand")


def _mpi_rendezvous(info: LaunchInfo) -> LaunchInfo:
    """Take ranks from mpi4py and share MASTER_ADDR/PORT chosen by rank 0 (all nodes)."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ConfigError(f"launched by {info.launcher} mpirun but mpi4py is not importable: {exc}; "
                          "install it with `pip install mpi4py mpich`") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != info.world_size or comm.Get_rank() != info.rank:
        raise ConfigError(
            f"mpi4py sees rank {comm.Get_rank()} of {comm.Get_size()} but the {info.launcher} "
            f"launcher published rank {info.rank} of {info.world_size}: mpi4py is linked against a "
            "different MPI than the `mpirun` you used (use the mpirun of the same installation, "
            "e.g. the one from the `mpich` wheel in your virtual environment)")
    local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    hosts = comm.allgather(socket.gethostname())
    # Rank 0 decides (its own MASTER_ADDR/PORT if set, since mpirun may not forward them to other
    # nodes) and every rank takes part in the broadcast, also when rank 0 fails to choose.
    choice = None
    if comm.Get_rank() == 0:
        try:
            single_node = all(h == hosts[0] for h in hosts)
            addr = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if single_node else _routable_address())
            choice = (addr, os.environ.get("MASTER_PORT") or str(_free_port()))
        except ConfigError as exc:
            choice = ("error", str(exc))
    addr, port = comm.bcast(choice, root=0)
    if addr == "error":
        raise ConfigError(port)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    return LaunchInfo(info.launcher, comm.Get_rank(), comm.Get_size(), local_rank)


def check_world(world_size: int, tp: int, pp: int = 1, cp: int = 1) -> None:
    """world = TP x CP x DP x PP, or one line naming the numbers."""
    if cp > 1 and world_size % (tp * cp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size x "
            f"--context-parallel-size x --pipeline-model-parallel-size = {tp} x {cp} x {pp} = "
            f"{tp * cp * pp}: world = TP x CP x DP x PP")
    if pp == 1 and world_size % tp:
        raise ConfigError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size={tp}: "
            "the ranks must form whole tensor-parallel groups")
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size x "
            f"--pipeline-model-parallel-size = {tp} x {pp} = {tp * pp}: world = TP x PP x DP")


def group_ranks(world: int, tp: int, pp: int = 1, cp: int = 1) -> list[tuple[str, list[int]]]:
    """Every ("tp" | "cp" | "dp" | "dp_cp" | "pp", ranks) group of the layout, in creation order
    (the same on every rank); context and pipeline groups only when cp > 1 / pp > 1, so a
    TP x DP run creates what it always did."""
    dp = world // (tp * cp * pp)
    stage = tp * cp * dp  # ranks per pipeline stage

    def rank(s, d, c, t):
        return s * stage + d * cp * tp + c * tp + t

    out = [("tp", list(range(start, start + tp))) for start in range(0, world, tp)]
    if cp > 1:
        out += [("cp", [rank(s, d, c, t) for c in range(cp)])
                for s in range(pp) for d in range(dp) for t in range(tp)]
    out += [("dp", [rank(s, d, c, t) for d in range(dp)])
            for s in range(pp) for c in range(cp) for t in range(tp)]
    if cp > 1:  # DeepSpeed's data-parallel group: every rank that holds the same weights
        out += [("dp_cp", [rank(s, d, c, t) for d in range(dp) for c in range(cp)])
                for s in range(pp) for t in range(tp)]
    if pp > 1:
        out += [("pp", [rank(s, d, c, t) for s in range(pp)])
                for d in range(dp) for c in range(cp) for t in range(tp)]
    return out


CP_SEED_OFFSET = 100_003  # default and TP streams of CP rank c: seed + c * this


class ParallelState:
    """Ranks and process groups of one run. Passed to every parallel layer; never global."""

    def __init__(self, *, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 tensor_model_parallel_size: int = 1, tp_group=None, dp_group=None,
                 device: torch.device | str = "cpu", launcher: str = "single",
                 pipeline_model_parallel_size: int = 1, pp_group=None,
                 context_parallel_size: int = 1, cp_group=None, dp_cp_group=None) -> None:
        tp, pp, cp = tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size
        check_world(world_size, tp, pp, cp)
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.tp_size, self.tp_rank = tp, rank % tp
        self.cp_size, self.cp_rank = cp, (rank // tp) % cp
        self.pp_size, self.pp_rank = pp, rank // (world_size // pp)
        dp = world_size // (tp * cp * pp)
        self.dp_size, self.dp_rank = dp, (rank // (tp * cp)) % dp
        self.tp_group, self.dp_group, self.pp_group = tp_group, dp_group, pp_group
        self.cp_group = cp_group
        self._dp_cp_group = dp_cp_group
        self.device = torch.device(device)
        self.launcher = launcher
        self.rng = RNGTracker(self.device)

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> "ParallelState":
        """One process, no parallelism, no torch.distributed."""
        return cls(device=device)

    @classmethod
    def from_environment(cls, tensor_model_parallel_size: int = 1, *, backend: Optional[str] = None,
                         timeout_s: float = 600.0,
                         pipeline_model_parallel_size: int = 1,
                         context_parallel_size: int = 1) -> "ParallelState":
        """Discover the launcher, initialise torch.distributed (once) and build TP, CP, DP and
        pipeline groups."""
        tp, pp, cp = tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size
        for name, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                            ("context_parallel_size", cp)):
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        info = discover_launch()
        if dist.is_initialized():
            info = LaunchInfo(info.launcher, dist.get_rank(), dist.get_world_size(), info.local_rank)
        elif info.launcher in ("openmpi", "mpich"):
            info = _mpi_rendezvous(info)
        check_world(info.world_size, tp, pp, cp)
        if torch.cuda.is_available():
            torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            backend = backend or ("nccl" if device.type == "cuda" else "gloo")
            if info.launcher == "single":
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                os.environ.setdefault("MASTER_PORT", str(_free_port()))
            for key in ("MASTER_ADDR", "MASTER_PORT"):
                if key not in os.environ:
                    raise ConfigError(f"{key} is not set: the {info.launcher} launcher must provide "
                                      "it (torchrun and deepspeed do; for srun set it in the script)")
            # LOCAL_RANK/RANK/WORLD_SIZE for libraries (DeepSpeed) that read them later.
            os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size),
                              LOCAL_RANK=str(info.local_rank))
            dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size,
                                    timeout=timedelta(seconds=timeout_s),
                                    device_id=device if device.type == "cuda" else None)
        groups = {}
        for kind, ranks in group_ranks(info.world_size, tp, pp, cp):  # every rank creates every group,
            group = dist.new_group(ranks)                          # in the same order
            if info.rank in ranks:
                groups[kind] = group
        return cls(rank=info.rank, world_size=info.world_size, local_rank=info.local_rank,
                   tensor_model_parallel_size=tp, tp_group=groups["tp"], dp_group=groups["dp"],
                   device=device, launcher=info.launcher, pipeline_model_parallel_size=pp,
                   pp_group=groups.get("pp"), context_parallel_size=cp,
                   cp_group=groups.get("cp"), dp_cp_group=groups.get("dp_cp"))

    # ---- pipeline stages ------------------------------------------------------------------
    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def layout(self) -> str:
        """The rank layout, one line per pipeline stage (printed at start by rank 0)."""
        tp, cp, dp, pp = self.tp_size, self.cp_size, self.dp_size, self.pp_size
        if cp == 1:
            lines = [f"rank layout: world {self.world_size} = TP {tp} x DP {dp} x PP {pp} "
                     "(TP innermost, then DP, then PP)"]
        else:
            lines = [f"rank layout: world {self.world_size} = TP {tp} x CP {cp} x DP {dp} x PP {pp} "
                     "(TP innermost, then CP, then DP, then PP)"]
        for stage in range(pp):
            base = stage * tp * cp * dp
            tps = [list(range(base + i * tp, base + (i + 1) * tp)) for i in range(cp * dp)]
            line = f"  stage {stage}: TP groups {tps}"
            if cp > 1:
                cps = [[base + d * cp * tp + c * tp + t for c in range(cp)]
                       for d in range(dp) for t in range(tp)]
                line += f"; CP groups {cps}"
            lines.append(line)
        return "\n".join(lines)

    def adopt_groups(self, tp_group, dp_group, pp_group) -> None:
        """Use another owner's process groups over the same ranks (DeepSpeed's pipeline grid),
        so that our layers and DeepSpeed communicate through the very same groups."""
        self.tp_group, self.dp_group, self.pp_group = tp_group, dp_group, pp_group

    # ---- helpers for layers ---------------------------------------------------------------
    @property
    def tp_comm(self):
        """The TP group, or None when there is nothing to communicate (TP=1: plain PyTorch)."""
        return self.tp_group if self.tp_size > 1 else None

    @property
    def tp_source_rank(self) -> int:
        """Global rank of TP rank 0: the rank that decides (samples, plans) for its TP group."""
        return self.rank - self.tp_rank

    def broadcast_from_tp_source(self, value):
        """TP rank 0's `value` on every rank of the TP group; returns it (no-op at TP=1).

        A tensor is broadcast in place (every rank passes one of the same shape and dtype); any
        other value is pickled (the other ranks may pass None) and the source's object returned."""
        if self.tp_comm is None:
            return value
        if isinstance(value, torch.Tensor):
            dist.broadcast(value, src=self.tp_source_rank, group=self.tp_group)
            return value
        box = [value]
        device = self.device if self.device.type == "cuda" else None
        dist.broadcast_object_list(box, src=self.tp_source_rank, group=self.tp_group, device=device)
        return box[0]

    @property
    def cp_comm(self):
        """The CP group, or None at CP=1 (every rank holds whole sequences)."""
        return self.cp_group if self.cp_size > 1 else None

    @property
    def dp_cp_group(self):
        """The ranks holding the same weights (DeepSpeed's data-parallel group): DP x CP."""
        return self._dp_cp_group if self.cp_size > 1 else self.dp_group

    @property
    def dp_cp_size(self) -> int:
        """Ranks that hold the same weights: DeepSpeed's data-parallel world (DP x CP)."""
        return self.dp_size * self.cp_size

    def validate(self, config: ModelConfig) -> None:
        config.validate_parallel(self.tp_size, self.cp_size)

    def seed(self, seed: int) -> None:
        """Same default stream on every TP rank; a per-TP-rank stream for dropout in TP regions.
        CP ranks hold other tokens (and, in attention, other heads): their streams differ too."""
        seed = seed + CP_SEED_OFFSET * self.cp_rank  # CP=1: unchanged
        torch.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)
        self.rng.seed(model_parallel_seed(seed, self.tp_rank))

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def __repr__(self) -> str:
        pp = f"pp={self.pp_rank}/{self.pp_size}, " if self.pp_size > 1 else ""
        pp += f"cp={self.cp_rank}/{self.cp_size}, " if self.cp_size > 1 else ""
        return (f"ParallelState(rank={self.rank}/{self.world_size}, tp={self.tp_rank}/{self.tp_size}, "
                f"{pp}dp={self.dp_rank}/{self.dp_size}, device={self.device}, launcher={self.launcher})")

    # ---- the `mpu` interface DeepSpeed expects --------------------------------------------
    # Its data-parallel group is DP x CP: the gradients of CP ranks (each from its own slice of
    # the sequences) are averaged with the DP ones, and ZeRO shards over all of them; the model's
    # loss (parallel/context.py) scales each CP rank's share by CP so the average is the
    # full-sequence mean. Our own code reads dp_rank / dp_size / dp_group (pure DP: the data).
    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_model_parallel_group(self):
        return self.tp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank * self.cp_size + self.cp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp_cp_size

    def get_data_parallel_group(self):
        return self.dp_cp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group
