"""Roofline step time of one layout: matmul FLOPs at a sustained fraction of peak, memory-bound parts at HBM speed, each collective over its link.

Per micro-batch and pipeline stage (the slowest stage sets the pace):
  compute   forward matmul FLOPs of the stage (parallel/pipeline.layer_costs: 2 x weights per token,
            causal attention 2sh per token scaled by the sparse layout's density) / (TP x CP),
            x3 for forward + backward, x4 with full recompute; weight matmuls at MATMUL_EFFICIENCY
            x peak, attention at ATTENTION_EFFICIENCY x peak
  memory    elementwise work as bytes moved at HBM bandwidth, counted pass by pass from our eager
            PyTorch ops (`elementwise_bytes`: norms -- RMSNorm's fp32 round trip --, residual
            adds, dropout, RoPE, GELU / SwiGLU; backward 2x the forward's traffic) and the
            softmax of the loss
  TP        4 all-reduces of b s h per layer (2 forward, 2 backward; SP's all-gather +
            reduce-scatter move the same bytes), +2 with recompute; SP adds 2 all-gathers per
            layer in backward (the QKV and MLP inputs, gathered again for the weight gradients,
            parallel/mappings.py gather_sequence_linear); not overlapped
  CP        Ulysses: 4 all-to-alls per layer forward (q, k, v, output) and 4 backward; not overlapped
  PP        1F1B: step = (m + p - 1) x (slowest stage's micro-batch time), bubble (p-1)/(m+p-1);
            p2p of b s h each way per micro-batch on the link between stages
Per step: data-parallel traffic (ZeRO 0/1: gradient all-reduce once per step; ZeRO 2: gradient
reduce-scatter per micro-batch; ZeRO 3: weight all-gather twice (three times with recompute) and
gradient reduce-scatter per micro-batch, hpZ gathering inside the node from its secondary copy)
-- overlapped with backward compute (ZeRO 1/2, overlap_comm) or with forward and backward (ZeRO 3,
prefetch), except what cannot overlap: the last gradient bucket after the last backward (ZeRO
1/2: DeepSpeed's reduce_bucket_size), the first layer's weight gather and the last layer's
gradient reduce-scatter of every micro-batch (ZeRO 3); ZeRO 0 is all exposed. ZeRO 1/2 then
all-gather the updated 16-bit weights after the optimizer step (DeepSpeed's stage_1_and_2.py
step(): all_gather_dp_groups), before the next forward: exposed. The optimizer step reads and
writes the model states at HBM speed.

Constants and what they rest on (A100 figures; no constant is fitted to one run):
  MATMUL_EFFICIENCY 0.7: MosaicML's llm-foundry benchmarks (scripts/train/benchmarking/README.md,
    A100-80GB, FSDP) reach 69-79 % hardware FLOPs utilisation for 7B and 13B models at 1k-16k
    tokens with activation checkpointing -- a lower bound on the GEMMs' sustained rate, since that time also holds the
    elementwise work and communication; Megatron-LM reports 44-52 % of peak end to end with full
    recompute and all communication (Narayanan et al. 2021, Table 1) and 54.2 % MFU for 530B
    on 2240 A100s with sequence parallelism and selective recompute (Korthikanti et al. 2022).
  ATTENTION_EFFICIENCY 0.45: FlashAttention-2 (Dao 2023) reaches 50-73 % of the A100 peak;
    0.45 leaves room for the backward pass, causal masking, GQA and smaller heads.
  LINK_EFFICIENCY 0.8: NCCL's bus bandwidth on NVLink / InfiniBand rings (nccl-tests).
Ring collectives: all-reduce moves 2(n-1)/n of the bytes, all-gather / reduce-scatter (n-1)/n, at
LINK_EFFICIENCY x link bandwidth. A group stays inside a node when its ranks do (TP innermost,
then CP, then DP, then PP).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from ..config import ModelConfig
from .accelerators import Accelerator

MATMUL_EFFICIENCY = 0.7  # sustained share of the dense peak in large bf16 GEMMs (A100 / H100)
ATTENTION_EFFICIENCY = 0.45  # flash / block-sparse attention kernels, forward + backward
LINK_EFFICIENCY = 0.8  # NCCL bus bandwidth / link bandwidth on NVLink and InfiniBand rings
REDUCE_BUCKET = 5e8  # DeepSpeed's reduce_bucket_size default (elements): the exposed last bucket


@functools.lru_cache(maxsize=256)
def _attention_fraction(sparse_json: str, layers_json: str, heads: int, seq_length: int) -> float:
    from ..model.sparsity import causal_density, make_layout
    sparse = json.loads(sparse_json)
    layers = json.loads(layers_json)
    block = int(sparse.get("block", 16))
    padded = -(-seq_length // block) * block
    density = causal_density(make_layout(sparse, heads, padded))
    return sum(density if s else 1.0 for s in layers) / len(layers)


def attention_fraction(config: ModelConfig, seq_length: int) -> float:
    """Mean over layers of the attention work kept (1 for dense layers)."""
    sparse = config.sparse_layers()
    if not any(sparse):
        return 1.0
    return _attention_fraction(json.dumps(config.sparse_attention, sort_keys=True), json.dumps(sparse),
                               config.num_attention_heads, seq_length)


def flops_per_token(config: ModelConfig, seq_length: int) -> float:
    """Model FLOPs per trained token = 6 N + 12 L h s (attention of sparse layers scaled by the
    fraction of causal blocks kept): the MFU numerator of training/metrics.py."""
    n = config.num_parameters()
    attn = 12 * config.num_layers * config.hidden_size * seq_length
    return 6.0 * n + attn * attention_fraction(config, seq_length)


def elementwise_bytes(cfg: ModelConfig, *, tp: int, sp: bool, dtype_bytes: int) -> float:
    """HBM bytes one layer's forward moves per token outside the matmuls and the attention
    kernel, pass by pass (read + write of each op of model/*.py, eager PyTorch). The regions
    outside attention and MLP hold 1/TP of the tokens with SP; the backward moves about twice
    this (its input, the saved tensor and the gradient)."""
    h, P, f = cfg.hidden_size, dtype_bytes, cfg.ffn_hidden_size / tp
    if cfg.is_llama:  # RMSNorm: to fp32, rms_norm (fp32 in and out), back to P, times the weight
        norm = 2 * h * P + 2 * 4 * h + 2 * 4 * h + (h * P + h * P) + 2 * h * P
    else:  # F.layer_norm: read and write
        norm = 2 * h * P
    replicated = 2 * norm + 2 * 3 * h * P  # two norms, two residual adds
    if cfg.hidden_dropout > 0.0:
        replicated += 2 * (3 * h * P + h)  # mask draw, apply (input, mask, output)
    per_rank = 0.0
    if cfg.is_llama:  # RoPE on q and k: x*cos, rotate_half (neg, cat), *sin, add: 10 passes
        per_rank += 10 * (cfg.num_attention_heads + cfg.num_key_value_heads) * cfg.head_dim / tp * P
        per_rank += 5 * f * P  # SwiGLU: silu (f in, f out), times up (2f in, f out)
    else:
        per_rank += 2 * f * P  # tanh GELU
    return replicated / (tp if sp else 1) + per_rank


def allreduce_s(nbytes: float, n: int, gbps: float) -> float:
    return 0.0 if n <= 1 else 2 * (n - 1) / n * nbytes / (gbps * 1e9 * LINK_EFFICIENCY)


def gather_s(nbytes: float, n: int, gbps: float) -> float:
    """All-gather or reduce-scatter of a tensor of `nbytes` (full size) over n ranks."""
    return 0.0 if n <= 1 else (n - 1) / n * nbytes / (gbps * 1e9 * LINK_EFFICIENCY)


@dataclass
class StepTime:
    step_s: float
    compute_s: float  # matmuls + memory-bound parts, all micro-batches, slowest stage
    tp_cp_s: float  # TP / SP / CP collectives on the critical path
    pp_bubble_s: float
    pp_p2p_s: float
    dp_exposed_s: float  # data-parallel / ZeRO traffic not hidden behind compute
    dp_total_s: float
    optimizer_s: float
    tokens_per_s_per_gpu: float
    mfu: float

    def as_dict(self) -> dict:
        return dict(vars(self))


def link(acc: Accelerator, group_span: int, gpus_per_node: int) -> float:
    """Bandwidth of a group whose ranks span `group_span` consecutive ranks."""
    return acc.intra_gbps if group_span <= gpus_per_node else acc.inter_gbps


def step_time(cfg: ModelConfig, layout, acc: Accelerator, *, seq_length: int, global_batch: int,
              gpus: int, gpus_per_node: int, stage_costs: list, stage_params: list,
              precision: str = "bf16") -> StepTime:
    """`layout`: a search.Layout; `stage_costs`: forward FLOPs per token of each pipeline stage
    (full model, before TP/CP); `stage_params`: parameters on one rank of each stage."""
    t, p, d, c = layout.tp, layout.pp, layout.dp, layout.cp
    b, s, m = layout.micro_batch, seq_length, layout.accum
    P = 2 if precision != "fp32" else 4
    peak = acc.tflops * 1e12 * MATMUL_EFFICIENCY
    if precision == "fp32":
        peak /= 16  # no tensor-core fp32 matmuls of the bf16 rate (TF32 not assumed)
    h = cfg.hidden_size
    tokens = b * s  # per micro-batch (the CP ranks share them)
    tp_link = link(acc, t, gpus_per_node)
    cp_link = link(acc, t * c, gpus_per_node)
    dp_link = link(acc, t * c * d, gpus_per_node)
    pp_link = link(acc, t * c * d + 1, gpus_per_node) if p > 1 else acc.intra_gbps
    passes = 4 if layout.recompute == "full" else 3
    per_micro = []
    for cost, nparams in zip(stage_costs, stage_params):
        layers = cost["layers"]
        attn = passes * tokens * cost["attn_flops"] / (t * c)
        flops = passes * tokens * cost["flops"] / (t * c) - attn
        mem_bytes = passes * tokens / c * layers * elementwise_bytes(cfg, tp=t, sp=layout.sp,
                                                                     dtype_bytes=P)
        if cost["last"]:  # loss: softmax over the vocabulary slice, fp32, a few passes
            mem_bytes += 4 * 4 * tokens / c * cfg.padded_vocab_size(t) / t
        comp = flops / peak + attn / (peak * ATTENTION_EFFICIENCY / MATMUL_EFFICIENCY) + mem_bytes / (acc.hbm_gbps * 1e9)
        coll = 0.0
        if t > 1:
            per_layer = (6 if layout.recompute == "full" else 4)
            coll += per_layer * layers * allreduce_s(tokens / c * h * P, t, tp_link)
            if layout.sp:  # backward re-gathers the column-parallel layers' input shards
                coll += 2 * layers * gather_s(tokens / c * h * P, t, tp_link)
        if c > 1:
            qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim / t
            vol = (qkv + h / t) * tokens / c * P * (c - 1) / c  # bytes each rank sends
            coll += 2 * layers * vol / (cp_link * 1e9 * LINK_EFFICIENCY)
        per_micro.append((comp, coll))
    slowest = max(range(p), key=lambda i: sum(per_micro[i]))
    comp, coll = per_micro[slowest]
    p2p = 0.0
    if p > 1:
        p2p = 2 * tokens / c * h * P / (pp_link * 1e9 * LINK_EFFICIENCY)
    micro_s = comp + coll + p2p
    pipeline_s = (m + p - 1) * micro_s
    bubble = (p - 1) * micro_s
    # data-parallel traffic of the slowest stage's rank
    n = stage_params[slowest]
    grad_bytes = n * (4 if precision == "fp32" else P)
    z = layout.zero
    per_grad = grad_bytes / max(n, 1)
    tail = 0.0  # traffic that cannot overlap compute whatever the window
    if d * c == 1:
        dp_total = 0.0
        window = 0.0
    elif z == 0:
        dp_total, window = allreduce_s(grad_bytes, d * c, dp_link), 0.0
    elif z in (1, 2):
        reduce = 2 * gather_s(grad_bytes, d * c, dp_link) if z == 1 else \
            m * gather_s(grad_bytes, d * c, dp_link)
        last_bucket = gather_s(min(n, REDUCE_BUCKET) * per_grad, d * c, dp_link) * (2 if z == 1 else 1)
        weights = gather_s(n * P, d * c, dp_link)  # after the optimizer step, before the forward
        dp_total = reduce + weights
        tail = last_bucket + weights
        window = (1 if z == 1 else m) * comp * 2 / passes  # backward compute
    else:
        gathers = 3 if layout.recompute == "full" else 2
        inner = layout.hpz if layout.hpz > 1 else d * c
        inner_link = link(acc, t * layout.hpz, gpus_per_node) if layout.hpz > 1 else dp_link
        dp_total = m * (gathers * gather_s(n * P, inner, inner_link) + gather_s(grad_bytes, d * c, dp_link))
        if layout.hpz > 1:
            dp_total += gather_s(n * P, d * c, dp_link)  # refresh of the secondary copy per step
        layer = n / max(1, stage_costs[slowest]["layers"])  # one layer's parameters on this rank
        tail = m * (gather_s(layer * P, inner, inner_link) + gather_s(layer * per_grad, d * c, dp_link))
        window = m * comp  # forward and backward compute
    dp_exposed = tail + max(0.0, dp_total - tail - window)
    states = stage_params[slowest] / (d * c if z >= 1 else 1)
    optimizer_s = states * (4 + 4 + 4 + 4) * 2 / (acc.hbm_gbps * 1e9)  # master, m, v, grad: read + write
    step = pipeline_s + dp_exposed + optimizer_s
    tok_gpu = global_batch * s / step / gpus
    mfu = flops_per_token(cfg, s) * tok_gpu / (acc.tflops * 1e12)
    return StepTime(step_s=step, compute_s=m * comp, tp_cp_s=m * coll, pp_bubble_s=bubble,
                    pp_p2p_s=(m + p - 1) * p2p, dp_exposed_s=dp_exposed, dp_total_s=dp_total,
                    optimizer_s=optimizer_s, tokens_per_s_per_gpu=tok_gpu, mfu=mfu)
