"""What a failed save is called (checkpoint/save_dir.save_failure): ENOSPC in its several forms,
a directory that refuses files, anything else unchanged; the line runtime prints for each."""
import errno
import os
import subprocess

import pytest

from megatron_ru.checkpoint.save_dir import SaveFailed, save_failure
from megatron_ru.errors import EXIT_FAILURE, EXIT_USAGE, describe, exit_code_of


@pytest.fixture()
def root(tmp_path):
    (tmp_path / "iter_0000002").mkdir()
    (tmp_path / "latest").write_text("iter_0000002\n")
    return tmp_path


def wrapped(inner: BaseException, outer: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except BaseException as exc:
        return exc


@pytest.mark.parametrize("exc", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    RuntimeError("[Errno 28] No space left on device: '/ckpt/iter_0000004.tmp/x.pt'"),  # DeepSpeed's words
    wrapped(OSError(errno.ENOSPC, "write"), RuntimeError("PytorchStreamWriter failed writing file")),
])
def test_no_space_in_any_form(root, exc):
    out = save_failure(exc, root, "iter_0000004", needed_bytes=3 << 20)
    assert isinstance(out, SaveFailed) and out.errno == errno.ENOSPC
    line = f"No space left on device while saving iter_0000004 to {root} (one checkpoint needs about " \
           "3.0 MiB); the previous checkpoint iter_0000002 stays latest"
    assert str(out) == describe(out) == line and exit_code_of(out) == EXIT_FAILURE


def test_zip_writer_error_on_a_full_file_system(root, tmp_path):
    """torch's zip writer does not say ENOSPC: the free space decides (a real, filled tmpfs)."""
    zip_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 15296 vs 15190")
    assert save_failure(zip_error, root, "iter_0000004") is zip_error  # plenty of room here
    full = tmp_path / "full"
    full.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(full)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")
    try:
        fd = os.open(full / "filler", os.O_CREAT | os.O_WRONLY)
        with pytest.raises(OSError, match="No space left"):
            while True:
                os.write(fd, b"x" * 65536)
        os.close(fd)
        out = save_failure(zip_error, full, "iter_0000004")
    finally:
        subprocess.run(["umount", "-l", str(full)], capture_output=True)
    assert isinstance(out, SaveFailed) and str(out).startswith("No space left on device while saving")


def test_refused_directory_and_other_errors(root):
    denied = PermissionError(errno.EACCES, "Permission denied", str(root / "iter_0000004.tmp"))
    out = save_failure(denied, root, "iter_0000004")
    assert str(out) == describe(out) == (f"--save {root} is not writable (Permission denied) while "
                                         "saving iter_0000004; the previous checkpoint iter_0000002 "
                                         "stays latest")
    assert exit_code_of(out) == EXIT_USAGE
    bug = KeyError("optimizer")
    assert save_failure(bug, root, "iter_0000004") is bug
    assert not [p for p in os.listdir(root) if p.startswith(".write_test")]  # the probe is gone
    fresh = root / "fresh"
    fresh.mkdir()
    out = save_failure(OSError(errno.ENOSPC, "full"), fresh, "iter_0000001")
    assert str(out).endswith(f"; no earlier checkpoint in {fresh}")
