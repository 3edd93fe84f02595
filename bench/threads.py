"""Benchmark: decode tokens/s of one sampler process, idle and next to busy CPU burners, by thread setting.

    python bench/threads.py [--burners 2] [--new-tokens 64] [--preset tiny-gpt3]

Rows: `torch default` (no OMP_NUM_THREADS, no set_num_threads: what the tools did before they chose
their threads), `ours` (megatron_ru/threads.py's default for a single process, as every entry point now
applies it) and `1 thread`; columns: idle and with N background burners (pure-Python busy loops,
one process each). Each cell runs the decode in a fresh process (greedy, batch 1, 16-token prompt,
no early stop) and reports the median of 3 tokens/s.
"""
import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, os, sys, time, torch
sys.path.insert(0, {root!r})
from megatron_ru import GPTModel, ModelConfig, threads
from megatron_ru.inference import Generator
mode = {mode!r}
if mode == "ours":
    threads.apply([], stream=open(os.devnull, "w"))
elif mode == "one":
    torch.set_num_threads(1)
cfg = ModelConfig.from_preset({preset!r})
model = GPTModel(cfg, seed=1).eval()
gen = Generator(model, max_length=16 + {new})
prompt = [list(range(5, 21))]
gen.generate(prompt, max_new_tokens=4)
rates = []
for _ in range(3):
    t = time.perf_counter()
    gen.generate(prompt, max_new_tokens={new}, min_new_tokens={new})
    rates.append({new} / (time.perf_counter() - t))
print(json.dumps({{"threads": torch.get_num_threads(), "rates": rates}}))
"""


def burn():
    while True:
        pass


def measure(mode: str, preset: str, new: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    code = CHILD.format(root=str(ROOT), mode=mode, preset=preset, new=new)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"threads": r["threads"], "tok_s": statistics.median(r["rates"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--burners", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--preset", default="tiny-gpt3")
    args = ap.parse_args()
    modes = [("torch default", "default"), ("ours", "ours"), ("1 thread", "one")]
    table = {name: {"idle": measure(mode, args.preset, args.new_tokens)} for name, mode in modes}
    procs = [mp.Process(target=burn, daemon=True) for _ in range(args.burners)]
    for p in procs:
        p.start()
    try:
        time.sleep(1.0)
        for name, mode in modes:
            table[name]["busy"] = measure(mode, args.preset, args.new_tokens)
    finally:
        for p in procs:
            p.terminate()
    print(f"machine: {os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable; load before: "
          f"{os.getloadavg()[0]:.1f}; preset {args.preset}, {args.new_tokens} new tokens, batch 1")
    print(f"{'setting':<14} {'threads':>7} {'idle tok/s':>11} {'+' + str(args.burners) + ' burners tok/s':>18} {'busy/idle':>9}")
    for name, row in table.items():
        idle, busy = row["idle"]["tok_s"], row["busy"]["tok_s"]
        print(f"{name:<14} {row['busy']['threads']:>7} {idle:>11.1f} {busy:>18.1f} {busy / idle:>9.2f}")


if __name__ == "__main__":
    main()
