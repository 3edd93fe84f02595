"""The --save directory of a training run: checks before compute, a lock, leftovers, retention.

- `check_writable` (every rank: DeepSpeed writes from every rank) — exists or can be created, is a
  directory, accepts a file, and has room for one checkpoint by `checkpoint_bytes`'s estimate.
- `SaveLock` — `DIR/.lock` holds "host pid time" of the run that owns the directory; a second run
  refuses, naming the holder; a lock whose process is gone (same host) is stale and taken over.
- `remove_leftovers` — `iter_*.tmp` / `iter_*.old` directories of an interrupted save are named
  and removed; the checkpoint `latest` names is never touched.
- `prune` — keep the K newest complete checkpoints (never the one `latest` names).
- `save_failure` — what a failed save means, in one line: a full disk (ENOSPC in any form: an
  OSError, a message, or torch's zip-writer error on a file system with almost nothing free) or a
  directory that stopped accepting files; other errors pass through unchanged.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Optional

from ..errors import EXIT_FAILURE, EXIT_USAGE
from .model_io import CheckpointError

TAG_RE = re.compile(r"^iter_(\d{7,})$")
LEFTOVER_RE = re.compile(r"^iter_\d{7,}\.(tmp|old)$")


class SaveDirError(CheckpointError):
    """--save is unusable (a file, read-only, no room, locked by another run)."""


def checkpoint_bytes(num_parameters: int, weight_bytes: int, optimizer: bool = True) -> int:
    """Estimated size of one training checkpoint: weights in the training precision, plus (with
    an optimizer) fp32 master weights and Adam's two moments, plus 2 % for metadata."""
    per = weight_bytes + (12 if optimizer and weight_bytes < 4 else 8 if optimizer else 0)
    return int(num_parameters * per * 1.02)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def check_writable(directory: str, needed_bytes: int) -> None:
    """Raise SaveDirError naming --save and the problem; creates the directory."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise SaveDirError(f"--save {directory} is a file, not a directory")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise SaveDirError(f"--save {directory}: {parent} is a file, not a directory")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SaveDirError(f"--save {directory} cannot be created: {exc.strerror or exc}") from None
    probe = path / f".write_test.{socket.gethostname()}.{os.getpid()}"
    try:
        probe.write_bytes(b"ok")
    except OSError as exc:
        raise SaveDirError(f"--save {directory} is not writable: {exc.strerror or exc}") from None
    finally:
        probe.unlink(missing_ok=True)
    free = shutil.disk_usage(path).free
    if needed_bytes > free:
        raise SaveDirError(
            f"--save {directory}: No space left on device for a checkpoint: one needs about "
            f"{_fmt_bytes(needed_bytes)} (estimate: weights + fp32 optimizer state), "
            f"{_fmt_bytes(free)} free")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SaveLock:
    """An exclusive claim on a save directory by one run (taken by global rank 0)."""

    NAME = ".lock"

    def __init__(self, directory: str) -> None:
        self.path = Path(directory) / self.NAME
        self.held = False
        self.note: Optional[str] = None  # what happened to a stale lock, for the log

    def acquire(self) -> "SaveLock":
        me = f"{socket.gethostname()} {os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:  # vanished between our attempts, or unreadable: try again
                    continue
                host, pid, since = holder
                if host == socket.gethostname() and not _process_alive(pid):
                    self.note = (f"removed a stale lock {self.path} of process {pid} "
                                 f"(started {since}), which is no longer running")
                    self.path.unlink(missing_ok=True)
                    continue
                raise SaveDirError(
                    f"--save {self.path.parent} is in use by another run (process {pid} on host "
                    f"{host}, since {since}; lock file {self.path}); wait for it, use another "
                    "--save, or delete the lock file if that run is dead") from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(me)
            self.held = True
            return self
        raise SaveDirError(f"cannot take the lock {self.path}")

    def _holder(self):
        try:
            host, pid, since = self.path.read_text(encoding="utf-8").split()[:3]
            return host, int(pid), since
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder and holder[1] == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False


def remove_leftovers(directory: str) -> list[str]:
    """Remove the directories an interrupted save left behind; returns their names."""
    root = Path(directory)
    if not root.is_dir():
        return []
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and LEFTOVER_RE.match(p.name))
    for name in names:
        shutil.rmtree(root / name, ignore_errors=True)
    return names


def complete_tags(directory: str) -> list[str]:
    """Tags of complete checkpoints (renamed from .tmp), oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name)),
                  key=lambda t: int(TAG_RE.match(t).group(1)))


def latest_or_newest(directory: str) -> Optional[str]:
    """The tag `latest` names, else the newest complete checkpoint (a run killed between the
    rename and writing `latest`), else None (nothing to resume from)."""
    path = Path(directory) / "latest"
    if path.is_file():
        tag = path.read_text(encoding="utf-8").strip()
        if (Path(directory) / tag).is_dir():
            return tag
    tags = complete_tags(directory)
    return tags[-1] if tags else None


def prune(directory: str, keep: int, latest: str) -> list[str]:
    """Delete all but the `keep` newest complete checkpoints, never `latest`; returns the removed."""
    tags = [t for t in complete_tags(directory) if t != latest]
    excess = tags[:max(0, len(tags) - (keep - 1))] if keep >= 1 else []
    for tag in excess:
        shutil.rmtree(Path(directory) / tag, ignore_errors=True)
    return excess


# ---- a save that failed ---------------------------------------------------------------------
# A write that fails while the file system has less than this free was stopped by the full disk,
# whatever the writer called it (torch's zip writer: "unexpected pos 15296 vs 15190").
DISK_FULL_MARGIN = 4 << 20
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class SaveFailed(OSError):
    """A save stopped by its directory (full disk: exit 1; no longer writable: exit 2). str() is
    the one line itself, without OSError's `[Errno N]`."""

    def __init__(self, code: int, message: str, exit_code: int) -> None:
        super().__init__(code, message)
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.strerror


def free_bytes(path: Path) -> Optional[int]:
    """Bytes this process may still write on `path`'s file system (root may use the reserve)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    blocks = st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail
    return blocks * st.f_frsize


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _says_no_space(exc: BaseException) -> bool:
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "ENOSPC" in text or "Disk quota exceeded" in text:
            return True
    return False


def _refused(exc: BaseException) -> Optional[OSError]:
    """The permission / read-only error in `exc`'s chain, or None."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _NOT_WRITABLE:
            return e
    return None


def _probe_refused(root: Path) -> Optional[OSError]:
    """Whether `root` refuses a new file now (DeepSpeed logs and swallows its own makedirs
    error, and torch then says "Parent directory ... does not exist")."""
    probe = root / f".write_test.{socket.gethostname()}.{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY, 0o644)
    except OSError as e:
        return e if e.errno in _NOT_WRITABLE else None
    os.close(fd)
    probe.unlink(missing_ok=True)
    return None


def _previous(root: Path) -> str:
    tag = latest_or_newest(str(root))
    return f"the previous checkpoint {tag} stays latest" if tag else \
        f"no earlier checkpoint in {root}"


def save_failure(exc: BaseException, root: Path, tag: str,
                 needed_bytes: Optional[int] = None) -> BaseException:
    """The error to report for `exc`, raised while saving `tag` into `root` (call it before the
    partial `<tag>.tmp` is removed: its files are what filled the disk): `SaveFailed` for a full
    disk or a directory that refuses files, else `exc` itself. An explicit errno in the chain
    decides; otherwise less than DISK_FULL_MARGIN free means a full disk, and a probe file that
    cannot be created means the directory refuses files."""
    if isinstance(exc, SaveFailed) or not isinstance(exc, Exception):
        return exc
    refused = _refused(exc)
    free = free_bytes(root)
    if _says_no_space(exc) or (refused is None and free is not None and free < DISK_FULL_MARGIN):
        need = f" (one checkpoint needs about {_fmt_bytes(needed_bytes)})" if needed_bytes else ""
        return SaveFailed(errno.ENOSPC, f"No space left on device while saving {tag} to {root}{need}; "
                          f"{_previous(root)}", EXIT_FAILURE)
    refused = refused or _probe_refused(root)
    if refused is not None:
        return SaveFailed(refused.errno, f"--save {root} is not writable ({refused.strerror}) while "
                          f"saving {tag}; {_previous(root)}", EXIT_USAGE)
    return exc
