"""How /v1/chat/completions turns messages into a prompt: the model's chat template.

The same templates fine-tuning trains with (data/chat_templates.py): `--chat-template llama3|rugpt3|FILE`,
by default the `chat_template` of the tokenizer's tokenizer_config.json, and without one the
built-in `rugpt3` dialogue style (`user: ...` / `bot: ...`). Rendering with the generation
prompt and tokenizing (special tokens split out first) is exactly what `generate.py --chat`
does, so a greedy chat reply from the server equals generate.py's. The template's end-of-turn
token (e.g. `<|eot_id|>`) ends a reply like the end of text does; with the `rugpt3` style the
reply also ends where the model starts the user's next line ("\\nuser:"), as an untuned model
tends to.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..data.chat_templates import ChatError, ChatTemplate, has_template, load_template
from .protocol import ApiError


@dataclass(frozen=True)
class ChatFormat:
    template: ChatTemplate
    stops: tuple[str, ...] = ()  # stop strings every chat reply gets
    stop_ids: tuple[int, ...] = ()  # tokens that end a reply besides the end of text
    name: str = "chat template"  # for the startup line

    def prompt_ids(self, tokenizer, messages: list[dict]) -> list[int]:
        """Ids of the rendered conversation plus the assistant's generation prompt; 400 when
        the template refuses the conversation."""
        try:
            return self.template.prompt_ids(tokenizer, messages)
        except ChatError as exc:
            raise ApiError(400, f"'messages': {exc}", param="messages",
                           code="invalid_value") from None


def load_chat_format(spec: Optional[str], tokenizer, tokenizer_dir: Optional[str]) -> ChatFormat:
    """The chat format of `--chat-template` (None: the tokenizer's own template, else rugpt3);
    a bad template is a ChatError (a usage error: exit 2 at startup)."""
    fallback = spec is None and not has_template(tokenizer_dir)
    if fallback:
        spec = "rugpt3"
    template = load_template(spec, tokenizer, tokenizer_dir)
    eot = template.eot_id(tokenizer)
    return ChatFormat(template, ("\nuser:",) if spec == "rugpt3" else (),
                      () if eot == tokenizer.eod else (eot,),
                      "the built-in rugpt3 dialogue style (the tokenizer has no chat template)"
                      if fallback else template.name)
