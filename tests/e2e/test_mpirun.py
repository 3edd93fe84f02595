"""Real `mpirun` launches: rank discovery without MASTER_ADDR/PORT, all-reduce, the TP demo, errors."""
import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, clean_env, run_mpirun as run

pytestmark = pytest.mark.slow


@pytest.mark.mpirun
def test_two_ranks_found_and_all_reduce_without_master_env(tmp_path):
    proc = run(2, "tests/e2e/mpi_probe.py", "2", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    rows = sorted((json.loads(f.read_text()) for f in tmp_path.glob("rank*.json")),
                  key=lambda r: r["rank"])
    assert [r["rank"] for r in rows] == [0, 1]
    assert all(r["world"] == 2 and r["launcher"] == "mpich" for r in rows)
    assert [r["tp_rank"] for r in rows] == [0, 1] and [r["dp_rank"] for r in rows] == [0, 0]
    assert [r["local_rank"] for r in rows] == [0, 1]
    assert all(r["sum"] == 3.0 and r["tp_sum"] == 1.0 for r in rows)
    assert rows[0]["master"] == rows[1]["master"] == "127.0.0.1"


@pytest.mark.mpirun
def test_tp_demo_loss_falls():
    proc = run(2, "examples/tp_demo.py", "--tensor-model-parallel-size", "2", "--steps", "15")
    assert proc.returncode == 0, proc.stderr
    losses = [float(l.split()[-1]) for l in proc.stdout.splitlines() if l.startswith("step")]
    assert len(losses) == 15 and losses[-1] < losses[0] - 0.3, losses


@pytest.mark.mpirun
def test_world_not_divisible_by_tp_fails_clearly():
    proc = run(2, "examples/tp_demo.py", "--tensor-model-parallel-size", "4", "--steps", "1", timeout=120)
    assert proc.returncode != 0
    assert "world size 2 is not divisible by tensor_model_parallel_size=4" in proc.stderr


def test_unknown_preset_fails_clearly():
    proc = subprocess.run([sys.executable, "examples/tp_demo.py", "--preset", "gpt-17"], cwd=ROOT,
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown preset 'gpt-17'" in proc.stderr and "Traceback" not in proc.stderr
