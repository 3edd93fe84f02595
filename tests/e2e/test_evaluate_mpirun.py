"""Evaluation at TP=2 under real mpirun equals TP=1 in process: tools/run_lm_eval.py (per-item results
of the bundled tasks) and tools/evaluate.py (perplexity over a text, a .bin/.idx prefix and JSON lines)."""
import json
import math

import pytest
import torch

from megatron_ru import runtime
from megatron_ru.evaluation import cli
from tests import evalkit
from tests.helpers import run_mpirun

pytestmark = [pytest.mark.mpirun, pytest.mark.slow]


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    return evalkit.make_checkpoint(tmp_path_factory.mktemp("eval") / "ours", max_positions=128)


def test_lm_eval_tp2_equals_tp1(ours, tmp_path):
    pytest.importorskip("lm_eval")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is fastest on a shared 2-core machine
    try:
        one = evalkit.lm_eval_run("megatron_ru", f"load={ours},batch_size=4")
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "tp2"
    proc = run_mpirun(2, "tools/run_lm_eval.py", "--model", "megatron_ru", "--model_args",
                      f"load={ours},batch_size=4", "--tasks", ",".join(evalkit.TASK_NAMES),
                      "--output_path", str(out), "--log_samples", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for task in evalkit.TASK_NAMES:
        files = list(out.rglob(f"samples_{task}_*.jsonl"))
        assert len(files) == 1, files
        rows = sorted((json.loads(line) for line in files[0].read_text().splitlines()),
                      key=lambda s: s["doc_id"])
        ref = evalkit.per_item(one, task)
        assert len(rows) == len(ref)
        for x, y in zip(rows, ref):
            if task == "ru_answer":
                assert x["resps"] == y["resps"]
            else:
                for rx, ry in zip(x["resps"], y["resps"]):
                    assert abs(float(rx[0][0]) - float(ry[0][0])) <= 1e-5 * max(1, abs(float(ry[0][0])))


def test_perplexity_tp2_equals_tp1(ours, tmp_path):
    text_file = tmp_path / "held_out.txt"
    text_file.write_text(evalkit.TEXT, encoding="utf-8")
    common = ["--load", str(ours), "--input", *evalkit.write_inputs(tmp_path, text_file),
              "--seq-length", "24", "--stride", "8", "--batch-size", "4"]
    assert runtime.run(cli.main, "tools/evaluate.py", common + ["--output", str(tmp_path / "tp1.json")]) == 0
    proc = run_mpirun(2, "tools/evaluate.py", *common, "--output", str(tmp_path / "tp2.json"))
    assert proc.returncode == 0, proc.stderr
    one = json.loads((tmp_path / "tp1.json").read_text())
    two = json.loads((tmp_path / "tp2.json").read_text())
    assert two["tensor_model_parallel_size"] == 2
    for key in ("tokens", "bytes", "windows"):
        assert two["overall"][key] == one["overall"][key]
    for key in ("loss", "bits_per_byte"):
        assert math.isclose(two["overall"][key], one["overall"][key], rel_tol=1e-5)
