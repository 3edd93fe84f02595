"""A tiny dependency-free progress bar for long CLI loops (tokenizer training, preprocessing,
evaluation, checkpoint conversion, adapter merges)."""
import sys
import time


def progress_wanted(force: bool = False, quiet: bool = False, stream=None) -> bool:
    """Whether a tool shows progress: never under --quiet; with --progress always; else only
    when stderr (`stream`) is a terminal, so that logs stay as they were."""
    if quiet:
        return False
    stream = stream if stream is not None else sys.stderr
    return bool(force) or (hasattr(stream, "isatty") and stream.isatty())


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """Prints `label: done/total items, items/s[, extra/s][, MB/s], elapsed[, ETA]` to stderr, throttled.

    On a terminal the line is redrawn in place every `interval` seconds; in logs (not a tty) a new
    line is written every `log_interval` seconds so that CI output stays short. `extra_unit` counts
    a second quantity (e.g. tokens) whose rate is shown too; `enabled=False` prints nothing.
    """

    def __init__(self, label, total=None, unit="docs", stream=None, interval=0.5, log_interval=10.0,
                 extra_unit=None, enabled=True):
        self.label, self.total, self.unit, self.extra_unit = label, total, unit, extra_unit
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = interval if self.tty else log_interval
        self.count = 0
        self.extra = 0
        self.nbytes = 0
        self.start = time.perf_counter()
        self._last = self.start

    def update(self, n=1, nbytes=0, extra=0):
        self.count += n
        self.nbytes += nbytes
        self.extra += extra
        now = time.perf_counter()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._draw(now, end="\r" if self.tty else "\n")

    def close(self):
        if self.enabled:
            self._draw(time.perf_counter(), end="\n")

    def line(self, now=None):
        elapsed = max((now or time.perf_counter()) - self.start, 1e-9)
        done = f"{self.count}/{self.total}" if self.total else f"{self.count}"
        text = f"{self.label}: {done} {self.unit}, {self.count / elapsed:,.0f} {self.unit}/s"
        if self.extra_unit:
            text += f", {self.extra / elapsed:,.0f} {self.extra_unit}/s"
        if self.nbytes:
            text += f", {self.nbytes / elapsed / 1e6:.2f} MB/s"
        if self.total:
            frac = min(self.count / self.total, 1.0)
            bar = "#" * int(frac * 20)
            text = f"[{bar:<20}] {100 * frac:5.1f}% " + text
        text += f", {elapsed:.1f}s"
        if self.total and 0 < self.count < self.total:
            text += f", ETA {_clock((self.total - self.count) * elapsed / self.count)}"
        return text

    def _draw(self, now, end):
        self.stream.write(self.line(now) + end)
        self.stream.flush()
