"""Saves that must not happen or cannot: a diverged state is never saved by any save path
(periodic, end of run, SIGTERM, time limit), a full disk and a save directory that stopped
accepting files are one line each with the previous checkpoint kept as `latest`.

pretrain_gpt.py's main runs in process under runtime.run (as the CLI runs it: exit status and
the one error line), one gloo rank, the tiny preset. A diverged state is made with
--debug-inject-spike-iters (the loss times 30, ~220 > --max-loss 30.02, with its update applied)
or, as reported, with --lr 100. The full disk is a real tmpfs sized for one checkpoint and a
half (mounted here: CI runs as root like this machine; skipped with the reason otherwise); an
injected ENOSPC covers the same path everywhere. The multi-rank agreement on a failed save is in
tests/faults/test_lifecycle.py."""
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from megatron_ru import runtime
from megatron_ru.checkpoint.load import read_config
from megatron_ru.checkpoint.training import check_compatible

from tests.helpers import BASE, DATA, ROOT, VOCAB

pytestmark = pytest.mark.slow

SPIKES = [str(i) for i in range(3, 400)]  # every step after the good checkpoint explodes


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("save_safety")


def argv(work: Path, save: Path, *extra, metrics: bool = True):
    watch = ["--metrics-file", str(save.parent / f"{save.name}.jsonl")] if metrics else []
    return [*BASE, *[str(ROOT / a) if a.startswith("examples/") else a for a in DATA],
            "--data-cache-path", str(work / "cache"), "--micro-batch-size", "2", "--save", str(save),
            *watch, *extra]


def pretrain(capsys, args) -> tuple:
    """(exit status, stdout, the error lines on stderr); without capsys the output is not read."""
    import pretrain_gpt
    if capsys is not None:
        capsys.readouterr()
    code = runtime.run(pretrain_gpt.main, "pretrain_gpt.py", args, graceful=True)
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return code, out, [line for line in err.splitlines() if "pretrain_gpt.py: error" in line]


def latest(save: Path) -> str:
    return (save / "latest").read_text().strip()


def iterations(save: Path) -> list:
    return sorted(p.name for p in save.glob("iter_*"))


@pytest.fixture(scope="module")
def good(ps, work):
    """A run's directory holding one good checkpoint, iter_0000002."""
    save = work / "good"
    code, _, _ = pretrain(None, argv(work, save, "--train-iters", "2"))
    assert code == 0 and latest(save) == "iter_0000002"
    return save


def resume_from(good: Path, tmp: Path) -> Path:
    save = tmp / "run"
    shutil.copytree(good, save)
    return save


def assert_kept_good(save: Path, kept: str = "iter_0000002") -> None:
    assert latest(save) == kept and iterations(save) == [kept]
    config, _ = read_config(save)
    check_compatible(str(save), config, 1, weights_only=False)  # every file of it is readable


# ---- a diverged state is never saved ----------------------------------------------------------
def test_end_of_run_does_not_save_a_diverged_model(ps, work, capsys, tmp_path):
    """As reported: 4 good iterations saved, then --lr 100 (finite losses ~1e5 from iteration 6)
    with --keep-last-n 1: exit 3, iter_0000004 kept and still latest."""
    save = tmp_path / "lr100"
    code, _, errors = pretrain(capsys, argv(work, save, "--train-iters", "4", "--save-interval", "2"))
    assert code == 0 and latest(save) == "iter_0000004", errors
    code, out, errors = pretrain(capsys, argv(work, save, "--load", str(save), "--lr", "100",
                                              "--keep-last-n", "1", "--rollback-on-nonfinite",
                                              "--train-iters", "8", "--save-interval", "100"))
    assert code == 3 and len(errors) == 1, (code, errors, out[-2000:])
    assert "training diverged at iteration 8: the update of iteration" in errors[0]
    assert "above --max-loss 30.02) was applied" in errors[0] and "(end of the run" in errors[0]
    assert "iter_0000004 stays latest in" in errors[0]
    assert "saved checkpoint" not in out and "--keep-last-n" not in out
    assert latest(save) == "iter_0000004" and iterations(save) == ["iter_0000002", "iter_0000004"]


def test_periodic_save_waits_for_a_good_step(ps, work, capsys, tmp_path):
    """A diverged step on a save interval is not saved; the run recovers and saves later."""
    save = tmp_path / "periodic"
    code, out, errors = pretrain(capsys, argv(work, save, "--train-iters", "6", "--save-interval", "2",
                                              "--debug-inject-spike-iters", "4"))
    assert code == 0, (errors, out[-2000:])
    assert "iteration 4: loss" in out and "above --max-loss" in out
    assert iterations(save) == ["iter_0000002", "iter_0000006"] and latest(save) == "iter_0000006"


def test_sigterm_does_not_save_a_diverged_model(ps, work, good, capsys, tmp_path):
    save = resume_from(good, tmp_path)
    metrics = save.parent / f"{save.name}.jsonl"

    def signal_once_running():
        for _ in range(6000):
            if metrics.exists() and '"iteration": 4' in metrics.read_text():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)

    sender = threading.Thread(target=signal_once_running, daemon=True)
    sender.start()
    code, out, errors = pretrain(capsys, argv(work, save, "--load", str(save), "--train-iters", "400",
                                              "--max-skipped-steps", "1000",
                                              "--debug-inject-spike-iters", *SPIKES))
    sender.join(timeout=5)
    assert code == 3 and len(errors) == 1, (code, errors, out[-2000:])
    assert "(stopped by SIGTERM)" in errors[0] and "iter_0000002 stays latest" in errors[0]
    assert_kept_good(save)


def test_time_limit_does_not_save_a_diverged_model(ps, work, good, capsys, tmp_path):
    save = resume_from(good, tmp_path)
    code, out, errors = pretrain(capsys, argv(work, save, "--load", str(save), "--train-iters", "400",
                                              "--max-skipped-steps", "1000", "--exit-duration-in-mins",
                                              "0.05", "--debug-inject-spike-iters", *SPIKES))
    assert code == 3 and len(errors) == 1, (code, errors, out[-2000:])
    assert "(stopped by --exit-duration-in-mins 0.05)" in errors[0]
    assert_kept_good(save)


# ---- a save the directory refuses -------------------------------------------------------------
def test_injected_enospc_while_writing(ps, work, good, capsys, tmp_path, monkeypatch):
    save = resume_from(good, tmp_path)
    monkeypatch.setenv("MEGATRON_RU_FAULT", "save:4")
    monkeypatch.setenv("MEGATRON_RU_FAULT_KIND", "enospc")
    code, out, errors = pretrain(capsys, argv(work, save, "--load", str(save), "--train-iters", "4"))
    assert code == 1 and len(errors) == 1, (code, errors, out[-2000:])
    assert errors[0].startswith(f"pretrain_gpt.py: error: No space left on device while saving "
                                f"iter_0000004 to {save} (one checkpoint needs about ")
    assert "; the previous checkpoint iter_0000002 stays latest" in errors[0]
    assert not list(save.glob("*.tmp"))
    assert_kept_good(save)


@pytest.fixture()
def tmpfs(tmp_path):
    """mount(SIZE_KIB) -> a fresh tmpfs directory; unmounted afterwards."""
    mounted = []

    def mount(size_kib: int) -> Path:
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); "
                        "test_injected_enospc_while_writing covers the same path")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_disk_that_fills_during_the_second_save(ps, work, capsys, tmpfs):
    """Room for one checkpoint and a half: the second save fails in torch's zip writer
    ("unexpected pos ..."), which is reported as the full disk it is."""
    from megatron_ru.checkpoint.save_dir import checkpoint_bytes
    from megatron_ru.training.arguments import model_config, parse_pretrain_args
    args = argv(work, Path("unused"), "--train-iters", "4", "--save-interval", "2")
    one = checkpoint_bytes(model_config(parse_pretrain_args(args), VOCAB, None).num_parameters(), 4)
    disk = tmpfs(int(1.5 * one) // 1024 + 200)  # + the tokenizer files and config.json
    save = disk / "ckpt"
    args[args.index("--save") + 1] = str(save)
    args[args.index("--metrics-file") + 1] = str(work / "tmpfs.jsonl")
    code, out, errors = pretrain(capsys, args)
    assert code == 1 and len(errors) == 1, (code, errors, out[-2000:])
    assert f"No space left on device while saving iter_0000004 to {save}" in errors[0]
    assert "the previous checkpoint iter_0000002 stays latest" in errors[0]
    assert "unexpected pos" not in errors[0]
    assert not list(save.glob("*.tmp"))
    assert_kept_good(save)


def test_save_directory_made_read_only_mid_run(ps, work, tmpfs, capsys):
    """Root ignores permission bits, so as root the directory's file system is remounted
    read-only; as another user the directory is made read-only with chmod."""
    from megatron_ru.checkpoint.save_dir import SaveFailed
    from megatron_ru.training.arguments import parse_pretrain_args
    from megatron_ru.training.trainer import Trainer
    root_user = os.geteuid() == 0
    disk = tmpfs(64 << 10) if root_user else work / "ro"
    save = disk / "ckpt"
    lines = []
    args = parse_pretrain_args(argv(work, save, "--train-iters", "2", metrics=False))
    trainer = Trainer(args, ps, log=lines.append)
    trainer.fit()
    assert latest(save) == "iter_0000002"
    if root_user:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    else:
        save.chmod(0o555)
    trainer.args.train_iters = 4  # two more steps, then the end-of-run save
    trainer.ensure_train_samples()
    try:
        with pytest.raises(SaveFailed) as e:
            trainer.fit()
    finally:
        if root_user:
            subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        else:
            save.chmod(0o755)
        trainer.lock.release()
    assert e.value.exit_code == 2 and runtime.describe(e.value) == str(e.value)
    assert str(e.value).startswith(f"--save {save} is not writable (")
    assert str(e.value).endswith("while saving iter_0000004; the previous checkpoint iter_0000002 "
                                 "stays latest")
    assert_kept_good(save)
