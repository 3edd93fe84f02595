"""Benchmark: decode tokens/s of our Generator against Hugging Face `generate()` on the same weights.

    python bench/generate.py [--repeats 3] [--new-tokens 128] [--quick]   # CPU table
    python bench/generate.py --fast [--xl]     # + int8 / int4 / speculative rows (+ rugpt3-xl shape)
    python bench/generate.py --gpu                                       # + rugpt3-xl fp16 roofline

`--fast` rows: fp32, int8 (linear layers), int8+head / int4+head (the output head too;
weight-only, inference/quantize.py, CPU kernel fbgemm) and speculative (fp32 target, its own
int4+head copy as the draft, K=4), each against HF fp32 in the same run; `weights` is the model's footprint in memory (fbgemm holds int4 weights as int8 on CPU).

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


def fast_variants(cfg, ours, which):
    """name → (generator, weight bytes): fp32, int8, int4, speculative (int4-self draft, K=4)."""
    from megatron_ru.inference.quantize import quantize, quantized_bytes
    from megatron_ru.inference.speculative import SpeculativeGenerator
    out = {}
    if "fp32" in which:
        out["fp32"] = (Generator(ours), quantized_bytes(ours))
    for method in ("int8", "int8+head", "int4+head"):
        if method in which:
            q = quantize(GPTModel(cfg, seed=1), method[:4], head=method.endswith("head"))
            out[method] = (Generator(q), quantized_bytes(q))
    if "spec" in which:
        draft = out["int4+head"][0].model if "int4+head" in out else \
            quantize(GPTModel(cfg, seed=1), "int4", head=True)
        out["spec int4-self K=4"] = (SpeculativeGenerator(Generator(ours), draft, 4),
                                     quantized_bytes(ours) + quantized_bytes(draft))
    return out


def compare_fast(name, cfg, variants, hf, batch, new, repeats):
    prompts = torch.randint(0, cfg.vocab_size, (batch, PROMPT),
                            generator=torch.Generator().manual_seed(batch))
    for gen, _ in variants.values():
        run_ours(gen, prompts, min(new, 8))  # warm-up
    run_hf(hf, prompts, min(new, 8))
    times = {v: [] for v in variants}
    t_hf, toks = [], {}
    for _ in range(repeats):
        for v, (gen, _) in variants.items():
            if hasattr(gen, "stats"):
                gen.stats = type(gen.stats)()
            t, toks[v] = run_ours(gen, prompts, new)
            times[v].append(t)
        t, toks_hf = run_hf(hf, prompts, new)
        t_hf.append(t)
    th = statistics.median(t_hf)
    rows = []
    for v, (gen, nbytes) in variants.items():
        to = statistics.median(times[v])
        acc = getattr(gen, "stats", None)
        rows.append(dict(name=name, variant=v, batch=batch, ours=batch * new / to, hf=batch * new / th,
                         ratio=th / to, same=agreement(toks[v], toks_hf), gb=nbytes / 1e9,
                         acc=None if acc is None else acc.acceptance_rate))
    return rows


def print_fast(rows, title):
    print(f"\n{title}")
    print("| model | weights | batch | ours tok/s | HF fp32 tok/s | ours / HF | same tokens | accepted |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        acc = "" if r["acc"] is None else f"{100 * r['acc']:.0f}%"
        print(f"| {r['name']} | {r['variant']} ({1e3 * r['gb']:.0f} MB) | {r['batch']} | {r['ours']:.1f} | "
              f"{r['hf']:.1f} | {r['ratio']:.2f}x | {100 * r['same']:.0f}% | {acc} |", flush=True)


def run_xl(args) -> list:
    """rugpt3-xl shape, batch 1, int8+head in place vs HF fp32, within ~11 GB: HF takes our fp32
    weights (no extra copies), then our model is quantized in place so its fp weights go. int4
    runs on the same int8 kernel on CPU (same speed) and our fp32 equals HF fp32 (issue 6), so
    neither is repeated at this size."""
    import gc
    from megatron_ru.inference.quantize import quantize, quantized_bytes
    cfg = ModelConfig.from_preset("rugpt3-xl", max_position_embeddings=512)
    ours = GPTModel(cfg, seed=1).eval()
    hf, sd = gpt2_from_ours(ours)
    hf.load_state_dict(sd, strict=False)
    del sd
    hf = hf.eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    quantize(ours, "int8", head=True)
    gc.collect()
    variants = {"int8+head": (Generator(ours), quantized_bytes(ours))}
    rows = compare_fast("rugpt3-xl", cfg, variants, hf, 1, min(args.new_tokens, 32), 1)
    for r in rows:
        print(f"  rugpt3-xl {r['variant']} batch 1: {r['ours']:.1f} tok/s vs HF {r['hf']:.1f} "
              f"({r['ratio']:.2f}x)", file=sys.stderr, flush=True)
    return rows


def run_fast(args) -> None:
    import gc
    import resource
    cases = [c for c in CASES if "llama" not in c[0] and not (args.quick and "125M" in c[0])]
    if args.xl_only:
        cases = []
    rows = []
    for name, preset, overrides in cases:
        cfg, ours, hf = build(preset, overrides, "cpu", torch.float32)
        variants = fast_variants(cfg, ours, ("fp32", "int8", "int8+head", "int4+head", "spec"))
        for batch in args.batches:
            rows += compare_fast(name, cfg, variants, hf, batch, args.new_tokens, args.repeats)
            for r in rows[-len(variants):]:
                print(f"  {name} {r['variant']} batch {batch}: {r['ours']:.1f} tok/s vs HF "
                      f"{r['hf']:.1f} ({r['ratio']:.2f}x)", file=sys.stderr, flush=True)
        del ours, hf, variants
        gc.collect()
    if args.xl or args.xl_only:
        rows += run_xl(args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print_fast(rows, f"CPU ({args.threads} threads), greedy, prompt {PROMPT}, {args.new_tokens} new "
                     f"tokens (rugpt3-xl: 32, 1 repeat), median of {args.repeats}; peak RSS of the "
                     f"whole run {peak:.1f} GB; torch {torch.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--quick", action="store_true", help="tiny models only, 1 repeat")
    parser.add_argument("--gpu", action="store_true", help="also the rugpt3-xl fp16 roofline run")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--fast", action="store_true", help="int8 / int4 / speculative rows")
    parser.add_argument("--xl", action="store_true", help="with --fast: also the rugpt3-xl shape")
    parser.add_argument("--xl-only", action="store_true", help="with --fast: only the rugpt3-xl shape")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.fast:
        return run_fast(args)
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
