"""What an adapted vocabulary must guarantee before it is written, and fertility figures of any tokenizer.

Guarantees (`check_extension`, VocabAdaptError naming the first failure):
  * every new token encodes to itself (the extended tokenizer's BPE on the token's own bytes),
  * decode(encode(text)) == text on the corpus sample,
  * text with no Cyrillic encodes id-for-id as with the base tokenizer; with --replace-unused: text
    with no Cyrillic whose base encoding uses none of the removed tokens (others round-trip),
  * every old token, special tokens and the chat template's tokens included, keeps its id; with
    --replace-unused every old token but the removed ones, which are gone, their ids reused,
  * the corpus sample uses none of the removed tokens.
The tokenizers checked are the real ones (ours for vocab.json + merges.txt, `tokenizers` for
tokenizer.json) built from the files as written, not the training's bookkeeping.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import regex

from .tokenizers import build_tokenizer
from .vocab_adapt import VocabAdaptError

CYRILLIC = regex.compile(r"\p{Cyrillic}")


def open_tokenizer(tok_dir, eod_token=None):
    """Our tokenizer over a directory holding vocab.json + merges.txt or tokenizer.json."""
    tok_dir = str(tok_dir)
    if os.path.isfile(os.path.join(tok_dir, "vocab.json")) and os.path.isfile(os.path.join(tok_dir, "merges.txt")):
        return build_tokenizer("GPT2BPETokenizer", vocab_file=os.path.join(tok_dir, "vocab.json"),
                               merge_file=os.path.join(tok_dir, "merges.txt"), eod_token=eod_token)
    return build_tokenizer("HuggingFaceTokenizer", tokenizer_model=os.path.join(tok_dir, "tokenizer.json"),
                           eod_token=eod_token)


def piece_tokens(tok, piece: str) -> list:
    """The tokens one byte-level piece encodes to (no pre-tokenizer)."""
    if hasattr(tok, "_bpe"):
        return tok._bpe(piece)
    return [t.value for t in tok.tok.model.tokenize(piece)]


def vocab_of(tok) -> dict:
    return dict(tok.encoder) if hasattr(tok, "encoder") else tok.tok.get_vocab(with_added_tokens=True)


def chat_tokens(tok_dir) -> dict:
    """{token: id} a tokenizer_config.json pins (added_tokens_decoder), {} without one."""
    path = os.path.join(str(tok_dir), "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    return {v["content"]: int(k) for k, v in (cfg.get("added_tokens_decoder") or {}).items()
            if isinstance(v, dict) and "content" in v}


def check_extension(base_dir, new_dir, new_tokens: list, sample: list, english: list = (),
                    eod_token=None, removed: Optional[dict] = None) -> dict:
    """Runs every guarantee on the tokenizers in BASE_DIR and NEW_DIR; returns what was checked.
    `removed`: {token: old id} of --replace-unused."""
    base, new = open_tokenizer(base_dir, eod_token), open_tokenizer(new_dir, eod_token)
    old_vocab, new_vocab = vocab_of(base), vocab_of(new)
    removed = removed or {}
    moved = [t for t, i in old_vocab.items() if t not in removed and new_vocab.get(t) != i]
    still = [t for t in removed if t in new_vocab]
    if still:
        raise VocabAdaptError(f"{new_dir}: removed token {still[0]!r} is still in the vocabulary")
    if moved:
        raise VocabAdaptError(f"{new_dir}: token {moved[0]!r} moved from id {old_vocab[moved[0]]} to "
                              f"{new_vocab.get(moved[0])} ({len(moved)} moved)")
    for t, i in chat_tokens(new_dir).items():
        if new_vocab.get(t) != i:
            raise VocabAdaptError(f"{new_dir}/tokenizer_config.json pins {t!r} to id {i}, the tokenizer "
                                  f"gives {new_vocab.get(t)}")
    by_id = {i: t for t, i in new_vocab.items()}
    fresh = set(new_tokens)
    taken = [i for i in removed.values() if by_id.get(i) not in fresh]
    if taken:
        raise VocabAdaptError(f"{new_dir}: id {taken[0]} of a removed token holds no new token")
    for t in new_tokens:
        got = piece_tokens(new, t)
        if got != [t]:
            raise VocabAdaptError(f"new token {t!r} does not encode to itself (it encodes to {got})")
    gone = set(removed.values())
    for text in sample:
        back = new.detokenize(new.tokenize(text))
        if back != text:
            raise VocabAdaptError(f"decode(encode(text)) differs from the text for corpus line {text[:60]!r}")
        if gone and gone.intersection(base.tokenize(text)):
            raise VocabAdaptError(f"corpus line {text[:60]!r} uses a token --replace-unused removed")
    plain = [t for t in (CYRILLIC.sub("", s) for s in [*sample, *english]) if t.strip()]
    uses_removed = 0
    for text in plain:
        ids = base.tokenize(text)
        if gone and gone.intersection(ids):  # only the round trip is promised
            uses_removed += 1
            if new.detokenize(new.tokenize(text)) != text:
                raise VocabAdaptError(f"decode(encode(text)) differs from the text for {text[:60]!r}")
        elif ids != new.tokenize(text):
            raise VocabAdaptError(f"text without Cyrillic encodes differently after the extension: {text[:60]!r}")
    if base.eod != new.eod:
        raise VocabAdaptError(f"the end-of-text token moved from id {base.eod} to {new.eod}")
    out = {"new_tokens_encode_to_themselves": len(new_tokens), "round_trip_lines": len(sample),
           "non_cyrillic_lines_unchanged": len(plain) - uses_removed, "old_ids_kept": len(old_vocab) - len(removed)}
    if removed:
        out["removed_tokens"] = len(removed)
        out["non_cyrillic_lines_using_removed_tokens"] = uses_removed
    return out


@dataclass
class Fertility:
    """Token statistics of one tokenizer on one text."""

    words: int
    tokens: int
    chars: int
    bytes: int
    short_words: int  # words that take at most 2 tokens

    def as_dict(self) -> dict:
        return {"tokens_per_word": round(self.tokens / max(self.words, 1), 3),
                "chars_per_token": round(self.chars / max(self.tokens, 1), 3),
                "bytes_per_token": round(self.bytes / max(self.tokens, 1), 3),
                "words_in_2_tokens": round(self.short_words / max(self.words, 1), 3),
                "words": self.words, "tokens": self.tokens}


def fertility(tok, text: str) -> Fertility:
    """Tokens per whitespace-separated word of `text` (encoded whole), characters and UTF-8 bytes per
    token, and how many words take at most 2 tokens (each word encoded alone, with a leading space,
    as it stands inside a line)."""
    words = text.split()
    tokens = sum(len(tok.tokenize(line)) for line in text.splitlines())
    cache, short = {}, 0
    for w in words:
        if w not in cache:
            cache[w] = len(tok.tokenize(" " + w)) <= 2
        short += cache[w]
    return Fertility(len(words), tokens, sum(len(line) for line in text.splitlines()),
                     sum(len(line.encode("utf-8")) for line in text.splitlines()), short)
