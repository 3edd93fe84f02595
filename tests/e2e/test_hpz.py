"""ZeRO++ hpZ under pretrain_gpt.py on 4 mpirun ranks (gloo, fp32) laid out CP 2 x DP 2, so ZeRO (and
hpZ) runs over DeepSpeed's data-parallel group DP x CP: the same losses as plain ZeRO-3, and a plain
ZeRO-3 checkpoint resumes into hpZ (an hpZ checkpoint holds the same tensors as a plain one, so it
resumes into plain ZeRO-3 as any ZeRO-3 checkpoint does)."""
import json

import pytest
import torch

from tests.helpers import ROOT, assert_losses_close, losses, pretrain

pytestmark = [pytest.mark.slow, pytest.mark.mpirun]

COMMON = ["--train-iters", "10", "--lr-decay-iters", "10", "--micro-batch-size", "2",
          "--save-interval", "5", "--context-parallel-size", "2", "--deepspeed"]


def _tensors(obj, prefix=""):
    """Every tensor of a (nested) checkpoint object, by path."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    out = {}
    for key, value in items:
        out.update(_tensors(value, f"{prefix}/{key}"))
    return out


def test_hpz_equals_plain_zero3_and_resumes_from_it(tmp_path):
    hpz_cfg = tmp_path / "hpz2.json"
    data = json.loads((ROOT / "configs" / "ds_zero3_hpz.json").read_text())
    data["zero_optimization"]["zero_hpz_partition_size"] = 2  # DP x CP = 4: groups [0,1], [2,3]
    hpz_cfg.write_text(json.dumps(data))
    plain_ckpt, hpz_ckpt = tmp_path / "plain_ckpt", tmp_path / "hpz_ckpt"
    _, plain = pretrain(tmp_path, "plain", *COMMON, "--deepspeed_config", "configs/ds_zero3.json",
                        "--save", str(plain_ckpt), np_=4)
    proc, hpz = pretrain(tmp_path, "hpz", *COMMON, "--deepspeed_config", str(hpz_cfg),
                         "--save", str(hpz_ckpt), np_=4)
    assert "ZeRO++ hpZ: secondary parameter shards over groups of 2 data-parallel ranks (DP x CP) " \
           "[[0, 1], [2, 3]], 4 ranks per node" in proc.stdout
    assert len(losses(plain)) == 10
    assert_losses_close(losses(hpz), losses(plain), tol=1e-6)  # in fact bit-identical on gloo

    # the saved tensors (module, ZeRO partitions, optimizer state) are the same at iteration 5
    for name in sorted(p.name for p in (plain_ckpt / "iter_0000005").glob("*.pt")):
        a = _tensors(torch.load(plain_ckpt / "iter_0000005" / name, weights_only=False))
        b = _tensors(torch.load(hpz_ckpt / "iter_0000005" / name, weights_only=False))
        assert a.keys() == b.keys() and a, name
        assert all(torch.equal(a[k], b[k]) for k in a), name

    # plain ZeRO-3 checkpoint at iteration 5 -> hpZ for iterations 6..10
    (plain_ckpt / "latest").write_text("iter_0000005\n")
    proc, resumed = pretrain(tmp_path, "resumed", *COMMON, "--deepspeed_config", str(hpz_cfg),
                             "--load", str(plain_ckpt), "--save", str(tmp_path / "ckpt3"), np_=4)
    assert "at iteration 5" in proc.stdout
    assert [r["iteration"] for r in resumed] == [6, 7, 8, 9, 10]
    assert_losses_close(losses(resumed), losses(plain)[5:], tol=1e-6)


def test_impossible_hpz_size_stops_before_compute(tmp_path):
    """The shipped config (h = 8) on one process: one line, exit 2, nothing trained or saved."""
    proc, rec = pretrain(tmp_path, "bad", "--train-iters", "2", "--deepspeed_config",
                         "configs/ds_zero3_hpz.json", "--save", str(tmp_path / "ckpt"), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert ("--deepspeed_config configs/ds_zero3_hpz.json: zero_optimization.zero_hpz_partition_size=8"
            " is larger than the data-parallel size 1") in proc.stderr
    assert "Traceback" not in proc.stderr and rec == [] and not (tmp_path / "ckpt" / "latest").exists()
