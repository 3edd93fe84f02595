"""Benchmark: training tokens/s and MFU of our DeepSpeed engine + GPTModel (TP=1) against a plain
PyTorch loop over Hugging Face GPT2LMHeadModel with the same optimizer, batch and precision.

    python bench/train.py                       # CPU: tiny-gpt3 and a ~125M GPT, fp32
    python bench/train.py --preset rugpt3-xl --seq 2048 --batch 4 --bf16   # on a GPU

Both loops do forward, backward, gradient clipping at 1.0 and an AdamW step. Steps alternate
between the two so machine noise hits both alike; the table shows medians and the ratio.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.model_step import hf_model  # noqa: E402
from megatron_ru import GPTModel, ModelConfig, ParallelState  # noqa: E402
from megatron_ru.training.metrics import device_peak_tflops, flops_per_token  # noqa: E402
from megatron_ru.training.optim import param_groups  # noqa: E402

CPU_CASES = [("tiny-gpt3", {}, 8, 256), ("rugpt3-small", {"max_position_embeddings": 1024}, 2, 256)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_case(preset, overrides, batch, seq, steps, dtype, device, ps, peak):
    import deepspeed
    cfg = ModelConfig.from_preset(preset, **overrides)
    ours = GPTModel(cfg, ps, seed=1, device=device)
    ds = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
          "train_batch_size": batch, "gradient_clipping": 1.0, "steps_per_print": 10**9,
          "zero_optimization": {"stage": 0}}
    if dtype == torch.bfloat16:
        ds["bf16"] = {"enabled": True}
    opt = torch.optim.AdamW(param_groups(ours, 0.01), lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    engine, _, _, _ = deepspeed.initialize(model=ours, optimizer=opt, config=ds, mpu=ps)
    ref = hf_model(cfg).to(device)
    ref_opt = torch.optim.AdamW(param_groups(ref, 0.01), lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)

    def ours_step():
        loss = engine(tokens[:, :-1], labels=tokens[:, 1:])
        engine.backward(loss)
        engine.step()

    def ref_step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = ref(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)

    times = {"ours": [], "hf": []}
    for i in range(steps + 2):  # two warm-up rounds
        for name, fn in (("ours", ours_step), ("hf", ref_step)):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    n_tok = batch * seq
    t_ours, t_hf = statistics.median(times["ours"]), statistics.median(times["hf"])
    tflops = flops_per_token(cfg, seq) * n_tok / t_ours / 1e12
    mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
    return (preset, f"{cfg.num_parameters() / 1e6:.1f}M", f"{batch}x{seq}", f"{n_tok / t_ours:,.0f}",
            f"{n_tok / t_hf:,.0f}", f"{t_hf / t_ours:.2f}x", f"{tflops:.3f}", mfu)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--peak-tflops", type=float)
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    ps = ParallelState.from_environment(tensor_model_parallel_size=1)
    device = ps.device
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak = device_peak_tflops(args.peak_tflops)
    cases = [(args.preset, {}, args.batch, args.seq)] if args.preset else CPU_CASES
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, "
          f"{str(dtype).replace('torch.', '')}, TP=1, ZeRO-0, AdamW + clip 1.0")
    rows = [run_case(p, o, b, s, args.steps, dtype, device, ps, peak) for p, o, b, s in cases]
    header = ("model", "params", "batch", "ours tok/s", "HF loop tok/s", "ours/HF", "TFLOP/s", "MFU")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths)] + rows:
        print(" | ".join(str(c).rjust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
