"""bench/gpu_check.sh --cpu-smoke: the GPU validation pack's steps at tiny sizes on CPU, so the
script cannot rot between GPU runs; one results file with every section PASS (fp16 SKIP)."""
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import clean_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "results.md"
    env = {**clean_env(), "PYTHON": sys.executable}
    run = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu-smoke", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = out.read_text()
    for section in ("1 hf_parity: PASS", "2 sparse: PASS", "3 train_step: PASS",
                    "4 fp16_scaling: SKIP", "5 decode: PASS", "6 speculative: PASS", "7 plan: PASS"):
        assert section in text, text
    assert "greedy tokens identical" in text and "0 section(s) failed" in text
