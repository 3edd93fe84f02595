"""Benchmark: block-sparse attention (13B ruGPT-3 layout) against dense causal SDPA.

    python bench/attention.py [--seq 2048] [--heads 16] [--repeats 5]

Prints forward and forward+backward times, ratios against dense causal SDPA measured in the
same run, and memory: peak extra CUDA memory on GPU; on CPU the computed size of the buffers
each path adds (see cpu_extra_mb). On a GPU it runs
bf16 at 2048, 4096 and 8192 tokens.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_ru.model.sparse_attention import BlockSparseAttention
from megatron_ru.model.sparsity import causal_density, make_layout

ROOT = Path(__file__).resolve().parents[1]


def cpu_extra_mb(path: str, fn, q) -> str:
    """CPU: RSS cannot isolate one op (the allocator reuses freed pages), so report the bytes of
    the buffers the path adds beyond q, k, v and the output: for gather, the cached plan (mask
    and indices, shared by all sparse layers) plus the gathered K and V; flash SDPA adds O(S)."""
    if path == "dense causal SDPA":
        return "~0"
    if path == "sparse flex":
        return "n/a"
    unit = fn.block * fn.tile_blocks
    idx, mask = fn._plan(-(-q.shape[2] // unit) * unit, q.device, q.dtype)
    gathered = 2 * q.shape[0] * idx.numel() * fn.block * q.shape[-1] * q.element_size()
    plan = mask.numel() * mask.element_size() + idx.numel() * idx.element_size()
    return f"{plan / 2**20:.0f} plan + {gathered / 2**20:.0f} K/V"


def setup(path, seq, heads, dim, device, dtype):
    sparse_cfg = json.loads((ROOT / "configs" / "gpt3_13b_sparse.json").read_text())["sparse_attention"]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq, dim, generator=gen).to(device, dtype) for _ in range(3))
    if path == "dense causal SDPA":
        return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)), q, k, v
    layout = make_layout(sparse_cfg, num_heads=heads, seq_length=seq)
    impl = path.split()[-1]
    return BlockSparseAttention(layout, sparse_cfg["block"], impl=impl).to(device), q, k, v


def timed(fn, repeats, device):
    fn()  # warm-up (and compilation)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else None
    return statistics.median(times), peak


def run(seq, heads, dim, repeats, device, dtype):
    rows = []
    for path in ("dense causal SDPA", "sparse gather", "sparse flex"):
        fn, q, k, v = setup(path, seq, heads, dim, device, dtype)
        with torch.no_grad():
            fwd, fwd_mem = timed(lambda: fn(q, k, v), repeats, device)
        train = train_mem = None
        if not (path == "sparse flex" and device.type == "cpu"):  # no CPU backward for flex
            qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

            def step():
                fn(qg, kg, vg).sum().backward()
            train, train_mem = timed(step, repeats, device)
        if device.type == "cpu":
            fwd_mem = train_mem = cpu_extra_mb(path, fn, q)
        else:
            fwd_mem, train_mem = f"{fwd_mem:.0f}", f"{train_mem:.0f}" if train else "n/a"
        rows.append((path, fwd, fwd_mem, train, train_mem))
    layout = make_layout(json.loads((ROOT / "configs" / "gpt3_13b_sparse.json").read_text())
                         ["sparse_attention"], num_heads=heads, seq_length=seq)
    base_f, base_t = rows[0][1], rows[0][3]
    print(f"\nseq {seq}, {heads} heads x {dim}, {str(dtype).replace('torch.', '')}, {device.type}, "
          f"layout keeps {causal_density(layout):.1%} of causal blocks")
    header = ("path", "fwd ms", "fwd speed-up", "fwd+bwd ms", "fwd+bwd speed-up", "extra MB fwd", "extra MB fwd+bwd")
    print(" | ".join(header))
    print(" | ".join("-" * len(h) for h in header))
    for path, fwd, fm, train, tm in rows:
        t_str = f"{train * 1e3:.1f}" if train else "n/a"
        r_str = f"{base_t / train:.2f}x" if train else "n/a"
        print(f"{path} | {fwd * 1e3:.1f} | {base_f / fwd:.2f}x | {t_str} | {r_str} | {fm} | {tm}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="*", default=None)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    seqs = args.seq or ([2048, 4096, 8192] if cuda else [2048])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{torch.cuda.get_device_name() if cuda else 'CPU'}")
    for seq in seqs:
        run(seq, args.heads, args.head_dim, args.repeats, device, dtype)


if __name__ == "__main__":
    main()
