"""--donor-tokenizer: new tokens are another tokenizer's Cyrillic tokens, each made reachable by merges from the base's pieces.

The donor (vocab.json + merges.txt, or any tokenizer.json: byte-level, or SentencePiece-style with
the "▁" word marker) encodes the corpus; its tokens that hold a Cyrillic letter are ranked by how
often it used them. Going down that list, a candidate is taken when it is new to the base, is one
piece of the base's own pre-tokenizer (a token spanning two pieces could never be produced), and
can be made reachable: its current segmentation [s1..sn] is split in two at the point that needs
the fewest new intermediate tokens, each half is built the same way, and the merge (left, right)
is appended. Every token this adds (the candidate and any intermediate) must hold a Cyrillic lead
byte (so text without Cyrillic never meets a new merge) and must encode to itself under all the
merges so far; a candidate that fails is rolled back. Merges appended later never change how an
earlier token encodes (they rank after every merge that built it), so each check stays true.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Iterable

from .tokenizers import TokenizerError
from .vocab_adapt import _BYTE, _TO_BYTE, BaseVocab, Splitter, _is_byte_level, has_cyrillic, merge_word, read_base


def donor_counts(path, texts: Iterable[str]) -> Counter:
    """{token as a byte-level string of the base's alphabet: how often the donor used it on texts}."""
    path = str(path)
    texts = list(texts)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "vocab.json")) and \
            os.path.isfile(os.path.join(path, "merges.txt")):
        splitter = Splitter(read_base(path))
        pieces = Counter(p for t in texts for p in splitter.pieces(t))
        out = Counter()
        for piece, n in pieces.items():
            for tok in splitter.segment(piece):
                out[tok] += n
        return out
    tj = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(tj):
        raise TokenizerError(f"--donor-tokenizer {path}: expected a directory with vocab.json + merges.txt or "
                             "tokenizer.json, or a tokenizer.json file")
    from tokenizers import Tokenizer
    try:
        with open(tj, encoding="utf-8") as f:
            body = json.load(f)
        tok = Tokenizer.from_str(json.dumps(body))
    except Exception as exc:  # the Rust side raises a plain Exception
        raise TokenizerError(f"--donor-tokenizer {tj} cannot be read: {exc}") from None
    byte_level = _is_byte_level(body) or (body.get("decoder") or {}).get("type") == "ByteLevel"
    counts = Counter()
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        counts.update(enc.tokens)
    out = Counter()
    for t, n in counts.items():
        if byte_level:
            if all(c in _TO_BYTE for c in t):
                out[t] += n
        elif not (t.startswith("<0x") and t.endswith(">")):  # byte-fallback pieces
            out["".join(_BYTE[b] for b in t.replace("\u2581", " ").encode("utf-8"))] += n
    return out


def donor_merges(base: BaseVocab, splitter: Splitter, counts: Counter, add: int,
                 min_frequency: int = 2) -> tuple:
    """(merges, donor tokens taken): at most `add` new merges making the most used donor tokens
    reachable (the module docstring says which are taken)."""
    ranks = {pair: r for r, pair in enumerate(base.merges)}
    known = set(base.vocab) | set(base.special)
    merges, taken = [], []
    for tok, n in counts.most_common():
        if len(merges) >= add or n < min_frequency:
            break
        if tok in known or not has_cyrillic(tok) or not _one_piece(splitter, tok):
            continue
        plan = _plan(tok, merge_word(list(tok), ranks), known)
        if len(merges) + len(plan) > add or not all(has_cyrillic(a + b) for a, b in plan):
            continue
        for pair in plan:
            ranks[pair] = len(ranks)
        made = [a + b for a, b in plan]
        if all(merge_word(list(t), ranks) == [t] for t in made):
            merges += plan
            known.update(made)
            taken.append(tok)
        else:  # roll back
            for pair in plan:
                del ranks[pair]
    return merges, taken


def _one_piece(splitter: Splitter, tok: str) -> bool:
    try:
        text = bytes(_TO_BYTE[c] for c in tok).decode("utf-8")
    except UnicodeDecodeError:
        return False  # part of a character: the pre-tokenizer cannot be asked
    return splitter.pieces(text) == [tok]


def _plan(tok: str, seg: list, known: set) -> list:
    """Merges building `tok` from its segmentation `seg`: split where the halves need the fewest
    new tokens (a known half needs none; an unknown one of k pieces needs k - 1 at most)."""
    if len(seg) < 2:
        return []

    def cost(part):
        return 0 if "".join(part) in known else len(part) - 1

    k = min(range(1, len(seg)), key=lambda i: (cost(seg[:i]) + cost(seg[i:]), abs(2 * i - len(seg))))
    left, right = "".join(seg[:k]), "".join(seg[k:])
    plan = [] if left in known else _plan(left, seg[:k], known)
    plan += [] if right in known else _plan(right, seg[k:], known | {a + b for a, b in plan})
    return plan + [(left, right)]
