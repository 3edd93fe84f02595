"""tools/plan.py: bad input is one line and exit 2; the layout it picks for a tiny model on 2 CPU ranks runs within its memory prediction."""
import re
import subprocess
import sys

import pytest

from megatron_ru import ModelConfig
from megatron_ru.errors import UsageError
from megatron_ru.planning import cli
from megatron_ru.planning.accelerators import Accelerator
from megatron_ru.planning.search import plan
from tests.helpers import ROOT, clean_env, pretrain


@pytest.mark.parametrize("argv, words", [
    (["--preset", "tiny-gpt3", "--gpus", "2", "--gpu", "tpu-v9", "--global-batch-size", "8"], "--gpu 'tpu-v9' is unknown"),
    (["--preset", "rugpt3-13b", "--gpus", "1", "--gpu", "l40s", "--global-batch-size", "8"], "no layout of 1 x l40s fits"),
    (["--preset", "tiny-gpt3", "--gpus", "3", "--gpus-per-node", "3", "--global-batch-size", "4"], "no layout divides 3 GPUs"),
])
def test_bad_input_is_a_usage_error(argv, words):
    with pytest.raises(UsageError, match=re.escape(words)):
        cli.main(argv)


def test_bad_input_one_line_exit_2():
    proc = subprocess.run([sys.executable, "tools/plan.py", "--preset", "tiny-gpt3", "--gpus", "2",
                           "--gpu", "tpu-v9", "--global-batch-size", "8"], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "tpu-v9" in proc.stderr, proc.stderr


def test_table_and_command_line(capsys):
    assert cli.main(["--preset", "rugpt3-xl", "--gpus", "8", "--gpu", "a100-40gb", "--seq-length", "2048",
                     "--global-batch-size", "64", "--micro-batch-size", "1", "--gpu-mem-gb", "24"]) == 0
    out = capsys.readouterr().out
    assert "tok/s/GPU" in out and "mpirun -np 8 python pretrain_gpt.py --preset rugpt3-xl" in out
    assert "do not fit" in out  # TP1 ZeRO 0: 1.3B x 16 bytes = 21 GB + activations > 24 GB


@pytest.mark.slow
@pytest.mark.mpirun
def test_chosen_layout_runs_within_its_prediction(tmp_path):
    """2 CPU 'GPUs' of a few MB: the planner's fastest fitting layout (of what pretrain_gpt.py runs
    here) trains, and the memory it measures stays within the prediction."""
    cfg = ModelConfig.from_preset("tiny-gpt3", vocab_size=50257)  # the demo tokenizer's vocabulary
    cpu = Accelerator("cpu-test", tflops=0.05, mem_gb=0.0, hbm_gbps=10.0, intra_gbps=1.0, inter_gbps=1.0)
    kw = dict(gpus=2, gpus_per_node=2, seq_length=64, global_batch=8, precision="fp32",
              implemented={"tp", "zero", "recompute"}, device="cpu", reserve=0.0, micro_batches=[2, 4])
    everything, _ = plan(cfg, Accelerator(**{**vars(cpu), "mem_gb": 1.0}), **kw)
    largest = max(r.memory["total"] for r in everything)
    smallest = min(r.memory["total"] for r in everything)
    limit = (largest + smallest) / 2 / 1e9  # some layouts fit, some do not
    fits, rejected = plan(cfg, Accelerator(**{**vars(cpu), "mem_gb": limit}), **kw)
    assert fits and rejected
    best = fits[0].layout
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": %d}}' % best.zero)
    extra = ["--tensor-model-parallel-size", str(best.tp), "--micro-batch-size", str(best.micro_batch),
             "--global-batch-size", "8", "--train-iters", "1", "--deepspeed_config", str(ds)]
    if best.recompute == "full":
        extra.append("--checkpoint-activations")
    proc, records = pretrain(tmp_path, "run", *extra, np_=2)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("plan check"))
    measured = float(re.search(r"measured ([\d.]+) MB", line).group(1)) * 1e6
    assert measured <= fits[0].memory["total"], (line, fits[0].memory)
    assert measured <= limit * 1e9
    assert records and records[0]["iteration"] == 1
