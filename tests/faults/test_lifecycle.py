"""Fault injection under real `mpirun --np 2`: a failure on one rank ends the whole job quickly with
one line, signals save and resume bit-exactly, a killed first save and a second run on the same
directory are handled, the hang watchdog dumps stacks.

Fault sites covered by MEGATRON_RU_FAULT (runtime.fault_point): setup, data, model, load, step,
log, eval, save, save_config; kinds: error, enospc, hang, exit (see runtime.fault_point).
Bounds are generous (60 s) so that a loaded CI machine does not make them flaky; the measured
times are ~5-15 s, most of it imports.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from megatron_ru.checkpoint.save_dir import SaveLock
from megatron_ru.checkpoint.training import check_compatible
from megatron_ru.checkpoint.load import read_config
from megatron_ru.checkpoint.model_io import CheckpointError

from tests.helpers import BASE, DATA, ROOT, assert_losses_close, clean_env, losses, mpirun

pytestmark = [pytest.mark.mpirun, pytest.mark.slow]

BOUND_S = 60


def command(tmp: Path, save: Path, *extra, np_=2, iters=8):
    args = ["pretrain_gpt.py", *BASE, *DATA, "--data-cache-path", str(tmp / "cache"),
            "--micro-batch-size", "2", "--train-iters", str(iters), "--save", str(save),
            "--metrics-file", str(save.parent / f"{save.name}.jsonl"), *extra]
    return [mpirun(), "--np", str(np_), sys.executable, *args] if np_ > 1 else [sys.executable, *args]


def launch(cmd, fault=None, kind=None, **kw):
    env = clean_env()
    if fault:
        env["MEGATRON_RU_FAULT"] = fault
    if kind:
        env["MEGATRON_RU_FAULT_KIND"] = kind
    env["MEGATRON_RU_LOG_DIR"] = kw.pop("log_dir", "/tmp")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)
    proc.reader = Output(proc)
    return proc


class Output:
    """stdout / stderr of a job read as they come, with the time the first error line arrived."""

    def __init__(self, proc):
        self.proc, self.out, self.err, self.error_at = proc, [], [], None
        self.threads = [threading.Thread(target=self._pump, args=(proc.stdout, self.out)),
                        threading.Thread(target=self._pump, args=(proc.stderr, self.err))]
        for t in self.threads:
            t.start()

    def _pump(self, stream, sink):
        for line in stream:
            if self.error_at is None and ": error" in line:
                self.error_at = time.monotonic()
            sink.append(line)


def finish(proc, timeout=600):
    """Wait for the job (start-up on a loaded 2-core machine can take minutes, so the bound is
    on the time from the first error line / signal to the end, asserted by the callers)."""
    reader = proc.reader if hasattr(proc, "reader") else Output(proc)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the job did not end within {timeout} s:\n{''.join(reader.err)[-3000:]}")
    end = time.monotonic()
    for t in reader.threads:
        t.join(timeout=30)
    since_error = end - reader.error_at if reader.error_at else None
    return proc.returncode, "".join(reader.out), "".join(reader.err), since_error


def latest(save: Path) -> str:
    return (save / "latest").read_text().strip()


def metrics(save: Path) -> list:
    path = save.parent / f"{save.name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def error_lines(err: str) -> list:
    return [line for line in err.splitlines() if "pretrain_gpt.py: error" in line]


@pytest.mark.parametrize("fault, kind, message", [
    ("step@1:3", None, "pretrain_gpt.py: error on rank 1: InjectedFault: injected fault at step "
                       "(iteration 3)"),
    ("save_config@0:4", "enospc", "No space left on device while saving iter_0000004 to"),
    # rank 1 fails while DeepSpeed writes: held until DeepSpeed's last barrier, then agreed
    ("save@1:4", "enospc", "error on rank 1: No space left on device while saving iter_0000004 to"),
])
def test_one_failing_rank_ends_the_job_and_keeps_the_last_checkpoint(tmp_path, fault, kind, message):
    save = tmp_path / "ckpt"
    code, out, err, elapsed = finish(launch(command(tmp_path, save, "--save-interval", "2"), fault,
                                            kind, log_dir=str(tmp_path)))
    assert code != 0 and elapsed < BOUND_S, (code, elapsed, err[-2000:])
    lines = error_lines(err)
    assert len(lines) == 1 and message in lines[0], err[-3000:]
    assert "Traceback" not in err
    assert latest(save) == "iter_0000002"
    assert not list(save.glob("*.tmp"))
    if fault.startswith("save@"):  # agreed: every rank left together (rank 0 released its lock)
        assert code == 1 and not (save / ".lock").exists(), err[-2000:]
    if (save / ".lock").exists():  # rank 0 was killed with the job: the lock is stale
        pid = int((save / ".lock").read_text().split()[1])
        for _ in range(100):  # mpirun may return while the killed rank is being reaped
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.1)
        assert not Path(f"/proc/{pid}").exists()
    config, _ = read_config(save)
    check_compatible(str(save), config, 1, weights_only=False)  # every file of it is readable
    if kind == "enospc":  # and a truncated optimizer shard is named before any resume work
        shard = sorted((save / "iter_0000002").glob("*states.pt"))[-1]  # ZeRO-0: in the model file
        shard.write_bytes(shard.read_bytes()[:100])
        with pytest.raises(CheckpointError, match=f"{shard.name} is corrupted or truncated"):
            check_compatible(str(save), config, 1, weights_only=False)


def test_agreed_failure_is_reported_once_by_rank_0(tmp_path):
    code, _, err, elapsed = finish(launch(command(tmp_path, tmp_path / "c"), "setup@1"))
    assert code == 1 and elapsed < BOUND_S
    lines = error_lines(err)
    assert lines == ["pretrain_gpt.py: error on rank 1: InjectedFault: injected fault at setup"], \
        err[-2000:]


def test_hang_watchdog_dumps_every_rank_and_aborts(tmp_path):
    cmd = command(tmp_path, tmp_path / "c", "--hang-timeout-minutes", "0.1")
    code, _, err, elapsed = finish(launch(cmd, "step@1:3", "hang"))
    assert code != 0 and elapsed < BOUND_S, err[-2000:]
    for rank in (0, 1):
        assert f"error on rank {rank}: no progress for" in err, err[-3000:]
    assert err.count("Current thread") >= 2, err[-3000:]  # one dump per rank


def wait_for_iteration(save: Path, proc, at_least: int, timeout=600):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        rows = [r for r in metrics(save) if "loss" in r]
        if rows and rows[-1]["iteration"] >= at_least:
            return rows[-1]["iteration"]
        if proc.poll() is not None:
            proc.wait()
            pytest.fail(f"the run ended early: {''.join(proc.reader.err)[-2000:]}")
        time.sleep(0.05)
    pytest.fail("the run made no progress")


def test_sigterm_saves_and_resumes_bit_exactly(tmp_path):
    """The schedule is that of a 400-iteration run; every run stops at iteration 30 at the latest
    (--exit-interval 30), SIGTERM arrives a few iterations in."""
    iters, until = 400, 30
    straight = tmp_path / "straight"
    code, _, err, _ = finish(launch(command(tmp_path, straight, "--exit-interval", str(until),
                                            iters=iters)))
    assert code == 0, err[-2000:]
    ref = losses(metrics(straight))
    assert len(ref) == until

    save = tmp_path / "ckpt"
    first = launch(command(tmp_path, save, "--exit-interval", str(until), iters=iters))
    wait_for_iteration(save, first, 3)
    first.send_signal(signal.SIGTERM)  # to mpirun, which forwards it to every rank
    t0 = time.monotonic()
    code, out, err, _ = finish(first)
    assert code == 0 and time.monotonic() - t0 < BOUND_S, err[-2000:]
    stopped = [line for line in out.splitlines() if "stopped at iteration" in line]
    assert len(stopped) == 1 and "by SIGTERM" in stopped[0], out[-2000:]
    at = int(stopped[0].split("stopped at iteration ")[1].split("/")[0])
    assert latest(save) == f"iter_{at:07d}" and at < until
    for name in ("latest", "config.json"):
        assert (os.stat(save / name).st_mode & 0o777) == 0o644

    # auto-resume without model flags; the metrics file keeps one row per iteration
    flags = [w for w in command(tmp_path, save, "--exit-interval", str(until), iters=iters)
             if w != "tiny-gpt3"]
    flags.remove("--preset")
    code, out, err, _ = finish(launch(flags + ["--load", str(save), "--use-checkpoint-args"]))
    assert code == 0, err[-2000:]
    rows = [r for r in metrics(save) if "loss" in r]
    assert [r["iteration"] for r in rows] == list(range(1, until + 1))
    assert_losses_close([r["loss"] for r in rows], ref, tol=0)  # bit-exact


def test_sigint_saves_and_a_second_sigint_aborts_at_once(tmp_path):
    save = tmp_path / "ckpt"
    proc = launch(command(tmp_path, save, iters=100000, np_=1))
    wait_for_iteration(save, proc, 3)
    proc.send_signal(signal.SIGINT)
    code, out, err, _ = finish(proc)
    assert code == 0 and "by SIGINT" in out and "KeyboardInterrupt" not in err, err[-2000:]
    assert latest(save).startswith("iter_")

    proc = launch(command(tmp_path, tmp_path / "other", iters=100000, np_=1))
    wait_for_iteration(tmp_path / "other", proc, 3)
    proc.send_signal(signal.SIGINT)
    while not any("SIGINT received" in line for line in proc.reader.err):  # two signals sent at
        time.sleep(0.01)  # once may reach Python as one; the second must come after the first
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    code, _, err, _ = finish(proc)
    assert code == 130 and time.monotonic() - t0 < 5, err[-2000:]
    assert "aborting now without saving" in err and "Traceback" not in err


def test_kill_during_the_first_save_then_auto_resume_then_a_locked_directory(tmp_path):
    save = tmp_path / "ckpt"
    cmd = command(tmp_path, save, "--load", str(save), "--save-interval", "2", iters=4)
    code, out, err, _ = finish(launch(cmd, "save_config@0:2", "exit"))  # dies like kill -9
    # DeepSpeed's files may not all be on disk when the process dies: the leftover is checked when there
    leftover = (save / "iter_0000002.tmp").is_dir()
    assert code != 0 and not (save / "latest").exists(), \
        (code, sorted(p.name for p in save.iterdir()) if save.is_dir() else None, out[-3000:], err[-3000:])
    assert (save / ".lock").exists()  # its owner died without releasing it
    code, out, err, _ = finish(launch(cmd + ["--keep-last-n", "1"]))
    assert code == 0, err[-2000:]
    assert "removed a stale lock" in out and (not leftover or "iter_0000002.tmp" in out), out[-3000:]
    assert "starting from scratch" in out and latest(save) == "iter_0000004"
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000004"]  # --keep-last-n 1
    before = sorted((p.name, p.stat().st_size) for p in (save / "iter_0000004").iterdir())

    holder = SaveLock(str(save)).acquire()  # a live run holds the directory (this process)
    try:
        code, _, err, _ = finish(launch(cmd))
    finally:
        holder.release()
    assert code == 2 and f"is in use by another run (process {os.getpid()}" in err, err[-2000:]
    assert sorted((p.name, p.stat().st_size) for p in (save / "iter_0000004").iterdir()) == before
    assert latest(save) == "iter_0000004"


def test_resume_on_more_ranks_continues_the_run(tmp_path):
    """ZeRO-2 saved at DP=1, resumed at DP=2 (same global batch, same data order) through a
    universal checkpoint: the losses continue as the uninterrupted DP=1 run's."""
    ds = tmp_path / "zero2.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}))
    flags = ["--deepspeed_config", str(ds), "--global-batch-size", "4"]
    straight = tmp_path / "straight"
    code, _, err, _ = finish(launch(command(tmp_path, straight, *flags, np_=1, iters=6)))
    assert code == 0, err[-2000:]
    save = tmp_path / "ckpt"
    code, _, err, _ = finish(launch(command(tmp_path, save, *flags, "--exit-interval", "3",
                                            np_=1, iters=6)))
    assert code == 0 and latest(save) == "iter_0000003", err[-2000:]
    code, out, err, _ = finish(launch(command(tmp_path, save, *flags, "--load", str(save),
                                              np_=2, iters=6)))
    assert code == 0, err[-3000:]
    assert "converting it to a DeepSpeed universal checkpoint" in out
    assert "resumed from" in out and "at iteration 3" in out
    resumed = [r for r in metrics(save) if "loss" in r]
    assert [r["iteration"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert_losses_close([r["loss"] for r in resumed], losses(metrics(straight)))


def test_time_limit_stops_and_saves(tmp_path):
    save = tmp_path / "ckpt"
    code, out, _, _ = finish(launch(command(tmp_path, save, "--exit-duration-in-mins", "0.05",
                                            np_=1, iters=100000)))
    stopped = [line for line in out.splitlines() if "stopped at iteration" in line]
    assert code == 0 and len(stopped) == 1 and "by --exit-duration-in-mins 0.05" in stopped[0], out
    at = int(stopped[0].split("stopped at iteration ")[1].split("/")[0])
    assert latest(save) == f"iter_{at:07d}"
