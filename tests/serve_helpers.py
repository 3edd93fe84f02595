"""Start tools/serve.py (alone or under mpirun) on a free localhost port and talk to it; for tests and bench/serve.py."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "examples" / "data" / "tokenizer"  # the demo GPT-2 BPE
TOK_FLAGS = ["--vocab-file", str(TOKENIZER / "vocab.json"), "--merge-file", str(TOKENIZER / "merges.txt")]
READY = re.compile(r"serving \S+ on http://([\d.]+):(\d+)")


class ServerProcess:
    """`with ServerProcess(flags) as srv:` → srv.url, srv.client(); stderr lines in srv.lines."""

    def __init__(self, flags: list[str], *, mpirun: str | None = None, np_: int = 1,
                 env: dict | None = None, start_timeout_s: float = 180.0) -> None:
        cmd = [sys.executable, str(ROOT / "tools" / "serve.py"), *flags, "--port", "0"]
        if mpirun is not None:
            cmd = [mpirun, "--np", str(np_), *cmd]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env or server_env(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.url = None
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(start_timeout_s) or self.url is None:
            self.kill()
            raise RuntimeError("server did not start:\n" + "\n".join(self.lines[-30:]))

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            m = READY.search(line)
            if m and self.url is None:
                self.url = f"http://{m.group(1)}:{m.group(2)}"
                self._ready.set()
        self._ready.set()  # the process ended (maybe before it was ready)

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def http(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, trust_env=False, **{"timeout": 120, **kwargs})

    def openai(self, api_key: str = "none"):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0,
                             timeout=120, http_client=httpx.Client(trust_env=False))

    def terminate(self, timeout_s: float = 90.0) -> int:
        """SIGTERM (to the launcher: mpirun forwards it) and wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def server_env() -> dict:
    drop = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not k.startswith(("PMI_", "OMPI_", "SLURM_"))}
    env["PYTHONPATH"] = str(ROOT)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def wait_until(predicate, timeout_s: float = 30.0, every_s: float = 0.05) -> bool:
    """Poll `predicate` until true or `timeout_s` passed (bounded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every_s)
    return bool(predicate())


def metric(text: str, name: str) -> float:
    """A sample's value from /metrics text (the full name with labels)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0
