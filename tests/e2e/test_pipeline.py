"""pretrain_gpt.py with pipeline parallelism under real mpirun (gloo, fp32, dropout 0): the losses of
10 iterations at TP2·PP2 (with sequence parallelism), TP1·PP2·DP2 (ZeRO-1) and TP1·PP2 equal one
process's to 1e-6 relative; the TP1·PP2·DP2 state resumed at TP1·PP4·DP1 (universal checkpoint)
continues its losses; SIGTERM + relaunch equals the straight PP2 run bit for bit; SFT data at
TP1·PP2 under torchrun equals one process; checkpoints of a PP run load at TP1
(logits), and --finetune moves weights between TP1·PP1 and TP1·PP4 / TP2·PP2 layouts; bad input
stops with one line and exit 2. Model: 4 layers, alternating block-sparse / dense attention."""
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, clean_env, losses, mpirun, pretrain

pytestmark = [pytest.mark.mpirun, pytest.mark.slow]

SPARSE = {"mode": "fixed", "block": 8, "different_layout_per_head": True, "num_local_blocks": 2,
          "num_global_blocks": 1, "attention": "unidirectional",
          "num_different_global_patterns": 2}
COMMON = ["--num-layers", "4", "--hidden-dropout", "0", "--attention-dropout", "0",
          "--micro-batch-size", "2", "--global-batch-size", "8"]


def _config(tmp: Path, stage: int) -> str:
    path = tmp / f"ds_zero{stage}.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}, "sparse_attention": SPARSE}))
    return str(path)


def _run(tmp, name, *extra, np_=1, iters=10, check=True):
    return pretrain(tmp, name, *COMMON, "--sparse-mode", "alternating",
                    "--deepspeed_config", _config(tmp, 0), "--train-iters",
                    str(iters), *extra, np_=np_, check=check, timeout=600)


def _close(a, b, tol):
    assert len(a) == len(b) and a, (a, b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= tol * abs(y), f"iteration {i + 1}: {x} vs {y} (rel {abs(x - y) / abs(y):.2e})"


def test_pipeline_losses_checkpoints_and_resume(tmp_path):
    t = tmp_path
    _, ref = _run(t, "ref", "--save", str(t / "A"), "--save-interval", "10")
    proc, tp2pp2 = _run(t, "tp2pp2", "--tensor-model-parallel-size", "2",
                        "--pipeline-model-parallel-size", "2", "--checkpoint-activations",
                        "--sequence-parallel",  # stages pass sequence shards
                        "--save", str(t / "B"), "--save-interval", "10", np_=4)
    assert "rank layout: world 4 = TP 2 x DP 1 x PP 2" in proc.stdout, proc.stdout[-2000:]
    _close(losses(tp2pp2), losses(ref), 1e-6)
    _, dp2 = _run(t, "dp2", "--pipeline-model-parallel-size", "2", "--deepspeed_config",
                  _config(t, 1), "--save", str(t / "C"), "--save-interval", "5", np_=4)
    _close(losses(dp2), losses(ref), 1e-6)
    # its iteration-5 state (ZeRO-1) resumed at TP1·PP4·DP1: via DeepSpeed's universal checkpoint
    (t / "D").mkdir()
    for name in ("config.json", "tokenizer", "iter_0000005"):
        (shutil.copytree if (t / "C" / name).is_dir() else shutil.copy)(t / "C" / name, t / "D" / name)
    (t / "D" / "latest").write_text("iter_0000005\n")
    proc, pp4dp1 = _run(t, "pp4dp1", "--pipeline-model-parallel-size", "4", "--deepspeed_config",
                        _config(t, 1), "--load", str(t / "D"), np_=4)
    assert "converting it to a DeepSpeed universal checkpoint" in proc.stdout, proc.stdout[-2000:]
    print("PP2·DP2 iterations 6-10 vs resumed at PP4·DP1:", losses(dp2)[5:], losses(pp4dp1))
    _close(losses(pp4dp1), losses(dp2)[5:], 1e-6)
    _, pp2 = _run(t, "pp2", "--pipeline-model-parallel-size", "2", "--pipeline-split", "balanced",
                  np_=2)
    _close(losses(pp2), losses(ref), 1e-6)

    # the TP2·PP2 checkpoint read at TP1 gives the logits of the same weights at TP1: those
    # merged here straight from DeepSpeed's layer files (and close to the TP1 run's own weights)
    meta = json.loads((t / "B" / "config.json").read_text())
    assert (meta["tensor_model_parallel_size"], meta["pipeline_model_parallel_size"]) == (2, 2)
    from megatron_ru.checkpoint.load import load_model, read_config
    from megatron_ru.checkpoint.model_io import merge_shards, model_from_state
    config, _ = read_config(t / "B")
    shards = [{}, {}]
    for f in sorted((t / "B" / "iter_0000010").glob("layer_*-model_*-model_states.pt")):
        layer, rank = int(f.name[6:8]), int(f.name.split("-model_")[1][:2])
        for k, v in torch.load(f, weights_only=True).items():
            name = f"blocks.{layer - 1}.{k[6:]}" if 1 <= layer <= 4 else k
            shards[rank].setdefault(name, v)
    same = model_from_state(config, merge_shards(config, shards, "test")).eval()
    tokens = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lb, ls = load_model(t / "B").eval()(tokens), same(tokens)
        la = load_model(t / "A").eval()(tokens)
    assert ((lb - ls).abs().max() / ls.abs().max()).item() <= 1e-5
    assert ((la - lb).abs().max() / la.abs().max()).item() <= 1e-3  # trained apart: Adam noise

    # --finetune across layouts: TP1·PP1 -> TP1·PP4 and TP2·PP2 -> TP1·PP1 (weights equal to 1e-6)
    _, pp4 = _run(t, "pp4", "--pipeline-model-parallel-size", "4", "--finetune", "--load",
                  str(t / "A"), iters=3, np_=4)
    _, back = _run(t, "back", "--finetune", "--load", str(t / "B"), iters=3)
    _close(losses(pp4), losses(back), 1e-5)


def test_pipeline_sft_under_torchrun_equals_one_process(tmp_path):
    """SFT data (loss masks; micro-batches with different target-token counts, weighted to the
    global token mean) at TP1·PP2 under torchrun: the losses of 3 iterations and the validation
    loss equal one process's to 1e-6 relative."""
    from tests.helpers import TOKENIZER
    from tools import preprocess_data
    t = tmp_path
    assert preprocess_data.main([
        "--input", str(ROOT / "examples" / "data" / "ru_sft.jsonl"), "--output-prefix", str(t / "sft"),
        "--dataset-type", "sft", "--chat-template", "rugpt3", "--tokenizer-type", "GPT2BPETokenizer",
        "--vocab-file", str(TOKENIZER / "vocab.json"), "--merge-file", str(TOKENIZER / "merges.txt")]) == 0
    sft = ["--dataset-type", "sft", "--data-path", str(t / "sft"), "--split", "90,10,0",
           "--eval-interval", "3", "--eval-iters", "1"]
    _, ref = _run(t, "sft_ref", *sft, iters=3)
    torchrun = Path(sys.executable).parent / "torchrun"
    metrics = t / "sft_pp2.jsonl"
    from tests.helpers import BASE, DATA
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "pretrain_gpt.py", *BASE, *DATA,
           *COMMON, "--sparse-mode", "alternating", "--deepspeed_config", _config(t, 0),
           "--train-iters", "3", "--data-cache-path", str(t / "cache"), "--metrics-file", str(metrics),
           "--pipeline-model-parallel-size", "2", *sft]
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "rank layout: world 2 = TP 1 x DP 1 x PP 2" in proc.stdout, proc.stdout[-2000:]
    rows = [json.loads(l) for l in metrics.read_text().splitlines()]
    print("SFT losses PP2 (torchrun) vs PP1:", losses(rows), losses(ref))
    _close(losses(rows), losses(ref), 1e-6)
    val, val_ref = ([r["val_loss"] for r in x if "val_loss" in r] for x in (rows, ref))
    _close(val, val_ref, 1e-6)


def _wait_for(metrics: Path, proc, iteration: int):
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if metrics.exists() and any(json.loads(l).get("iteration", 0) >= iteration
                                    for l in metrics.read_text().splitlines() if l.strip()):
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.1)
    pytest.fail("no progress")


def test_pipeline_sigterm_resumes_bit_exactly(tmp_path):
    t = tmp_path
    flags = ["--pipeline-model-parallel-size", "2", "--exit-interval", "10"]
    _, straight = _run(t, "straight", *flags, iters=40, np_=2)
    save = t / "run"
    save.mkdir()
    metrics = save / "metrics.jsonl"
    from tests.helpers import BASE, DATA
    cmd = [mpirun(), "--np", "2", sys.executable, "pretrain_gpt.py", *BASE, *DATA, *COMMON,
           "--sparse-mode", "alternating",
           "--deepspeed_config", _config(t, 0), "--train-iters", "40", "--data-cache-path",
           str(t / "cache"), "--metrics-file", str(metrics), "--save", str(save), *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(metrics, proc, 2)
    proc.send_signal(signal.SIGTERM)  # mpirun forwards it to both stages
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    stopped = [line for line in out.splitlines() if "stopped at iteration" in line]
    assert len(stopped) == 1 and "by SIGTERM" in stopped[0], out[-2000:]
    at = int(stopped[0].split("stopped at iteration ")[1].split("/")[0])
    assert (save / "latest").read_text().strip() == f"iter_{at:07d}" and at < 10
    resumed = subprocess.run(cmd[:cmd.index("--save")] + ["--load", str(save), "--save", str(save),
                                                         *flags], cwd=ROOT, env=clean_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = [json.loads(l) for l in metrics.read_text().splitlines() if '"loss"' in l]
    assert [r["iteration"] for r in rows] == list(range(1, 11))
    assert [r["loss"] for r in rows] == losses(straight)  # bit for bit


@pytest.mark.parametrize("extra, np_, message", [
    (["--pipeline-model-parallel-size", "2"], 1,
     "world size 1 is not divisible by --tensor-model-parallel-size x --pipeline-model-parallel-size"),
    (["--pipeline-model-parallel-size", "2", "--global-batch-size", "2"], 2,
     "micro-batches per step = global batch 2 / (micro batch 2 x data-parallel size 1) = 1 is "
     "smaller than --pipeline-model-parallel-size=2"),
])
def test_pipeline_bad_input_one_line(tmp_path, extra, np_, message):
    proc, _ = pretrain(tmp_path, "bad", *COMMON, "--train-iters", "2", *extra, np_=np_, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if "error" in l]
    assert lines and all(message in l for l in lines), proc.stderr[-2000:]
    assert not list((tmp_path / "bad").glob("iter_*"))


def test_one_failing_stage_ends_the_job(tmp_path):
    """Rank 3 (last stage) raises at iteration 2 of a TP1·PP2·DP2 run: every rank ends within
    seconds, with one line from the failing rank."""
    from tests.helpers import BASE, DATA
    cmd = [mpirun(), "--np", "4", sys.executable, "pretrain_gpt.py", *BASE, *DATA, *COMMON,
           "--train-iters", "20", "--data-cache-path", str(tmp_path / "cache"),
           "--pipeline-model-parallel-size", "2"]
    env = {**clean_env(), "MEGATRON_RU_FAULT": "step@3:2", "MEGATRON_RU_LOG_DIR": str(tmp_path)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    lines = [l for l in err.splitlines() if ": error" in l]
    assert len(lines) == 1 and lines[0].startswith(
        "pretrain_gpt.py: error on rank 3: InjectedFault: injected fault at step (iteration 2)"), err[-2000:]
    assert "Traceback" not in err
    # the other ranks were waiting in the pipeline's sends / receives: they end with the job
    assert "iter      1/20" in out, out[-2000:]


@pytest.mark.parametrize("precision", [[], ["--fp16"]], ids=["fp32", "fp16"])
def test_pipeline_nonfinite_step_is_skipped(tmp_path, precision):
    """An inf loss on the last stage: fp32 (the guards' skip, agreed by all stages) and fp16
    (loss scaling) both skip that step on every stage and go on."""
    proc, rows = pretrain(tmp_path, "inf", *COMMON, "--train-iters", "3", "--pipeline-model-parallel-size",
                          "2", "--debug-inject-overflow-iters", "2", *precision, np_=2)
    assert "iteration 2: step skipped" in proc.stdout, proc.stdout[-2000:]
    rows = [r for r in rows if "skipped_iters" in r]
    skipped = [r["skipped_iters"] for r in rows]
    assert skipped == [0, 1, 0] and rows[-1]["loss"] == rows[-1]["loss"], rows
