"""A run that reaches --train-iters ends with a line saying it finished (not a resume hint)."""
import pytest

from tests.helpers import pretrain

pytestmark = pytest.mark.slow


def test_last_line_says_finished(tmp_path):
    proc, _ = pretrain(tmp_path, "run", "--train-iters", "2", "--micro-batch-size", "2",
                       "--save", str(tmp_path / "ckpt"))
    lines = [l for l in (proc.stdout + proc.stderr).splitlines() if l.strip()]
    last = [l for l in lines if "finished:" in l or "resume with" in l]
    assert last and "finished: iteration 2/2 reached; final checkpoint in" in last[-1], lines[-5:]
    assert "resume with --load" not in proc.stdout + proc.stderr
