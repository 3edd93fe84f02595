"""The layouts the toolkit can run for a model on a cluster: enumerated, checked against its rules, sized (memory, time), ranked.

A layout = TP x CP x DP x PP ranks (TP innermost, then CP, then DP, then PP), ZeRO stage, hpZ
group, sequence parallelism, recompute, micro-batch. Rules = what pretrain_gpt.py refuses
(config.validate_parallel, training/arguments.py validate(), training/pipeline_run.py check(),
training/hpz.py check_layout(); tests/e2e/test_plan.py feeds the planner's commands to
those): heads, KV heads and FFN divide by TP; SP needs TP > 1 and the sequence divisible by TP;
CP divides the heads and KV heads of a TP rank and the sequence, and does not combine with PP,
SFT data or --reset-attention-mask; PP <= layers, PP needs ZeRO 0/1, at least PP micro-batches
per step, and no --reset-attention-mask / --reset-position-ids / packed SFT; hpZ only with ZeRO 3
and no PP, h secondary members of the ZeRO group (DP x CP ranks; hpz.py takes h consecutive
ones) with h dividing DP x CP and the h x TP consecutive ranks they span inside a node; the
global batch is micro x accumulation x DP. LoRA is not planned (the planner sizes full training).
Features behind IMPLEMENTED: a parallelism that has not landed is left out of the search (drop
its name to hide it).
Per-rank memory = model states (states.py, the worst pipeline stage) + activations of the
micro-batches in flight (1F1B: stage s holds min(m, p - s)) (activations.py) + communication
buffers + FRAGMENTATION of the total, against the device memory less CONTEXT_RESERVE.
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from typing import Optional

from ..config import ModelConfig
from ..parallel.pipeline import layer_costs, split_layers
from .accelerators import Accelerator
from .activations import activation_bytes, sparse_density
from .states import BYTES, PERSISTENCE_THRESHOLD, model_state_bytes, rank_params
from .timing import step_time

IMPLEMENTED = {"tp", "pp", "zero", "hpz", "sp", "cp", "recompute"}
FRAGMENTATION = 0.05  # allocator fragmentation allowance: a share of everything allocated
CONTEXT_RESERVE = 1.5e9  # CUDA context, NCCL and cuBLAS workspaces: outside the allocator
REDUCE_BUCKET = 5e8  # DeepSpeed's reduce_bucket_size / allgather_bucket_size default (elements)
PREFETCH_BUCKET = 5e7  # DeepSpeed's stage3_prefetch_bucket_size default (elements)


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    zero: int = 0
    hpz: int = 1
    sp: bool = False
    recompute: str = "none"
    micro_batch: int = 1
    accum: int = 1

    def short(self) -> str:
        parts = [f"TP{self.tp}", f"PP{self.pp}", f"DP{self.dp}"]
        if self.cp > 1:
            parts.append(f"CP{self.cp}")
        parts.append(f"Z{self.zero}" + (f"/hpZ{self.hpz}" if self.hpz > 1 else ""))
        if self.sp:
            parts.append("SP")
        if self.recompute != "none":
            parts.append("RC")
        parts.append(f"mb{self.micro_batch}x{self.accum}")
        return " ".join(parts)


@dataclass
class Result:
    layout: Layout
    memory: dict = field(default_factory=dict)  # bytes: weights grads optimizer activations comm fragmentation total
    time: dict = field(default_factory=dict)
    split: Optional[list] = None
    fits: bool = True
    reason: str = ""

    def as_dict(self) -> dict:
        return {"layout": asdict(self.layout), "memory_bytes": self.memory, "time": self.time,
                "pipeline_split": self.split, "fits": self.fits, "reason": self.reason}


def _divisors(n: int) -> list:
    return [k for k in range(1, n + 1) if n % k == 0]


@dataclass(frozen=True)
class Workload:
    """The pretrain_gpt.py flags that restrict layouts (the planner adds them to its command)."""
    dataset_type: str = "text"  # "sft": no context parallelism
    sft_packing: str = "pad"  # "packed": no pipeline parallelism
    reset_attention_mask: bool = False  # no context or pipeline parallelism
    reset_position_ids: bool = False  # no pipeline parallelism

    def flags(self) -> list:
        out = [f"--dataset-type {self.dataset_type}"] if self.dataset_type != "text" else []
        if self.sft_packing != "pad":
            out.append(f"--sft-packing {self.sft_packing}")
        out += [f for f, on in (("--reset-attention-mask", self.reset_attention_mask),
                                ("--reset-position-ids", self.reset_position_ids)) if on]
        return out


def rule_violation(cfg: ModelConfig, lay: Layout, *, seq_length: int, global_batch: int,
                   gpus_per_node: int, workload: Workload = Workload()) -> str:
    """Why pretrain_gpt.py would refuse this layout ('' = it runs)."""
    t, c = lay.tp, lay.cp
    for name, value in (("heads", cfg.num_attention_heads), ("KV heads", cfg.num_key_value_heads),
                        ("FFN size", cfg.ffn_hidden_size)):
        if value % t:
            return f"{name} {value} not divisible by TP {t}"
    if lay.sp and t == 1:
        return "sequence parallelism needs TP > 1"
    if c > 1 and ((cfg.num_attention_heads // t) % c or (cfg.num_key_value_heads // t) % c
                  or seq_length % c):
        return f"CP {c} does not divide the heads / KV heads per TP rank or the sequence"
    if c > 1:
        for what, on in (("pipeline parallelism", lay.pp > 1),
                         ("SFT data", workload.dataset_type == "sft"),
                         ("--reset-attention-mask", workload.reset_attention_mask)):
            if on:
                return f"context parallelism does not combine with {what}"
    if lay.sp and seq_length % (t * c):  # each CP slice splits over TP (the model's forward)
        return f"sequence {seq_length} not divisible by TP x CP for SP"
    if lay.pp > cfg.num_layers:
        return f"PP {lay.pp} > {cfg.num_layers} layers"
    if lay.pp > 1:
        if lay.zero >= 2:
            return "pipeline parallelism needs ZeRO 0 or 1"
        if lay.accum < lay.pp:
            return f"{lay.accum} micro-batches per step < PP {lay.pp}"
        for what, on in (("--reset-attention-mask", workload.reset_attention_mask),
                         ("--reset-position-ids", workload.reset_position_ids),
                         ("packed SFT rows", workload.sft_packing == "packed")):
            if on:
                return f"pipeline parallelism does not combine with {what}"
    if lay.hpz > 1:
        zero_group = lay.dp * c  # the ranks holding the same weights (hpz.py's ZeRO group)
        if lay.zero != 3 or lay.pp > 1:
            return "hpZ needs ZeRO 3 and no pipeline parallelism"
        if lay.hpz > zero_group or zero_group % lay.hpz or gpus_per_node % (t * lay.hpz):
            return "hpZ needs a group dividing DP x CP whose TP x h ranks stay inside a node"
    if global_batch != lay.micro_batch * lay.accum * lay.dp:
        return "global batch != micro x accumulation x DP"
    return ""


def enumerate_layouts(cfg: ModelConfig, *, gpus: int, gpus_per_node: int, seq_length: int,
                      global_batch: int, max_tp: Optional[int] = None,
                      micro_batches: Optional[list] = None, zero_stages=(0, 1, 2, 3),
                      implemented: frozenset = frozenset(IMPLEMENTED),
                      workload: Workload = Workload()) -> list:
    """Every layout the rules allow (Layout objects); none at all when the world is not divisible."""
    out = []
    features = implemented
    tps = [t for t in _divisors(min(gpus, gpus_per_node)) if t <= (max_tp or gpus)] if "tp" in features else [1]
    for t in tps:
        for p in (_divisors(gpus // t) if "pp" in features else [1]):
            rest = gpus // (t * p)
            for c in (_divisors(rest) if "cp" in features else [1]):
                d = rest // c
                for mb in micro_batches or [1, 2, 4, 8]:
                    if global_batch % (mb * d):
                        continue
                    accum = global_batch // (mb * d)
                    for z in (zero_stages if "zero" in features else (0,)):
                        hpzs = [1]
                        if z == 3 and p == 1 and "hpz" in features:  # the largest in-node group
                            inside = gpus_per_node // t if gpus_per_node % t == 0 else 1
                            if 1 < inside < d * c and (d * c) % inside == 0:
                                hpzs.append(inside)
                        for hz in hpzs:
                            for sp in ([False, True] if "sp" in features and t > 1 else [False]):
                                for rc in (["none", "full"] if "recompute" in features else ["none"]):
                                    lay = Layout(t, p, d, c, z, hz, sp, rc, mb, accum)
                                    if not rule_violation(cfg, lay, seq_length=seq_length,
                                                          global_batch=global_batch,
                                                          gpus_per_node=gpus_per_node,
                                                          workload=workload):
                                        out.append(lay)
    return out


@functools.lru_cache(maxsize=4096)
def _split(cfg_json: str, pp: int, seq_length: int, tp: int) -> tuple:
    cfg = ModelConfig.from_dict(json.loads(cfg_json))
    if pp == 1:
        return (cfg.num_layers,)
    return tuple(split_layers(cfg, pp, "balanced", seq_length=seq_length,
                              sparse_density=sparse_density(cfg, seq_length), tp_size=tp))


def evaluate(cfg: ModelConfig, lay: Layout, acc: Accelerator, *, seq_length: int, global_batch: int,
             gpus: int, gpus_per_node: int, precision: str = "bf16", zero_options: Optional[dict] = None,
             device: str = "cuda", reserve: float = CONTEXT_RESERVE) -> Result:
    """Memory and time of one layout; `fits` False with the reason when it exceeds the device."""
    zero_options = zero_options or {}
    counts = list(_split(cfg.to_json(), lay.pp, seq_length, lay.tp))
    e = BYTES[precision]
    embed, blocks, head = layer_costs(cfg, seq_length, sparse_density(cfg, seq_length), lay.tp)
    stage_costs, stage_params, worst = [], [], None
    start = 0
    for stage, n_layers in enumerate(counts):
        first, last = stage == 0, stage == lay.pp - 1
        params = rank_params(cfg, lay.tp, counts if lay.pp > 1 else None, stage)
        states = model_state_bytes(params, zero=lay.zero, dp=lay.dp * lay.cp, precision=precision,
                                   hpz=lay.hpz, pipeline=lay.pp > 1,
                                   persistence_threshold=zero_options.get(
                                       "stage3_param_persistence_threshold", PERSISTENCE_THRESHOLD))
        act = activation_bytes(cfg, micro_batch=lay.micro_batch, seq_length=seq_length, tp=lay.tp,
                               sp=lay.sp, cp=lay.cp, layers=range(start, start + n_layers),
                               first_stage=first, last_stage=last, recompute=lay.recompute,
                               dtype_bytes=e, device=device)
        inflight = min(lay.accum, lay.pp - stage)
        activations = inflight * act["total"] + act.get("recompute_working_set", 0)
        n = params.numel
        largest_layer = max(params.decay + params.no_decay) if params.tensors else 0
        if lay.zero == 3:
            comm = e * (2 * min(n, 12 * cfg.hidden_size ** 2 / lay.tp + largest_layer)
                        + min(n, zero_options.get("stage3_prefetch_bucket_size", PREFETCH_BUCKET)))
        else:
            comm = e * min(n, zero_options.get("reduce_bucket_size", REDUCE_BUCKET))
        mem = dict(weights=states["weights"], grads=states["grads"],
                   optimizer=states["master"] + states["optimizer"], activations=activations, comm=comm)
        mem["fragmentation"] = FRAGMENTATION * sum(mem.values())
        mem["total"] = sum(mem.values())
        if worst is None or mem["total"] > worst["total"]:
            worst = mem
        dens = sparse_density(cfg, seq_length)
        attn = sum(2.0 * seq_length * cfg.hidden_size * (dens if sp else 1.0)
                   for sp in cfg.sparse_layers()[start:start + n_layers])
        stage_costs.append({"layers": n_layers, "first": first, "last": last, "attn_flops": attn,
                            "flops": sum(blocks[start:start + n_layers]) + (embed if first else 0)
                            + (head if last else 0)})
        stage_params.append(n)
        start += n_layers
    res = Result(lay, memory={k: int(v) for k, v in worst.items()}, split=counts if lay.pp > 1 else None)
    budget = acc.mem_bytes - reserve
    if worst["total"] > budget:
        res.fits = False
        res.reason = f"needs {worst['total'] / 1e9:.1f} GB > {budget / 1e9:.1f} GB usable"
    st = step_time(cfg, lay, acc, seq_length=seq_length, global_batch=global_batch, gpus=gpus,
                   gpus_per_node=gpus_per_node, stage_costs=stage_costs, stage_params=stage_params,
                   precision=precision)
    res.time = st.as_dict()
    return res


def plan(cfg: ModelConfig, acc: Accelerator, *, gpus: int, gpus_per_node: int, seq_length: int,
         global_batch: int, precision: str = "bf16", max_tp: Optional[int] = None,
         micro_batches: Optional[list] = None, zero_stages=(0, 1, 2, 3),
         zero_options: Optional[dict] = None, implemented=frozenset(IMPLEMENTED), device: str = "cuda",
         reserve: float = CONTEXT_RESERVE, workload: Workload = Workload()) -> tuple[list, list]:
    """(fitting results sorted by predicted tokens/s/GPU, the rejected ones). `device` "cpu" and
    `reserve` 0 size a CPU run (tests)."""
    layouts = enumerate_layouts(cfg, gpus=gpus, gpus_per_node=gpus_per_node, seq_length=seq_length,
                                global_batch=global_batch, max_tp=max_tp, micro_batches=micro_batches,
                                zero_stages=zero_stages, implemented=frozenset(implemented),
                                workload=workload)
    results = [evaluate(cfg, lay, acc, seq_length=seq_length, global_batch=global_batch, gpus=gpus,
                        gpus_per_node=gpus_per_node, precision=precision, zero_options=zero_options,
                        device=device, reserve=reserve)
               for lay in layouts]
    fits = sorted((r for r in results if r.fits), key=lambda r: -r.time["tokens_per_s_per_gpu"])
    return fits, [r for r in results if not r.fits]
