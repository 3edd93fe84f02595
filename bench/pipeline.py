"""Benchmark: pipeline-parallel step time against the 1F1B bubble theory, and per-stage memory.

    python bench/pipeline.py [--hidden 256] [--layers 8] [--seq 128] [--micro 2] [--steps 3]

Four CPU processes (gloo, one thread each). For PP = 2 (x DP 2) and PP = 4 and m = 4, 8, 16
micro-batches per step it measures the step time of DeepSpeed's PipelineEngine on a GPT model
built by our pipeline code (layers wide enough that compute dominates), and compares it with
the 1F1B model: step = (m + p - 1) x t_stage, t_stage = t_mb / p, where t_mb is one micro-batch's
forward + backward through the whole model on one process (measured first, same threads).
Efficiency = ideal (m x t_stage) / measured; the theory's is 1 - bubble, bubble = (p-1)/(m+p-1).
Memory: peak RSS of each stage's process and the parameter + AdamW-state bytes it holds.
"""
import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def config(a):
    from megatron_ru import ModelConfig
    return ModelConfig(family="gpt3", num_layers=a.layers, hidden_size=a.hidden,
                       num_attention_heads=a.hidden // 64, ffn_hidden_size=4 * a.hidden,
                       vocab_size=1000, max_position_embeddings=a.seq, hidden_dropout=0.0,
                       attention_dropout=0.0)


def batches(a, n):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        text = torch.randint(0, 1000, (a.micro, a.seq + 1), generator=g)
        yield text[:, :-1], (text[:, 1:], torch.ones(a.micro, a.seq))


def single_microbatch_time(a) -> float:
    from megatron_ru import GPTModel
    torch.set_num_threads(1)
    model = GPTModel(config(a), seed=1)
    times = []
    for tokens, (labels, mask) in batches(a, a.steps + 1):
        t0 = time.perf_counter()
        model(tokens, labels=labels, loss_mask=mask).backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def worker(rank, world, port, a, pp, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import deepspeed
    from megatron_ru import ParallelState
    from megatron_ru.training import pipeline_run

    ps = ParallelState.from_environment(pipeline_model_parallel_size=pp)
    cfg = config(a)
    counts = pipeline_run.pipeline.split_layers(cfg, pp, "uniform")
    results = {}
    for m in a.micro_batches:
        model = pipeline_run.build_model(cfg, ps, counts, seed=1)
        module = pipeline_run.build_module(model, ps, counts)
        ds = {"train_micro_batch_size_per_gpu": a.micro, "gradient_accumulation_steps": m,
              "train_batch_size": a.micro * m * ps.dp_size, "steps_per_print": 10**9,
              "gradient_clipping": 1.0}
        opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
        engine, *_ = deepspeed.initialize(model=module, optimizer=opt, config=ds)
        pipeline_run.install_clipping(engine, ps)
        times = []
        for _ in range(a.steps + 1):
            torch.distributed.barrier()
            t0 = time.perf_counter()
            engine.train_batch(data_iter=batches(a, m))
            times.append(time.perf_counter() - t0)
        held = sum(p.numel() for p in module.parameters()) * 4 * 4  # weights, grads, Adam m, v
        results[m] = (statistics.median(times[1:]), held)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # MiB
    queue.put((rank, ps.pp_rank, results, rss))
    torch.distributed.destroy_process_group()


def run(a, pp):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, 4, port, a, pp, queue)) for r in range(4)]
    for p in procs:
        p.start()
    out = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return sorted(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8, 16])
    a = ap.parse_args()
    t_mb = single_microbatch_time(a)
    print(f"model: {a.layers} layers x {a.hidden}, seq {a.seq}, micro batch {a.micro}; one process "
          f"forward+backward per micro-batch t_mb = {1000 * t_mb:.1f} ms (1 thread); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("| PP x DP | m | measured step s | 1F1B theory s | bubble (theory) | efficiency measured | efficiency theory |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    memory = {}
    for pp in (2, 4):
        out = run(a, pp)
        for m in a.micro_batches:
            step = max(r[2][m][0] for r in out)
            t_stage = t_mb / pp
            theory = (m + pp - 1) * t_stage
            bubble = (pp - 1) / (m + pp - 1)
            print(f"| {pp} x {4 // pp} | {m} | {step:.3f} | {theory:.3f} | {100 * bubble:.1f}% | "
                  f"{100 * m * t_stage / step:.0f}% | {100 * (1 - bubble):.0f}% |")
        memory[pp] = [(r[1], r[3], r[2][a.micro_batches[-1]][1] / 2**20) for r in out]
    print("\n| PP | stage | peak RSS MiB | weights + grads + Adam MiB |")
    print("|---|---:|---:|---:|")
    for pp, rows in memory.items():
        seen = set()
        for stage, rss, held in rows:
            if stage not in seen:
                seen.add(stage)
                print(f"| {pp} | {stage} | {rss:.0f} | {held:.1f} |")


if __name__ == "__main__":
    main()
