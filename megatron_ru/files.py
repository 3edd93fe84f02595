"""Atomic file writes: write a temporary sibling, then rename it into place; a failure leaves the old file.

Every writer of a file others may read while we write (checkpoints, `latest`, dataset indices,
caches, tokenizer files, outputs) goes through here. A temporary sibling is named
`.<name>.tmp-XXXXXXXX` in the target's directory (so the rename never crosses file systems), gets
the mode `open()` would give (0666 minus the umask) just before it is renamed, and is removed when
the write fails. Bottom module: imports nothing of ours.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_mode() -> int:
    """0666 minus the umask: what open() would give (mkstemp's files are 0600)."""
    return 0o666 & ~_umask()


def temp_sibling(path: PathLike) -> str:
    """A new empty file next to `path` to write into; `commit` or `discard` it afterwards."""
    directory, name = os.path.split(os.fspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory or ".", prefix=f".{name}.tmp-")
    os.close(fd)
    return tmp


def commit(tmp: PathLike, path: PathLike) -> None:
    """Give `tmp` the ordinary file mode and rename it to `path` (atomic on POSIX)."""
    os.chmod(tmp, ordinary_mode())
    os.replace(tmp, path)


def discard(tmp: PathLike) -> None:
    """Remove a temporary file if it is still there."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yields a temporary sibling path of `path` to write (by any library); on success it is renamed
    to `path`, on an exception it is removed and `path` is left as it was."""
    tmp = temp_sibling(path)
    try:
        yield tmp
        commit(tmp, path)
    finally:
        discard(tmp)


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", *, encoding: str = "utf-8", fsync: bool = False):
    """`open(path, mode)` that replaces `path` only when the block completes ("w" or "wb")."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', not {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())


def atomic_write_text(path: PathLike, text: str) -> None:
    """Replace `path` by `text` (UTF-8), flushed to disk before the rename."""
    with atomic_open(path, "w", fsync=True) as f:
        f.write(text)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Replace `path` by `data`, flushed to disk before the rename."""
    with atomic_open(path, "wb", fsync=True) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
    """Yields a new temporary directory next to `path` (mode as mkdir gives) to fill; on success it
    replaces `path` (an existing one is removed first), on an exception it is removed and `path`
    is untouched."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp."))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 → what mkdir gives
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["atomic_directory", "atomic_open", "atomic_path", "atomic_write_bytes", "atomic_write_text",
           "commit", "discard", "ordinary_mode", "temp_sibling"]
