"""How /v1/chat/completions turns messages into a prompt: the model's chat template.

The same templates fine-tuning trains with (data/chat_templates.py): `--chat-template llama3|rugpt3|FILE`,
by default the `chat_template` of the tokenizer's tokenizer_config.json, and without one the
built-in `rugpt3` dialogue style (`user: ...` / `bot: ...`). Rendering with the generation
prompt and tokenizing (special tokens split out first, cut at earlier replies' edges as training
is) is exactly what `generate.py --chat` does, so a greedy chat reply from the server equals generate.py's. The template's end-of-turn
token (e.g. `<|eot_id|>`) ends a reply like the end of text does; with the `rugpt3` style the
reply also ends where the model starts the user's next line ("\\nuser:"), as an untuned model
tends to.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from ..data.chat_templates import (BUILTINS, ChatError, ChatTemplate, check_messages, has_template,
                                   load_template, special_token_strings, tokenize_cut)
from .protocol import ApiError

_DIRS = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?[\\/](?:[^\s\\/'\":]+[\\/])+")  # a path's folders


@dataclass(frozen=True)
class ChatFormat:
    template: ChatTemplate
    stops: tuple[str, ...] = ()  # stop strings every chat reply gets
    stop_ids: tuple[int, ...] = ()  # tokens that end a reply besides the end of text
    name: str = "chat template"  # for the startup line
    specials: dict = field(default_factory=dict, compare=False)  # the tokenizer's, computed once

    def prompt_ids(self, tokenizer, messages: list[dict], time_limit_s: Optional[float] = None,
                   max_bytes: Optional[int] = None) -> list[int]:
        """Ids of the rendered conversation plus the assistant's generation prompt (what
        ChatTemplate.prompt_ids gives); 400 when the template refuses the conversation, runs
        past `time_limit_s` or renders more than `max_bytes` (surely beyond the context). The
        message never names the server's files."""
        try:
            text, cuts = self.template.prompt_text(check_messages(messages, "chat"),
                                                   time_limit_s=time_limit_s)
        except ChatError as exc:
            message = _DIRS.sub("", str(exc).replace(self.template.name, "the chat template"))
            slow = "took too long" in message
            raise ApiError(400, f"'messages': {message}", param="messages",
                           code="template_too_slow" if slow else "invalid_value") from None
        if max_bytes is not None and len(text) * 4 > max_bytes and \
                len(text.encode("utf-8")) > max_bytes:
            raise ApiError(400, f"'messages' render to {len(text.encode('utf-8'))} bytes, more "
                                "than the context can hold", param="messages",
                           code="context_length_exceeded")
        if "s" not in self.specials:
            self.specials["s"] = special_token_strings(tokenizer)
        return tokenize_cut(tokenizer, text, cuts, self.specials["s"])[0]


def load_chat_format(spec: Optional[str], tokenizer, tokenizer_dir: Optional[str]) -> ChatFormat:
    """The chat format of `--chat-template` (None: the tokenizer's own template, else rugpt3);
    a bad template is a ChatError (a usage error: exit 2 at startup)."""
    fallback = spec is None and not has_template(tokenizer_dir)
    if fallback:
        spec = "rugpt3"
    template = load_template(spec, tokenizer, tokenizer_dir)
    eot = template.eot_id(tokenizer)
    rugpt3 = spec == "rugpt3" or template.source == BUILTINS["rugpt3"]
    return ChatFormat(template, ("\nuser:",) if rugpt3 else (),
                      () if eot == tokenizer.eod else (eot,),
                      "the built-in rugpt3 dialogue style (the tokenizer has no chat template)"
                      if fallback else template.name)
