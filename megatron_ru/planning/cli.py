"""tools/plan.py: which parallel layout of a model fits N GPUs of a kind and which is fastest, before launch.

Prints the fitting layouts sorted by predicted tokens/s/GPU with the per-rank memory split and
the step-time model's figures, the pretrain_gpt.py command line of the best one, and why the
others do not fit; --json writes the same as one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from ..config import PRESETS, ConfigError, ModelConfig
from ..errors import UsageError
from .accelerators import ACCELERATORS, get_accelerator
from .search import IMPLEMENTED, Workload, plan
from .timing import LINK_EFFICIENCY, MATMUL_EFFICIENCY

GB = 1e9


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/plan.py", description=__doc__.split("\n")[0])
    m = p.add_argument_group("model (a preset, a checkpoint, or flags)")
    m.add_argument("--preset", choices=sorted(PRESETS))
    m.add_argument("--load", metavar="CKPT", help="take the model from a checkpoint's config")
    m.add_argument("--trust-checkpoint", action="store_true")
    for flag in ("num-layers", "hidden-size", "num-attention-heads", "num-key-value-heads",
                 "ffn-hidden-size", "vocab-size", "max-position-embeddings"):
        m.add_argument(f"--{flag}", type=int)
    m.add_argument("--model-family", dest="family", choices=("gpt3", "llama"))
    m.add_argument("--sparse-mode", choices=("alternating", "all", "top_bottom", "dense"))
    c = p.add_argument_group("cluster")
    c.add_argument("--gpus", type=int, required=True, help="GPUs in the job (world size)")
    c.add_argument("--gpus-per-node", type=int, default=8)
    c.add_argument("--gpu", default="a100-80gb", help=f"one of {', '.join(ACCELERATORS)}")
    c.add_argument("--gpu-tflops", type=float, help="peak dense bf16/fp16 TFLOP/s per GPU")
    c.add_argument("--gpu-mem-gb", type=float, help="device memory per GPU, GB")
    c.add_argument("--intra-gbps", type=float, help="GPU-to-GPU bandwidth inside a node, GB/s per direction")
    c.add_argument("--inter-gbps", type=float, help="per-GPU bandwidth between nodes, GB/s per direction")
    t = p.add_argument_group("training")
    t.add_argument("--seq-length", type=int, help="default: the model's max_position_embeddings")
    t.add_argument("--global-batch-size", type=int, required=True)
    t.add_argument("--micro-batch-size", type=int, help="only this micro-batch (default: try 1, 2, 4, 8)")
    t.add_argument("--max-tp", type=int, help="largest tensor-parallel size to consider")
    t.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                   help="take ZeRO stage, precision and bucket sizes from this JSON")
    t.add_argument("--dataset-type", choices=("text", "sft"), default="text",
                   help="sft: no context parallelism (as pretrain_gpt.py)")
    t.add_argument("--sft-packing", choices=("pad", "packed"), default="pad",
                   help="packed: no pipeline parallelism")
    t.add_argument("--reset-attention-mask", action="store_true",
                   help="no context or pipeline parallelism")
    t.add_argument("--reset-position-ids", action="store_true", help="no pipeline parallelism")
    t.add_argument("--bf16", action="store_true")
    t.add_argument("--fp16", action="store_true")
    t.add_argument("--fp32", action="store_true")
    o = p.add_argument_group("output")
    o.add_argument("--top", type=int, default=12, help="rows of the table (default 12)")
    o.add_argument("--json", action="store_true", help="one JSON object on stdout instead of tables")
    return p


def _model(a) -> ModelConfig:
    overrides = {k: getattr(a, k) for k in ("num_layers", "hidden_size", "num_attention_heads",
                                            "num_key_value_heads", "ffn_hidden_size", "vocab_size",
                                            "max_position_embeddings", "family", "sparse_mode")
                 if getattr(a, k) is not None}
    if a.load:
        from ..checkpoint.load import read_config
        cfg, _ = read_config(Path(a.load), trust=a.trust_checkpoint)
        data = cfg.to_dict()
        data.update(overrides)
        return ModelConfig.from_dict(data)
    if a.preset:
        return ModelConfig.from_preset(a.preset, **overrides)
    if "num_layers" not in overrides or "hidden_size" not in overrides:
        raise UsageError("give a model: --preset NAME, --load CKPT, or --num-layers / --hidden-size / "
                         "--num-attention-heads")
    return ModelConfig(**overrides)


def _deepspeed(path: Optional[str]) -> tuple[dict, Optional[str], Optional[int]]:
    """(zero options, precision or None, zero stage or None) from a DeepSpeed JSON."""
    if not path:
        return {}, None, None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--deepspeed_config {path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"--deepspeed_config {path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    zero = data.get("zero_optimization", {}) or {}
    precision = "fp16" if data.get("fp16", {}).get("enabled") else \
        "bf16" if data.get("bf16", data.get("bfloat16", {})).get("enabled") else None
    return zero, precision, zero.get("stage") if "zero_optimization" in data else None


def _workload(a) -> Workload:
    return Workload(dataset_type=a.dataset_type, sft_packing=a.sft_packing,
                    reset_attention_mask=a.reset_attention_mask,
                    reset_position_ids=a.reset_position_ids)


def command_line(r, cfg_source: str, a, seq: int, precision: str) -> str:
    lay = r.layout
    parts = [f"mpirun -np {a.gpus} python pretrain_gpt.py {cfg_source}",
             f"--tensor-model-parallel-size {lay.tp}"]
    if lay.pp > 1:
        parts.append(f"--pipeline-model-parallel-size {lay.pp} --pipeline-split balanced")
    if lay.cp > 1:
        parts.append(f"--context-parallel-size {lay.cp}")
    if lay.sp:
        parts.append("--sequence-parallel")
    if lay.recompute == "full":
        parts.append("--checkpoint-activations")
    parts.append(f"--micro-batch-size {lay.micro_batch} --global-batch-size {a.global_batch_size} "
                 f"--seq-length {seq}")
    parts += _workload(a).flags()
    if precision != "fp32":
        parts.append(f"--{precision}")
    zero = {"stage": lay.zero}
    if lay.hpz > 1:
        zero["zero_hpz_partition_size"] = lay.hpz
    parts.append(f"--deepspeed_config ds.json  # ds.json: {{\"zero_optimization\": {json.dumps(zero)}}}")
    return " \\\n    ".join(parts)


def _row(r) -> str:
    m, t = r.memory, r.time
    return (f"{r.layout.short():34s} {m['weights'] / GB:6.1f} {m['grads'] / GB:6.1f} "
            f"{m['optimizer'] / GB:6.1f} {m['activations'] / GB:6.1f} {m['comm'] / GB:5.1f} "
            f"{m['fragmentation'] / GB:5.1f} {m['total'] / GB:6.1f} | {t['step_s']:7.2f} "
            f"{t['tokens_per_s_per_gpu']:8,.0f} {t['mfu']:5.2f}")


HEADER = (f"{'layout':34s} {'weight':>6s} {'grads':>6s} {'optim':>6s} {'activ':>6s} {'comm':>5s} "
          f"{'frag':>5s} {'total':>6s} | {'step s':>7s} {'tok/s/GPU':>8s} {'MFU':>5s}")


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    for name in ("gpus", "gpus_per_node", "global_batch_size", "micro_batch_size", "max_tp", "seq_length",
                 "top"):
        value = getattr(a, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name.replace('_', '-')}={value} must be positive")
    if a.gpus % a.gpus_per_node and a.gpus > a.gpus_per_node:
        raise UsageError(f"--gpus {a.gpus} is not a whole number of nodes of --gpus-per-node {a.gpus_per_node}")
    acc = get_accelerator(a.gpu, tflops=a.gpu_tflops, mem_gb=a.gpu_mem_gb, intra_gbps=a.intra_gbps,
                          inter_gbps=a.inter_gbps)
    try:
        cfg = _model(a)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    zero_opts, json_precision, json_stage = _deepspeed(a.deepspeed_config)
    flags = [x for x in ("bf16", "fp16", "fp32") if getattr(a, x)]
    if len(flags) > 1:
        raise UsageError("--bf16, --fp16 and --fp32 are mutually exclusive")
    if flags and json_precision and flags[0] != json_precision:
        raise UsageError(f"--{flags[0]} contradicts {a.deepspeed_config}, which enables {json_precision}")
    precision = flags[0] if flags else json_precision or "bf16"
    seq = a.seq_length or cfg.max_position_embeddings
    if seq > cfg.max_position_embeddings:
        raise UsageError(f"--seq-length {seq} is longer than the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    stages = (json_stage,) if json_stage is not None else (0, 1, 2, 3)
    fits, rejected = plan(cfg, acc, gpus=a.gpus, gpus_per_node=min(a.gpus_per_node, a.gpus),
                          seq_length=seq, global_batch=a.global_batch_size, precision=precision,
                          max_tp=a.max_tp, micro_batches=[a.micro_batch_size] if a.micro_batch_size else None,
                          zero_stages=stages, zero_options=zero_opts, workload=_workload(a))
    if not fits and not rejected:
        raise UsageError(f"no layout divides {a.gpus} GPUs for this model and global batch "
                         f"{a.global_batch_size} (TP must divide the heads / FFN and a node; global "
                         "batch = micro x accumulation x DP)")
    if not fits:
        best = min(rejected, key=lambda r: r.memory["total"])
        raise UsageError(f"no layout of {a.gpus} x {acc.name} fits the model: the smallest, "
                         f"{best.layout.short()}, {best.reason}")
    source = f"--preset {a.preset}" if a.preset and not a.load else (f"--load {a.load}" if a.load else "<model flags>")
    best = fits[0]
    if a.json:
        print(json.dumps({"accelerator": vars(acc), "model": cfg.to_dict(), "seq_length": seq,
                          "precision": precision, "implemented": sorted(IMPLEMENTED),
                          "fits": [r.as_dict() for r in fits], "rejected": [r.as_dict() for r in rejected],
                          "command": command_line(best, source, a, seq, precision)}, default=str))
        return 0
    n = cfg.num_parameters()
    print(f"{source}: {n / 1e9:.2f}B parameters, seq {seq}, global batch {a.global_batch_size}, "
          f"{precision}; {a.gpus} x {acc.name} ({acc.mem_gb:g} GB, {acc.tflops:g} TFLOP/s, "
          f"{a.gpus_per_node} per node, {acc.intra_gbps:g}/{acc.inter_gbps:g} GB/s intra/inter)")
    print(f"{len(fits)} layouts fit, {len(rejected)} do not. Memory per rank in GB (worst pipeline "
          f"stage); time: matmuls at {MATMUL_EFFICIENCY:.0%} of peak, links at {LINK_EFFICIENCY:.0%}; "
          "MFU = (6N + 12Lhs) x tokens/s / peak")
    print(HEADER)
    for r in fits[:a.top]:
        print(_row(r))
    t = best.time
    print(f"\nbest: {best.layout.short()}"
          + (f", pipeline split {best.split}" if best.split else "")
          + f"; step {t['step_s']:.2f} s = compute {t['compute_s']:.2f} + TP/CP {t['tp_cp_s']:.2f} + "
          f"PP bubble {t['pp_bubble_s']:.2f} + p2p {t['pp_p2p_s']:.2f} + exposed DP {t['dp_exposed_s']:.2f} "
          f"(of {t['dp_total_s']:.2f}, the rest overlapped) + optimizer {t['optimizer_s']:.2f}")
    print(command_line(best, source, a, seq, precision))
    if rejected:
        print(f"\n{len(rejected)} layouts do not fit, e.g.:")
        for r in sorted(rejected, key=lambda r: -r.time["tokens_per_s_per_gpu"])[:5]:
            print(f"  {r.layout.short():34s} {r.reason}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
