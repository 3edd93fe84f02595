"""Model-state bytes per rank (weights, gradients, fp32 master copies, optimizer state) as DeepSpeed lays them out.

Counted from this rank's own parameter list (the GPTModel built on the meta device for one TP rank
and, with pipeline parallelism, one stage -- so vocabulary padding, GQA, biases, tied embeddings
on the first and last stage are exactly the model's), grouped as training/optim.py groups them
(decay: matrices; no decay: biases and norms), then laid out as each DeepSpeed optimizer does:

  ZeRO 0, fp32        torch AdamW: weights 4N, grads 4N, moments 8N + a 4-byte step per tensor
  ZeRO 0, bf16/fp16   FP16_UnfusedOptimizer: weights 2N, grads 2N, fp32 master 4N, moments 8N
  ZeRO 0, bf16 + PP   BF16_Optimizer: flat 2N, fp32 grad accumulation 4N, master and moments of
                      the DP partition (the pipeline engine's choice for bf16)
  ZeRO 1/2            DeepSpeedZeroOptimizer: each group flattened and padded to a multiple of
                      2 x DP elements; master and moments of this rank's partition; gradients:
                      one buffer holding every parameter that overlaps the partition (whole)
  ZeRO 3              Stage3: per parameter ceil(numel / DP) elements (params of at most
                      `stage3_param_persistence_threshold` elements stay whole as well); master,
                      moments and gradients of the partition; hpZ adds a secondary copy of
                      ceil(numel / hpz) per partitioned parameter

N = parameters on this rank; 4-byte step counters: one per tensor (ZeRO 0) or per flat group.
tests/distributed/test_planning_states.py checks every formula against what a real DeepSpeed
engine holds (megatron_ru/planning/held.py), byte for byte.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Optional

from ..config import ModelConfig

PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed's stage3_param_persistence_threshold default
SUB_GROUP_SIZE = 1_000_000_000  # DeepSpeed's sub_group_size default (ZeRO-3 flat groups)
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class RankParams:
    """Parameter sizes of one rank, in DeepSpeed's order: (decay group, no-decay group)."""
    decay: tuple
    no_decay: tuple

    @property
    def groups(self) -> list:
        return [g for g in (self.decay, self.no_decay) if g]

    @property
    def numel(self) -> int:
        return sum(self.decay) + sum(self.no_decay)

    @property
    def tensors(self) -> int:
        return len(self.decay) + len(self.no_decay)


def _meta_model(cfg: ModelConfig, tp: int):
    import torch

    from ..model.gpt import GPTModel
    from ..parallel.state import ParallelState

    ps = ParallelState(rank=0, world_size=tp, tensor_model_parallel_size=tp)
    with torch.device("meta"):
        return GPTModel(cfg, ps, initialize=False, device="meta")


@functools.lru_cache(maxsize=64)
def _named_shapes(cfg_json: str, tp: int) -> tuple:
    cfg = ModelConfig.from_dict(json.loads(cfg_json))
    model = _meta_model(cfg, tp)
    return tuple((name, tuple(p.shape)) for name, p in model.named_parameters())


def rank_params(cfg: ModelConfig, tp: int = 1, counts: Optional[list] = None,
                stage: int = 0) -> RankParams:
    """This rank's parameters (any TP rank: the shares are equal); `counts` = layers per
    pipeline stage (None: no pipeline), `stage` = which stage."""
    shapes = _named_shapes(cfg.to_json(), tp)
    if counts is not None and len(counts) > 1:
        from ..parallel.pipeline import owned_prefixes
        prefixes = owned_prefixes(cfg, list(counts), stage)
        first, last = stage == 0, stage == len(counts) - 1
        mine = [(n, s) for n, s in shapes if any(n.startswith(x) for x in prefixes)]
        # the pipeline module registers the stage's layers in list order: embedding (first
        # stage, or the tied head copy on the last), blocks, final norm, head
        if last and not first and cfg.tie_word_embeddings:  # the tied head holds the table only
            mine = [(n, s) for n, s in mine if not n.startswith("pos_embed.")]
        shapes = tuple(mine)
    decay = tuple(math.prod(s) for _, s in shapes if len(s) >= 2)
    no_decay = tuple(math.prod(s) for _, s in shapes if len(s) < 2)
    return RankParams(decay, no_decay)


def _zero12_grad_elems(group: tuple, dp: int, dp_rank: int) -> tuple[int, int]:
    """(padded flat size, elements of every parameter overlapping this rank's partition)."""
    align = 2 * dp
    flat = -(-sum(group) // align) * align
    part = flat // dp
    lo, hi = dp_rank * part, (dp_rank + 1) * part
    start, touched = 0, 0
    for n in group:
        if start < hi and start + n > lo:
            touched += n
        start += n
    return flat, touched


def model_state_bytes(params: RankParams, *, zero: int = 0, dp: int = 1, dp_rank: Optional[int] = None,
                      precision: str = "bf16", hpz: int = 1, pipeline: bool = False,
                      persistence_threshold: int = PERSISTENCE_THRESHOLD,
                      sub_group_size: int = SUB_GROUP_SIZE) -> dict:
    """Bytes held on one rank: {"weights", "grads", "master", "optimizer", "total"}.
    `dp_rank` None: the largest over the data-parallel ranks (ZeRO 1/2 gradient buffers
    differ by a straddling parameter or two)."""
    if dp_rank is None:
        ranks = range(dp) if zero in (1, 2) else [0]
        return max((model_state_bytes(params, zero=zero, dp=dp, dp_rank=r, precision=precision,
                                      hpz=hpz, pipeline=pipeline,
                                      persistence_threshold=persistence_threshold,
                                      sub_group_size=sub_group_size) for r in ranks),
                   key=lambda d: d["total"])
    e = BYTES[precision]
    n = params.numel
    if zero == 0 and pipeline and precision == "bf16":
        out = _bf16_optimizer(params, dp, e)
    elif zero == 0:
        master = 0 if precision == "fp32" else 4 * n
        out = dict(weights=e * n, grads=e * n, master=master, optimizer=8 * n + 4 * params.tensors)
    elif zero in (1, 2):
        weights = grads = master = 0
        for group in params.groups:
            flat, touched = _zero12_grad_elems(group, dp, dp_rank)
            weights += e * flat
            grads += e * touched
            master += 4 * (flat // dp)
        out = dict(weights=weights, grads=grads, master=master,
                   optimizer=2 * master + 4 * len(params.groups))
    elif zero == 3:
        whole = part = secondary = steps = 0
        for group in params.groups:
            group_part = 0
            for numel in group:
                p = -(-numel // dp)
                group_part += p
                if numel <= persistence_threshold:
                    whole += numel if dp > 1 else 0  # at DP 1 the partition is the parameter
                elif hpz > 1:
                    secondary += -(-numel // hpz)
            part += group_part
            steps += -(-group_part // sub_group_size)
        out = dict(weights=e * (whole + part + secondary), grads=e * part, master=4 * part,
                   optimizer=8 * part + 4 * steps)
    else:
        raise ValueError(f"ZeRO stage {zero} is not 0, 1, 2 or 3")
    out["total"] = sum(out.values())
    return out


def _bf16_optimizer(params: RankParams, dp: int, e: int) -> dict:
    """DeepSpeed's BF16_Optimizer (bf16 under the pipeline engine at ZeRO 0): a flat bf16 copy
    per group padded to DP, fp32 gradient accumulation of the whole group, master and moments
    of this rank's partition."""
    weights = grads = master = 0
    for group in params.groups:
        flat = -(-sum(group) // dp) * dp
        weights += e * flat
        grads += 4 * flat
        master += 4 * (flat // dp)
    return dict(weights=weights, grads=grads, master=master,
                optimizer=2 * master + 4 * len(params.groups))


def deepspeed_zero3_estimate(total_params: int, largest_layer_params: int, num_gpus_per_node: int,
                             num_nodes: int) -> float:
    """DeepSpeed's own `estimate_zero3_model_states_mem_needs` (offload off, fp16/bf16 params):
    bytes per GPU it prints, for comparison in the docs; computed by calling it."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    _, gpu, _ = estimate_zero3_model_states_mem_needs(total_params, largest_layer_params,
                                                      num_gpus_per_node, num_nodes,
                                                      cpu_offload=False, cpu_offload_params=False,
                                                      zero_init=True)
    return float(gpu)
