"""pretrain_gpt.py --context-parallel-size 2 under mpirun (alternating block-sparse gpt3, ZeRO-2): the
losses of a one-process run, the rank layout printed, an ordinary checkpoint that loads at CP = 1,
and its full training state resumed by one process at CP = 1 (DeepSpeed's data-parallel world
DP x CP = 2 -> 1: through a universal checkpoint) continues as the one-process run;
a world that CP does not divide: one line, exit 2."""
import subprocess
import sys

import pytest

from megatron_ru.checkpoint.load import load_full_state_dict
from tests.helpers import ROOT, assert_losses_close, clean_env, losses, pretrain, rel_err

pytestmark = pytest.mark.slow
RUN = ["--train-iters", "6", "--hidden-dropout", "0", "--attention-dropout", "0",
       "--deepspeed_config", "configs/tiny_sparse.json"]


@pytest.mark.mpirun
def test_cp2_cli_equals_one_process_and_saves_an_ordinary_checkpoint(tmp_path):
    _, ref = pretrain(tmp_path, "cp1", *RUN, "--save", str(tmp_path / "cp1"), "--save-interval", "3")
    proc, cp = pretrain(tmp_path, "cp2", *RUN, "--save", str(tmp_path / "cp2"),
                        "--context-parallel-size", "2", "--exit-interval", "3", np_=2)
    assert "rank layout: world 2 = TP 1 x CP 2 x DP 1 x PP 1" in proc.stdout
    assert "CP groups [[0, 1]]" in proc.stdout
    assert_losses_close(losses(cp), losses(ref)[:3], tol=1e-5)  # AdamW: rounding-level differences
    tag = tmp_path / "cp2" / "iter_0000003"
    assert sorted(p.name for p in tag.glob("*model_states.pt")) == ["mp_rank_00_model_states.pt"]
    _, full = load_full_state_dict(tmp_path / "cp2")  # read at CP = 1 like any checkpoint
    _, full_ref = load_full_state_dict(tmp_path / "cp1", "iter_0000003")
    assert full.keys() == full_ref.keys()
    assert max(rel_err(full[k], full_ref[k]) for k in full) < 1e-2  # a wrong gradient: ~1 step

    # the CP2 run's full training state (ZeRO-2 partitions over DP x CP = 2) resumed at CP = 1
    proc, resumed = pretrain(tmp_path, "cp1_resumed", *RUN, "--load", str(tmp_path / "cp2"),
                             "--save", str(tmp_path / "cp1_resumed"))
    assert "converting it to a DeepSpeed universal checkpoint" in proc.stdout
    assert [r["iteration"] for r in resumed] == [4, 5, 6]
    assert_losses_close(losses(resumed), losses(ref)[3:], tol=1e-5)


def test_world_not_divisible_by_cp_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "pretrain_gpt.py", "--preset", "tiny-gpt3",
                           "--data-path", "x", "--context-parallel-size", "2"], cwd=ROOT,
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if "divisible" in l]
    assert len(lines) == 1 and "world size 1 is not divisible by" in lines[0] and "1 x 2 x 1" in lines[0]
