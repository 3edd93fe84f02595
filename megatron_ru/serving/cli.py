"""tools/serve.py's work: flags, the model (loading.open_model, as generate.py), the scheduler and uvicorn on rank 0.

Under `mpirun --np N` (N = TP size) rank 0 runs the HTTP server and the scheduler and the
other ranks follow its step plans (engine.BatchEngine.follow). SIGTERM / SIGINT on rank 0:
/health answers 503 and new requests get 503 while the listener stays open for --drain-seconds
(load balancers see it), then the listener closes; running requests may finish until
--shutdown-timeout seconds after the signal, then they are cut (a stream gets an error event and
[DONE]); the other ranks are told to stop; exit 0. A second signal cuts them at once.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from .. import runtime
from ..data.chat_templates import BUILTINS as BUILTIN_TEMPLATES
from ..inference.cli import (add_chat_template_argument, add_context_arguments, add_rugpts_arguments,
                             is_generate_flag, model_options)
from ..inference.loading import InputError, add_inference_arguments
from ..parallel.state import discover_launch


def build_serve_parser() -> argparse.ArgumentParser:
    """loading.py's model, tokenizer and quantization groups, the context and chat-template flags,
    and the serving group; no sampling or prompt flags (those come with each request)."""
    p = argparse.ArgumentParser(
        prog="tools/serve.py", allow_abbrev=False,  # --chat must not abbreviate --chat-template
        description="Serve a megatron_ru checkpoint over an OpenAI-compatible HTTP API with "
                    "continuous batching; under `mpirun --np N` at tensor-parallel size N.")
    add_inference_arguments(p)
    add_rugpts_arguments(p)
    g = p.add_argument_group("serving")
    add_context_arguments(g)
    add_chat_template_argument(g)
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 for all)")
    g.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed)")
    g.add_argument("--model-name", help="the model id clients send (default: the --load "
                                        "directory's name)")
    g.add_argument("--api-key", default=os.environ.get("MEGATRON_RU_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (default: "
                        "$MEGATRON_RU_API_KEY; the variable keeps the key out of `ps`)")
    g.add_argument("--max-batch-size", type=int, default=8,
                   help="rows of the KV cache: sequences decoded together (default 8)")
    g.add_argument("--max-queue", type=int, default=64,
                   help="sequences waiting for a row beyond the batch; more gets HTTP 429")
    g.add_argument("--request-timeout", type=float, default=600.0, metavar="S",
                   help="a sequence still running after S seconds ends (finish_reason timeout)")
    g.add_argument("--max-tokens-limit", type=int, default=4096,
                   help="largest max_tokens a request may ask for (default 4096)")
    g.add_argument("--max-n", type=int, default=16, help="largest n (choices per prompt)")
    g.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body (default 1 MiB; more gets HTTP 413)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, running requests get S seconds to finish")
    g.add_argument("--drain-seconds", type=float, default=2.0, metavar="S",
                   help="on SIGTERM, keep listening S seconds with /health at 503 before closing "
                        "the listener (default 2)")
    g.add_argument("--max-connections", type=int, default=1000,
                   help="open connections beyond this get 503 and are closed (default 1000)")
    g.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                   help="close a connection whose request head is not complete after S seconds")
    g.add_argument("--body-timeout", type=float, default=30.0, metavar="S",
                   help="a request body not received within S seconds gets HTTP 408")
    g.add_argument("--prompt-timeout", type=float, default=10.0, metavar="S",
                   help="tokenising a request's prompts or rendering its chat template may take "
                        "S seconds (HTTP 400 after)")
    g.add_argument("--allowed-hosts", metavar="NAMES",
                   help="comma-separated Host names the server answers to ('*': any; default: "
                        "localhost names for a server without --api-key on a loopback address, "
                        "else any)")
    runtime.add_arguments(p)
    return p


def parse(argv=None) -> argparse.Namespace:
    p = build_serve_parser()
    args, rest = p.parse_known_args(argv)
    for word in rest:
        if is_generate_flag(word.split("=", 1)[0]):
            raise InputError(f"{word.split('=', 1)[0]} is a generate.py flag: a server takes sampling "
                             "settings and prompts with each request")
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    args.model = model_options(args)  # --fp16/--bf16, TP size, --quantize, --lora, shape flags
    for flag, value, low in (("--max-batch-size", args.max_batch_size, 1),
                             ("--max-queue", args.max_queue, 0),
                             ("--max-tokens-limit", args.max_tokens_limit, 1),
                             ("--max-n", args.max_n, 1), ("--max-body-bytes", args.max_body_bytes, 2),
                             ("--port", args.port, 0), ("--request-timeout", args.request_timeout, 0.001),
                             ("--shutdown-timeout", args.shutdown_timeout, 0),
                             ("--drain-seconds", args.drain_seconds, 0),
                             ("--max-connections", args.max_connections, 1),
                             ("--header-timeout", args.header_timeout, 0.001),
                             ("--body-timeout", args.body_timeout, 0.001),
                             ("--prompt-timeout", args.prompt_timeout, 0.001),
                             ("--seq-length", args.seq_length or 2, 2)):
        if value < low:
            raise InputError(f"{flag} {value} must be >= {low}")
    if args.chat_template and args.chat_template not in BUILTIN_TEMPLATES and \
            not os.path.isfile(args.chat_template):
        raise InputError(f"--chat-template {args.chat_template}: neither a built-in "
                         f"({', '.join(BUILTIN_TEMPLATES)}) nor a file")
    if args.port > 65535:
        raise InputError(f"--port {args.port} must be <= 65535")
    if args.api_key is not None:
        try:
            args.api_key.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError("--api-key ($MEGATRON_RU_API_KEY) is not valid text (undecodable "
                             "bytes)") from None
    return args


def main(argv=None) -> int:
    """tools/serve.py's main; run it under `runtime.run`."""
    args = parse(argv)
    try:
        import fastapi  # noqa: F401
        import jinja2  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise InputError(f"serving needs the `serve` extra: pip install -e .[serve] ({exc})") from None
    launch = discover_launch()
    if args.tp is not None and launch.world_size != args.tp:
        raise InputError(f"--tensor-model-parallel-size {args.tp} but {launch.world_size} "
                         "processes: a server is one replica, launch exactly TP processes")
    runtime.start_watchdog(args.hang_timeout_minutes)
    from ..inference.generator import Generator  # heavy imports after the flag checks
    from ..inference.loading import open_model
    from ..inference.quantize import set_per_token
    from .chat_prompt import load_chat_format
    from .engine import BatchEngine

    opened = open_model(args.model, max_length=args.seq_length, seed=args.seed,
                        timeout_s=60.0 * args.distributed_timeout_minutes)
    ps, tok = opened.ps, opened.tokenizer
    gen = Generator(opened.model, eod=tok.eod,
                    max_length=args.seq_length or opened.model.config.max_position_embeddings)
    set_per_token(gen.model)  # quantized layers: a row's numbers independent of its batch
    engine = runtime.checked(ps, BatchEngine, gen, args.max_batch_size, gen.max_length)
    sock = runtime.checked(ps, lambda: _bind(args.host, args.port) if ps.rank == 0 else None)
    chat = runtime.checked(ps, lambda: load_chat_format(args.chat_template, tok, opened.template_dir)
                           if ps.rank == 0 else None)
    if ps.rank != 0:
        return engine.follow()
    return _serve(args, opened, gen, engine, sock, chat)


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, *_ , address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise InputError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    sock.set_inheritable(True)
    return sock


def _serve(args, opened, gen, engine, sock: socket.socket, chat) -> int:
    import uvicorn

    from .app import Service, build_app
    from .connections import bound_logs, fit_open_files, guarded_protocol
    from .guards import default_allowed_hosts, parse_allowed_hosts
    from .metrics import Metrics
    from .protocol import Limits
    from .scheduler import Scheduler

    tok = opened.tokenizer
    holder = {}
    metrics = Metrics({
        "queue_length": ("sequences waiting for a row", lambda: holder["s"].queued),
        "running_rows": ("KV-cache rows in use", lambda: holder["s"].running),
        "max_batch_size": ("KV-cache rows", lambda: args.max_batch_size),
    })
    scheduler = holder["s"] = Scheduler(engine, eod=tok.eod, vocab_size=gen.config.vocab_size,
                                        detokenize=tok.detokenize, max_queue=args.max_queue,
                                        metrics=metrics, token_limit=tok.vocab_size)
    name = args.model_name or Path(args.load).resolve().name
    limits = Limits(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens_limit,
                    max_n=args.max_n, body_timeout_s=args.body_timeout,
                    work_timeout_s=args.prompt_timeout)
    allowed = parse_allowed_hosts(args.allowed_hosts) if args.allowed_hosts is not None else \
        default_allowed_hosts(args.host, args.api_key)
    service = Service(tok, scheduler, name, limits, metrics, api_key=args.api_key,
                      request_timeout_s=args.request_timeout, chat=chat,
                      log=lambda line: runtime.say(line), allowed_hosts=allowed)
    app = build_app(service)
    fit_open_files(args.max_connections)
    host, port = sock.getsockname()[:2]
    ready = (f"serving {name} on http://{host}:{port} (max batch {args.max_batch_size}, queue "
             f"{args.max_queue}, context {gen.max_length}, {opened.ps}); chat: {chat.name}; "
             f"hosts: {', '.join(allowed) if allowed else 'any'}")
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            http=guarded_protocol(args.max_connections, args.header_timeout),
                            timeout_keep_alive=5, h11_max_incomplete_event_size=16 * 1024,
                            timeout_graceful_shutdown=args.shutdown_timeout + 5)
    bound_logs()
    server = _Server(config, ready, service, args.drain_seconds, args.shutdown_timeout)
    scheduler.start()
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.stop()
        sock.close()
    runtime.say("stopped")
    return 0


class _Server:
    """uvicorn.Server with our shutdown: the first SIGTERM/SIGINT drains (health 503, listener
    open for `drain_s`), then closes the listener and lets running requests finish until
    `shutdown_s` after the signal, when the rest are cut; a second signal cuts them at once.
    It never re-raises the signal (runtime's handler would turn that into an abort)."""

    def __new__(cls, config, ready_line: str, service, drain_s: float, shutdown_s: float):
        import uvicorn

        class Server(uvicorn.Server):
            signalled_at = None
            abort_timer = None

            @contextlib.contextmanager
            def capture_signals(self):
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                previous = {sig: signal.signal(sig, self.handle_exit)
                            for sig in (signal.SIGTERM, signal.SIGINT)}
                try:
                    yield
                finally:
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)

            def handle_exit(self, sig, frame):  # flags only: this runs inside the loop's thread
                if self.signalled_at is None:
                    runtime.say(f"{signal.Signals(sig).name} received: /health answers 503, "
                                "running requests finish, then the server stops")
                    self.signalled_at = time.monotonic()
                    service.draining = True
                else:
                    runtime.say(f"{signal.Signals(sig).name} received again: cutting running "
                                "requests")
                    service.scheduler.abort_all("shutdown")
                    self.should_exit = True

            async def on_tick(self, counter: int) -> bool:
                if self.signalled_at is not None:
                    if self.abort_timer is None:
                        import asyncio
                        left = self.signalled_at + shutdown_s - time.monotonic()
                        self.abort_timer = asyncio.get_running_loop().call_later(
                            max(left, 0), self.cut)
                    if time.monotonic() >= self.signalled_at + drain_s:
                        self.should_exit = True
                return await super().on_tick(counter)

            def cut(self) -> None:
                n = service.scheduler.abort_all("shutdown")
                if n:
                    runtime.say(f"--shutdown-timeout {shutdown_s:g} s passed: cutting {n} "
                                "running sequence(s)")

            async def startup(self, sockets=None):
                await super().startup(sockets)
                if self.started:
                    runtime.say(ready_line)

        return Server(config)


if __name__ == "__main__":
    sys.exit(runtime.run(main, "tools/serve.py"))
