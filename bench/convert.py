"""Benchmark: checkpoint conversion time and peak resident memory against checkpoint file sizes.

    python bench/convert.py [--preset rugpt3-xl] [--dtype fp16] [--workdir /tmp/bench_convert]
    python bench/convert.py --preset tiny-gpt3 --quick        # seconds, for CI

Writes a random checkpoint of the preset in our format (TP=1), then runs each conversion as a
fresh `tools/convert_checkpoint.py` process and reads its peak RSS from the kernel (wait4
ru_maxrss: anonymous memory plus the file pages it touched through memory maps). The goal column
is peak RSS / (largest input file + largest output file) ≤ 1.3.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STEPS = [  # (name, source, destination, extra flags)
    ("ours TP1 → HF", "ours_tp1", "hf", ["--to", "hf"]),
    ("HF → ours TP2", "hf", "ours_tp2", ["--to", "megatron_ru", "--target-tensor-parallel-size", "2"]),
    ("ours TP2 → ours TP1", "ours_tp2", "ours_back", ["--to", "megatron_ru"]),
    ("ours TP2 → HF", "ours_tp2", "hf2", ["--to", "hf"]),
]


def write_random_checkpoint(directory: Path, preset: str, dtype_name: str) -> None:
    """Our TP=1 layout with random weights (run in a child process: the measuring parent stays
    small, since a child's ru_maxrss starts from its parent's RSS at fork)."""
    import torch

    from megatron_ru import GPTModel, ModelConfig
    from megatron_ru.checkpoint.model_io import write_config

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    config = ModelConfig.from_preset(preset)
    with torch.device("meta"):
        model = GPTModel(config, initialize=False)
    gen = torch.Generator().manual_seed(0)
    state = {n: (torch.randn(p.shape, generator=gen) * 0.02).to(dtype) for n, p in model.named_parameters()}
    (directory / "release").mkdir(parents=True)
    torch.save({"module": state, "mp_world_size": 1}, directory / "release" / "mp_rank_00_model_states.pt")
    del state
    write_config(directory, config, 1)
    (directory / "latest").write_text("release\n")
    print(f"{preset}: {config.num_parameters() / 1e9:.2f} B parameters, {dtype_name}")


def largest_file(directory: Path) -> int:
    return max(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def run_step(src: Path, dst: Path, flags: list) -> tuple[float, int, str]:
    """(seconds, peak RSS bytes, stderr tail) of one conversion in a fresh process."""
    cmd = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "--load", str(src), "--save",
           str(dst), "--quiet", *flags]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    err = proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    return elapsed, usage.ru_maxrss * 1024, err[-300:]


def python_baseline() -> int:
    """Peak RSS of a process that only imports what the converter imports (subtracted)."""
    code = "import megatron_ru.checkpoint.convert, torch"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    _, _, usage = os.wait4(proc.pid, 0)
    return usage.ru_maxrss * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="rugpt3-xl")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    p.add_argument("--workdir", default="/tmp/bench_convert")
    p.add_argument("--quick", action="store_true", help="tiny model (a smoke run)")
    p.add_argument("--make-source", help=argparse.SUPPRESS)  # child mode: write the source only
    args = p.parse_args()
    preset = "tiny-gpt3" if args.quick else args.preset
    if args.make_source:
        return write_random_checkpoint(Path(args.make_source), preset, args.dtype)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--make-source", str(work / "ours_tp1"), "--preset", preset,
                    "--dtype", args.dtype], check=True)
    print(f"source written in {time.perf_counter() - t0:.0f} s", flush=True)
    base = python_baseline()
    print(f"baseline RSS of the imports: {base / 2**30:.2f} GiB (included below)\n")
    print("| conversion | time s | GB/s | peak RSS GiB | largest in GiB | largest out GiB | "
          "RSS / (in + out) | same − imports | goal ≤ 1.3 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, src, dst, flags in STEPS:
        seconds, rss, _ = run_step(work / src, work / dst, flags)
        size_in, size_out = largest_file(work / src), largest_file(work / dst)
        total_in = sum(f.stat().st_size for f in (work / src).rglob("*") if f.is_file())
        ratio, net = rss / (size_in + size_out), (rss - base) / (size_in + size_out)
        print(f"| {name} | {seconds:.1f} | {total_in / seconds / 1e9:.2f} | {rss / 2**30:.2f} | "
              f"{size_in / 2**30:.2f} | {size_out / 2**30:.2f} | {ratio:.2f} | {net:.2f} | "
              f"{'yes' if ratio <= 1.3 else 'NO'} |", flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
