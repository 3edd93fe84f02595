"""ZeRO++ hierarchical partitioning (hpZ): the secondary shard groups, checked against our rank layout and the nodes, then given to DeepSpeed.

What DeepSpeed 0.19 builds by itself (deepspeed/utils/groups.py `_create_zero_param_parallel_group`,
called from the stage-3 optimizer when no group is set yet): groups of h = zero_hpz_partition_size
CONSECUTIVE GLOBAL ranks, [0..h-1], [h..2h-1], ... over the whole world, whatever data-parallel
group ZeRO partitions over. Each rank keeps slice `rank_in_group` of its own copy of a parameter
as the secondary shard and all-gathers it over that group (partition_parameters.py
`_partition_param_sec`, `_all_gather_coalesced`). Our layout puts tensor parallelism innermost, so
at TP > 1 consecutive ranks hold DIFFERENT tensor-parallel shards and DeepSpeed's own groups would
stitch a parameter from several shards: measured on 4 CPU ranks, TP 2 x DP 2 with h = 2 trains
with losses that differ from plain ZeRO-3 from the first step, without any error.

What we do instead: a secondary group is h consecutive members of one ZeRO data-parallel group
(at TP = 1 exactly DeepSpeed's groups; at TP = t the global ranks r, r+t, ..., r+(h-1)t). With
context parallelism ZeRO partitions over DP x CP (every rank holding the same weights, ParallelState's
`mpu` group), and the secondary groups are h consecutive members of that group (CP ranks first,
so h = CP gives the CP groups themselves). Every
rank creates every group in the same order, and the one it belongs to is set where the stage-3
optimizer looks first (`deepspeed.utils.groups._ZERO_PARAM_INTRA_PARALLEL_GROUP`), so DeepSpeed
keeps it. Before compute we refuse, with one line: hpZ below ZeRO stage 3 or with pipeline
stages, h not dividing the data-parallel size or larger than it, and a group whose ranks are not
all on one node (ranks per node from the launcher; ranks must be placed in consecutive blocks
per node, as mpirun/torchrun/srun do by default) -- the secondary all-gather is meant to stay on
the node's fast links.
"""
from __future__ import annotations

from typing import Callable, Optional

from ..config import ConfigError


def partition_size(ds: dict) -> int:
    """zero_hpz_partition_size of a DeepSpeed config dict (1 = hpZ off; 0 reads as off too)."""
    return int(ds.get("zero_optimization", {}).get("zero_hpz_partition_size", 1) or 1)


def secondary_groups(zero_groups: list[list[int]], h: int) -> list[list[int]]:
    """Every secondary group: consecutive runs of h members of each ZeRO data-parallel group."""
    return [sorted(g)[i:i + h] for g in zero_groups for i in range(0, len(g), h)]


def zero_groups(world: int, tp: int, pp: int = 1, cp: int = 1) -> list[list[int]]:
    """The groups ZeRO partitions over (DeepSpeed's data-parallel group, ParallelState's `mpu`):
    the DP groups, or the DP x CP groups with context parallelism."""
    from ..parallel.state import group_ranks
    kind = "dp_cp" if cp > 1 else "dp"
    return [ranks for k, ranks in group_ranks(world, tp, pp, cp) if k == kind]


def deepspeed_groups(world: int, h: int) -> list[list[int]]:
    """The groups DeepSpeed 0.19 would build by itself: h consecutive global ranks."""
    return [list(range(i, i + h)) for i in range(0, world, h)]


def check_layout(h: int, *, world: int, tp: int, pp: int, zero_groups: list[list[int]],
                 ranks_per_node: int, rank: int, local_rank: int, path: str,
                 cp: int = 1) -> list[list[int]]:
    """The secondary groups for hpZ size h, or ConfigError with one line. `zero_groups`: the
    groups ZeRO partitions over (DP, or DP x CP with context parallelism). Pure: the same
    answer on every rank except for the placement check, which reads this rank's own position."""
    key = f"{path}: zero_optimization.zero_hpz_partition_size={h}"
    dp = len(zero_groups[0])
    size = f"world {world} / TP {tp}" if cp == 1 else f"DP {dp // cp} x CP {cp}"
    if pp > 1:
        raise ConfigError(f"{key} cannot be combined with --pipeline-model-parallel-size={pp} "
                          "(hpZ is part of ZeRO stage 3, which pipeline stages do not run)")
    if h > dp:
        raise ConfigError(f"{key} is larger than the data-parallel size {dp} ({size}): a secondary "
                          "group holds h data-parallel ranks")
    if dp % h:
        raise ConfigError(f"{key} does not divide the data-parallel size {dp} ({size}): the "
                          f"data-parallel ranks must split into whole groups of {h}")
    groups = secondary_groups(zero_groups, h)
    node = ranks_per_node
    if (rank - local_rank) % node or local_rank >= node:
        raise ConfigError(f"{key}: rank {rank} is local rank {local_rank} of {node} on its node, so "
                          "ranks are not placed in consecutive blocks per node; hpZ groups are "
                          "checked against nodes only for block placement (e.g. mpirun --map-by "
                          "slot, the default)")
    for g in groups:
        if len({r // node for r in g}) > 1:
            span = f"TP {tp} x h {h} = {tp * h} consecutive ranks" if tp > 1 else f"{h} ranks"
            hint = (f"choose h dividing {node // tp} (the data-parallel ranks of one node)"
                     if node >= tp else "the tensor-parallel group alone fills more than a node")
            if node == 1:
                hint = "(an unknown count also reads as 1: set LOCAL_WORLD_SIZE where the launcher does not)"
            raise ConfigError(f"{key}: the secondary group {g} spans {span} but a node runs "
                              f"{node} ranks (as the launcher reports), so it crosses nodes; {hint}")
    return groups


def describe(groups: list[list[int]], world: int, h: int, ranks_per_node: int, cp: int = 1) -> str:
    ours = groups if len(groups) <= 4 else groups[:3] + [["..."]]
    note = "" if sorted(map(sorted, groups)) == deepspeed_groups(world, h) else \
        " (DeepSpeed's own consecutive-rank groups would mix tensor-parallel shards; ours are used)"
    what = "data-parallel ranks" if cp == 1 else "data-parallel ranks (DP x CP)"
    return (f"ZeRO++ hpZ: secondary parameter shards over groups of {h} {what} "
            f"{ours}, {ranks_per_node} ranks per node{note}")


def setup(ds: dict, ps, path: str, ranks_per_node: int, log: Callable) -> Optional[list[list[int]]]:
    """Check hpZ against this run's layout (no communication; call inside runtime.checked);
    the secondary groups, or None when hpZ is off."""
    h = partition_size(ds)
    if h <= 1:
        return None
    groups = check_layout(h, world=ps.world_size, tp=ps.tp_size, pp=ps.pp_size,
                          zero_groups=zero_groups(ps.world_size, ps.tp_size, ps.pp_size, ps.cp_size),
                          ranks_per_node=ranks_per_node, rank=ps.rank,
                          local_rank=ps.local_rank, path=path, cp=ps.cp_size)
    log(describe(groups, ps.world_size, h, ranks_per_node, ps.cp_size))
    return groups


def install(groups: list[list[int]], ps):
    """Create every secondary group on every rank (same order) and set this rank's as the one
    DeepSpeed's stage 3 uses; refuses when this rank's group is not inside the data-parallel
    group DeepSpeed will partition over (a layout this module does not know)."""
    import torch.distributed as dist
    from deepspeed.utils import groups as ds_groups

    zero = ps.get_sequence_data_parallel_group() if hasattr(ps, "get_sequence_data_parallel_group") \
        else ps.get_data_parallel_group()
    members = set(dist.get_process_group_ranks(zero)) if zero is not None else set()
    mine = None
    for g in groups:
        group = dist.new_group(g)
        if ps.rank in g:
            mine, mine_ranks = group, g
    if mine is None or not set(mine_ranks) <= members:
        raise ConfigError(f"hpZ: the secondary group of rank {ps.rank} is not inside its ZeRO "
                          f"data-parallel group {sorted(members)}")
    # replaces one an earlier engine of this process used (its parameters keep their own)
    ds_groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = mine
    return mine


def verify(model, group) -> None:
    """After deepspeed.initialize: every ZeRO-3 parameter gathers its secondary shard over our
    group (a DeepSpeed that built its own would be caught here, before the first step)."""
    bad = [n for n, p in model.named_parameters()
           if getattr(p, "ds_zero_param_process_group", None) is not group]
    if bad:
        raise RuntimeError(f"hpZ: DeepSpeed did not keep our secondary group for {len(bad)} "
                           f"parameter(s), e.g. {bad[0]} (a DeepSpeed version other than 0.19?)")


def check_quantization(ds: dict, ps, path: str) -> None:
    """ZeRO++ quantized weights (qwZ) and gradients (qgZ), refused where DeepSpeed 0.19 cannot
    run them: both load DeepSpeed's quantizer kernels (QuantizerBuilder), which its CPU
    accelerator does not implement (it raises at engine start for qwZ, at the first backward for
    qgZ); qgZ's all-to-all runs over consecutive global ranks per node and the world group
    (runtime/comm/coalesced_collectives.py), not over the data-parallel group, so at TP > 1 it
    would sum gradients of different tensor-parallel shards."""
    zero = ds.get("zero_optimization", {})
    used = [k for k in ("zero_quantized_weights", "zero_quantized_nontrainable_weights",
                        "zero_quantized_gradients") if zero.get(k)]
    if not used:
        return
    if zero.get("zero_quantized_gradients") and ps.tp_size > 1:
        raise ConfigError(f"{path}: zero_optimization.zero_quantized_gradients cannot be combined "
                          f"with --tensor-model-parallel-size={ps.tp_size}: DeepSpeed's quantized "
                          "gradient all-to-all runs over all ranks of each node, not the "
                          "data-parallel group")
    from deepspeed.accelerator import get_accelerator
    builder = get_accelerator().get_op_builder("QuantizerBuilder")
    if builder is None or getattr(builder, "NAME", "") == "deepspeed_not_implemented":
        raise ConfigError(f"{path}: zero_optimization.{used[0]} needs DeepSpeed's quantizer kernels "
                          f"(QuantizerBuilder), which the {get_accelerator().device_name()} "
                          "accelerator does not implement; use it on GPUs")
