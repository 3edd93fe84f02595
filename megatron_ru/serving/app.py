"""The HTTP side: FastAPI routes of the OpenAI API (completions, chat, models), health, metrics, errors.

Every route answers errors with OpenAI's error JSON; a bad request never reaches the model
thread. Requests pass guards.py's checks (Host, Content-Type, key, body), their prompts are
tokenised and chat templates rendered on worker threads (offload.py), so no request holds up the
event loop; then they become sequences (prompts × n) handed to the Scheduler, whose tokens come
back as events on this event loop and are sent whole or as server-sent events.
"""
from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..inference.sampling import SamplingParams
from . import guards
from .chat_prompt import ChatFormat
from .metrics import Metrics
from .offload import Offload, prompt_bytes_limit
from .protocol import (ApiError, ChatBody, CompletionBody, Limits, check_common,
                       check_range, message_dicts, parse_body, stop_strings)
from .responses import Choice, Handle, chat_logprobs, event_stream, legacy_logprobs, new_id
from .scheduler import QueueFull, Scheduler, Seq, SeqOptions


@dataclass
class Service:
    """What the routes need: the tokenizer, the scheduler and the server's settings."""

    tokenizer: object
    scheduler: Scheduler
    model_name: str
    limits: Limits
    metrics: Metrics
    api_key: Optional[str] = None
    request_timeout_s: float = 600.0
    chat: Optional[ChatFormat] = None  # how chat messages become a prompt (serving/chat_prompt.py)
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)
    allowed_hosts: Optional[tuple[str, ...]] = None  # Host names answered (None: any)
    offload: Offload = None  # worker threads for tokenising and templating
    draining: bool = False  # shutting down: /health 503, new requests 503

    def __post_init__(self) -> None:
        if self.offload is None:
            self.offload = Offload(timeout_s=self.limits.work_timeout_s)

    @property
    def max_length(self) -> int:
        return self.scheduler.max_length


def build_app(service: Service):
    """The ASGI app: the routes behind the Host check."""
    app = FastAPI(title="megatron_ru", docs_url=None, redoc_url=None, openapi_url=None)
    routes = Routes(service)
    app.add_api_route("/health", routes.health, methods=["GET"])
    app.add_api_route("/metrics", routes.metrics, methods=["GET"])
    app.add_api_route("/v1/models", routes.models, methods=["GET"])
    app.add_api_route("/v1/completions", routes.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", routes.chat, methods=["POST"])

    known = {r.path for r in app.routes}

    async def api_error(request: Request, exc: ApiError):
        route = request.url.path if request.url.path in known else "other"
        service.metrics.count_request(route, exc.status)
        service.log(f"{request.method} {request.url.path} {exc.status} {exc.code or ''}: {exc.message}")
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {404: f"no route {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(
            exc.status_code, str(exc.detail))
        return await api_error(request, ApiError(exc.status_code, message, code=code))

    async def internal_error(request: Request, exc: Exception):
        return await api_error(request, ApiError(500, f"internal error: {type(exc).__name__}",
                                                 code="internal_error"))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)

    def host_refused(scope, exc: ApiError) -> None:
        route = scope.get("path") if scope.get("path") in known else "other"
        service.metrics.count_request(route, exc.status)
        service.log(f"{scope.get('method')} {scope.get('path', '')[:200]} {exc.status} {exc.code}: "
                    f"{exc.message}")

    return guards.HostGuard(app, service.allowed_hosts, host_refused)


class Routes:
    def __init__(self, service: Service) -> None:
        self.s = service
        limit = service.scheduler.token_limit  # alternatives in logprobs may lie beyond it
        # texts longer than this surely exceed the context: refused before tokenising
        self.prompt_bytes = prompt_bytes_limit(service.tokenizer, service.max_length)
        self.detokenize = service.tokenizer.detokenize if limit is None else \
            (lambda ids: service.tokenizer.detokenize([i for i in ids if i < limit]))

    # ---- small routes ---------------------------------------------------------------------
    async def health(self):
        if self.s.draining or self.s.scheduler.stopping:
            raise ApiError(503, "shutting down", code="shutting_down")
        return {"status": "ok"}

    async def metrics(self, request: Request):
        self.authorize(request)
        return PlainTextResponse(self.s.metrics.render(), media_type="text/plain; version=0.0.4")

    async def models(self, request: Request):
        self.authorize(request)
        return {"object": "list", "data": [{
            "id": self.s.model_name, "object": "model", "created": int(self.s.metrics.started),
            "owned_by": "megatron_ru", "max_model_len": self.s.max_length}]}

    # ---- checks ---------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        guards.authorize(request, self.s.api_key)

    async def read_json(self, request: Request):
        return await guards.read_json(request, self.s.limits)

    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name != self.s.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                                f"{self.s.model_name!r}", param="model", code="model_not_found")

    def check_prompt(self, ids: list[int], param: str, max_tokens: int) -> None:
        vocab = self.s.scheduler.token_limit or self.s.scheduler.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"'{param}' holds token id {bad[0]} outside the vocabulary "
                                f"[0, {vocab})", param=param, code="invalid_value")
        limit = self.s.max_length - (1 if max_tokens > 0 else 0)
        if len(ids) > limit:
            raise ApiError(400, f"'{param}' is {len(ids)} tokens, {len(ids) - limit} over the "
                                f"limit of {limit} (context of {self.s.max_length} positions)",
                           param=param, code="context_length_exceeded")

    def max_tokens(self, value: Optional[int], default: Optional[int], low: int,
                   name: str = "max_tokens") -> int:
        cap = self.s.limits.max_tokens
        if value is None:
            return min(default or cap, cap)
        check_range(name, value, low <= value <= cap, f"in [{low}, {cap}]")
        return value

    def options(self, body, max_tokens: int, *, logprobs: Optional[int],
                prompt_logprobs: bool = False, extra_stops=(), stop_ids=()) -> SeqOptions:
        check_common(body, self.s.limits)
        min_tokens = body.min_tokens or 0
        if min_tokens > max_tokens:
            raise ApiError(400, f"'min_tokens' {min_tokens} exceeds the token budget "
                                f"{max_tokens}", param="min_tokens", code="invalid_value")
        if logprobs is not None:
            top = self.s.limits.max_logprobs
            check_range("logprobs", logprobs, 0 <= logprobs <= top, f"in [0, {top}]")
        t = 1.0 if body.temperature is None else body.temperature
        sampling = SamplingParams(temperature=t, top_k=body.top_k or 0,
                                  top_p=1.0 if body.top_p is None else body.top_p,
                                  repetition_penalty=body.repetition_penalty or 1.0)
        return SeqOptions(sampling, max_tokens, min_tokens,
                          tuple(stop_strings(body)) + tuple(extra_stops), logprobs,
                          prompt_logprobs, self.s.request_timeout_s, tuple(stop_ids))

    # ---- submission -----------------------------------------------------------------------
    def submit(self, prompts: list[list[int]], n: int, options: SeqOptions,
               seed: Optional[int], streaming: bool) -> Handle:
        rows = len(prompts) * n
        most = min(self.s.limits.max_rows, self.s.scheduler.max_batch + self.s.scheduler.max_queue)
        if rows > most:
            raise ApiError(400, f"the request asks for {rows} sequences (prompts x n); this "
                                f"server takes at most {most} per request", param="n",
                           code="invalid_value")
        if self.s.draining or self.s.scheduler.stopping:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        base = secrets.randbits(62) if seed is None else seed
        handle = Handle(asyncio.get_running_loop())
        detok = self.detokenize
        for i, ids in enumerate(p for p in prompts for _ in range(n)):
            seq = Seq(ids, options, (base + i) % 2 ** 63, handle.sink(i))
            handle.choices.append(Choice(i, seq, detok, list(options.stops), streaming))
        try:
            self.s.scheduler.submit(handle.seqs)
        except QueueFull as exc:
            raise ApiError(429, f"the server is busy: {exc}; retry later", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        return handle

    def check_text_size(self, text: str, param: str) -> None:
        """400 for a text that surely exceeds the context, before any tokenising."""
        if self.prompt_bytes is None or len(text) * 4 <= self.prompt_bytes:
            return
        size = len(text.encode("utf-8"))
        if size > self.prompt_bytes:
            raise ApiError(400, f"'{param}' is too long: {size} bytes cannot fit in a context of "
                                f"{self.s.max_length} tokens", param=param,
                           code="context_length_exceeded")

    async def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (on a worker thread); empty: unconditional, as generate.py."""
        tok = self.s.tokenizer
        for t in texts:
            self.check_text_size(t, "prompt")
        return await self.s.offload.run(
            lambda: [tok.tokenize(t) if t else [tok.eod] for t in texts], what="'prompt'")

    def check_finished(self, handle: Handle) -> None:
        if any(c.finish == "shutdown" for c in handle.choices):
            raise ApiError(503, "the server shut down before the request finished",
                           code="shutting_down")

    async def collect(self, request: Request, handle: Handle) -> None:
        """Wait for every sequence; a client that goes away cancels them."""
        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.s.scheduler.cancel(handle.seqs)

        watcher = asyncio.create_task(watch())
        try:
            async for _ in handle.updates():
                pass
        finally:
            watcher.cancel()
            self.s.scheduler.cancel(handle.seqs)

    def finished(self, route: str, rid: str, handle: Handle, prompt_tokens: int,
                 status: int = 200) -> None:
        m = self.s.metrics
        m.count_request(route, status, prompt_tokens)
        elapsed = time.monotonic() - handle.t0
        m.observe_latency(elapsed)
        u = handle.usage(prompt_tokens)
        ttft = handle.ttft_ms()
        reasons = ",".join(sorted({c.finish or "cancelled" for c in handle.choices}))  # None: gone
        self.s.log(f"POST {route} {status} id={rid} seqs={len(handle.choices)} "
                   f"prompt_tokens={u['prompt_tokens']} completion_tokens={u['completion_tokens']} "
                   f"ttft_ms={'-' if ttft is None else f'{ttft:.1f}'} "
                   f"total_ms={1000 * elapsed:.1f} finish={reasons}")

    def stream(self, request: Request, body, rid: str, handle: Handle, prompt_tokens: int,
               head: Callable[[list], dict], entry: Callable, opening: list[dict]) -> StreamingResponse:
        """A streamed answer (responses.event_stream); when it ends or the client goes away,
        the request's sequences are cancelled and the request is logged."""
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def chunks():
            try:
                async with contextlib.aclosing(event_stream(
                        handle, head, entry, opening=opening, prompt_tokens=prompt_tokens,
                        include_usage=include_usage)) as events:
                    async for line in events:
                        yield line
            finally:
                self.s.scheduler.cancel(handle.seqs)
                self.finished(request.url.path, rid, handle, prompt_tokens)

        return StreamingResponse(chunks(), media_type="text/event-stream")

    # ---- /v1/completions ------------------------------------------------------------------
    async def completions(self, request: Request):
        self.authorize(request)
        body = parse_body(CompletionBody, await self.read_json(request))
        self.check_model(body.model)
        echo = bool(body.echo)
        max_tokens = self.max_tokens(body.max_tokens, 16, 0 if echo else 1)
        if body.suffix:
            raise ApiError(400, "'suffix' is not supported by this server", param="suffix",
                           code="unsupported")
        if body.best_of not in (None, body.n or 1):
            raise ApiError(400, "'best_of' other than n is not supported", param="best_of",
                           code="unsupported")
        p = body.prompt
        if isinstance(p, list) and not p:
            raise ApiError(400, "'prompt' is an empty list", param="prompt", code="invalid_value")
        texts = [p] if isinstance(p, str) else p if isinstance(p[0], str) else None
        prompts = await self.encode(texts) if texts is not None else \
            [p] if isinstance(p[0], int) else p
        for i, ids in enumerate(prompts):
            if not ids:
                raise ApiError(400, f"'prompt[{i}]' is empty", param="prompt", code="invalid_value")
            self.check_prompt(ids, "prompt", max_tokens)
        options = self.options(body, max_tokens, logprobs=body.logprobs,
                               prompt_logprobs=echo and body.logprobs is not None)
        n = body.n or 1
        handle = self.submit(prompts, n, options, body.seed, bool(body.stream))
        rid, created = new_id("cmpl"), int(time.time())
        prompt_tokens = sum(len(ids) for ids in prompts)
        detok = self.detokenize
        prompt_texts = [texts[i // n] if texts is not None else detok(prompts[i // n])
                        for i in range(len(handle.choices))] if echo else None

        def head(choices):
            return {"id": rid, "object": "text_completion", "created": created,
                    "model": self.s.model_name, "choices": choices}

        if body.stream:
            def entry(u):
                c, lp = u.choice, None
                if body.logprobs is not None and (u.tokens or u.prompt_scores):
                    toks, ents = u.tokens, u.entries
                    if u.prompt_scores is not None:
                        toks, ents = c.seq.prompt + toks, u.prompt_scores + ents
                    lp = legacy_logprobs(toks, ents, detok)
                return {"index": c.index, "text": u.text, "logprobs": lp,
                        "finish_reason": c.finish_reason if u.done else None}

            opening = [{"index": c.index, "text": prompt_texts[c.index], "logprobs": None,
                        "finish_reason": None} for c in handle.choices] if echo else []
            return self.stream(request, body, rid, handle, prompt_tokens, head, entry, opening)

        await self.collect(request, handle)
        self.check_finished(handle)
        choices = []
        for c in handle.choices:
            text, lp = c.text(), None
            if body.logprobs is not None:
                tokens, entries, offset = list(c.tokens), list(c.logprobs), 0
                if echo:
                    prompt_entries = c.prompt_logprobs or [None] * len(c.seq.prompt)
                    tokens, entries = c.seq.prompt + tokens, prompt_entries + entries
                lp = legacy_logprobs(tokens, entries, detok, offset)
            if echo:
                text = prompt_texts[c.index] + text
            choices.append({"index": c.index, "text": text, "logprobs": lp,
                            "finish_reason": c.finish_reason})
        self.finished(request.url.path, rid, handle, prompt_tokens)
        return {**head(choices), "usage": handle.usage(prompt_tokens)}

    # ---- /v1/chat/completions -------------------------------------------------------------
    async def chat(self, request: Request):
        self.authorize(request)
        body = parse_body(ChatBody, await self.read_json(request))
        self.check_model(body.model)
        if self.s.chat is None:
            raise ApiError(404, "this server has no chat format", code="not_found")
        messages = message_dicts(body)
        ids = await self.s.offload.run(self.s.chat.prompt_ids, self.s.tokenizer, messages,
                                       self.s.limits.work_timeout_s, self.prompt_bytes,
                                       what="the chat template", code="template_too_slow")
        given = body.max_completion_tokens if body.max_completion_tokens is not None \
            else body.max_tokens
        max_tokens = self.max_tokens(given, max(self.s.max_length - len(ids), 1), 1)
        self.check_prompt(ids, "messages", max_tokens)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs",
                           code="invalid_value")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        options = self.options(body, max_tokens, logprobs=logprobs, extra_stops=self.s.chat.stops,
                               stop_ids=self.s.chat.stop_ids)
        handle = self.submit([ids], body.n or 1, options, body.seed, bool(body.stream))
        rid, created = new_id("chatcmpl"), int(time.time())
        detok = self.detokenize

        def head(kind, choices):
            return {"id": rid, "object": kind, "created": created, "model": self.s.model_name,
                    "choices": choices}

        if body.stream:
            def entry(u):
                lp = chat_logprobs(u.tokens, u.entries, detok) \
                    if logprobs is not None and u.tokens else None
                return {"index": u.choice.index, "delta": {"content": u.text} if u.text else {},
                        "logprobs": lp, "finish_reason": u.choice.finish_reason if u.done else None}

            opening = [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                        "logprobs": None, "finish_reason": None} for c in handle.choices]
            return self.stream(request, body, rid, handle, len(ids),
                               lambda choices: head("chat.completion.chunk", choices), entry, opening)

        await self.collect(request, handle)
        self.check_finished(handle)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text()},
                    "logprobs": None if logprobs is None else
                    chat_logprobs(c.tokens, c.logprobs, detok),
                    "finish_reason": c.finish_reason} for c in handle.choices]
        self.finished(request.url.path, rid, handle, len(ids))
        return {**head("chat.completion", choices), "usage": handle.usage(len(ids))}
