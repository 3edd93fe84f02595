"""tools/serve.py's work: flags, the model (loading.open_model, as generate.py), the scheduler and uvicorn on rank 0.

Under `mpirun --np N` (N = TP size) rank 0 runs the HTTP server and the scheduler and the
other ranks follow its step plans (engine.BatchEngine.follow). SIGTERM / SIGINT on rank 0:
stop accepting, let running requests finish for up to --shutdown-timeout seconds (then cancel
them), tell the other ranks to stop, exit 0.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import threading
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
                             ("--seq-length", args.seq_length or 2, 2)):
        if value < low:
            raise InputError(f"{flag} {value} must be >= {low}")
    if args.chat_template and args.chat_template not in BUILTIN_TEMPLATES and \
            not os.path.isfile(args.chat_template):
        raise InputError(f"--chat-template {args.chat_template}: neither a built-in "
                         f"({', '.join(BUILTIN_TEMPLATES)}) nor a file")
    if args.port > 65535:
        raise InputError(f"--port {args.port} must be <= 65535")
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
                    max_n=args.max_n)
    service = Service(tok, scheduler, name, limits, metrics, api_key=args.api_key,
                      request_timeout_s=args.request_timeout, chat=chat,
                      log=lambda line: runtime.say(line))
    app = build_app(service)
    host, port = sock.getsockname()[:2]
    ready = (f"serving {name} on http://{host}:{port} (max batch {args.max_batch_size}, queue "
             f"{args.max_queue}, context {gen.max_length}, {opened.ps}); chat: {chat.name}")
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=args.shutdown_timeout)
    server = _Server(config, ready)
    scheduler.start()
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.stop()
        sock.close()
    runtime.say("stopped")
    return 0


class _Server:
    """uvicorn.Server whose signal handling asks for a graceful stop and does not re-raise the
    signal afterwards (runtime's handler would turn that into an abort)."""

    def __new__(cls, config, ready_line: str):
        import uvicorn

        class Server(uvicorn.Server):
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

            def handle_exit(self, sig, frame):
                if not self.should_exit:
                    runtime.say(f"{signal.Signals(sig).name} received: finishing running "
                                "requests, then stopping")
                super().handle_exit(sig, frame)

            async def startup(self, sockets=None):
                await super().startup(sockets)
                if self.started:
                    runtime.say(ready_line)

        return Server(config)


if __name__ == "__main__":
    sys.exit(runtime.run(main, "tools/serve.py"))
