"""Chat templates in the Hugging Face convention (Jinja), rendering, tokenizing and assistant masks.

A template is a Jinja string rendered with `messages`, `add_generation_prompt`, `bos_token` and
`eos_token` in the same sandboxed environment `transformers` uses (trim_blocks, lstrip_blocks,
loop controls, `raise_exception`, a non-escaping `tojson`), so the rendered text equals
`apply_chat_template(..., tokenize=False)`. Sources: a named built-in (`llama3` for T-lite,
`rugpt3` for the `user:` / `bot:` dialogue style), a Jinja file, or the `chat_template` field of a
`tokenizer_config.json`.

Assistant spans are found by rendering, never by searching the output: turn i spans
[len(render(m[:i], add_generation_prompt=True)), len(render(m[:i+1]))), i.e. the reply and its
end-of-turn marker. Token ids come from tokenizing the rendered text cut at the assistant spans'
edges (special tokens such as `<|eot_id|>` are split out first, as `transformers` does), and a
generation prompt is cut the same way (`prompt_text`), so the ids of a training conversation
start with exactly the ids generation gives for its prompt, whatever whitespace the template puts
before a reply: the model never learns a token that the prompt would already hold (a reply that
starts with a space). A token is in the loss when its first character lies inside an assistant span.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Optional

from ..errors import UsageError

ROLES = ("system", "user", "assistant")

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
    "message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# Plain dialogue lines as in the ruGPT-3 card; the reply follows "bot: " (the space belongs to the
# prompt, which is tokenized apart from the reply) and ends with the end-of-text token.
RUGPT3 = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\n' }}{% endif %}"
    "{% if message['role'] == 'system' %}{{ 'system: ' + message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ 'user: ' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ 'bot: ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\nbot: ' }}{% endif %}")

BUILTINS = {"llama3": LLAMA3, "rugpt3": RUGPT3}
BUILTIN_EOT = {"llama3": "<|eot_id|>", "rugpt3": None}  # None: the tokenizer's end of text


class ChatError(UsageError):
    """A conversation or chat template is malformed; the message names the line, file or flag."""


def check_messages(messages, where: str = "conversation", *, training: bool = False) -> list[dict]:
    """Validated list of {"role", "content"}: known roles, string content, a system message only
    first. `training` (SFT data) adds the order of training conversations: after the optional
    system message, user and assistant turns strictly alternate, starting with the user and
    ending with the assistant's reply. Prompts (generation, the server) keep the looser rule:
    they end with the turn the model is to answer."""
    if not isinstance(messages, list) or not messages:
        raise ChatError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or \
                not isinstance(m.get("content"), str):
            raise ChatError(f"{where}: message {i} needs string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ChatError(f"{where}: message {i} has unknown role {m['role']!r} "
                            f"(expected one of {', '.join(ROLES)})")
        if m["role"] == "system" and i != 0:
            raise ChatError(f"{where}: a system message may only come first (message {i})")
        out.append({"role": m["role"], "content": m["content"]})
    if training:
        _check_training_order(out, where)
    return out


def _check_training_order(messages: list[dict], where: str) -> None:
    first = 1 if messages[0]["role"] == "system" else 0
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatError(f"{where}: no assistant message, nothing to learn")
    for i in range(first, len(messages)):
        expected = "user" if (i - first) % 2 == 0 else "assistant"
        if messages[i]["role"] != expected:
            raise ChatError(f"{where}: message {i} is {messages[i]['role']!r} where {expected!r} is "
                            "expected (after an optional system message, user and assistant turns "
                            "alternate, starting with the user)")
    if messages[-1]["role"] != "assistant":
        raise ChatError(f"{where}: the conversation ends with a user message; training data "
                        "ends with the assistant's reply")


MAX_RENDERED_CHARS = 1 << 22  # a product or format result of a template longer than this is refused


class TemplateTimeout(Exception):
    """A template ran past its time limit (raised inside the template's frames)."""


def _environment():
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    class Environment(ImmutableSandboxedEnvironment):
        """transformers' sandbox, plus bounded `*`, `**` and `%` (one C call each: a string times
        10**9 or a format width of 10**9 would allocate gigabytes before any time limit)."""

        intercepted_binops = frozenset({"*", "**", "%"})

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, times in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and \
                            len(seq) * times > MAX_RENDERED_CHARS:
                        raise SecurityError("a template product longer than "
                                            f"{MAX_RENDERED_CHARS} items")
            elif operator == "**" and isinstance(right, int) and abs(right) > 1000:
                raise SecurityError("a template power with an exponent above 1000")
            elif operator == "%" and isinstance(left, str) and \
                    re.search(r"%[-+ #0]*(\*|\d{5,})|\.(\*|\d{5,})", left):
                raise SecurityError("a template format with a width of 10000 or more")
            return super().call_binop(context, operator, left, right)

    env = Environment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


def _deadline_tracer(deadline: float):
    """A sys.settrace function that raises TemplateTimeout in template code after `deadline`
    (checked on every line a template executes, so nested loops cannot run on)."""
    def local(frame, event, arg):
        if event == "line" and time.monotonic() > deadline:
            raise TemplateTimeout()
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename == "<template>" else None
    return tracer


def special_token_strings(tokenizer) -> list[str]:
    """Strings tokenized as single special ids: added tokens of a tokenizer.json; for GPT-2 BPE
    the end-of-text token and any other `<|...|>` entry of the vocabulary; for SentencePiece its
    control and unknown pieces (`<s>`, `</s>`, ...), which SentencePiece itself would spell out
    piece by piece (as Hugging Face's tokenizer.json of the same model does not)."""
    if hasattr(tokenizer, "tok"):  # HFTokenizer: the `tokenizers` library splits them itself
        return []
    sp = getattr(tokenizer, "sp", None)
    if sp is not None:
        return sorted({sp.IdToPiece(i) for i in range(sp.GetPieceSize())
                       if sp.IsControl(i) or sp.IsUnknown(i)}, key=len, reverse=True)
    encoder = getattr(tokenizer, "encoder", None)
    if encoder is None:
        return []
    return sorted({t for t in encoder if re.fullmatch(r"<\|[^|<>]+\|>", t)} |
                  {getattr(tokenizer, "eod_token", "<|endoftext|>")}, key=len, reverse=True)


def tokenize_with_offsets(tokenizer, text: str, specials: list[str]) -> tuple[list[int], list[int]]:
    """(ids, start character of each token) for `text`, special token strings split out first."""
    pieces = re.split("(" + "|".join(map(re.escape, specials)) + ")", text) if specials else [text]
    ids, starts, pos = [], [], 0
    for k, piece in enumerate(pieces):
        if not piece:
            continue
        if k % 2 == 1:  # a special token string
            ids.append(tokenizer.sp.PieceToId(piece) if hasattr(tokenizer, "sp")
                       else tokenizer.encoder[piece])
            starts.append(pos)
        else:
            piece_ids, piece_starts = _piece_offsets(tokenizer, piece)
            ids += piece_ids
            starts += [pos + s for s in piece_starts]
        pos += len(piece)
    return ids, starts


def tokenize_cut(tokenizer, text: str, cuts, specials: list[str]) -> tuple[list[int], list[int]]:
    """tokenize_with_offsets of `text` cut at the character positions `cuts` (no token spans a cut)."""
    edges = sorted({0, len(text), *(c for c in cuts if 0 < c < len(text))})
    ids, starts = [], []
    for a, b in zip(edges, edges[1:]):
        part_ids, part_starts = tokenize_with_offsets(tokenizer, text[a:b], specials)
        ids += part_ids
        starts += [a + s for s in part_starts]
    return ids, starts


def _piece_offsets(tokenizer, text: str) -> tuple[list[int], list[int]]:
    if hasattr(tokenizer, "tok"):  # tokenizers.Tokenizer gives character offsets
        enc = tokenizer.tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [a for a, _ in enc.offsets]
    ids = tokenizer.tokenize(text)
    if hasattr(tokenizer, "byte_decoder"):  # byte-level BPE: each token is whole bytes
        byte_pos, starts, raw = 0, [], text.encode("utf-8")
        char_of_byte = _char_index_of_bytes(text, len(raw))
        for i in ids:
            starts.append(char_of_byte[byte_pos])
            byte_pos += len(tokenizer.decoder[int(i)])  # one char per byte in GPT-2's alphabet
        return ids, starts
    starts, prev = [], 0  # generic: the text decoded so far
    for n in range(len(ids)):
        starts.append(min(prev, len(text)))
        prev = len(tokenizer.detokenize(ids[:n + 1]))
    return ids, starts


def _char_index_of_bytes(text: str, nbytes: int) -> list[int]:
    out = []
    for ci, ch in enumerate(text):
        out += [ci] * len(ch.encode("utf-8"))
    out.append(len(text))
    assert len(out) == nbytes + 1
    return out


@dataclass
class Encoded:
    ids: list[int]
    loss_mask: list[int]
    text: str


class ChatTemplate:
    """A compiled chat template plus the tokens it needs (`bos_token`, `eos_token`)."""

    def __init__(self, source: str, *, name: str = "chat template", bos_token: str = "",
                 eos_token: str = "", eot_token: Optional[str] = None) -> None:
        import jinja2
        self.source, self.name = source, name
        self.bos_token, self.eos_token = bos_token, eos_token
        self.eot_token = eot_token or eos_token
        try:
            self.template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatError(f"{name}: Jinja syntax error at line {exc.lineno}: {exc.message}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = False, *,
               time_limit_s: Optional[float] = None) -> str:
        """The rendered conversation; ChatError when the template refuses it, fails, or (with
        `time_limit_s`) runs longer than that."""
        import jinja2
        previous = sys.gettrace()
        if time_limit_s is not None:
            sys.settrace(_deadline_tracer(time.monotonic() + time_limit_s))
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateTimeout:
            raise ChatError(f"{self.name}: template took too long (over {time_limit_s:g} s)") from None
        except jinja2.TemplateError as exc:
            raise ChatError(f"{self.name}: {exc}") from None
        except (ArithmeticError, LookupError, TypeError, ValueError, AttributeError,
                RecursionError, MemoryError) as exc:
            raise ChatError(f"{self.name}: the template failed: {type(exc).__name__}: {exc}") from None
        finally:
            if time_limit_s is not None:
                sys.settrace(previous)

    def assistant_spans(self, messages: list[dict], where: str = "conversation", *,
                        time_limit_s: Optional[float] = None) -> tuple[str, list]:
        """(rendered text, [(start, end) character span of each assistant turn])."""
        full = self.render(messages, time_limit_s=time_limit_s)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True, time_limit_s=time_limit_s)
            if before == self.render(messages[:i], time_limit_s=time_limit_s):
                raise ChatError(f"{self.name} has no assistant marker: add_generation_prompt renders "
                                "nothing, so replies cannot be told from prompts")
            upto = self.render(messages[:i + 1], time_limit_s=time_limit_s)
            if not upto.startswith(before) or not full.startswith(upto):
                raise ChatError(f"{where}: {self.name} does not render turn {i} as an extension of "
                                "the turns before it; assistant spans cannot be located")
            spans.append((len(before), len(upto)))
        return full, spans

    def encode(self, tokenizer, messages: list[dict], *, train_on_prompt: bool = False,
               where: str = "conversation") -> Encoded:
        """Token ids of the rendered conversation and the 0/1 loss mask per token."""
        messages = check_messages(messages, where)
        if not any(m["role"] == "assistant" for m in messages):
            raise ChatError(f"{where}: no assistant message, nothing to learn")
        for i, m in enumerate(messages):
            if m["role"] == "assistant" and not m["content"].strip():
                raise ChatError(f"{where}: assistant message {i} is empty")
        text, spans = self.assistant_spans(messages, where)
        ids, starts = tokenize_cut(tokenizer, text, [c for span in spans for c in span],
                                   special_token_strings(tokenizer))
        if train_on_prompt:
            return Encoded(ids, [1] * len(ids), text)
        mask = [int(any(a <= s < b for a, b in spans)) for s in starts]
        return Encoded(ids, mask, text)

    def prompt_text(self, messages: list[dict], *, time_limit_s: Optional[float] = None
                    ) -> tuple[str, list[int]]:
        """(the conversation so far plus the generation prompt, the cuts `encode` makes in it:
        the edges of earlier replies). Tokenized with `tokenize_cut`, it gives the ids a training
        conversation continuing it starts with. A template that does not render earlier turns as
        a prefix (no spans to find) is tokenized whole."""
        text = self.render(messages, add_generation_prompt=True, time_limit_s=time_limit_s)
        cuts = []
        if any(m["role"] == "assistant" for m in messages):
            try:
                full, spans = self.assistant_spans(messages, time_limit_s=time_limit_s)
            except ChatError as exc:
                if "took too long" in str(exc):
                    raise
                full, spans = "", []
            if text.startswith(full):
                cuts = [c for span in spans for c in span]
        return text, cuts

    def prompt_ids(self, tokenizer, messages: list[dict]) -> list[int]:
        """Ids of the conversation so far plus the generation prompt (for sampling)."""
        text, cuts = self.prompt_text(check_messages(messages, "chat"))
        return tokenize_cut(tokenizer, text, cuts, special_token_strings(tokenizer))[0]

    def eot_id(self, tokenizer) -> int:
        """Id of the token that ends an assistant turn (the stop token when sampling)."""
        if self.eot_token:
            ids, _ = tokenize_with_offsets(tokenizer, self.eot_token, special_token_strings(tokenizer))
            if len(ids) == 1:
                return ids[0]
        return tokenizer.eod


def has_template(tokenizer_dir: Optional[str]) -> bool:
    """Whether `tokenizer_dir` holds a chat template (chat_template.jinja or tokenizer_config.json)."""
    return own_template(tokenizer_dir) is not None


def template_source(value, where: str) -> str:
    """The Jinja source of a `chat_template` value: a string, or Hugging Face's list of named
    templates ([{"name", "template"}, ...]), of which the one named "default" is used."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ChatError(f"{where}: chat_template lists named templates ({', '.join(map(str, named))}) "
                        "but none named 'default'; pass --chat-template FILE")
    raise ChatError(f"{where}: chat_template must be a string or a list of named templates")


CHAT_FILES = ("tokenizer_config.json", "chat_template.jinja")  # carried with a tokenizer


def own_template(tokenizer_dir: Optional[str]) -> Optional[tuple[str, str]]:
    """(Jinja source, where it came from) of the tokenizer directory's own template: its
    chat_template.jinja (how transformers saves templates since 4.43), else the chat_template of
    its tokenizer_config.json; None when it has neither."""
    if not tokenizer_dir:
        return None
    jinja = os.path.join(tokenizer_dir, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read(), jinja
    path = os.path.join(tokenizer_dir, "tokenizer_config.json")
    if os.path.isfile(path):
        value = _read_json(path, "tokenizer_config.json").get("chat_template")
        if value:
            return template_source(value, path), path
    return None


def _token_name(tokenizer_config: dict, key: str) -> str:
    value = tokenizer_config.get(key) or ""
    return value.get("content", "") if isinstance(value, dict) else value


def load_template(spec: Optional[str], tokenizer=None, tokenizer_dir: Optional[str] = None) -> ChatTemplate:
    """The template named by `--chat-template` (built-in name, Jinja file or tokenizer_config.json)
    or, when None, the tokenizer directory's own (chat_template.jinja or the `chat_template` of
    its tokenizer_config.json)."""
    eod = getattr(tokenizer, "eod_token", None) or _eod_string(tokenizer)
    config = {}
    if tokenizer_dir and os.path.isfile(os.path.join(tokenizer_dir, "tokenizer_config.json")):
        config = _read_json(os.path.join(tokenizer_dir, "tokenizer_config.json"), "tokenizer_config.json")
    if spec in BUILTINS:
        bos = _token_name(config, "bos_token") or ("<|begin_of_text|>" if spec == "llama3" else "")
        if spec == "llama3" and tokenizer is not None and not _is_single(tokenizer, bos):
            bos = ""
        return ChatTemplate(BUILTINS[spec], name=f"--chat-template {spec}", bos_token=bos,
                            eos_token=_token_name(config, "eos_token") or eod or "",
                            eot_token=BUILTIN_EOT[spec])
    if spec is None:
        own = own_template(tokenizer_dir)
        if own is None:
            raise ChatError("no chat template: pass --chat-template llama3|rugpt3|FILE (the tokenizer "
                            "has no chat_template.jinja or tokenizer_config.json with a chat_template)")
        source, name = own
    else:
        if not os.path.isfile(spec):
            raise ChatError(f"--chat-template {spec}: neither a built-in ({', '.join(BUILTINS)}) "
                            "nor a file")
        if spec.endswith(".json"):
            config = _read_json(spec, "--chat-template")
            if not config.get("chat_template"):
                raise ChatError(f"--chat-template {spec} has no 'chat_template' field")
            source = template_source(config["chat_template"], f"--chat-template {spec}")
        else:
            with open(spec, encoding="utf-8") as f:
                source = f.read()
        name = f"--chat-template {spec}"
    builtin = next((k for k, v in BUILTINS.items() if v == source), None)  # e.g. recorded by SFT
    return ChatTemplate(source, name=f"{name} (the built-in {builtin})" if builtin else name,
                        bos_token=_token_name(config, "bos_token"),
                        eos_token=_token_name(config, "eos_token") or eod or "",
                        eot_token=BUILTIN_EOT[builtin] if builtin else None)


def _is_single(tokenizer, token: str) -> bool:
    ids, _ = tokenize_with_offsets(tokenizer, token, special_token_strings(tokenizer))
    return len(ids) == 1


def _eod_string(tokenizer) -> Optional[str]:
    if tokenizer is None:
        return None
    if hasattr(tokenizer, "tok"):
        return tokenizer.tok.id_to_token(tokenizer.eod)
    if hasattr(tokenizer, "sp"):
        return tokenizer.sp.IdToPiece(tokenizer.eod)
    return None


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ChatError(f"{what} {path} is not readable JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ChatError(f"{what} {path} must hold a JSON object")
    return value
