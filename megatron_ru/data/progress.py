"""A tiny dependency-free progress bar for long CLI loops (tokenizer training, preprocessing)."""
import sys
import time


class Progress:
    """Prints `label: done/total items, items/s, MB/s` to stderr, throttled.

    On a terminal the line is redrawn in place every `interval` seconds; in logs (not a tty) a new
    line is written every `log_interval` seconds so that CI output stays short.
    """

    def __init__(self, label, total=None, unit="docs", stream=None, interval=0.5, log_interval=10.0):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = interval if self.tty else log_interval
        self.count = 0
        self.nbytes = 0
        self.start = time.perf_counter()
        self._last = self.start

    def update(self, n=1, nbytes=0):
        self.count += n
        self.nbytes += nbytes
        now = time.perf_counter()
        if now - self._last >= self.interval:
            self._last = now
            self._draw(now, end="\r" if self.tty else "\n")

    def close(self):
        self._draw(time.perf_counter(), end="\n")

    def line(self, now=None):
        elapsed = max((now or time.perf_counter()) - self.start, 1e-9)
        done = f"{self.count}/{self.total}" if self.total else f"{self.count}"
        text = f"{self.label}: {done} {self.unit}, {self.count / elapsed:,.0f} {self.unit}/s"
        if self.nbytes:
            text += f", {self.nbytes / elapsed / 1e6:.2f} MB/s"
        if self.total:
            frac = min(self.count / self.total, 1.0)
            bar = "#" * int(frac * 20)
            text = f"[{bar:<20}] {100 * frac:5.1f}% " + text
        return text + f", {elapsed:.1f}s"

    def _draw(self, now, end):
        self.stream.write(self.line(now) + end)
        self.stream.flush()
