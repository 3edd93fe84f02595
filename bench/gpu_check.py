"""GPU validation pack: one command, one results file (see bench/gpu_check.sh).

    bash bench/gpu_check.sh                 # one CUDA GPU, < 8 minutes
    bash bench/gpu_check.sh --cpu-smoke     # the same steps at tiny sizes on CPU (CI runs this)

Sections (each PASS / FAIL / SKIP with its figures; one failing section does not stop the rest):
  1 hf_parity     our logits vs Hugging Face on the same weights, fp32 and bf16, both families
  2 sparse        block-sparse attention (13B layout; FlexAttention on GPU) forward + backward vs
                  the dense-masked reference, and its speed vs dense causal SDPA at 2048/4096/8192
  3 train_step    rugpt3-xl shape, bf16, seq 2048: fwd + bwd + AdamW step, tokens/s and MFU
                  (FLOPs/token = 6N + 12·L·h·s, peak = the dense bf16 spec of the device)
  4 fp16_scaling  DeepSpeed fp16 with dynamic loss scaling from 2^32: overflowing steps are
                  skipped and the scale falls until steps go through, loss finite
  5 decode        rugpt3-xl batch 1: fp16, int8, int4 (weight-only, torch.compile) tok/s and %
                  of the HBM roofline (weight bytes / bandwidth measured by a device copy)
  6 speculative   rugpt3-xl fp16 target, its int8 copy as the draft, K=4: speed-up over plain
  7 plan          the planner (megatron_ru/planning) vs a real DeepSpeed step: rugpt3-xl bf16
                  ZeRO 0, seq 2048, micro 4, recompute; predicted per-rank memory vs
                  max_memory_allocated before the optimizer step (goal within 10 %) and predicted
                  vs measured step time (goal within 25 %); the step's own peak reported beside
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_ru import GPTModel, ModelConfig  # noqa: E402
from megatron_ru.inference import Generator, quantize  # noqa: E402
from megatron_ru.inference.quantize import quantized_bytes  # noqa: E402
from megatron_ru.inference.speculative import SpeculativeGenerator  # noqa: E402
from megatron_ru.training.metrics import device_peak_tflops, flops_per_token  # noqa: E402

SPEC_BANDWIDTH_GBS = {"H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H200": 4800,
                      "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100 80GB PCIe": 1935,
                      "L40S": 864, "A10G": 600}


class Skip(Exception):
    """A section that cannot run here; the message says why."""


class Pack:
    """Sizes for a GPU run or a CPU smoke run, the device, and the results file."""

    def __init__(self, smoke: bool, out: Path, budget_s: float) -> None:
        self.smoke, self.out, self.budget_s, self.t0 = smoke, out, budget_s, time.perf_counter()
        self.device = torch.device("cpu" if smoke else "cuda")
        self.lines: list[str] = []
        self.failed = 0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn, repeats: int = 3) -> float:
        repeats = 1 if self.smoke else repeats
        fn()
        self.sync()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            self.sync()
            best = min(best, time.perf_counter() - t0)
        return best

    def write(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text("\n".join(self.lines) + "\n", encoding="utf-8")
        os.replace(tmp, self.out)

    def section(self, name: str, fn) -> None:
        elapsed = time.perf_counter() - self.t0
        if elapsed > self.budget_s:
            self.write(f"## {name}: SKIP (time budget of {self.budget_s:.0f} s spent)")
            return
        t0 = time.perf_counter()
        try:
            figures = fn(self)
            self.write(f"## {name}: PASS ({time.perf_counter() - t0:.1f} s)")
        except Skip as why:
            figures = []
            self.write(f"## {name}: SKIP ({why})")
        except Exception as exc:  # noqa: BLE001 - record and go on to the next section
            self.failed += 1
            figures = [f"error: {type(exc).__name__}: {exc}"] + \
                traceback.format_exc().splitlines()[-6:]
            self.write(f"## {name}: FAIL ({time.perf_counter() - t0:.1f} s)")
        for line in figures:
            self.write("    " + line)


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


# ---- 1. HF parity ------------------------------------------------------------------------------
def hf_parity(pack: Pack) -> list[str]:
    from tests.unit.test_hf_parity import gpt2_from_ours, llama_from_ours
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    presets = [("tiny-gpt3", {}), ("tiny-llama", {})] if pack.smoke else \
        [("rugpt3-small", {"max_position_embeddings": 1024}), ("tiny-llama", {"hidden_size": 1024,
          "num_attention_heads": 16, "num_key_value_heads": 4, "ffn_hidden_size": 2816,
          "num_layers": 4, "vocab_size": 32000})]
    out = []
    limits = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
    for preset, over in presets:
        cfg = ModelConfig.from_preset(preset, **over)
        ours = GPTModel(cfg, seed=1).eval()
        hf, sd = (llama_from_ours if cfg.is_llama else gpt2_from_ours)(ours)
        hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
        x = torch.randint(0, cfg.vocab_size, (2, 64 if pack.smoke else 512),
                          generator=torch.Generator().manual_seed(0)).to(pack.device)
        for dtype in (torch.float32, torch.bfloat16):
            a = ours.to(pack.device, dtype)
            b = hf.to(pack.device, dtype).eval()
            with torch.no_grad():
                err = rel(a(x).float(), b(x).logits.float())
            out.append(f"{preset} {str(dtype)[6:]}: max rel logit error {err:.2e} (limit "
                       f"{limits[dtype]:.0e})")
            assert err <= limits[dtype], out[-1]
        del ours, hf
    return out


# ---- 2. block-sparse attention -----------------------------------------------------------------
def sparse(pack: Pack) -> list[str]:
    from megatron_ru.model.sparse_attention import BlockSparseAttention
    from megatron_ru.model.sparsity import causal_density, make_layout
    cfg = json.loads((ROOT / "configs" / "gpt3_13b_sparse.json").read_text())["sparse_attention"]
    heads, dim = (4, 32) if pack.smoke else (16, 128)
    dtype = torch.float32 if pack.smoke else torch.bfloat16
    impl = "gather" if pack.smoke else "flex"
    out = []
    for seq in ((128,) if pack.smoke else (2048, 4096, 8192)):
        layout = make_layout(cfg, num_heads=heads, seq_length=seq)
        fast = BlockSparseAttention(layout, cfg["block"], impl=impl).to(pack.device)
        ref = BlockSparseAttention(layout, cfg["block"], impl="reference").to(pack.device)
        gen = torch.Generator().manual_seed(seq)
        q, k, v = (torch.randn(1, heads, seq, dim, generator=gen).to(pack.device, dtype)
                   .requires_grad_() for _ in range(3))
        grads = []
        for fn in (fast, ref):
            o = fn(q, k, v)
            g = torch.autograd.grad(o.float().square().sum(), (q, k, v))
            grads.append((o.detach().float(), [t.float() for t in g]))
        err_o = rel(grads[0][0], grads[1][0])
        err_g = max(rel(a, b) for a, b in zip(grads[0][1], grads[1][1]))
        limit = 1e-4 if dtype == torch.float32 else 3e-2

        def step(fn):
            return lambda: torch.autograd.grad(fn(q, k, v).float().sum(), (q, k, v))
        dense = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa
        t_sparse, t_dense = pack.timed(step(fast)), pack.timed(step(dense))
        out.append(f"seq {seq} {impl} {str(dtype)[6:]}: density {causal_density(layout):.3f}, "
                   f"fwd rel err {err_o:.1e}, grad rel err {err_g:.1e} (limit {limit:.0e}); "
                   f"fwd+bwd {1e3 * t_sparse:.2f} ms vs dense SDPA {1e3 * t_dense:.2f} ms = "
                   f"{t_dense / t_sparse:.2f}x")
        assert err_o <= limit and err_g <= limit, out[-1]
    return out


# ---- 3. training step with MFU -----------------------------------------------------------------
def train_step(pack: Pack) -> list[str]:
    if pack.smoke:
        cfg, seq, batch, dtype = ModelConfig.from_preset("tiny-gpt3"), 64, 2, torch.float32
    else:
        cfg = ModelConfig.from_preset("rugpt3-xl", checkpoint_activations=True)
        seq, batch, dtype = 2048, 4, torch.bfloat16
    model = GPTModel(cfg, seed=1, device=pack.device, dtype=dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=pack.device.type == "cuda")
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=pack.device)
    losses = []

    def step():
        loss = model(x[:, :-1], labels=x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    t = pack.timed(step, repeats=3)
    tokens = batch * seq / t
    peak = device_peak_tflops()
    tflops = flops_per_token(cfg, seq) * tokens / 1e12
    mfu = f", MFU {100 * tflops / peak:.1f}% of {peak:.0f} TFLOP/s" if peak else ", MFU n/a (no peak)"
    mem = torch.cuda.max_memory_allocated() / 2**30 if pack.device.type == "cuda" else 0.0
    assert all(l == l and l < 20 for l in losses), losses  # noqa: E741 - finite, sane
    return [f"{'tiny-gpt3' if pack.smoke else 'rugpt3-xl'} {str(dtype)[6:]} seq {seq} batch {batch}: "
            f"{1e3 * t:.0f} ms/step, {tokens:.0f} tokens/s, {tflops:.1f} TFLOP/s{mfu}; "
            f"loss {losses[0]:.3f} → {losses[-1]:.3f}; peak memory {mem:.1f} GiB"]


# ---- 4. fp16 loss scaling ----------------------------------------------------------------------
def fp16_scaling(pack: Pack) -> list[str]:
    if pack.smoke:  # DeepSpeed on CPU JIT-builds a shared-memory comm op: not a smoke test's job
        raise Skip("DeepSpeed's fp16 optimizer needs CUDA; the GPU run checks loss scaling")
    import socket

    import deepspeed
    from megatron_ru.parallel.state import ParallelState
    with socket.socket() as s:  # a free port for the one-process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                           LOCAL_RANK="0", WORLD_SIZE="1").items():
        os.environ.setdefault(key, value)
    ps = ParallelState.from_environment(tensor_model_parallel_size=1, timeout_s=120)
    cfg = ModelConfig.from_preset("tiny-gpt3" if pack.smoke else "rugpt3-small")
    model = GPTModel(cfg, ps, seed=1, device=pack.device)
    fp16 = not pack.smoke  # DeepSpeed's fp16 optimizer needs CUDA; the smoke run checks wiring
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)  # a client optimizer: no JIT build
    ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**6,
          "fp16": {"enabled": fp16, "loss_scale": 0, "initial_scale_power": 32,
                   "loss_scale_window": 1000, "hysteresis": 1, "min_loss_scale": 1}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds, mpu=ps)
    x = torch.randint(0, cfg.vocab_size, (2, 129), device=pack.device)
    scales, losses = [], []
    for _ in range(12):
        loss = engine(x[:, :-1], labels=x[:, 1:])
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
        scales.append(float(getattr(engine.optimizer, "cur_scale", 1.0)) if fp16 else 1.0)
    skipped = int(getattr(engine, "skipped_steps", 0))
    assert all(l == l and abs(l) != float("inf") for l in losses), losses  # noqa: E741
    if fp16:
        assert scales[-1] < 2.0 ** 32 and skipped > 0, (scales, skipped)
    return [f"{'fp32 wiring (smoke)' if not fp16 else 'fp16'}: scale 2^32 → {scales[-1]:.0f} after "
            f"{skipped} skipped overflow steps; loss {losses[0]:.3f} → {losses[-1]:.3f}"]


# ---- 5. decode roofline ------------------------------------------------------------------------
def bandwidth_gbs(pack: Pack) -> float:
    n = (1 << 24) if pack.smoke else (1 << 30)
    x = torch.empty(n, dtype=torch.uint8, device=pack.device)
    y = torch.empty_like(x)
    return 2 * n / pack.timed(lambda: y.copy_(x), repeats=5) / 1e9


def _decode_models(pack: Pack):
    cfg = ModelConfig.from_preset("tiny-gpt3" if pack.smoke else "rugpt3-xl",
                                  max_position_embeddings=256 if pack.smoke else 1024)
    dtype = torch.float32 if pack.smoke else torch.float16
    return cfg, dtype


def decode(pack: Pack) -> list[str]:
    cfg, dtype = _decode_models(pack)
    bw = bandwidth_gbs(pack)
    name = torch.cuda.get_device_name() if pack.device.type == "cuda" else platform.processor() or "cpu"
    spec = next((v for k, v in SPEC_BANDWIDTH_GBS.items() if k in name), None)
    out = [f"device {name}: copy bandwidth {bw:.0f} GB/s" + (f" (spec {spec} GB/s)" if spec else "")]
    new = 8 if pack.smoke else 128
    prompt = [list(range(1, 17))]
    for variant in ("fp16" if not pack.smoke else "fp32", "int8", "int4"):
        model = GPTModel(cfg, seed=1, device=pack.device, dtype=dtype).eval()
        if variant in ("int8", "int4"):
            quantize(model, variant, kernel="auto")
        nbytes = quantized_bytes(model)
        gen = Generator(model, compile=not pack.smoke)
        if not pack.smoke:
            gen.generate(prompt, max_new_tokens=8)  # compile / warm up
        t = pack.timed(lambda: gen.generate(prompt, max_new_tokens=new), repeats=2)
        per_token = t / new
        roof = nbytes / (bw * 1e9)
        line = (f"{variant}: {new / t:.1f} tok/s, {1e3 * per_token:.2f} ms/token, weights "
                f"{nbytes / 1e9:.2f} GB, {100 * roof / per_token:.0f}% of the measured-bandwidth roofline")
        if spec:
            line += f", {100 * nbytes / (spec * 1e9) / per_token:.0f}% of spec"
        out.append(line)
        del model, gen
        if pack.device.type == "cuda":
            torch.cuda.empty_cache()
    return out


# ---- 6. speculative ----------------------------------------------------------------------------
def speculative(pack: Pack) -> list[str]:
    cfg, dtype = _decode_models(pack)
    target = GPTModel(cfg, seed=1, device=pack.device, dtype=dtype).eval()
    draft = quantize(GPTModel(cfg, seed=1, device=pack.device, dtype=dtype), "int8")
    prompt, new = [list(range(1, 17))], 8 if pack.smoke else 128
    plain = Generator(target)
    spec = SpeculativeGenerator(Generator(target), draft, 4)
    same = plain.generate(prompt, max_new_tokens=new)[0].tokens == \
        spec.generate(prompt, max_new_tokens=new)[0].tokens
    t_plain = pack.timed(lambda: plain.generate(prompt, max_new_tokens=new), repeats=2)
    spec.stats = type(spec.stats)()
    t_spec = pack.timed(lambda: spec.generate(prompt, max_new_tokens=new), repeats=2)
    assert same, "greedy speculative output differs from plain greedy"
    return [f"plain {new / t_plain:.1f} tok/s, speculative (int8 self-draft, K=4) {new / t_spec:.1f} "
            f"tok/s = {t_plain / t_spec:.2f}x; acceptance {100 * spec.stats.acceptance_rate:.0f}%; "
            "greedy tokens identical"]


# ---- 7. the planner's prediction vs a real step -----------------------------------------------------
def plan(pack: Pack) -> list[str]:
    import deepspeed

    from megatron_ru import ParallelState
    from megatron_ru.planning.selfcheck import SelfCheck
    from megatron_ru.training.optim import param_groups
    if pack.smoke:
        cfg, seq, micro, precision = ModelConfig.from_preset("tiny-gpt3"), 64, 2, "fp32"
    else:
        cfg = ModelConfig.from_preset("rugpt3-xl", checkpoint_activations=True)
        seq, micro, precision = 2048, 4, "bf16"
    ps = ParallelState.from_environment(1)
    ds = {"train_batch_size": micro, "train_micro_batch_size_per_gpu": micro,
          "gradient_accumulation_steps": 1, "steps_per_print": 10**9, "zero_optimization": {"stage": 0}}
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    notes: list[str] = []
    check = SelfCheck(cfg, ds, ps, seq, precision, None, notes.append)
    model = GPTModel(cfg, ps, seed=1, device=ps.device)
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds, mpu=ps)
    check.arm(engine, model)  # CPU: DeepSpeed's bytes + saved-for-backward; CUDA: nothing to arm
    x = torch.randint(0, cfg.vocab_size, (micro, seq + 1), device=ps.device)
    before_step = {}
    inner_step = engine.optimizer.step

    def step_measured(*a, **k):  # peak of forward + backward, before the step's own transients
        if ps.device.type == "cuda":
            before_step["bytes"] = torch.cuda.max_memory_allocated()
        return inner_step(*a, **k)
    engine.optimizer.step = step_measured
    if ps.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        engine.backward(engine(x[:, :-1], labels=x[:, 1:]))
        engine.step()
    first_t0 = time.perf_counter()
    step()
    pack.sync()
    report = check.report(time.perf_counter() - first_t0, micro * seq)
    t = pack.timed(step, repeats=3)
    measured = before_step.get("bytes", report["measured_bytes"])
    err = measured / check.predicted - 1
    lines = notes + [f"memory per rank: predicted {check.predicted / 1e9:.2f} GB (states "
                     f"{check.states['total'] / 1e9:.2f} + activations {check.activations / 1e9:.2f}), "
                     f"measured {measured / 1e9:.2f} GB before the step ({100 * err:+.1f}%, goal within 10%)"]
    if ps.device.type == "cuda":
        lines.append(f"peak including the optimizer step {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")
    speed = micro * seq / t
    if check.tokens_per_s:
        lines.append(f"tokens/s: predicted {check.tokens_per_s:,.0f}, measured {speed:,.0f} "
                     f"({100 * (speed / check.tokens_per_s - 1):+.1f}%, goal within 25%)")
    else:
        lines.append(f"tokens/s: measured {speed:,.0f}; no prediction (device not in the planner's table)")
    assert abs(err) <= 0.10, f"memory prediction off by {100 * err:+.1f}%"
    return lines


SECTIONS = [("1 hf_parity", hf_parity), ("2 sparse", sparse), ("3 train_step", train_step),
            ("4 fp16_scaling", fp16_scaling), ("5 decode", decode), ("6 speculative", speculative),
            ("7 plan", plan)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU (CI)")
    p.add_argument("--out", default=None, help="results file (default bench/results/gpu_check-*.md)")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="start no new section after this many seconds (default 450: < 8 min)")
    p.add_argument("--only", nargs="*", default=None, help="section numbers to run, e.g. 1 5")
    args = p.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --cpu-smoke for the CPU smoke test", file=sys.stderr)
        return 2
    kind = "cpu-smoke" if args.cpu_smoke else torch.cuda.get_device_name().replace(" ", "_")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / \
        f"gpu_check-{kind}-{time.strftime('%Y%m%d-%H%M')}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    pack = Pack(args.cpu_smoke, out, args.budget_s)
    pack.write(f"# gpu_check ({kind}), torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    for name, fn in SECTIONS:
        if args.only is None or name.split()[0] in args.only:
            pack.section(name, fn)
    pack.write(f"# {pack.failed} section(s) failed; total {time.perf_counter() - pack.t0:.0f} s")
    print(f"results: {out}", file=sys.stderr)
    return 1 if pack.failed else 0


if __name__ == "__main__":
    sys.exit(main())
