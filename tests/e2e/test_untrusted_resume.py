"""DeepSpeed opens its own files with a plain unpickler: a payload in a training checkpoint is refused before it does (resume, universal, ZeRO-3)."""
import subprocess
import sys

import pytest
import torch

from tests.helpers import REFUSED, ROOT, Payload, clean_env, pretrain

pytestmark = pytest.mark.slow

def poison(path, marker):
    blob = torch.load(path, map_location="cpu", weights_only=False)
    blob["payload"] = Payload(marker)
    torch.save(blob, path)


def one_line(proc, path):
    err = [line for line in proc.stderr.splitlines() if line.strip() and "[WARNING]" not in line]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(err) == 1 and str(path) in err[0] and REFUSED in err[0], err


@pytest.mark.parametrize("stage", [1, 3])
def test_payload_in_optimizer_states_is_refused(tmp_path, stage):
    ckpt, marker = tmp_path / "ckpt", tmp_path / "PWNED"
    common = ["--micro-batch-size", "4", "--deepspeed_config", f"configs/ds_zero{stage}.json"]
    pretrain(tmp_path, "first", "--train-iters", "2", "--save", str(ckpt), *common)
    optim = next((ckpt / "iter_0000002").glob("*optim_states.pt"))
    poison(optim, marker)
    proc, _ = pretrain(tmp_path, "resume", "--train-iters", "4", "--load", str(ckpt), "--save", str(ckpt),
                       *common, check=False)
    one_line(proc, optim)
    tool = [sys.executable, "tools/convert_checkpoint.py", "--load", str(ckpt), "--quiet"]
    target = "universal" if stage == 1 else "hf"  # stage 3: the weights come from DeepSpeed's partitions
    proc = subprocess.run(tool + ["--save", str(tmp_path / "out"), "--to", target], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    one_line(proc, optim)
    assert not marker.exists() and not (tmp_path / "out").exists()
