"""Benchmark: decode tokens/s of our Generator against Hugging Face `generate()` on the same weights.

    python bench/generate.py [--repeats 3] [--new-tokens 128] [--quick]   # CPU table
    python bench/generate.py --gpu                                       # + rugpt3-xl fp16 roofline

Greedy decoding of a 16-token prompt by 128 new tokens (no early stop) at batch 1 and 8.
Ours and HF alternate run by run, so machine noise hits both alike; each cell is the median.
tokens/s = batch × new tokens / wall time of the whole generate call (prefill included for
both; it is 16 tokens). `same` = share of greedy tokens identical to HF's (random weights have
near-ties, so fp32 rounding may fork a sequence late; early tokens must agree).

GPU roofline (--gpu, CUDA only): decoding one token at batch 1 must read every weight once, so
time/token >= weight bytes / memory bandwidth. We report that bound over the measured
time/token, with bandwidth measured by a device-to-device copy (and the spec sheet value).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_ru import GPTModel, ModelConfig  # noqa: E402
from megatron_ru.inference import Generator  # noqa: E402
from tests.unit.test_hf_parity import gpt2_from_ours, llama_from_ours  # noqa: E402

CASES = [
    # (name, preset, overrides)
    ("tiny-gpt3", "tiny-gpt3", {}),
    ("gpt3-125M", "rugpt3-small", {"max_position_embeddings": 1024}),
    ("tiny-llama", "tiny-llama", {}),
]
PROMPT = 16
SPEC_BANDWIDTH_GBS = {"H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H200": 4800,
                      "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100 80GB PCIe": 1935}


def build(preset: str, overrides: dict, device, dtype):
    cfg = ModelConfig.from_preset(preset, **overrides)
    ours = GPTModel(cfg, seed=1, device=device, dtype=dtype).eval()
    hf, sd = (llama_from_ours if cfg.is_llama else gpt2_from_ours)(ours)
    hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    hf = hf.to(device=device, dtype=dtype).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return cfg, ours, hf


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_ours(gen: Generator, prompts: torch.Tensor, new: int):
    sync(gen.device)
    t0 = time.perf_counter()
    out = gen.generate(prompts.tolist(), max_new_tokens=new)
    sync(gen.device)
    return time.perf_counter() - t0, [c.tokens for c in out]


@torch.inference_mode()
def run_hf(hf, prompts: torch.Tensor, new: int):
    sync(prompts.device)
    t0 = time.perf_counter()
    out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                      min_new_tokens=new, do_sample=False)
    sync(prompts.device)
    return time.perf_counter() - t0, out[:, prompts.shape[1]:].tolist()


def agreement(a: list, b: list) -> float:
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    return same / max(1, sum(len(r) for r in a))


def compare(name, cfg, ours, hf, batch, new, repeats, device, compile=False):
    prompts = torch.randint(0, cfg.vocab_size, (batch, PROMPT),
                            generator=torch.Generator().manual_seed(batch)).to(device)
    gen = Generator(ours, compile=compile)
    run_ours(gen, prompts, new)  # warm-up (and compile)
    run_hf(hf, prompts, new)
    t_ours, t_hf = [], []
    for _ in range(repeats):
        t, toks_ours = run_ours(gen, prompts, new)
        t_ours.append(t)
        t, toks_hf = run_hf(hf, prompts, new)
        t_hf.append(t)
    to, th = statistics.median(t_ours), statistics.median(t_hf)
    return dict(name=name, batch=batch, ours=batch * new / to, hf=batch * new / th,
                ratio=th / to, same=agreement(toks_ours, toks_hf), t_ours=to)


def print_table(rows, title):
    print(f"\n{title}")
    print(f"| model | batch | ours tok/s | HF tok/s | ours / HF | same tokens |")
    print(f"|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['batch']} | {r['ours']:.1f} | {r['hf']:.1f} | "
              f"{r['ratio']:.2f}x | {100 * r['same']:.0f}% |", flush=True)


def measured_bandwidth_gbs(device) -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        y.copy_(x)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * x.numel() / min(times) / 1e9  # read + write


def gpu_roofline(new: int, repeats: int) -> None:
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    cfg, ours, hf = build("rugpt3-xl", {}, device, torch.float16)
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    bw = measured_bandwidth_gbs(device)
    spec = next((v for k, v in SPEC_BANDWIDTH_GBS.items() if k in name), None)
    rows = [compare("rugpt3-xl fp16", cfg, ours, hf, 1, new, repeats, device)]
    rows.append(compare("rugpt3-xl fp16 compiled", cfg, ours, hf, 1, new, repeats, device,
                        compile=True))
    print_table(rows, f"GPU: {name}, weights {weight_bytes / 1e9:.2f} GB, copy bandwidth "
                      f"{bw:.0f} GB/s" + (f" (spec {spec} GB/s)" if spec else ""))
    for r in rows:
        per_token = r["t_ours"] / new
        bound = weight_bytes / (bw * 1e9)
        line = f"{r['name']}: {1e3 * per_token:.2f} ms/token; roofline {1e3 * bound:.2f} ms " \
               f"= {100 * bound / per_token:.0f}% of measured-bandwidth roofline"
        if spec:
            line += f", {100 * weight_bytes / (spec * 1e9) / per_token:.0f}% of spec"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--quick", action="store_true", help="tiny models only, 1 repeat")
    parser.add_argument("--gpu", action="store_true", help="also the rugpt3-xl fp16 roofline run")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = [c for c in CASES if not (args.quick and "125M" in c[0])]
    repeats = 1 if args.quick else args.repeats
    rows = []
    for name, preset, overrides in cases:
        cfg, ours, hf = build(preset, overrides, "cpu", torch.float32)
        for batch in args.batches:
            rows.append(compare(name, cfg, ours, hf, batch, args.new_tokens, repeats, "cpu"))
            r = rows[-1]
            print(f"  {name} batch {batch}: ours {r['ours']:.1f} tok/s, HF {r['hf']:.1f} tok/s",
                  file=sys.stderr, flush=True)
    print_table(rows, f"CPU ({args.threads} threads), greedy, prompt {PROMPT}, "
                      f"{args.new_tokens} new tokens, median of {repeats}; torch {torch.__version__}")
    if args.gpu:
        if not torch.cuda.is_available():
            print("\n--gpu: no CUDA device here; GPU roofline skipped")
        else:
            gpu_roofline(args.new_tokens, repeats)


if __name__ == "__main__":
    main()
