"""Benchmark: activation memory per layer, measured (saved-for-backward bytes) vs our formula vs Korthikanti's.

    python bench/memory.py [--hidden 512] [--heads 8] [--seq 512] [--batch 1]

Part 1 builds a 2-layer model of each family (layer 0 block-sparse, layer 1 dense; bf16 on the
CPU, dropout 0) and counts the bytes one micro-batch's forward keeps for backward
(megatron_ru/planning/measure.py, torch.autograd.graph.saved_tensors_hooks) at TP 1 in this process
and, on one spawn of four gloo processes (rank 0's figures; layouts of 2 ranks run beside a DP 2),
at TP 2, TP 2 + sequence parallelism, CP 2 (Ulysses), TP 2 x CP 2 and TP 2 x CP 2 + SP, with and
without full recompute where it matters. Beside each: our formula
(megatron_ru/planning/activations.py) for the CPU kernels that ran, the same formula for CUDA
kernels, and Korthikanti et al. 2022 (Table 2; the score term scaled by the layout's density for
sparse layers). Part 2 prints the per-GPU activation memory the formula implies for ruGPT-3 13B
and T-lite 8B (bf16, micro-batch 1, no pipeline: all layers on the GPU).
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


def tiny(family, a, recompute=False, sp=False):
    return ModelConfig(family=family, num_layers=2, hidden_size=a.hidden,
                       num_attention_heads=a.heads,
                       num_key_value_heads=a.heads // 2 if family == "llama" else None,
                       vocab_size=1000, max_position_embeddings=a.seq, sparse_attention=SPARSE,
                       sparse_mode="alternating", checkpoint_activations=recompute,
                       sequence_parallel=sp)


def measure(family, a, tp, sp, cp, recompute, ps=None):
    from megatron_ru.model.gpt import GPTModel
    from megatron_ru.parallel.context import local_slice
    from megatron_ru.planning.measure import measure_activation_bytes
    model = GPTModel(tiny(family, a, recompute, sp), ps, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    tokens, labels = (torch.randint(0, 1000, (a.batch, a.seq), generator=gen) for _ in range(2))
    if ps is not None:  # the trainer's context_parallel_slice: this rank's slice, a copy
        tokens, labels = (local_slice(t, ps).contiguous() for t in (tokens, labels))
    return measure_activation_bytes(model, tokens, labels=labels)["layers"]


def _parallel_worker(rank, world, port, a, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from megatron_ru.parallel.state import ParallelState
    states, out = {}, {}
    for name, tp, sp, cp, rc in LAYOUTS:
        if tp * cp == 1:
            continue
        if (tp, cp) not in states:  # every rank builds every group, in the same order
            states[tp, cp] = ParallelState.from_environment(tp, context_parallel_size=cp)
        for f in ("gpt3", "llama"):
            out[f, name] = measure(f, a, tp, sp, cp, rc == "full", states[tp, cp])
    if rank == 0:
        queue.put(out)
    torch.distributed.destroy_process_group()


def measured_parallel(a):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_parallel_worker, args=(r, 4, port, a, queue)) for r in range(4)]
    for p in procs:
        p.start()
    out = queue.get(timeout=900)
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


LAYOUTS = [  # name, tp, sp, cp, recompute
    ("TP1", 1, False, 1, "none"),
    ("TP1 + recompute", 1, False, 1, "full"),
    ("TP2", 2, False, 1, "none"),
    ("TP2 + recompute", 2, False, 1, "full"),
    ("TP2 + SP", 2, True, 1, "none"),
    ("TP2 + SP + recompute", 2, True, 1, "full"),
    ("CP2", 1, False, 2, "none"),
    ("TP2 x CP2", 2, False, 2, "none"),
    ("TP2 x CP2 + SP", 2, True, 2, "none"),
]


def mib(x):
    return f"{x / 2 ** 20:.2f}"


def part1(a):
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    measured = {(f, name): measure(f, a, 1, False, 1, rc == "full")
                for f in ("gpt3", "llama") for name, tp, _, cp, rc in LAYOUTS if tp * cp == 1}
    measured.update(measured_parallel(a))
    print(f"\n### Per layer, measured vs formulas (h={a.hidden}, a={a.heads}, s={a.seq}, "
          f"b={a.batch}, bf16, MiB per rank)\n")
    print("| family | layer | layout | measured | ours (CPU kernels) | ours / measured "
          "| ours (CUDA kernels) | Korthikanti | Korthikanti / ours (CUDA) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for family in ("gpt3", "llama"):
        cfg = tiny(family, a)
        for layer, kind in ((0, "sparse"), (1, "dense")):
            for name, tp, sp, cp, rc in LAYOUTS:
                kw = dict(micro_batch=a.batch, seq_length=a.seq, tp=tp, sp=sp, cp=cp, recompute=rc,
                          dtype_bytes=2)
                cpu = activation_bytes(cfg, device="cpu", **kw)["layers"][layer]
                cuda = activation_bytes(cfg, device="cuda", **kw)["layers"][layer]
                density = sparse_density(cfg, a.seq, tp=tp, cp=cp) if kind == "sparse" else 1.0
                kor = korthikanti(a.seq, a.batch, a.hidden, a.heads, tp, sp, cp, rc, density)
                m = measured[(family, name)][layer]
                print(f"| {family} | {layer} {kind} | {name} | {mib(m)} | {mib(cpu)} | {cpu / m:.3f} "
                      f"| {mib(cuda)} | {mib(kor)} | {kor / cuda:.2f} |")


def part2():
    print("\n### Per GPU, from the formula (CUDA kernels, bf16, micro-batch 1, all layers, GiB)\n")
    print("| model | seq | layout | per layer (dense / sparse) | all layers + embedding + loss "
          "| SP keeping the gathered inputs instead | Korthikanti, all layers |")
    print("|---|---:|---|---:|---:|---:|---:|")
    cases = [("rugpt3-13b", 2048, [("TP8", 8, False, 1, "none"), ("TP8 + SP", 8, True, 1, "none"),
                                   ("TP8 + SP + recompute", 8, True, 1, "full")]),
             ("tlite-8b", 8192, [("TP8", 8, False, 1, "none"), ("TP8 + SP", 8, True, 1, "none"),
                                 ("TP8 + SP + recompute", 8, True, 1, "full"),
                                 ("TP4 x CP2", 4, False, 2, "none"),
                                 ("TP4 x CP2 + SP", 4, True, 2, "none"),
                                 ("TP4 x CP2 + SP + recompute", 4, True, 2, "full")])]
    for preset, seq, layouts in cases:
        cfg = ModelConfig.from_preset(preset)
        kinds = cfg.sparse_layers()
        for name, tp, sp, cp, rc in layouts:
            kw = dict(micro_batch=1, seq_length=seq, tp=tp, sp=sp, cp=cp, recompute=rc,
                      dtype_bytes=2, device="cuda")
            r = activation_bytes(cfg, **kw)
            dense = next((b for b, k in zip(r["layers"], kinds) if not k), None)
            sparse = next((b for b, k in zip(r["layers"], kinds) if k), None)
            per = " / ".join(f"{x / GIB:.3f}" if x is not None else "—" for x in (dense, sparse))
            density = sparse_density(cfg, seq, tp=tp, cp=cp)
            kor = sum(korthikanti(seq, 1, cfg.hidden_size, cfg.num_attention_heads, tp, sp, cp, rc,
                                  density if k else 1.0) for k in kinds)
            extra = f" (+{r['recompute_working_set'] / GIB:.2f} rebuilt)" if rc == "full" else ""
            kept = "—"  # our SP keeps the shard; this is what keeping the gathered input would cost
            if sp and rc == "none":
                kept = f"{activation_bytes(cfg, sp_keeps_gathered=True, **kw)['total'] / GIB:.2f}"
            print(f"| {preset} | {seq} | {name} | {per} | {r['total'] / GIB:.2f}{extra} "
                  f"| {kept} | {kor / GIB:.2f} |")


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
