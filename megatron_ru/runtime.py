"""How every entry point runs: failure containment, signals, hang watchdog, one-line errors, exit codes.

    def main(argv=None) -> int: ...
    if __name__ == "__main__":
        sys.exit(runtime.run(main, "tools/serve.py"))

Failure containment. An exception that escapes `main` on one rank of a multi-rank job ends every
rank of the job: the failing rank prints one line (`prog: error on rank R: ...`; the traceback
goes to a log file, or to stderr with `--debug` / MEGATRON_RU_DEBUG=1) and then *aborts*: MPI
`Abort` when MPI is initialised (Hydra / ORTE kill the peers), otherwise `os._exit`, which a
torchrun agent or Slurm step treats as a failed worker and tears the others down. It never
returns into the interpreter's exit hooks, where mpi4py's `MPI_Finalize` would wait for peers
stuck in a collective (that wait was gloo's 30-minute timeout).

Failures that every rank knows about at once (checks agreed with `agree` / `checked`, argument
errors before any communication) are printed by rank 0 only, and every rank exits normally with
the same status.

Exit statuses: 0 done (also after a graceful stop that saved), 1 unexpected failure (machine,
peer, bug), 2 user mistake (flag, file, input), 3 training diverged (non-finite policy), 4 hang
watchdog fired, 130 aborted by a second interrupt.

Signals. `run(..., graceful=True)` (training): SIGTERM and the first SIGINT only set a flag that
the loop polls (`stop_requested()`; the ranks agree on the step), the second SIGINT aborts at
once. Otherwise (sampling, conversion, ...) the first SIGINT / SIGTERM ends the job at once with
one line.

Fault injection for tests: MEGATRON_RU_FAULT="SITE[@RANK][:ITERATION]" makes `fault_point(SITE,
iteration)` raise on that rank (every rank when @RANK is absent); see `fault_point`.
"""
from __future__ import annotations

import errno
import faulthandler
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from typing import Callable, Optional

from .errors import (EXIT_ABORTED, EXIT_DIVERGED, EXIT_FAILURE, EXIT_HANG, EXIT_OK,  # noqa: F401 (re-exported)
                     EXIT_USAGE, InjectedFault, JobFailure, UsageError, describe, exit_code_of)
from . import threads
from .launch import discover_launch


# ---- process-wide state of the job (one per process by nature: signals, MPI) --------------------
class _State:
    prog = "megatron_ru"
    rank = 0
    world_size = 1
    debug = False
    stop_signal: Optional[str] = None  # name of the signal that asked for a graceful stop
    interrupts = 0
    watchdog: Optional["Watchdog"] = None
    started = time.time()  # when `run` was entered (wall clock, for --exit-duration-in-mins)
    cleanups: list = []  # run before a hard exit too (e.g. release a save-directory lock)


_state = _State()


def _mpi_comm():
    """MPI.COMM_WORLD when mpi4py is imported and MPI initialised, else None (never initialises)."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None:
        return None
    try:
        return mpi.COMM_WORLD if mpi.Is_initialized() and not mpi.Is_finalized() else None
    except Exception:  # noqa: BLE001 - a broken MPI must not stop the abort
        return None


def on_exit(callback: Callable[[], None]) -> Callable[[], None]:
    """Register a quick clean-up that runs when `run` ends, also through `hard_exit`."""
    _state.cleanups.append(callback)
    return callback


def _run_cleanups() -> None:
    while _state.cleanups:
        try:
            _state.cleanups.pop()()
        except Exception:  # noqa: BLE001 - clean-ups are best effort
            pass


ABORT_GRACE_S = 0.5


def hard_exit(code: int, *, together: bool = False) -> None:
    """End this process now, and with it the job: MPI Abort, or os._exit (no exit hooks).
    `together`: every rank of the job is leaving here with the same status (success, or an
    agreed failure), so no abort is needed: each rank runs its clean-ups, waits at a barrier until every rank has
    (rank 0 has printed the report: a launcher kills the others once one rank exits non-zero),
    finalises MPI and exits, skipping the interpreter's teardown of gloo threads, which could
    abort the process ("terminate called without an active exception", seen once in CI)."""
    _run_cleanups()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    comm = _mpi_comm() if _state.world_size > 1 else None
    if together:
        _barrier(comm)
        if comm is not None:
            try:
                sys.modules["mpi4py.MPI"].Finalize()
            except Exception:  # noqa: BLE001
                pass
    elif comm is not None:
        time.sleep(ABORT_GRACE_S)  # MPI's abort kills the job at once: let the launcher forward
        try:  # the error line first (a fault test lost it in one of a few local runs)
            comm.Abort(code)
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


def _barrier(comm) -> None:
    """Every rank of the job reaches this point: the process group's barrier (bounded by its
    collective timeout), else MPI's when MPI spans the whole job."""
    try:
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.barrier()
        elif comm is not None and comm.Get_size() == _state.world_size:
            comm.Barrier()
    except Exception:  # noqa: BLE001 - leaving anyway
        pass


def say(message: str, *, rank: Optional[int] = None) -> None:
    """One line on stderr: `prog: message`, or `prog on rank R: message` when `rank` is given."""
    where = f" on rank {rank}" if rank is not None else ""
    print(f"{_state.prog}{where}: {' '.join(message.splitlines())}", file=sys.stderr, flush=True)


def _error_line(message: str, rank: Optional[int]) -> str:
    where = f" on rank {rank}" if rank is not None else ""
    return f"error{where}: {message}"


def _traceback_file(exc: BaseException) -> Optional[str]:
    if _state.debug:
        traceback.print_exception(exc, file=sys.stderr)
        return None
    try:
        name = os.path.basename(_state.prog).replace(".py", "")
        directory = os.environ.get("MEGATRON_RU_LOG_DIR") or tempfile.gettempdir()
        path = os.path.join(directory, f"megatron_ru-{name}-rank{_state.rank}-{os.getpid()}.log")
        with open(path, "w", encoding="utf-8") as f:
            traceback.print_exception(exc, file=f)
        return path
    except OSError:
        return None


def report(exc: BaseException) -> int:
    """Print the one line for `exc` (rank 0 only for agreed failures); return its exit status."""
    code = exit_code_of(exc)
    if isinstance(exc, JobFailure):
        if _state.rank == 0 and str(exc):
            say(_error_line(str(exc), exc.rank))
        return code
    line = _error_line(describe(exc), _state.rank if _state.world_size > 1 else None)
    if code != EXIT_USAGE:
        path = _traceback_file(exc)
        if path:
            line += f" (traceback in {path})"
    elif _state.debug:
        traceback.print_exception(exc, file=sys.stderr)
    say(line)
    return code


def _distributed_started() -> bool:
    dist = sys.modules.get("torch.distributed")
    started = bool(dist is not None and dist.is_available() and dist.is_initialized())
    return started or _mpi_comm() is not None


# ---- signals ------------------------------------------------------------------------------------
def stop_requested() -> Optional[str]:
    """The name of the signal that asked this process to stop gracefully, or None."""
    return _state.stop_signal


def request_stop(reason: str) -> None:
    _state.stop_signal = _state.stop_signal or reason


def _graceful_handler(signum, frame) -> None:  # noqa: ARG001
    name = signal.Signals(signum).name
    if signum == signal.SIGINT:
        _state.interrupts += 1
    if _state.stop_signal is not None and (signum == signal.SIGINT and _state.interrupts > 1
                                           or signum == signal.SIGTERM):
        say(f"second {name}: aborting now without saving", rank=_state.rank)
        hard_exit(EXIT_ABORTED)
    _state.stop_signal = name
    if _state.rank == 0:
        say(f"{name} received: finishing the current step, then saving and exiting "
            "(interrupt again to abort without saving)")


def _immediate_handler(signum, frame) -> None:  # noqa: ARG001
    name = signal.Signals(signum).name
    if _state.rank == 0:
        say(f"{name} received: stopping")
    hard_exit(EXIT_ABORTED if signum == signal.SIGINT else 128 + signum)


def install_signal_handlers(graceful: bool) -> dict:
    """Install ours; returns the previous handlers (for `run` to restore when main returns)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    _state.stop_signal, _state.interrupts = None, 0
    handler = _graceful_handler if graceful else _immediate_handler
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}


# ---- hang watchdog ------------------------------------------------------------------------------
class Watchdog:
    """No `beat()` for `timeout_s` → dump every thread's Python stack to stderr, then abort the job.

    Every rank runs its own; a job stuck in a collective is stuck on every rank, so each one dumps
    its stacks (the short grace period lets the others dump before the first abort kills them).
    """

    def __init__(self, timeout_s: float, *, grace_s: float = 5.0) -> None:
        self.timeout_s, self.grace_s = float(timeout_s), grace_s
        self.last = time.monotonic()
        self.what = "start-up"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="megatron_ru-watchdog", daemon=True)
        self._thread.start()

    def beat(self, what: str = "") -> None:
        self.last = time.monotonic()
        if what:
            self.what = what

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, max(0.05, self.timeout_s / 10))):
            idle = time.monotonic() - self.last
            if idle > self.timeout_s:
                say(f"error on rank {_state.rank}: no progress for {idle / 60:.1f} min "
                    f"(--hang-timeout-minutes {self.timeout_s / 60:g}) after {self.what}; Python "
                    "stacks follow, then the job is aborted")
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                time.sleep(self.grace_s)
                hard_exit(EXIT_HANG)


def start_watchdog(timeout_minutes: Optional[float]) -> Optional[Watchdog]:
    """Start (or restart) the process's watchdog; None or <= 0 disables it."""
    if _state.watchdog is not None:
        _state.watchdog.close()
        _state.watchdog = None
    if timeout_minutes and timeout_minutes > 0:
        _state.watchdog = Watchdog(timeout_minutes * 60.0)
    return _state.watchdog


def heartbeat(what: str = "") -> None:
    """Progress was made (a step, a batch, a saved file): resets the hang watchdog."""
    if _state.watchdog is not None:
        _state.watchdog.beat(what)


# ---- agreement between ranks --------------------------------------------------------------------
def agree(ps, error: Optional[BaseException]) -> None:
    """Collective: every rank passes its own outcome; if any rank failed, every rank raises the
    first failing rank's error as a `JobFailure` (rank 0 prints it, all exit alike). With one
    process it simply re-raises `error`."""
    import torch.distributed as dist

    if ps is None or getattr(ps, "world_size", 1) == 1 or not dist.is_initialized():
        if error is not None:
            raise error
        return
    outcome = None if error is None else (describe(error), exit_code_of(error))
    gathered: list = [None] * ps.world_size
    dist.all_gather_object(gathered, outcome)
    failed = [(r, o) for r, o in enumerate(gathered) if o is not None]
    if not failed:
        return
    if error is not None and exit_code_of(error) != EXIT_USAGE and not _state.debug:
        path = _traceback_file(error)
        if path:
            say(f"traceback of the error below in {path}", rank=_state.rank)
    rank, (message, code) = failed[0]
    more = f" (and {len(failed) - 1} more rank(s) failed)" if len(failed) > 1 else ""
    raise JobFailure(message + more, code, rank) from error


def checked(ps, build: Callable, *args, **kwargs):
    """Run `build` on every rank and `agree` on the outcome; returns its result."""
    error, result = None, None
    try:
        result = build(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - shared with the other ranks, then re-raised
        error = exc
    agree(ps, error)
    return result


# ---- fault injection (tests) --------------------------------------------------------------------
def fault_point(site: str, iteration: Optional[int] = None) -> None:
    """Test-only fault hook. MEGATRON_RU_FAULT="SITE[@RANK][:ITERATION]" (several separated by
    commas) names where to fail; MEGATRON_RU_FAULT_KIND says how: `error` (default: raise
    InjectedFault), `enospc` (raise OSError "No space left on device"), `hang` (sleep forever, for
    the watchdog), `exit` (os._exit(1) without any clean-up, like a crashed process)."""
    spec_all = os.environ.get("MEGATRON_RU_FAULT")
    if not spec_all:
        return
    for spec in spec_all.split(","):
        name, _, when = spec.partition(":")
        name, _, rank = name.partition("@")
        if name != site or (rank and int(rank) != _state.rank):
            continue
        if when and (iteration is None or int(when) != iteration):
            continue
        kind = os.environ.get("MEGATRON_RU_FAULT_KIND", "error")
        where = f"injected fault at {site}" + (f" (iteration {iteration})" if iteration is not None
                                               else "")
        if kind == "enospc":
            raise OSError(errno.ENOSPC, f"No space left on device ({where})")
        if kind == "hang":
            while True:
                time.sleep(3600)
        if kind == "exit":
            os._exit(1)
        raise InjectedFault(where)


def started_at() -> float:
    """Wall-clock time (time.time()) at which the entry point started."""
    return _state.started


def discover_rank() -> int:
    """This process's global rank as the launcher published it (0 when run alone)."""
    return _state.rank


# ---- the flags every entry point shares ---------------------------------------------------------
def add_arguments(parser, *, hang_default: Optional[float] = None) -> None:
    """--distributed-timeout-minutes, --hang-timeout-minutes, --debug (Megatron's names)."""
    g = parser.add_argument_group("failure handling")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0, metavar="M",
                   help="timeout of every collective (default 10); a peer that stops answering "
                        "ends the job after M minutes instead of gloo/NCCL's 30")
    g.add_argument("--hang-timeout-minutes", type=float, default=hang_default, metavar="M",
                   help="no progress for M minutes -> every rank dumps its Python stacks and the "
                        "job aborts (exit 4)" + (f"; default {hang_default:g}" if hang_default
                                                 else "; default off"))
    g.add_argument("--debug", action="store_true",
                   help="print full tracebacks on errors (otherwise one line plus a log file)")
    threads.add_argument(g)


# ---- the entry-point wrapper --------------------------------------------------------------------
def run(main: Callable, prog: str, argv=None, *, graceful: bool = False) -> int:
    """Run `main(argv)` under failure containment; returns the exit status for `sys.exit`."""
    _state.prog, _state.started = prog, time.time()
    previous = install_signal_handlers(graceful)  # first: a Ctrl-C during imports is handled too
    dist_before = _distributed_started()
    words = sys.argv[1:] if argv is None else list(argv)
    _state.debug = "--debug" in words or os.environ.get("MEGATRON_RU_DEBUG", "") not in ("", "0")
    try:
        launch = discover_launch()
        _state.rank, _state.world_size = launch.rank, launch.world_size
    except Exception:  # noqa: BLE001 - a malformed launcher environment is reported by main
        pass
    try:
        if "-h" not in words and "--help" not in words:
            threads.apply(words, rank=_state.rank, follow_load=not graceful)  # training: a fixed share
        code = main(argv)
    except SystemExit as exc:  # argparse: it printed its own message (every rank alike)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_FAILURE)
        if code and _state.world_size > 1 and _distributed_started():
            hard_exit(code)  # a rank of a job; never a process that merely has a process group
        _shutdown(previous, dist_before)
        return code
    except BaseException as exc:  # noqa: BLE001 - the point of this function
        interrupted = isinstance(exc, KeyboardInterrupt)  # this rank's signal: not agreed
        if interrupted:
            exc = JobFailure("interrupted", EXIT_ABORTED)
        code = exit_code_of(exc)
        if _state.world_size > 1 and code == EXIT_USAGE and not _distributed_started():
            # Before any communication the ranks run the same deterministic checks (flags):
            # every rank fails alike, rank 0 says it once, all exit with the same status.
            if _state.rank == 0:
                report(exc)
            return code
        code = report(exc)
        if _state.world_size > 1 and (interrupted or not isinstance(exc, JobFailure)):
            # Only this rank knows: take the whole job down rather than finalise into a wait.
            hard_exit(code)
        if _state.world_size > 1 and _distributed_started():
            # An agreed failure: all ranks are here together and leave with the same status.
            hard_exit(code, together=True)
        _shutdown(previous, dist_before)
        return code
    if _state.world_size > 1 and _distributed_started():
        # A rank of a job that succeeded: leave together, as after an agreed failure. The
        # interpreter's own teardown of gloo / DeepSpeed threads could abort a finished ZeRO-3
        # run ("terminate called without an active exception", status 6: twice in CI).
        hard_exit(int(code or 0), together=True)
    _shutdown(previous)
    return int(code or 0)


def _shutdown(previous: dict, dist_before: bool = True) -> None:
    _run_cleanups()
    dist = sys.modules.get("torch.distributed")
    if not dist_before and dist is not None and dist.is_available() and dist.is_initialized():
        # every rank returns here together after an agreed failure: tear the process group
        # down now, not in the interpreter's exit, where gloo's threads may abort
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    if _state.watchdog is not None:
        _state.watchdog.close()
        _state.watchdog = None
    for sig, handler in previous.items():  # a caller in-process (tests) gets its handlers back
        signal.signal(sig, handler)
