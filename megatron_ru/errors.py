"""Errors at the bottom of the package: exit statuses, the user-mistake base class, agreed job failures.

Imports nothing of ours, so every layer (config, data, model, checkpoint, inference, serving, training,
runtime) can raise and classify them. `runtime` turns them into one line and an exit status.

Exit statuses: 0 done (also after a graceful stop that saved), 1 unexpected failure (machine,
peer, bug), 2 user mistake (flag, file, input), 3 training diverged (non-finite policy), 4 hang
watchdog fired, 130 aborted by a second interrupt.
"""
from __future__ import annotations

import errno
from typing import Optional

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_DIVERGED, EXIT_HANG, EXIT_ABORTED = 0, 1, 2, 3, 4, 130


class UsageError(ValueError):
    """A user mistake (flag, file, input): one line, exit status 2. Our error classes derive from it."""
    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A model or parallel configuration breaks a rule; the message names the value and the rule."""


class JobFailure(Exception):
    """An error every rank learnt about together (via `agree`): rank 0 reports it, all exit alike."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE,
                 rank: Optional[int] = None) -> None:
        super().__init__(message)
        self.exit_code, self.rank = exit_code, rank


class InjectedFault(RuntimeError):
    """Raised by `fault_point` when MEGATRON_RU_FAULT names the site."""


# OSErrors that are the user's path mistakes rather than faults of the machine.
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                FileExistsError)


def exit_code_of(exc: BaseException) -> int:
    code = getattr(exc, "exit_code", None)
    if isinstance(code, int):
        return code
    if isinstance(exc, _PATH_ERRORS):
        return EXIT_USAGE
    return EXIT_FAILURE


def describe(exc: BaseException) -> str:
    """One line: the message, prefixed by the exception type where the message alone is unclear."""
    msg = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return msg if "No space left on device" in msg else f"No space left on device: {msg}"
    if isinstance(exc, (UsageError, JobFailure)) or exit_code_of(exc) == EXIT_USAGE:
        return msg
    return f"{type(exc).__name__}: {msg}"
