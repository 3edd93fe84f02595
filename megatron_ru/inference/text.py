"""Text-level helpers of sampling: stop strings over token ids, and an incremental detokenizer for
streaming that never prints half a character or the start of a stop string it may later cut."""
from __future__ import annotations

from typing import Callable, Sequence

Detokenize = Callable[[Sequence[int]], str]


class StopStrings:
    """`stop(row, tokens)` is True once the continuation's text contains one of `strings`.

    Only the tail of the continuation is decoded each step: a stop string of n UTF-8 bytes that
    the newest token completes lies within the last n + 1 tokens (every token is >= 1 byte)."""

    def __init__(self, strings: Sequence[str], detokenize: Detokenize) -> None:
        self.strings = [s for s in strings if s]
        self.detokenize = detokenize
        self.window = max((len(s.encode("utf-8")) for s in self.strings), default=0) + 1

    def __bool__(self) -> bool:
        return bool(self.strings)

    def __call__(self, row: int, tokens: Sequence[int]) -> bool:
        tail = self.detokenize(list(tokens[-self.window:]))
        return any(s in tail for s in self.strings)

    def truncate(self, text: str) -> str:
        """`text` up to (not including) the earliest stop string in it."""
        cut = min((i for i in (text.find(s) for s in self.strings) if i >= 0), default=len(text))
        return text[:cut]

    def holdback(self, text: str) -> int:
        """How many trailing characters of `text` could still begin a stop string."""
        best = 0
        for s in self.strings:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


class TextStream:
    """Feed token ids one by one; `push` returns the text that is safe to print now.

    Incremental decoding in the style of vLLM: decode a short window of recent tokens and emit
    what the newest ones add, waiting while the text ends in an incomplete UTF-8 sequence."""

    def __init__(self, detokenize: Detokenize, stops: StopStrings | None = None) -> None:
        self.detokenize, self.stops = detokenize, stops
        self.tokens: list[int] = []
        self.text = ""  # decoded so far (complete characters only)
        self.emitted = 0  # characters of `text` already returned
        self._prefix, self._read = 0, 0  # window [prefix, read) was decoded into `text`

    def push(self, token: int) -> str:
        self.tokens.append(token)
        before = self.detokenize(self.tokens[self._prefix:self._read])
        after = self.detokenize(self.tokens[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.tokens)
        safe = len(self.text)
        if self.stops:
            cut = self.stops.truncate(self.text)
            safe = len(cut) if len(cut) < len(self.text) else safe - self.stops.holdback(self.text)
        return self._emit(safe)

    def finish(self, final_text: str) -> str:
        """The rest of `final_text` (the completion's definitive text) not yet printed."""
        if final_text.startswith(self.text[: self.emitted]):
            out = final_text[self.emitted:]
        else:  # a tokenizer whose pieces do not decode incrementally: print the whole text
            out = "\n" + final_text
        self.emitted = len(final_text)
        return out

    def _emit(self, safe: int) -> str:
        if safe <= self.emitted:
            return ""
        out = self.text[self.emitted:safe]
        self.emitted = safe
        return out
