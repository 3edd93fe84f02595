"""Checks every request passes before a route looks at it: Host, Content-Type, API key, the body (size, time, JSON depth, text).

All of them answer with OpenAI's error JSON (protocol.ApiError) and a 4xx status: 421 for a Host
the server does not answer to (a web page that rebinds a name to 127.0.0.1 cannot reach a
key-less local server), 415 for a body that is not `application/json` (a page may post
`text/plain` across origins without asking), 401 for a missing or wrong key (compared as bytes:
a non-ASCII header or key never raises), 413 / 408 for a body too large or too slow, 400 for
JSON that is invalid, nested too deeply or holds a lone surrogate (text no tokenizer can
encode), and 499 (logged, never seen) for a client that went away mid-upload.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from typing import Iterable, Optional

from starlette.requests import ClientDisconnect, Request

from .protocol import ApiError, Limits

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


def default_allowed_hosts(bind_host: str, api_key: Optional[str]) -> Optional[tuple[str, ...]]:
    """A key-less server bound to the loopback answers only to local names; any other: any Host."""
    if api_key is not None:
        return None
    try:
        loopback = bind_host == "localhost" or ipaddress.ip_address(bind_host).is_loopback
    except ValueError:
        loopback = False
    return LOCAL_NAMES + ((bind_host,) if bind_host not in LOCAL_NAMES else ()) if loopback else None


def parse_allowed_hosts(value: str) -> Optional[tuple[str, ...]]:
    """`--allowed-hosts a.example,b.example` (names, without ports; `*`: any)."""
    names = tuple(n.strip().lower().rstrip(".") for n in value.split(",") if n.strip())
    return None if "*" in names else names


def host_name(header: Optional[str]) -> Optional[str]:
    """The name of a Host header ("name:port", "[::1]:port") in lower case."""
    if not header:
        return None
    h = header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else None
    return h.rsplit(":", 1)[0].rstrip(".") if h.count(":") <= 1 else h


class HostGuard:
    """ASGI wrapper: requests whose Host is not allowed get 421 before any route runs."""

    def __init__(self, app, allowed: Optional[Iterable[str]], on_refused) -> None:
        self.app, self.on_refused = app, on_refused
        self.allowed = None if allowed is None else frozenset(allowed)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.allowed is not None:
            raw = dict(scope.get("headers") or ()).get(b"host", b"").decode("latin-1")
            name = host_name(raw)
            if name not in self.allowed:
                err = ApiError(421, f"this server does not answer to Host {raw[:100]!r} (see "
                                    "--allowed-hosts)", code="invalid_host")
                self.on_refused(scope, err)
                body = json.dumps(err.body()).encode()
                await send({"type": "http.response.start", "status": err.status,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def authorize(request: Request, key: Optional[str]) -> None:
    """401 unless `Authorization: Bearer KEY`; compared as bytes (the header as sent, the key
    as UTF-8), in constant time."""
    if key is None:
        return
    given = request.headers.get("authorization", "").encode("latin-1")  # the raw header bytes
    if not (given.startswith(b"Bearer ") and
            hmac.compare_digest(given[7:].strip(), key.encode("utf-8"))):
        raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                       code="invalid_api_key")


def check_json_content_type(request: Request) -> None:
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, f"the request body must be sent as 'Content-Type: application/json' "
                            f"(got {kind[:80] or 'none'!r})", code="unsupported_media_type")


async def read_json(request: Request, limits: Limits):
    """The body parsed as JSON, within the size, time and depth limits."""
    check_json_content_type(request)
    limit = limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit}",
                       code="body_too_large")
    chunks, size = [], 0

    async def receive_all():
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes",
                               code="body_too_large")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(receive_all(), limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {limits.body_timeout_s:g} s",
                       code="body_timeout") from None
    except ClientDisconnect:
        raise ApiError(499, "the client went away while sending the body",
                       code="client_disconnected") from None
    try:
        data = json.loads(b"".join(chunks))
    except RecursionError:
        data = None
        too_deep = True
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}",
                       code="invalid_json") from None
    else:
        too_deep = False
    if too_deep or not check_values(data, limits.max_json_depth):
        raise ApiError(400, f"the request body is nested more than {limits.max_json_depth} "
                            "levels deep", code="invalid_json")
    return data


def check_values(data, max_depth: int) -> bool:
    """False when `data` nests deeper than `max_depth`; 400 on a string that is not valid
    Unicode text (a lone surrogate from a \\ud800 escape)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise ApiError(400, f"the request body holds a string with an invalid "
                                        f"character (a lone surrogate at offset {exc.start})",
                                   code="invalid_json") from None
        elif isinstance(value, (list, dict)):
            if depth > max_depth:
                return False
            items = value.items() if isinstance(value, dict) else ((None, v) for v in value)
            for k, v in items:
                if k is not None:
                    stack.append((k, depth + 1))
                stack.append((v, depth + 1))
    return True
