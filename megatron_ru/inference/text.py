"""Text-level helpers of sampling: stop strings over token ids, and an incremental detokenizer for
streaming that never prints half a character or the start of a stop string it may later cut.

Streams look for stop strings with an Aho-Corasick automaton fed the new characters only, so a
token costs time in proportion to the text it adds, never to the text so far or to the stop
strings' length (a rescan of the whole text per token made long streams quadratic).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

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
        scan = self.scanner()
        scan.feed(text[-max(map(len, self.strings), default=1):])
        return scan.held

    def scanner(self) -> "StopScan":
        """An incremental matcher of these strings over a growing text."""
        return StopScan(_automaton(tuple(self.strings)))


class _Automaton:
    """Aho-Corasick over a few strings: goto dicts, failure links, per node the depth (length of
    the prefix it stands for) and the longest string that ends there (0: none)."""

    def __init__(self, strings: tuple[str, ...]) -> None:
        self.goto: list[dict[str, int]] = [{}]
        self.depth, self.fail, self.longest = [0], [0], [0]
        for s in strings:
            node = 0
            for ch in s:
                nxt = self.goto[node].get(ch)
                if nxt is None:
                    nxt = self.goto[node][ch] = len(self.goto)
                    self.goto.append({})
                    self.depth.append(self.depth[node] + 1)
                    self.fail.append(0)
                    self.longest.append(0)
                node = nxt
            self.longest[node] = len(s)
        queue = list(self.goto[0].values())
        for node in queue:  # breadth first: a node's failure target is shallower, so done
            for ch, child in self.goto[node].items():
                f = self.fail[node]
                while f and ch not in self.goto[f]:
                    f = self.fail[f]
                target = self.goto[f].get(ch, 0)
                self.fail[child] = target if target != child else 0
                self.longest[child] = max(self.longest[child], self.longest[self.fail[child]])
                queue.append(child)


@functools.lru_cache(maxsize=64)
def _automaton(strings: tuple[str, ...]) -> _Automaton:
    return _Automaton(strings)


class StopScan:
    """Feed a text piece by piece: `cut` is where the earliest stop string in it starts (None while
    there is none), `held` how many trailing characters could still begin one; `feed` returns
    whether a stop string ended inside the new piece. Linear in the text fed."""

    def __init__(self, automaton: _Automaton) -> None:
        self.a, self.state, self.length = automaton, 0, 0
        self.cut: Optional[int] = None

    @property
    def held(self) -> int:
        return self.a.depth[self.state]

    def feed(self, piece: str) -> bool:
        goto, fail, longest = self.a.goto, self.a.fail, self.a.longest
        state, found = self.state, False
        for ch in piece:
            while state and ch not in goto[state]:
                state = fail[state]
            state = goto[state].get(ch, 0)
            self.length += 1
            if longest[state]:
                found = True
                start = self.length - longest[state]
                if self.cut is None or start < self.cut:
                    self.cut = start
        self.state = state
        return found


class TextStream:
    """Feed token ids one by one; `push` returns the text that is safe to print now.

    Incremental decoding in the style of vLLM: decode a short window of recent tokens and emit
    what the newest ones add, waiting while the text ends in an incomplete UTF-8 sequence."""

    MAX_PENDING = 8  # tokens that end in a partial character: after this many it stays \ufffd

    def __init__(self, detokenize: Detokenize, stops: StopStrings | None = None) -> None:
        self.detokenize, self.stops = detokenize, stops
        self.scan = stops.scanner() if stops else None
        self.tokens: list[int] = []
        self.text = ""  # decoded so far (complete characters only)
        self.emitted = 0  # characters of `text` already returned
        self._prefix, self._read = 0, 0  # window [prefix, read) was decoded into `text`

    def add(self, token: int) -> str:
        """Take a token; returns the characters it completes (possibly none yet)."""
        self.tokens.append(token)
        before = self.detokenize(self.tokens[self._prefix:self._read])
        after = self.detokenize(self.tokens[self._prefix:])
        if len(after) > len(before) and (not after.endswith("\ufffd") or
                                         len(self.tokens) - self._read > self.MAX_PENDING):
            new = after[len(before):]
            self.text += new
            self._prefix, self._read = self._read, len(self.tokens)
            return new
        return ""

    @property
    def stopped(self) -> bool:
        """Whether the text so far holds a stop string."""
        return self.scan is not None and self.scan.cut is not None

    def push(self, token: int) -> str:
        new = self.add(token)
        safe = len(self.text)
        if self.scan is not None:
            self.scan.feed(new)
            safe = self.scan.cut if self.scan.cut is not None else safe - self.scan.held
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
