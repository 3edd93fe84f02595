"""pretrain_gpt.py end to end on the bundled corpus: real DeepSpeed, real mpirun, real files.

Parity runs use fp32 with dropout off and compare the per-iteration losses of the metrics file.
"""
import json
import subprocess
import sys

import pytest

from megatron_ru.training.optim import LRSchedule

from tests.helpers import ROOT, assert_losses_close, clean_env, losses, mpirun, pretrain

pytestmark = pytest.mark.slow

@pytest.mark.mpirun
def test_tp2_equals_tp1(tmp_path):
    _, one = pretrain(tmp_path, "tp1", "--train-iters", "5", "--micro-batch-size", "4")
    _, two = pretrain(tmp_path, "tp2", "--train-iters", "5", "--micro-batch-size", "4",
                      "--tensor-model-parallel-size", "2", np_=2)
    assert_losses_close(losses(two), losses(one))
    assert losses(one)[-1] < losses(one)[0]
    # Megatron sequence parallelism: the same losses (fp32, dropout 0), ZeRO-2
    _, sp = pretrain(tmp_path, "tp2sp", "--train-iters", "5", "--micro-batch-size", "4",
                     "--tensor-model-parallel-size", "2", "--sequence-parallel",
                     "--deepspeed_config", "configs/ds_zero2.json", np_=2)
    assert_losses_close(losses(sp), losses(one), tol=1e-6)


@pytest.mark.mpirun
def test_zero2_dp2_equals_single_process(tmp_path):
    _, single = pretrain(tmp_path, "single", "--train-iters", "5", "--micro-batch-size", "8")
    _, dp = pretrain(tmp_path, "dp2", "--train-iters", "5", "--deepspeed",
                     "--deepspeed_config", "configs/ds_zero2.json", np_=2)
    assert_losses_close(losses(dp), losses(single))


@pytest.mark.mpirun
def test_resume_is_bit_exact(tmp_path):
    """Stop at iteration 3 (latest → iter 3), resume to 6: same losses as the uninterrupted run,
    with dropout on, so the RNG state has to come back too."""
    common = ["--train-iters", "6", "--micro-batch-size", "4", "--hidden-dropout", "0.1",
              "--attention-dropout", "0.1", "--save-interval", "3",
              "--deepspeed_config", "configs/ds_zero2.json"]
    _, full = pretrain(tmp_path, "full", *common, "--save", str(tmp_path / "ckpt"), np_=2)
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "iter_0000006"
    (ckpt / "latest").write_text("iter_0000003\n")  # as if the run had died after iteration 3
    proc, resumed = pretrain(tmp_path, "resumed", *common, "--load", str(ckpt),
                             "--save", str(tmp_path / "ckpt2"), np_=2)
    assert "resumed from" in proc.stdout and "at iteration 3" in proc.stdout
    assert [r["iteration"] for r in resumed] == [4, 5, 6]
    assert losses(resumed) == losses(full)[3:]  # bit-exact
    assert (tmp_path / "ckpt2" / "latest").read_text().strip() == "iter_0000006"


def test_fp16_overflow_is_skipped_and_recovers(tmp_path):
    cfg = tmp_path / "fp16.json"
    cfg.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2},
                               "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 12,
                                        "loss_scale_window": 1000, "hysteresis": 1,
                                        "min_loss_scale": 1}}))
    _, rec = pretrain(tmp_path, "fp16", "--train-iters", "6", "--deepspeed_config", str(cfg),
                      "--debug-inject-overflow-iters", "3")
    by_it = {r["iteration"]: r for r in rec}
    assert by_it[3]["skipped_iters"] == 1 and by_it[6]["total_skipped"] == 1
    assert by_it[2]["loss_scale"] == 4096 and by_it[3]["loss_scale"] == 2048
    assert all(by_it[i]["skipped_iters"] == 0 for i in (1, 2, 4, 5, 6))
    assert all(abs(by_it[i]["loss"]) < 20 for i in (4, 5, 6))  # finite again after the skip


@pytest.mark.mpirun
def test_bf16_zero3_llama_runs(tmp_path):
    _, rec = pretrain(tmp_path, "bf16", "--train-iters", "4", "--preset", "tiny-llama",
                      "--deepspeed_config", "configs/tlite_8b_bf16.json",
                      "--save", str(tmp_path / "ckpt"), np_=2)
    assert len(losses(rec)) == 4 and all(l == l and l < 20 for l in losses(rec))
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "iter_0000004"


@pytest.mark.mpirun
def test_mpirun_end_to_end_loss_falls_and_checkpoint_written(tmp_path):
    ckpt = tmp_path / "ckpt"
    proc, rec = pretrain(tmp_path, "e2e", "--train-iters", "30", "--lr-decay-iters", "30",
                         "--seq-length", "128",
                         "--tensor-model-parallel-size", "2", "--sparse-mode", "alternating",
                         "--deepspeed_config", "configs/tiny_sparse.json", "--eval-interval", "15",
                         "--eval-iters", "1", "--save", str(ckpt), "--save-interval", "15",
                         "--eval-tasks", "ru_choice,ru_answer", "--eval-tasks-interval", "15",
                         "--eval-tasks-limit", "6", np_=2)
    assert "1/2 sparse layers" in proc.stdout
    # lm-eval tasks on the live TP=2 model (issue 14): logged at 15 and 30, stdout + metrics
    tasks = [r for r in rec if "tasks/ru_choice/acc" in r]
    assert [r["iteration"] for r in tasks] == [15, 30] and "tasks at iter 15 |" in proc.stdout
    assert all(0 <= r["tasks/ru_choice/acc"] <= 1 and "tasks/ru_answer/exact_match_strip" in r
               for r in tasks)
    ls = losses(rec)
    assert sum(ls[-5:]) / 5 < sum(ls[:5]) / 5 - 0.3, ls
    assert any("val_loss" in r for r in rec)
    assert (ckpt / "latest").read_text().strip() == "iter_0000030"
    assert (ckpt / "iter_0000015").is_dir() and not list(ckpt.glob("*.tmp"))
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["tensor_model_parallel_size"] == 2 and meta["model"]["sparse_attention"]["block"] == 8
    assert meta["tokenizer"]["vocab_file"] == "tokenizer/vocab.json" and "eod_token" in meta["tokenizer"]
    assert (ckpt / "tokenizer" / "vocab.json").is_file()
    # generate.py samples from the training checkpoint (its own tokenizer copy), under mpirun at
    # the checkpoint's TP=2 and resharded to TP=1: the greedy continuations are identical.
    outputs = []
    for np_, tp in ((2, 2), (1, 1)):
        out = tmp_path / f"samples_tp{tp}.jsonl"
        args = [sys.executable, "generate.py", "--load", str(ckpt), "--greedy",
                "--tensor-model-parallel-size", str(tp), "--prompt", "Москва — столица",
                "--out-seq-length", "12", "--sample-output-file", str(out)]
        cmd = [mpirun(), "--np", str(np_), *args] if np_ > 1 else args
        gen = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                             timeout=180)
        assert gen.returncode == 0, gen.stderr[-2000:]
        outputs.append([json.loads(l) for l in out.read_text().splitlines()])
    assert outputs[0] == outputs[1] and len(outputs[0][0]["tokens"]) > 0


@pytest.mark.parametrize("extra,message", [
    (["--data-path", "examples/data/nope"], "--data-path prefix 'examples/data/nope' does not exist"),
    (["--fp16", "--bf16"], "--fp16 and --bf16 are mutually exclusive"),
    (["--seq-length", "512"], "--seq-length=512 is longer than the model's max_position_embeddings=256"),
    (["--vocab-file", "examples/data/missing.json"], "missing.json"),
    (["--tensor-model-parallel-size", "3"], "world size 1 is not divisible by tensor_model_parallel_size=3"),
])
def test_bad_flags_fail_clearly(tmp_path, extra, message):
    proc, _ = pretrain(tmp_path, "bad", "--train-iters", "2", *extra, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_bad_deepspeed_json_fails_clearly(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "train_micro_batch_size_per_gpu": 4,\n  "zero_optimization": {"stage": 2,}\n}')
    proc, _ = pretrain(tmp_path, "json", "--deepspeed_config", str(broken), check=False)
    assert proc.returncode != 0 and "invalid JSON at line 3, column" in proc.stderr
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "gradient_acumulation_steps": 2}))
    proc, _ = pretrain(tmp_path, "typo", "--deepspeed_config", str(typo), check=False)
    assert "unknown key 'gradient_acumulation_steps'; did you mean 'gradient_accumulation_steps'" in proc.stderr
    proc, _ = pretrain(tmp_path, "batch", "--deepspeed_config", "configs/ds_zero1.json",
                       "--global-batch-size", "6", check=False)
    assert ("train_batch_size (global batch) 6 != micro batch 4 x gradient accumulation 1 x "
            "data-parallel size 1 = 4") in proc.stderr


def test_resume_mismatch_and_corruption_leave_checkpoint_untouched(tmp_path):
    ckpt = tmp_path / "ckpt"
    pretrain(tmp_path, "first", "--train-iters", "2", "--save", str(ckpt))
    before = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*"))
    proc, _ = pretrain(tmp_path, "other", "--train-iters", "4", "--load", str(ckpt), "--save",
                       str(ckpt), "--num-layers", "3", "--hidden-size", "96", check=False)
    assert proc.returncode != 0
    for diff in ("differing fields:", "hidden_size: checkpoint 64 vs flags 96",
                 "num_layers: checkpoint 2 vs flags 3"):
        assert diff in proc.stderr, proc.stderr
    (ckpt / "iter_0000002" / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    proc, _ = pretrain(tmp_path, "corrupt", "--train-iters", "4", "--load", str(ckpt), "--save",
                       str(ckpt), check=False)
    assert proc.returncode != 0 and "mp_rank_00_model_states.pt is corrupted or truncated" in proc.stderr
    assert sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*")) == before
    assert (ckpt / "latest").read_text().strip() == "iter_0000002"


@pytest.mark.mpirun
@pytest.mark.parametrize("config", ["ds_zero1", "ds_zero3", "ds_zero2_offload", "gpt3_13b",
                                    "gpt3_13b_sparse"])
def test_every_shipped_config_trains(tmp_path, config):
    """Each JSON in configs/ drives a real 2-rank DeepSpeed run (tiny model, 2 iterations)."""
    path = ROOT / "configs" / f"{config}.json"
    if config == "ds_zero2_offload":  # torch AdamW on the offloaded fp32 master weights: the
        # default DeepSpeedCPUAdam is a C++ extension that takes minutes to compile in CI
        data = json.loads(path.read_text())
        path = tmp_path / "offload.json"
        path.write_text(json.dumps({**data, "zero_force_ds_cpu_optimizer": False}))
    proc, rec = pretrain(tmp_path, config, "--train-iters", "2", "--deepspeed_config", str(path),
                         np_=2)
    assert len(losses(rec)) == 2 and all(l < 20 for l in losses(rec))
    if config.startswith("gpt3_13b"):
        assert rec[0]["loss_scale"] == 65536.0  # fp16, initial_scale_power 16
    if config == "gpt3_13b_sparse":
        assert "1/2 sparse layers" in proc.stdout


@pytest.mark.mpirun
def test_error_on_rank0_stops_every_rank(tmp_path):
    """A data error found while rank 0 builds the indices must not leave rank 1 waiting."""
    proc, _ = pretrain(tmp_path, "np2", "--train-iters", "2", "--seq-length", "8192",
                       "--max-position-embeddings", "8192", np_=2, check=False, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("pretrain_gpt.py: error") == 1, proc.stderr[-2000:]


def test_json_optimizer_keeps_our_schedule_and_json_scheduler_wins(tmp_path):
    opt = {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                       "weight_decay": 0.01, "torch_adam": True}}
    cfg = tmp_path / "opt.json"
    cfg.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "optimizer": opt}))
    proc, rec = pretrain(tmp_path, "opt", "--train-iters", "3", "--lr", "3e-3",
                         "--lr-warmup-iters", "2", "--deepspeed_config", str(cfg))
    assert "optimizer AdamW from" in proc.stdout
    ours = LRSchedule(lr=3e-3, min_lr=0.0, warmup=2, decay_iters=6, style="cosine")
    # logged: the LR the next step uses, i.e. the schedule after 1, 2, 3 optimizer steps
    assert [r["lr"] for r in rec] == pytest.approx([ours(1), ours(2), ours(3)])
    assert rec[2]["lr"] < rec[1]["lr"]  # the cosine decay really runs with the JSON optimizer
    sched = {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-3,
                                            "warmup_num_steps": 10}}
    cfg.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "scheduler": sched}))
    proc, rec = pretrain(tmp_path, "sched", "--train-iters", "3", "--lr", "3e-3",
                         "--deepspeed_config", str(cfg))
    assert "scheduler WarmupLR from" in proc.stdout
    assert all(r["lr"] <= 1e-3 for r in rec), [r["lr"] for r in rec]  # the JSON's, not --lr
