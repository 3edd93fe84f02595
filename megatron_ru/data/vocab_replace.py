"""--replace-unused K: free the ids of K tokens the corpus never uses, so new tokens take them and the vocabulary keeps its size.

A token may be removed when it
  * is not special (an added token, the end-of-text token, a token a chat template pins),
    not one of the 256 byte tokens and holds no Cyrillic lead byte,
  * is never used by the base tokenizer on the texts given (corpus and held-out text),
  * is no part of a merge whose result is kept (nothing kept is built through it).
Candidates are taken from the highest id down: BPE learns its rarest pairs last. A removed token
loses its id and every merge that makes it. Why text that does not use a removed token encodes as
before: a removed token is a part of no kept merge, so once made it would stay to the end of the
piece's encoding; a piece whose base encoding does not hold it therefore never made it, its merge
never fired, and dropping a merge that never fires leaves every step of BPE (lowest rank first)
unchanged. Text that used a removed token still round-trips (byte-level BPE), in other tokens.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Iterable

from .vocab_adapt import _BYTE, BaseVocab, Splitter, VocabAdaptError, has_cyrillic


def used_tokens(splitter: Splitter, texts: Iterable[str]) -> Counter:
    """How often the base tokenizer uses each token (string) on `texts` (each piece segmented once)."""
    pieces = Counter()
    for text in texts:
        pieces.update(splitter.pieces(text))
    used = Counter()
    for piece, n in pieces.items():
        for t in splitter.segment(piece):
            used[t] += n
    return used


def choose_unused(base: BaseVocab, used, k: int, pinned: Iterable[str] = ()) -> list:
    """K token strings to remove (highest id first), or VocabAdaptError naming --replace-unused."""
    parents = defaultdict(set)  # token -> the tokens merges build from it
    for a, b in base.merges:
        parents[a].add(a + b)
        parents[b].add(a + b)
    keep = set(base.special) | set(pinned) | set(_BYTE.values())
    candidates = sorted(((i, t) for t, i in base.vocab.items()
                         if t not in keep and not has_cyrillic(t) and not used.get(t)), reverse=True)
    chosen, order = set(), []
    for _, t in candidates:
        if len(order) == k:
            break
        if parents[t] <= chosen:  # everything built from it goes too (chosen earlier: higher ids)
            chosen.add(t)
            order.append(t)
    if len(order) < k:
        raise VocabAdaptError(f"--replace-unused {k}: only {len(order)} tokens can be replaced (not special, "
                              "not a byte, no Cyrillic, unused by the corpus and held-out text, no part of a "
                              "kept token's merges): give a smaller --replace-unused")
    return order


def without(base: BaseVocab, removed: Iterable[str]) -> BaseVocab:
    """The base vocabulary with `removed` tokens and the merges that make them dropped (ids of the
    others unchanged; the freed ids are left as holes for the new tokens)."""
    removed = set(removed)
    vocab = {t: i for t, i in base.vocab.items() if t not in removed}
    merges = [(a, b) for a, b in base.merges if a + b not in removed]
    body = None
    if base.body is not None:
        body = json.loads(json.dumps(base.body))
        model = body["model"]
        as_str = bool(model.get("merges")) and isinstance(model["merges"][0], str)
        model["vocab"] = vocab
        model["merges"] = [f"{a} {b}" if as_str else [a, b] for a, b in merges]
    return BaseVocab(base.kind, vocab, merges, dict(base.special), base.ignore_merges, body, base.source)
