"""Shared test helpers: relative-error checks, N gloo ranks, mpirun and CLI launchers, pretraining runs, small models.

Test modules import from here (or from the other helper modules: evalkit, fast_decoding,
serve_helpers, mcore_fixtures), never from another test_* module.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "examples" / "data" / "tokenizer"  # the demo GPT-2 BPE (vocab.json, merges.txt)
VOCAB = 1815  # its vocabulary size
TOKENIZER_FLAGS = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(TOKENIZER / "vocab.json"),
                   "--merge-file", str(TOKENIZER / "merges.txt")]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| (inf-norm relative error; a whole-tensor measure, so tiny entries
    of a gradient do not need an absolute tolerance)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_rel_close(actual, expected, tol: float = 1e-5, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        fn(rank, world, *args)
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args) -> None:
    """Run fn(rank, world, *args) in `world` spawned processes with RANK/WORLD_SIZE set (the
    torchrun convention); a failure in any rank fails the caller with that rank's traceback."""
    mp.spawn(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True)


# ---- processes: mpirun, tools/ scripts, entry points ------------------------------------------
def mpirun() -> str:
    local = Path(sys.executable).parent / "mpirun"
    found = str(local) if local.exists() else shutil.which("mpirun")
    if not found:
        pytest.fail("mpirun not found: install the `mpich` wheel (pip install mpich) into this venv")
    return found


def clean_env() -> dict:
    """This environment without any launcher's rank variables, for a child job of its own."""
    drop = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("PMI_", "OMPI_", "SLURM_"))}
    env["PYTHONPATH"] = str(ROOT)
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_mpirun(np_: int, *args, timeout=240):
    """`mpirun --np N python ARGS...` in the repository root; the CompletedProcess (text)."""
    cmd = [mpirun(), "--np", str(np_), sys.executable, *args]
    return subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=timeout)


def load_tool(name: str):
    """tools/NAME.py imported as module NAME (registered: pool workers pickle its functions by name)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def generate_main(argv) -> int:
    """generate.py in process (the runtime wrapper included); returns the exit status."""
    from megatron_ru import runtime
    from megatron_ru.inference import runner
    return runtime.run(runner.main, "generate.py", argv)


# ---- pretrain_gpt.py runs on the bundled corpus -----------------------------------------------
DATA = ["--data-path", "examples/data/ru_demo_text_document",
        "--vocab-file", "examples/data/tokenizer/vocab.json",
        "--merge-file", "examples/data/tokenizer/merges.txt"]
BASE = ["--preset", "tiny-gpt3", "--seq-length", "64", "--lr", "3e-3", "--lr-warmup-iters", "2",
        "--lr-decay-iters", "6", "--log-interval", "1", "--eval-interval", "1000",
        "--eval-iters", "0", "--seed", "7"]


def pretrain(tmp: Path, name: str, *extra, np_=1, check=True, timeout=300):
    """Run pretrain_gpt.py (under mpirun when np_ > 1); returns (proc, metric records)."""
    out = tmp / name
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    args = ["pretrain_gpt.py", *BASE, *DATA, "--data-cache-path", str(tmp / "cache"),
            "--metrics-file", str(metrics), *extra]
    cmd = [mpirun(), "--np", str(np_), sys.executable, *args] if np_ > 1 else [sys.executable, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(l) for l in metrics.read_text().splitlines()] if metrics.exists() else []
    return proc, records


def losses(records):
    return [r["loss"] for r in records if "loss" in r]


def assert_losses_close(a, b, tol=1e-5):
    assert len(a) == len(b) and a, (a, b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= tol * abs(y), f"iteration {i + 1}: {x} vs {y}"


# ---- tokenizers and small models -------------------------------------------------------------
def demo_bpe():
    """The demo GPT-2 BPE tokenizer."""
    from megatron_ru.data.tokenizers import build_tokenizer
    return build_tokenizer("GPT2BPETokenizer", vocab_file=str(TOKENIZER / "vocab.json"),
                           merge_file=str(TOKENIZER / "merges.txt"))


LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>"]


def llama_tokenizer_dir(d: Path) -> Path:
    """A tiny byte-level BPE tokenizer.json with the Llama-3 chat special tokens, written to `d`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=LLAMA_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with open(ROOT / "examples" / "data" / "ru_demo.txt", encoding="utf-8") as f:
        tok.train_from_iterator(f.read().split("\n"), trainer)
    tok.save(str(Path(d) / "tokenizer.json"))
    return Path(d)


SPARSE = dict(mode="fixed", block=4, num_local_blocks=2, num_global_blocks=1,
              attention="unidirectional", different_layout_per_head=True,
              num_different_global_patterns=2)
SMALL_MODELS = {  # tiny models of each family, dense and block-sparse (generator and scheduler tests)
    "gpt3": dict(preset="tiny-gpt3"),
    "llama": dict(preset="tiny-llama"),
    "gpt3_sparse": dict(preset="tiny-gpt3", sparse_attention=SPARSE, sparse_mode="alternating"),
    "llama_sparse": dict(preset="tiny-llama", sparse_attention=SPARSE, sparse_mode="all"),
}


def make_model(name, **extra):
    """SMALL_MODELS[name] at 64 positions, seeded, in eval mode."""
    from megatron_ru import GPTModel, ModelConfig
    kwargs = dict(SMALL_MODELS[name])
    cfg = ModelConfig.from_preset(kwargs.pop("preset"), init_method_std=0.1,
                                  max_position_embeddings=64, **kwargs, **extra)
    return GPTModel(cfg, seed=11).eval()


# ---- untrusted checkpoints ---------------------------------------------------------------------
REFUSED = "refusing to unpickle posix.system (not a checkpoint type); pass --trust-checkpoint"


class Payload:
    """Runs `touch MARKER` when unpickled by anything that resolves os.system."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def tiny_hf_export(root: Path) -> Path:
    """A tiny-llama (vocabulary 100, 64 positions) saved as ours in ROOT/ours and exported to ROOT/hf."""
    from megatron_ru import GPTModel, ModelConfig
    from megatron_ru.checkpoint.convert import convert
    from megatron_ru.checkpoint.model_io import save_model
    cfg = ModelConfig.from_preset("tiny-llama", vocab_size=100, max_position_embeddings=64)
    save_model(root / "ours", GPTModel(cfg, seed=1))
    convert(root / "ours", root / "hf", "hf", quiet=True)
    return root / "hf"

