"""generate.py --chat: conversations in, replies out, the chat template applied and the end-of-turn
token as the stop; interactive multi-turn sessions keep their history.

Input file (--sample-input-file with --chat): JSON lines {"messages": [{"role", "content"}, ...]}
(the last message is the user's); output (--sample-output-file): the same objects with the reply
appended as an assistant message, plus "text", "tokens" and "finish_reason".
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..files import atomic_write_text
from ..data.chat_templates import ChatError, check_messages
from ..errors import UsageError
from .cli import InputError

CHAT_PROMPT = "User (\"stop\" to quit, \"reset\" to start over) >>> "


def read_conversations(path: str) -> list[list[dict]]:
    """The `messages` of every JSON line of `path`; InputError naming FILE:LINE when malformed."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--sample-input-file {p} does not exist")
    out = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"--sample-input-file {p}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        messages = record.get("messages") if isinstance(record, dict) else None
        try:
            messages = check_messages(messages, where)
        except ChatError as exc:
            raise InputError(str(exc)) from None
        if messages[-1]["role"] != "user":
            raise InputError(f"{where}: the last message must be the user's (the model answers it)")
        out.append(messages)
    if not out:
        raise InputError(f"--sample-input-file {p} holds no conversation")
    return out


def run(session) -> int:
    """Answers every conversation of the input file, or chats interactively."""
    if session.args.sample_input_file is None:
        return interactive(session)
    conversations = read_conversations(session.args.sample_input_file)
    rows = [(json.dumps(m, ensure_ascii=False), encode(session, m, f"conversation {i + 1}"))
            for i, m in enumerate(conversations) for _ in range(session.settings.num_samples)]
    t0, lines = time.perf_counter(), []
    for start in range(0, len(rows), session.args.batch_size):
        lines += session.generate_rows(rows[start:start + session.args.batch_size], show_prompt=False)
    out = []
    for line in lines:  # the conversation with its reply
        rec = json.loads(line)
        messages = json.loads(rec.pop("prompt"))
        out.append(json.dumps({"messages": messages + [{"role": "assistant", "content": rec["text"].strip()}],
                               **rec}, ensure_ascii=False))
    if session.writer and session.args.sample_output_file:
        atomic_write_text(Path(session.args.sample_output_file), "".join(o + "\n" for o in out))
    if session.writer:
        print(f"[{len(rows)} replies, {session.new_tokens} new tokens in "
              f"{time.perf_counter() - t0:.2f} s, {session.ps}]", file=sys.stderr, flush=True)
    return 0


def encode(session, messages: list[dict], name: str) -> list[int]:
    ids = session.template.prompt_ids(session.tok, messages)
    session.gen.check_prompt(ids, name)
    return ids


def interactive(session) -> int:
    history: list[dict] = []
    if session.args.system:
        history.append({"role": "system", "content": session.args.system})
    base = list(history)
    while True:
        line = session.read_line(CHAT_PROMPT)
        if line is None or line.strip() == "stop":
            return 0
        if line.strip() == "reset":
            history = list(base)
            continue
        if not line.strip():
            continue
        try:
            turn = history + [{"role": "user", "content": line}]
            ids = encode(session, turn, "the conversation")
            record = json.loads(session.generate_rows([(line, ids)], show_prompt=False)[0])
            history = turn + [{"role": "assistant", "content": record["text"].strip()}]
        except UsageError as exc:  # a bad turn is reported, the session goes on
            if session.writer:
                print(f"error: {exc}", file=sys.stderr, flush=True)
