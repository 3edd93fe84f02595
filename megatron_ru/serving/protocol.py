"""OpenAI request bodies: typed parsing (422), value checks (400), OpenAI error JSON, and the chat renderer.

Bodies are parsed strictly (a string where a number belongs is a 422 naming the field); values
outside their range, unsupported options and prompts that do not fit are a 400. Unknown fields
are ignored, as OpenAI's own server does for fields a model does not use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
               404: "invalid_request_error", 405: "invalid_request_error",
               408: "invalid_request_error", 413: "invalid_request_error",
               415: "invalid_request_error", 421: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error",
               499: "invalid_request_error", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """An HTTP error answered with OpenAI's error JSON."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: Optional[int] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: Optional[bool] = None
    stream_options: Optional[dict] = None
    # our extras (vLLM spells them the same way)
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    min_tokens: Optional[int] = None
    # OpenAI fields we accept only at their neutral value
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logit_bias: Optional[dict] = None
    user: Optional[str] = None


class CompletionBody(_Body):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = None
    echo: Optional[bool] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: str
    text: Optional[str] = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None


class ChatBody(_Body):
    messages: list[Message]
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    max_completion_tokens: Optional[int] = None


def parse_body(kind: type, data) -> BaseModel:
    """A parsed body, or ApiError 400 (not a JSON object) / 422 (a field of the wrong type)."""
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}",
                       code="invalid_body")
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _param(first["loc"])
        kinds = sorted({e["msg"] for e in exc.errors() if _param(e["loc"]) == param})
        what = "is required" if first["type"] == "missing" else "has the wrong type (" + \
            "; ".join(kinds) + ")"
        raise ApiError(422, f"'{param}' {what}", param=param, code="invalid_type") from None


def _param(loc) -> str:
    """('messages', 0, 'role') → 'messages[0].role'; union member tags ('list[str]') dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" not in part and part not in ("str", "int", "float", "bool"):
            out += ("." if out else "") + part
    return out


@dataclass(frozen=True)
class Limits:
    """Request size limits of the server (flags of tools/serve.py)."""

    max_body_bytes: int = 1 << 20
    max_tokens: int = 4096  # per choice
    max_n: int = 16
    max_rows: int = 64  # prompts × n of one request
    max_logprobs: int = 20
    max_stops: int = 16
    max_stop_chars: int = 1000  # per stop string
    max_json_depth: int = 64  # nesting of the request body
    body_timeout_s: float = 30.0  # to receive the whole body
    work_timeout_s: float = 10.0  # tokenising and templating one request (a worker thread)


def check_range(name: str, value, ok: bool, rule: str) -> None:
    if not ok:
        raise ApiError(400, f"'{name}' is {value!r}: it must be {rule}", param=name,
                       code="invalid_value")


def check_common(body: _Body, limits: Limits) -> None:
    """Range checks shared by both routes (400)."""
    if body.temperature is not None:
        check_range("temperature", body.temperature, 0.0 <= body.temperature <= 2.0, "in [0, 2]")
    if body.top_p is not None:
        check_range("top_p", body.top_p, 0.0 < body.top_p <= 1.0, "in (0, 1]")
    if body.n is not None:
        check_range("n", body.n, 1 <= body.n <= limits.max_n, f"in [1, {limits.max_n}]")
    if body.top_k is not None:
        check_range("top_k", body.top_k, body.top_k >= 0, ">= 0 (0 turns top-k off)")
    if body.repetition_penalty is not None:
        check_range("repetition_penalty", body.repetition_penalty,
                    0.0 < body.repetition_penalty <= 10.0, "in (0, 10] (1 turns it off)")
    if body.min_tokens is not None:
        check_range("min_tokens", body.min_tokens, body.min_tokens >= 0, ">= 0")
    if body.seed is not None:
        check_range("seed", body.seed, 0 <= body.seed < 2 ** 63, "in [0, 2^63)")
    stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    check_range("stop", f"{len(stops)} strings", len(stops) <= limits.max_stops,
                f"at most {limits.max_stops} strings")
    longest = max(map(len, stops), default=0)
    check_range("stop", f"a string of {longest} characters", longest <= limits.max_stop_chars,
                f"strings of at most {limits.max_stop_chars} characters")
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(body, name)
        if value not in (None, 0, 0.0):
            raise ApiError(400, f"'{name}' is not supported by this server (use "
                                "'repetition_penalty')", param=name, code="unsupported")
    if body.logit_bias:
        raise ApiError(400, "'logit_bias' is not supported by this server", param="logit_bias",
                       code="unsupported")
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true",
                       param="stream_options", code="invalid_value")


def stop_strings(body: _Body) -> list[str]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return [s for s in stops if s]


# ---- chat messages (rendered by the model's chat template: serving/chat_prompt.py) ---------------
ROLES = ("system", "developer", "user", "assistant")


def message_dicts(body: ChatBody) -> list[dict]:
    """Messages as plain {role, content} dicts (text parts joined); 400 on roles or parts we
    cannot render."""
    if not body.messages:
        raise ApiError(400, "'messages' is empty: give at least one message", param="messages",
                       code="invalid_value")
    out = []
    for i, m in enumerate(body.messages):
        if m.role not in ROLES:
            raise ApiError(400, f"'messages[{i}].role' is {m.role!r}: expected one of "
                                f"{', '.join(ROLES)}", param=f"messages[{i}].role",
                           code="invalid_value")
        content = m.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise ApiError(400, f"'messages[{i}].content[{j}]' is a {part.type!r} part: "
                                        "only text parts are supported",
                                   param=f"messages[{i}].content[{j}]", code="unsupported")
            content = "".join(part.text for part in content)
        out.append({"role": "system" if m.role == "developer" else m.role,
                    "content": content or ""})
    return out
