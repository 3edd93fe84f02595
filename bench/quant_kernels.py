"""Benchmark: the candidate CPU kernels for weight-only quantized linear layers, one layer at a
time, against fp32 F.linear (the measurement behind inference/quantize.py's kernel choice).

    python bench/quant_kernels.py [--threads 2] [--rounds 7]

Rows: fp32 F.linear; torch.ao dynamic quantized linear with per-channel qint8 weights (fbgemm);
torch.ao dynamic fp16 (fbgemm); aten._weight_int8pack_mm; aten._weight_int4pack_mm_for_cpu
(group 128). µs per call, best of `rounds` rounds of n calls, kernels interleaved so machine
noise hits all alike; in brackets the speed-up over fp32 measured in the same round.
"""
import argparse
import time
import warnings

import torch
import torch.nn.functional as F

SHAPES = [(768, 2304), (3072, 768), (2048, 8192), (8192, 2048)]  # (in, out): rugpt3-small / xl


def kernels(k: int, n: int, b: int) -> dict:
    import torch.ao.nn.quantized.dynamic as nnqd
    from torch.ao.quantization import float16_dynamic_qconfig, per_channel_dynamic_qconfig
    x, w = torch.randn(b, k), torch.randn(n, k) * 0.02
    lin = torch.nn.Linear(k, n)
    lin.weight.data = w
    lin.qconfig = per_channel_dynamic_qconfig
    q8 = nnqd.Linear.from_float(lin)
    lin.qconfig = float16_dynamic_qconfig
    q16 = nnqd.Linear.from_float(lin)
    s = w.abs().amax(1) / 127
    wq = (w / s[:, None]).round().to(torch.int8)
    g = 128
    wg = w.view(n, k // g, g)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    sc = (hi - lo).clamp(min=1e-6) / 15
    q4 = ((wg - lo) / sc).round().clamp(0, 15).to(torch.int32).view(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1)
    sz = torch.stack([sc.view(n, -1).t(), (lo + 8 * sc).view(n, -1).t()], -1).contiguous()
    return {"fp32 F.linear": lambda: F.linear(x, w, lin.bias),
            "ao dynamic qint8 (fbgemm)": lambda: q8(x),
            "ao dynamic fp16 (fbgemm)": lambda: q16(x),
            "_weight_int8pack_mm": lambda: torch.ops.aten._weight_int8pack_mm(x, wq, s),
            "_weight_int4pack_mm_for_cpu": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, packed, g, sz)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {args.threads} threads; µs per call (speed-up over fp32)")
    print("| layer (in x out) | batch | " + " | ".join(kernels(64, 128, 1)) + " |")
    print("|---|---:|" + "---:|" * 5)
    for k, n in SHAPES:
        for b in (1, 8):
            fns = kernels(k, n, b)
            calls = 5 if k * n > 3e6 else 20
            best = {name: float("inf") for name in fns}
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    fn()
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    best[name] = min(best[name], (time.perf_counter() - t0) / calls * 1e6)
            ref = best["fp32 F.linear"]
            print(f"| {k}x{n} | {b} | " + " | ".join(f"{v:.0f} ({ref / v:.2f}x)" for v in best.values())
                  + " |", flush=True)


if __name__ == "__main__":
    main()
