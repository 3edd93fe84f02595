"""Benchmark: activation memory per layer, measured (saved-for-backward bytes) vs our formula vs Korthikanti's.

    python bench/memory.py [--hidden 512] [--heads 8] [--seq 512] [--batch 1]

Part 1 builds a 2-layer model of each family (layer 0 block-sparse, layer 1 dense; bf16 on the
CPU, dropout 0) and counts the bytes one micro-batch's forward keeps for backward
(megatron_ru/planning/measure.py, torch.autograd.graph.saved_tensors_hooks) at TP 1 and TP 2
(two gloo processes; rank 0's figures), with and without full recompute. Beside each: our formula
(megatron_ru/planning/activations.py) for the CPU kernels that ran, the same formula for CUDA
kernels, and Korthikanti et al. 2022 (Table 2; the score term scaled by the layout's density for
sparse layers). Layouts the code cannot run yet (sequence and context parallelism) are printed from
the formulas only, marked "formula". Part 2 prints the per-GPU activation memory the formula
implies for ruGPT-3 13B and T-lite 8B (bf16, micro-batch 1, no pipeline: all layers on the GPU).
"""
import argparse
import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_ru.config import ModelConfig  # noqa: E402
from megatron_ru.planning.activations import (activation_bytes, korthikanti_bytes_per_layer,  # noqa: E402
                                              sparse_density)

SPARSE = {"mode": "fixed", "block": 16, "different_layout_per_head": True, "num_local_blocks": 4,
          "num_global_blocks": 1, "attention": "unidirectional", "num_different_global_patterns": 4}
GIB = 2 ** 30


def tiny(family, a, recompute=False):
    return ModelConfig(family=family, num_layers=2, hidden_size=a.hidden,
                       num_attention_heads=a.heads,
                       num_key_value_heads=a.heads // 2 if family == "llama" else None,
                       vocab_size=1000, max_position_embeddings=a.seq, sparse_attention=SPARSE,
                       sparse_mode="alternating", checkpoint_activations=recompute)


def measure(family, a, tp, recompute, ps=None):
    from megatron_ru.model.gpt import GPTModel
    from megatron_ru.planning.measure import measure_activation_bytes
    model = GPTModel(tiny(family, a, recompute), ps, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    tokens, labels = (torch.randint(0, 1000, (a.batch, a.seq), generator=gen) for _ in range(2))
    return measure_activation_bytes(model, tokens, labels=labels)["layers"]


def _tp_worker(rank, world, port, a, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from megatron_ru.parallel.state import ParallelState
    ps = ParallelState.from_environment(tensor_model_parallel_size=world)
    out = {(f, r): measure(f, a, world, r, ps) for f in ("gpt3", "llama") for r in (False, True)}
    if rank == 0:
        queue.put(out)
    torch.distributed.destroy_process_group()


def measured_tp2(a):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_tp_worker, args=(r, 2, port, a, queue)) for r in range(2)]
    for p in procs:
        p.start()
    out = queue.get(timeout=600)
    for p in procs:
        p.join()
    return out


def korthikanti(s, b, h, heads, tp, sp, cp, rc, density):
    """Table 2 with the sequence split by CP, except the score term: Ulysses attention runs
    a/(tC) heads over the full sequence, 5 a s^2 b / (tC) bytes."""
    out = korthikanti_bytes_per_layer(s=s // cp, b=b, h=h, a=heads, t=tp, sp=sp, recompute=rc,
                                      density=density)
    if cp > 1 and rc == "none":
        out += 5 * heads * b * density / tp * (s * s / cp - (s // cp) ** 2)
    return out


LAYOUTS = [  # name, tp, sp, cp, recompute, measurable now
    ("TP1", 1, False, 1, "none", True),
    ("TP1 + recompute", 1, False, 1, "full", True),
    ("TP2", 2, False, 1, "none", True),
    ("TP2 + recompute", 2, False, 1, "full", True),
    ("TP2 + SP", 2, True, 1, "none", False),
    ("TP2 + SP + recompute", 2, True, 1, "full", False),
    ("CP2", 1, False, 2, "none", False),
    ("TP2 + SP + CP2", 2, True, 2, "none", False),
]


def mib(x):
    return f"{x / 2 ** 20:.2f}"


def part1(a):
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    measured = {(f, 1, r): measure(f, a, 1, r) for f in ("gpt3", "llama") for r in (False, True)}
    for (f, r), layers in measured_tp2(a).items():
        measured[(f, 2, r)] = layers
    print(f"\n### Per layer, measured vs formulas (h={a.hidden}, a={a.heads}, s={a.seq}, "
          f"b={a.batch}, bf16, MiB per rank)\n")
    print("| family | layer | layout | measured | ours (CPU kernels) | ours / measured "
          "| ours (CUDA kernels) | Korthikanti | Korthikanti / ours (CUDA) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for family in ("gpt3", "llama"):
        cfg = tiny(family, a)
        for layer, kind in ((0, "sparse"), (1, "dense")):
            for name, tp, sp, cp, rc, runnable in LAYOUTS:
                kw = dict(micro_batch=a.batch, seq_length=a.seq, tp=tp, sp=sp, cp=cp, recompute=rc,
                          dtype_bytes=2)
                cpu = activation_bytes(cfg, device="cpu", **kw)["layers"][layer]
                cuda = activation_bytes(cfg, device="cuda", **kw)["layers"][layer]
                density = sparse_density(cfg, a.seq, tp=tp, cp=cp) if kind == "sparse" else 1.0
                kor = korthikanti(a.seq, a.batch, a.hidden, a.heads, tp, sp, cp, rc, density)
                if runnable:
                    m = measured[(family, tp, rc == "full")][layer]
                    meas, ratio = mib(m), f"{cpu / m:.3f}"
                else:
                    meas, ratio = "formula", "—"
                print(f"| {family} | {layer} {kind} | {name} | {meas} | {mib(cpu)} | {ratio} "
                      f"| {mib(cuda)} | {mib(kor)} | {kor / cuda:.2f} |")


def part2():
    print("\n### Per GPU, from the formula (CUDA kernels, bf16, micro-batch 1, all layers, GiB)\n")
    print("| model | seq | layout | per layer (dense / sparse) | all layers + embedding + loss "
          "| Korthikanti, all layers |")
    print("|---|---:|---|---:|---:|---:|")
    cases = [("rugpt3-13b", 2048, [("TP8", 8, False, 1, "none"), ("TP8 + SP", 8, True, 1, "none"),
                                   ("TP8 + SP + recompute", 8, True, 1, "full")]),
             ("tlite-8b", 8192, [("TP8", 8, False, 1, "none"), ("TP8 + SP", 8, True, 1, "none"),
                                 ("TP8 + SP + recompute", 8, True, 1, "full"),
                                 ("TP4 + CP2", 4, False, 2, "none"),
                                 ("TP4 + SP + CP2", 4, True, 2, "none"),
                                 ("TP4 + SP + CP2 + recompute", 4, True, 2, "full")])]
    for preset, seq, layouts in cases:
        cfg = ModelConfig.from_preset(preset)
        kinds = cfg.sparse_layers()
        for name, tp, sp, cp, rc in layouts:
            r = activation_bytes(cfg, micro_batch=1, seq_length=seq, tp=tp, sp=sp, cp=cp,
                                 recompute=rc, dtype_bytes=2, device="cuda")
            dense = next((b for b, k in zip(r["layers"], kinds) if not k), None)
            sparse = next((b for b, k in zip(r["layers"], kinds) if k), None)
            per = " / ".join(f"{x / GIB:.3f}" if x is not None else "—" for x in (dense, sparse))
            density = sparse_density(cfg, seq, tp=tp, cp=cp)
            kor = sum(korthikanti(seq, 1, cfg.hidden_size, cfg.num_attention_heads, tp, sp, cp, rc,
                                  density if k else 1.0) for k in kinds)
            extra = f" (+{r['recompute_working_set'] / GIB:.2f} rebuilt)" if rc == "full" else ""
            print(f"| {preset} | {seq} | {name} | {per} | {r['total'] / GIB:.2f}{extra} "
                  f"| {kor / GIB:.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    a = p.parse_args()
    part1(a)
    part2()


if __name__ == "__main__":
    main()
