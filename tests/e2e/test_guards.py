"""Guards on data and numbers, through the real Trainer (in-process, one gloo rank, real DeepSpeed) and
the real CLIs: data order that extends, non-finite policy, spike rollback, checked resumes, data
validation before compute, checkpoint weights vs config.json. Parity checks are bit-exact (fp32)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_ru import runtime
from megatron_ru.training.arguments import parse_pretrain_args
from megatron_ru.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_ru.data.validate import DataValidationError
from megatron_ru.training.guards import DataArgsMismatch, TrainingDiverged

from tests.helpers import clean_env, mpirun

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "examples/data/ru_demo_text_document")
TOK = ["--vocab-file", str(ROOT / "examples/data/tokenizer/vocab.json"),
       "--merge-file", str(ROOT / "examples/data/tokenizer/merges.txt")]
# 128-token samples, 12 per iteration: the ~48-sample epoch of the demo split ends in iteration 4
BASE = ["--preset", "tiny-gpt3", "--seq-length", "128", "--micro-batch-size", "12", "--lr", "3e-3",
        "--lr-warmup-iters", "2", "--lr-decay-iters", "8", "--log-interval", "1", "--eval-iters", "0",
        "--seed", "7", *TOK]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("guards")


def trainer(ps, work, *extra, data=DEMO):
    from megatron_ru.training.trainer import Trainer
    lines = []
    args = parse_pretrain_args([*BASE, "--data-path", data, "--data-cache-path", str(work / "cache"), *extra])
    return Trainer(args, ps, log=lines.append), lines


def losses(history):
    return [r["loss"] for r in history]


@pytest.fixture(scope="module")
def straight6(ps, work):
    t, _ = trainer(ps, work, "--train-iters", "6", "--save", str(work / "six"))
    return t.fit()


def test_order_and_extension_across_an_epoch_boundary(ps, work, straight6):
    t, _ = trainer(ps, work, "--train-iters", "3", "--save", str(work / "three"))
    assert len(t.data[0]) == 36 and t.data[0].num_epochs == 1
    three = t.fit()
    assert losses(three) == losses(straight6)[:3]  # the order does not depend on --train-iters
    t, lines = trainer(ps, work, "--train-iters", "6", "--load", str(work / "three"))
    assert t.data[0].num_epochs == 2  # the extension crosses into the second epoch
    extended = t.fit()
    assert [r["iteration"] for r in extended] == [4, 5, 6]
    assert losses(extended) == losses(straight6)[3:]  # bit-exact continuation


def test_resume_with_other_data_settings_is_refused(ps, work, straight6):
    with pytest.raises(DataArgsMismatch) as e:
        trainer(ps, work, "--train-iters", "8", "--load", str(work / "six"), "--seed", "8", "--split", "90,10,0")
    msg = str(e.value)
    assert "--split: checkpoint" in msg and "--seed: checkpoint 7 vs now 8" in msg and "--override-data-args" in msg
    assert "--seq-length" not in msg and "--data-path" not in msg
    t, lines = trainer(ps, work, "--train-iters", "7", "--load", str(work / "six"), "--micro-batch-size", "8",
                       "--override-data-args")
    assert any("--override-data-args" in l and "global batch: checkpoint 12 vs now 8" in l for l in lines)
    assert [r["iteration"] for r in t.fit()] == [7] and t.consumed == 72 + 8


def test_injected_inf_step_is_skipped_like_a_skipped_batch(ps, work):
    t, lines = trainer(ps, work, "--train-iters", "5", "--debug-inject-overflow-iters", "3")
    injected = t.fit()
    assert t.engine.skipped_steps == 1 and any("iteration 3: step skipped" in l for l in lines)
    t, _ = trainer(ps, work, "--train-iters", "5", "--iterations-to-skip", "3")
    skipped = t.fit()
    assert [r["iteration"] for r in skipped] == [1, 2, 4, 5]
    by_it = {r["iteration"]: r["loss"] for r in injected}
    assert by_it[3] == float("inf")
    assert [by_it[i] for i in (1, 2, 4, 5)] == losses(skipped)  # no update, no LR step: bit-exact


def test_consecutive_non_finite_steps_stop_without_saving(ps, work, capsys):
    """pretrain_gpt.py's main under runtime.run (as the CLI runs it): one line, exit 3, no save."""
    import pretrain_gpt
    save = work / "diverged"
    argv = [*BASE, "--data-path", DEMO, "--data-cache-path", str(work / "cache"), "--train-iters", "8",
            "--debug-inject-overflow-iters", "3", "4", "5", "--max-skipped-steps", "3",
            "--save", str(save), "--save-interval", "2"]
    capsys.readouterr()
    assert runtime.run(pretrain_gpt.main, "pretrain_gpt.py", argv, graceful=True) == runtime.EXIT_DIVERGED == 3
    out, err = capsys.readouterr()
    errors = [l for l in err.splitlines() if "error" in l]
    assert len(errors) == 1, err
    assert "training diverged at iteration 5: 3 consecutive steps skipped" in errors[0]
    assert "last good loss" in errors[0] and "at iteration 2" in errors[0] and "--lr" in errors[0]
    assert "iteration 4: step skipped" in out
    assert (save / "latest").read_text().strip() == "iter_0000002"  # no save inside the streak or after


def test_lr_100_fp32_diverges_and_stops(ps, work):
    """The losses explode but stay finite (~1e5): above --max-loss (4 ln V) they count like
    non-finite steps, and the run stops instead of saving the diverged model."""
    save = work / "lr100"
    t, lines = trainer(ps, work, "--train-iters", "30", "--lr", "100", "--max-skipped-steps", "3",
                       "--save", str(save), "--save-interval", "10")
    with pytest.raises(TrainingDiverged) as e:
        t.fit()
    assert "3 consecutive steps" in str(e.value) and "above --max-loss 30" in str(e.value)
    assert t.iteration < 10 and not (save / "latest").exists()
    assert any("above --max-loss" in l for l in lines)


def test_fp16_minimum_loss_scale_is_a_clean_stop(ps, work):
    cfg = work / "fp16.json"
    cfg.write_text(json.dumps({"train_micro_batch_size_per_gpu": 12, "zero_optimization": {"stage": 2},
                               "fp16": {"enabled": True, "initial_scale_power": 12, "hysteresis": 1,
                                        "min_loss_scale": 2048}}))
    t, _ = trainer(ps, work, "--train-iters", "4", "--deepspeed_config", str(cfg),
                   "--debug-inject-overflow-iters", "2", "3")
    with pytest.raises(TrainingDiverged, match="at iteration 2: fp16 loss scaling reached its minimum"):
        t.fit()


def test_spike_rolls_back_skips_the_window_and_resume_skips_it_too(ps, work):
    save = work / "spike"
    t, lines = trainer(ps, work, "--train-iters", "7", "--save", str(save), "--save-interval", "2",
                       "--spike-window", "3", "--spike-threshold", "3", "--debug-inject-spike-iters", "5")
    history = t.fit()
    assert any("rollback 1/3 at iteration 5: loss spike" in l and "skipping samples [48, 60)" in l for l in lines)
    assert [r["iteration"] for r in history] == [1, 2, 3, 4, 5, 6, 7]
    assert max(losses(history)) < 10  # the spiked step is not among them
    client = torch.load(save / "iter_0000004" / "mp_rank_00_model_states.pt", weights_only=False)
    assert client["consumed_samples"] == 60 and client["iteration"] == 4
    assert [(w["start"], w["end"], w["iteration"]) for w in client["skipped_data"]] == [(48, 60, 5)]
    final = torch.load(save / "iter_0000007" / "mp_rank_00_model_states.pt", weights_only=False)
    assert final["skipped_data"] == client["skipped_data"]
    (save / "latest").write_text("iter_0000004\n")  # a later run resumes from the rolled-back checkpoint
    t, _ = trainer(ps, work, "--train-iters", "7", "--load", str(save))
    resumed = t.fit()
    assert losses(resumed) == losses(history)[4:]  # it skips the same window, bit-exactly


@pytest.fixture(scope="module")
def oov_data(work):
    """The demo corpus with one token of document 5 replaced by 8000 (a 1,815-token vocabulary)."""
    demo = IndexedDataset(DEMO)
    prefix = str(work / "oov_text_document")
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        for d in range(len(demo.document_indices) - 1):
            tokens = np.array(demo.document(d))
            if d == 5:
                tokens[3] = 8000
            b.add_document(tokens)
    return prefix


def test_out_of_vocabulary_ids_stop_before_the_model_is_built(ps, work, oov_data):
    with pytest.raises(DataValidationError) as e:
        trainer(ps, work, "--train-iters", "2", data=oov_data)
    assert f"{oov_data}: token id 8000 in document 5 (token 3) is outside the tokenizer's vocabulary" in str(e.value)


@pytest.mark.mpirun
def test_out_of_vocabulary_ids_at_tp2_exit_2(work, oov_data):
    cmd = [mpirun(), "--np", "2", sys.executable, "pretrain_gpt.py", *BASE, "--data-path", oov_data,
           "--data-cache-path", str(work / "cache2"), "--train-iters", "2", "--tensor-model-parallel-size", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if "token id 8000 in document 5" in l]
    assert len(lines) == 1 and "model:" not in proc.stdout


@pytest.mark.parametrize("field,value,message", [
    ("num_layers", 1, "tensor blocks.1."),
    ("hidden_size", 32, "has shape (1920, 64), its config (num_layers=2, hidden_size=32, vocab_size=1815) "
                        "implies (1920, 32)"),
])
def test_edited_config_json_is_refused_by_generate_and_convert(ps, work, straight6, capsys, field, value, message):
    from megatron_ru.inference.runner import main as generate_main
    from tools.convert_checkpoint import main as convert_main
    edited = work / f"edited_{field}"
    shutil.copytree(work / "six", edited, ignore=shutil.ignore_patterns("global_step*", "*optim*"))
    meta = json.loads((edited / "config.json").read_text())
    meta["model"][field] = value
    (edited / "config.json").write_text(json.dumps(meta))
    for prog, main, argv in (
            ("generate.py", generate_main, ["--load", str(edited), "--prompt", "Москва", "--greedy",
                                            "--out-seq-length", "4"]),
            ("convert_checkpoint.py", convert_main, ["--load", str(edited), "--save", str(work / f"hf_{field}"),
                                                     "--to", "hf", "--quiet"])):
        capsys.readouterr()
        assert runtime.run(main, prog, argv) == 2
        err = capsys.readouterr().err
        assert message in err and "config" in err, err
    assert not (work / f"hf_{field}").exists()
    model = meta["model"]
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):  # --load too
        trainer(ps, work, "--train-iters", "7", "--load", str(edited), "--num-layers", str(model["num_layers"]),
                "--hidden-size", str(model["hidden_size"]), "--ffn-hidden-size", str(model["ffn_hidden_size"]))


def test_edited_config_json_is_refused_on_a_zero3_resume(ps, work):
    """ZeRO-3 model-state files hold empty placeholders; the shapes DeepSpeed records for its
    partitioned parameters are checked against config.json instead."""
    z3 = ["--deepspeed_config", str(ROOT / "configs/ds_zero3.json"), "--micro-batch-size", "4",
          "--global-batch-size", "4"]
    t, _ = trainer(ps, work, *z3, "--train-iters", "1", "--save", str(work / "z3"))
    t.fit()
    meta = json.loads((work / "z3" / "config.json").read_text())
    meta["model"]["num_layers"] = 1
    (work / "z3" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match=r"tensor blocks\.1\..* has no place in the model its config "
                                        r"describes \(num_layers=1"):
        trainer(ps, work, *z3, "--train-iters", "2", "--load", str(work / "z3"), "--num-layers", "1")
