"""runtime.py and the save-directory rules in-process: exit statuses, one-line errors, fault points,
locks (live, stale), leftovers, retention, space checks, permissions, metrics truncation."""
import errno
import json
import os
import signal
import stat

import pytest

from megatron_ru import runtime
from megatron_ru.checkpoint import save_dir
from megatron_ru.files import atomic_write_text
from megatron_ru.config import ConfigError
from megatron_ru.training.metrics import truncate_after


def run(main, argv=()):
    return runtime.run(main, "prog.py", list(argv))


@pytest.mark.parametrize("exc, code, text", [
    (ConfigError("--lr must be positive"), 2, "prog.py: error: --lr must be positive"),
    (FileNotFoundError(2, "No such file or directory", "x.json"), 2, "No such file or directory"),
    (RuntimeError("boom"), 1, "prog.py: error: RuntimeError: boom (traceback in "),
    (OSError(errno.ENOSPC, "disk"), 1, "No space left on device"),
])
def test_run_maps_errors_to_one_line_and_status(exc, code, text, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRON_RU_LOG_DIR", str(tmp_path))

    def main(argv):
        raise exc
    assert run(main) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and text in err and "Traceback" not in err, err
    if code == 1:  # the traceback went to the named file
        path = err.split("traceback in ")[1].rstrip(")\n")
        assert "Traceback" in open(path).read()


def test_run_debug_prints_traceback_and_restores_signal_handlers(capsys):
    before = signal.getsignal(signal.SIGINT)

    def main(argv):
        raise RuntimeError("boom")
    assert run(main, ["--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before
    assert run(lambda argv: 0) == 0 and run(lambda argv: None) == 0


def test_fault_point_spec(monkeypatch):
    runtime.fault_point("step", 3)  # no spec: nothing
    monkeypatch.setenv("MEGATRON_RU_FAULT", "save@1,step:3")
    runtime.fault_point("save")  # rank 1 only; we are rank 0
    runtime.fault_point("step", 2)
    with pytest.raises(runtime.InjectedFault, match="injected fault at step"):
        runtime.fault_point("step", 3)
    monkeypatch.setenv("MEGATRON_RU_FAULT_KIND", "enospc")
    with pytest.raises(OSError, match="No space left on device"):
        runtime.fault_point("step", 3)


def test_agree_single_process_reraises():
    runtime.agree(None, None)
    with pytest.raises(ValueError, match="x"):
        runtime.agree(None, ValueError("x"))
    assert runtime.checked(None, lambda: 5) == 5


def test_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path):
    first = save_dir.SaveLock(str(tmp_path)).acquire()
    with pytest.raises(save_dir.SaveDirError, match=f"in use by another run \\(process {os.getpid()}"):
        save_dir.SaveLock(str(tmp_path)).acquire()
    first.release()
    assert not (tmp_path / ".lock").exists()
    with open("/proc/sys/kernel/pid_max") as f:
        dead = int(f.read()) + 1  # above the kernel's largest pid: never a running process
    import socket
    (tmp_path / ".lock").write_text(f"{socket.gethostname()} {dead} 2026-01-01T00:00:00\n")
    lock = save_dir.SaveLock(str(tmp_path)).acquire()
    assert lock.held and "stale lock" in lock.note
    assert stat.S_IMODE(os.stat(tmp_path / ".lock").st_mode) == 0o644
    lock.release()


def test_leftovers_latest_and_retention(tmp_path):
    for i in (2, 4, 6, 8):
        (tmp_path / f"iter_{i:07d}").mkdir()
    (tmp_path / "iter_0000010.tmp").mkdir()
    (tmp_path / "iter_0000004.old").mkdir()
    assert save_dir.latest_or_newest(str(tmp_path)) == "iter_0000008"  # no `latest` file yet
    (tmp_path / "latest").write_text("iter_0000004\n")
    assert save_dir.latest_or_newest(str(tmp_path)) == "iter_0000004"
    assert save_dir.remove_leftovers(str(tmp_path)) == ["iter_0000004.old", "iter_0000010.tmp"]
    assert save_dir.prune(str(tmp_path), 2, latest="iter_0000004") == ["iter_0000002", "iter_0000006"]
    assert save_dir.complete_tags(str(tmp_path)) == ["iter_0000004", "iter_0000008"]


def test_check_writable_names_the_problem(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(save_dir.SaveDirError, match="is a file"):
        save_dir.check_writable(str(afile), 0)
    with pytest.raises(save_dir.SaveDirError, match=f"{afile} is a file, not a directory"):
        save_dir.check_writable(str(afile / "sub"), 0)
    with pytest.raises(save_dir.SaveDirError, match=r"No space left on device for a checkpoint: one needs about \d"):
        save_dir.check_writable(str(tmp_path / "ok"), 2**62)
    save_dir.check_writable(str(tmp_path / "ok"), 1)
    assert (tmp_path / "ok").is_dir() and not list((tmp_path / "ok").iterdir())
    assert save_dir.checkpoint_bytes(1000, 2) == int(1000 * 14 * 1.02)  # fp16 + fp32 master + Adam
    assert save_dir.checkpoint_bytes(1000, 4) == int(1000 * 12 * 1.02)


def test_atomic_files_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "latest", "iter_0000001\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "latest").st_mode) == 0o644


def test_metrics_rows_after_the_resumed_iteration_are_dropped(tmp_path):
    path = tmp_path / "m.jsonl"
    rows = [{"iteration": i, "loss": 1.0 / i} for i in range(1, 7)] + [{"iteration": 4, "val_loss": 2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"iteration": 7, "lo')
    assert truncate_after(path, 4) == 3  # iterations 5, 6 and the line cut short
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["iteration"] for r in kept] == [1, 2, 3, 4, 4]
    assert truncate_after(path, 4) == 0


def test_output_checks_name_the_flag(tmp_path):
    from types import SimpleNamespace

    from megatron_ru.training.lifecycle import check_outputs

    afile = tmp_path / "file"
    afile.write_text("x")
    ps = SimpleNamespace(rank=0)

    def args(**kw):
        base = dict(tensorboard_dir=None, metrics_file=None, save=None)
        return SimpleNamespace(**{**base, **kw})
    with pytest.raises(ConfigError, match=f"--metrics-file {afile}/m.jsonl: {afile} is a file"):
        check_outputs(args(metrics_file=str(afile / "m.jsonl")), ps, 0)
    with pytest.raises(save_dir.SaveDirError, match=f"--save {afile} is a file"):
        check_outputs(args(save=str(afile)), ps, 0)
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="--tensorboard-dir needs the tensorboard package"):
            check_outputs(args(tensorboard_dir=str(tmp_path / "tb")), ps, 0)
    check_outputs(args(metrics_file=str(tmp_path / "new" / "m.jsonl"), save=str(tmp_path / "s")), ps, 1)


def test_tokenizer_copy_into_the_checkpoint_it_comes_from(tmp_path):
    """--vocab-file DIR/tokenizer/vocab.json while saving into DIR: no SameFileError."""
    from megatron_ru.checkpoint.training import _copy_tokenizer

    (tmp_path / "tokenizer").mkdir()
    vocab = tmp_path / "tokenizer" / "vocab.json"
    vocab.write_text("{}")
    _copy_tokenizer(tmp_path, {"vocab_file": str(vocab), "type": "GPT2BPETokenizer"})
    assert vocab.read_text() == "{}"


def test_in_process_run_with_a_process_group_never_exits_the_caller(capsys):
    """A single process that already has a process group (a notebook, this test session) gets a
    status back for argparse errors too, instead of os._exit."""
    import argparse

    import torch.distributed as dist

    from megatron_ru.parallel.state import ParallelState

    ParallelState.from_environment(1)
    assert dist.is_initialized()

    def main(argv):
        argparse.ArgumentParser(prog="prog.py").parse_args(argv)
    assert run(main, ["--no-such-flag"]) == 2
    assert dist.is_initialized()  # the caller's group is left alone
    assert "unrecognized arguments" in capsys.readouterr().err
