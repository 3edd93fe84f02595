"""Benchmark: LoRA vs full fine-tuning (ours, DeepSpeed engine, TP=1) against `peft` + `transformers`
with the same rank, targets, batch and optimizer; and packed vs padded SFT rows.

    python bench/finetune.py                        # CPU: rugpt3-small (~125M), seq 256, batch 4
    python bench/finetune.py --preset tiny-gpt3 --steps 5

Each case runs in its own process (peak memory = that process's max RSS; on CUDA the allocator's
peak), so cases do not share allocations. Columns: trainable parameters, optimizer-state bytes
(Adam: two fp32 moments per trainable parameter, counted from the optimizer's state), peak
memory, tokens/s (median step). The second table trains the same length-skewed conversations
(most short, a few long) one per row (`pad`) and packed into full rows (`packed`): tokens/s counts
real (non-padding) tokens.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_ru import GPTModel, ModelConfig, ParallelState  # noqa: E402
from megatron_ru.training.optim import param_groups  # noqa: E402

CASES = ("ours-full", "ours-lora", "peft-lora")
HF_TARGETS = ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]


def peak_bytes(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def opt_state_bytes(optimizer):
    opt = getattr(optimizer, "optimizer", optimizer)
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def run_case(case, args):
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ModelConfig.from_preset(args.preset, max_position_embeddings=max(args.seq, 256))
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    if case == "peft-lora":
        from peft import LoraConfig, get_peft_model
        from bench.model_step import hf_model
        model = get_peft_model(hf_model(cfg).to(device), LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=HF_TARGETS,
            fan_in_fan_out=True, task_type="CAUSAL_LM"))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        import deepspeed
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        ps = ParallelState.from_environment(tensor_model_parallel_size=1)  # DeepSpeed needs a group
        model = GPTModel(cfg, ps, seed=1, device=device)
        if case == "ours-lora":
            from megatron_ru.model.lora import apply_lora
            apply_lora(model, rank=args.rank, alpha=2.0 * args.rank, targets="qkv,proj,fc1,fc2")
        opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-4)
        ds = {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
              "train_batch_size": args.batch, "steps_per_print": 10**9, "zero_optimization": {"stage": 0}}
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds, mpu=ps)

        def step():
            engine.backward(engine(tokens[:, :-1], labels=tokens[:, 1:]))
            engine.step()
    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step allocates optimizer state
            times.append(time.perf_counter() - t0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"case": case, "trainable": trainable, "opt_bytes": opt_state_bytes(opt),
            "peak_bytes": peak_bytes(device), "tok_s": args.batch * args.seq / statistics.median(times)}


def run_packing(args):
    """Tokens/s of pad vs packed rows over the same skewed conversations (ours, full FT)."""
    from megatron_ru.data.sft_examples import pack_rows, sft_batch
    import numpy as np
    rng = np.random.RandomState(0)
    cfg = ModelConfig.from_preset(args.preset, max_position_embeddings=max(args.seq, 256))
    lengths = np.where(rng.rand(64) < 0.85, rng.randint(16, 48, 64), rng.randint(args.seq // 2, args.seq + 1, 64))
    model = GPTModel(cfg, ParallelState.single(), seed=1)
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-4)
    out = []
    for packing in ("pad", "packed"):
        rows = pack_rows(lengths, np.arange(len(lengths)), args.seq + 1, packing)
        batches = []
        for start in range(0, len(rows), args.batch):
            group = rows[start:start + args.batch]
            text = np.zeros((len(group), args.seq + 1), np.int64)
            seg = np.full_like(text, -1)
            for r, docs in enumerate(group):
                pos = 0
                for k, d in enumerate(docs):
                    text[r, pos:pos + lengths[d]] = rng.randint(1, cfg.vocab_size, lengths[d])
                    seg[r, pos:pos + lengths[d]] = k
                    pos += lengths[d]
            batches.append(sft_batch({"text": text, "loss_mask": (seg >= 0).astype(np.int64), "segment": seg},
                                     packed=packing == "packed"))
        t0 = time.perf_counter()
        for b in batches:
            loss = model(b["tokens"], positions=b["position_ids"], labels=b["labels"], loss_mask=b["loss_mask"],
                         attention_mask=b["attention_mask"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        out.append({"packing": packing, "rows": len(rows),
                    "tok_s": int(lengths.sum()) / (time.perf_counter() - t0)})
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="rugpt3-small")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--case", choices=CASES + ("packing",), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        result = run_packing(args) if args.case == "packing" else run_case(args.case, args)
        print("RESULT " + json.dumps(result))
        return
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    results = {}
    for case in CASES + ("packing",):
        cmd = [sys.executable, __file__, "--case", case] + [f"--{k}={v}" for k, v in
                                                           (("preset", args.preset), ("seq", args.seq), ("batch", args.batch),
                                                            ("rank", args.rank), ("steps", args.steps))]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"case {case} failed:\n{proc.stderr[-2000:]}")
        results[case] = json.loads(line[len("RESULT "):])
    ref = results["peft-lora"]
    print(f"{args.preset}, seq {args.seq}, batch {args.batch}, LoRA rank {args.rank} on qkv/proj/fc1/fc2, "
          f"{args.steps} timed steps")
    print("| case | trainable params | optimizer state | peak memory | tokens/s | vs peft tokens/s | vs peft memory |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for case in CASES:
        r = results[case]
        print(f"| {case} | {r['trainable']:,} | {r['opt_bytes'] / 2**20:.1f} MiB | {r['peak_bytes'] / 2**30:.2f} GiB | "
              f"{r['tok_s']:,.0f} | {r['tok_s'] / ref['tok_s']:.2f}x | {r['peak_bytes'] / ref['peak_bytes']:.2f}x |")
    pad, packed = results["packing"]
    print(f"\nSFT rows on 64 length-skewed conversations (full FT): pad {pad['rows']} rows "
          f"{pad['tok_s']:,.0f} real tok/s; packed {packed['rows']} rows {packed['tok_s']:,.0f} real tok/s "
          f"({packed['tok_s'] / pad['tok_s']:.2f}x)")


if __name__ == "__main__":
    main()
