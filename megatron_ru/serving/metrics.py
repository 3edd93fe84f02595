"""Server metrics in the Prometheus text format: requests, tokens, queue, rows, tokens/s, time to first token."""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Callable

PREFIX = "megatron_ru_serve"
WINDOW_S = 10.0  # tokens/s is measured over this trailing window
QUANTILES = (0.5, 0.9, 0.99)


class Metrics:
    """Counters and recent observations, updated from the HTTP and scheduler threads."""

    def __init__(self, gauges: dict[str, tuple[str, Callable[[], float]]]) -> None:
        self.gauges = gauges  # name → (help, read)
        self.lock = threading.Lock()
        self.requests: Counter = Counter()  # (route, status)
        self.finished: Counter = Counter()  # finish reason
        self.prompt_tokens = self.completion_tokens = 0
        self.steps = self.decoded_rows = self.prefills = 0
        self.ttft = _Summary()
        self.latency = _Summary()
        self.recent: deque = deque()  # (time, tokens) within WINDOW_S
        self.started = time.time()

    def count_request(self, route: str, status: int, prompt_tokens: int = 0) -> None:
        with self.lock:
            self.requests[(route, status)] += 1
            self.prompt_tokens += prompt_tokens

    def count_tokens(self, n: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.completion_tokens += n
            self.recent.append((now, n))

    def count_step(self, decoded_rows: int, prefills: int) -> None:
        with self.lock:
            self.steps += 1
            self.decoded_rows += decoded_rows
            self.prefills += prefills

    def count_finish(self, reason: str) -> None:
        with self.lock:
            self.finished[reason] += 1

    def observe_ttft(self, seconds: float) -> None:
        with self.lock:
            self.ttft.add(seconds)

    def observe_latency(self, seconds: float) -> None:
        with self.lock:
            self.latency.add(seconds)

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self.lock:
            while self.recent and self.recent[0][0] < now - WINDOW_S:
                self.recent.popleft()
            return sum(n for _, n in self.recent) / WINDOW_S

    def render(self) -> str:
        lines: list[str] = []

        def metric(name, kind, help_, samples):
            lines.append(f"# HELP {PREFIX}_{name} {help_}")
            lines.append(f"# TYPE {PREFIX}_{name} {kind}")
            for labels, value in samples:
                lines.append(f"{PREFIX}_{name}{labels} {value:.6g}")

        for name, (help_, read) in self.gauges.items():
            metric(name, "gauge", help_, [("", float(read()))])
        metric("tokens_per_second", "gauge",
               f"completion tokens per second over the last {WINDOW_S:g} s",
               [("", self.tokens_per_second())])
        with self.lock:
            metric("requests_total", "counter", "HTTP requests by route and status",
                   [(f'{{route="{r}",status="{s}"}}', n) for (r, s), n in sorted(self.requests.items())])
            metric("sequences_finished_total", "counter", "sequences (choices) by finish reason",
                   [(f'{{reason="{r}"}}', n) for r, n in sorted(self.finished.items())])
            metric("prompt_tokens_total", "counter", "prompt tokens received", [("", self.prompt_tokens)])
            metric("completion_tokens_total", "counter", "tokens generated",
                   [("", self.completion_tokens)])
            metric("steps_total", "counter", "scheduler steps that ran the model", [("", self.steps)])
            metric("decoded_rows_total", "counter",
                   "sequences decoded, summed over steps (/ steps_total = mean batch)",
                   [("", self.decoded_rows)])
            metric("prefills_total", "counter", "prompts prefilled into a row", [("", self.prefills)])
            for name, summary, help_ in (
                    ("time_to_first_token_seconds", self.ttft, "submission to first token, per sequence"),
                    ("request_seconds", self.latency, "request start to last byte")):
                metric(name, "summary", help_, summary.samples())
        return "\n".join(lines) + "\n"


class _Summary:
    """Sum and count since the start, quantiles over the last 1000 observations."""

    def __init__(self) -> None:
        self.values: deque = deque(maxlen=1000)
        self.sum, self.count = 0.0, 0

    def add(self, value: float) -> None:
        self.values.append(value)
        self.sum += value
        self.count += 1

    def samples(self) -> list[tuple[str, float]]:
        ordered = sorted(self.values)
        out = []
        for q in QUANTILES:
            value = ordered[min(int(q * len(ordered)), len(ordered) - 1)] if ordered else float("nan")
            out.append((f'{{quantile="{q}"}}', value))
        return out + [("_sum", self.sum), ("_count", self.count)]
