"""The shell recipes in examples/ are valid bash and pass only flags pretrain_gpt.py accepts."""
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from megatron_ru.training.arguments import parse_pretrain_args

ROOT = Path(__file__).resolve().parents[2]
ENV = {"DATA": "d/ru", "VOCAB": "v.json", "MERGES": "m.txt", "BASE": "ckpt", "RU": "d/ru",
       "EN": "d/en", "TOKENIZER": "tok.json", "HOSTFILE": "hosts"}


@pytest.mark.parametrize("script", ["pretrain_13b.sh", "pretrain_tlite.sh", "pretrain_tiny.sh"])
def test_recipe_flags_parse(script, tmp_path):
    env = {**os.environ, **ENV, "MPIRUN": "echo", "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", str(ROOT / "examples" / script)], env=env, capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    words = shlex.split(proc.stdout)
    args = parse_pretrain_args(words[words.index("pretrain_gpt.py") + 1:])
    assert args.train_iters > 0 and args.deepspeed_config
    if script == "pretrain_13b.sh":
        assert args.preset == "rugpt3-13b" and args.fp16 and args.model_overrides["sparse_mode"] == "alternating"
        assert args.model_overrides["sequence_parallel"]  # default at TP > 1; SP=0 turns it off
        off = subprocess.run(["bash", str(ROOT / "examples" / script)], env={**env, "SP": "0"},
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert off.returncode == 0 and "--sequence-parallel" not in off.stdout, off.stderr
    if script == "pretrain_tlite.sh":
        assert args.bf16 and args.adam_beta2 == 0.95 and args.lr_warmup_iters == 10
        assert args.lr_decay_style == "constant" and args.data_path == ["0.85", "d/ru", "0.15", "d/en"]


@pytest.mark.parametrize("script", ["finetune_sft.sh", "finetune_tlite_sft.sh"])
def test_finetune_recipes_are_valid_bash(script):
    """The fine-tuning recipes run real steps (preprocess, sample, convert), so CI checks their
    syntax here; tests/e2e/test_finetune.py runs the same pipeline at toy size."""
    proc = subprocess.run(["bash", "-n", str(ROOT / "examples" / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_tlite_recipe_hpz_writes_its_config(tmp_path):
    """HPZ=4: the shipped hpZ JSON with that partition size, written under SAVE; batch sizes from
    DP = NP / (TP x PP x CP)."""
    import json
    env = {**os.environ, **ENV, "MPIRUN": "echo", "NP": "16", "TP": "2", "HPZ": "4",
           "SAVE": str(tmp_path / "run")}
    proc = subprocess.run(["bash", str(ROOT / "examples" / "pretrain_tlite.sh")], env=env,
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    words = shlex.split(proc.stdout)
    args = parse_pretrain_args(words[words.index("pretrain_gpt.py") + 1:])
    assert args.deepspeed_config == str(tmp_path / "run" / "ds_zero3_hpz4.json")
    data = json.loads(Path(args.deepspeed_config).read_text())
    shipped = json.loads((ROOT / "configs" / "ds_zero3_hpz.json").read_text())
    shipped["zero_optimization"]["zero_hpz_partition_size"] = 4
    assert data == shipped
    assert (args.micro_batch_size, args.global_batch_size) == (1, 64)  # 1 x 8 x DP 8
