"""Extends a byte-level BPE vocabulary with Russian tokens by continuing BPE training from its own merges.

Both vocabulary kinds the toolkit speaks: GPT-2 `vocab.json` + `merges.txt` (ruGPT-3) and a
`tokenizer.json` byte-level BPE (Llama-3 / T-lite, `ignore_merges` included). The corpus is split
by the base tokenizer's own normaliser and pre-tokenizer; every Cyrillic-bearing piece starts from
the base tokenizer's segmentation of it, and the most frequent adjacent pair is merged, again and
again, exactly as BPE training would have gone on. New merges are appended after the old ones and
new tokens after the largest old id (special tokens included), so old ids never move.

A candidate merge is taken only when
  * the merged token is new (a string already in the vocabulary would let old merges fire after
    a new one and the encoder would no longer follow the training),
  * it holds a Cyrillic lead byte (0xD0-0xD3: in UTF-8 these bytes occur in Cyrillic letters
    only), so text without Cyrillic never meets a new merge and encodes id-for-id as before,
  * the merges so far, run on the token's own bytes, produce exactly that token (it encodes to
    itself; a token reachable only inside a longer piece is useless as a unit).
With these rules each merge does in the corpus what the encoder does, so counts stay exact.
"""
from __future__ import annotations

import heapq
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Optional

import regex

from ..errors import UsageError
from ..files import atomic_open
from .tokenizers import GPT2_PATTERN, GPT2BPETokenizer, TokenizerError, bytes_to_unicode, load_vocab_and_merges

_BYTE = bytes_to_unicode()
CYRILLIC_LEADS = frozenset(_BYTE[b] for b in (0xD0, 0xD1, 0xD2, 0xD3))  # byte-level chars of lead bytes
_TO_BYTE = {c: b for b, c in _BYTE.items()}


class VocabAdaptError(UsageError):
    """The vocabulary cannot be adapted as asked; the message names the flag or file."""


def has_cyrillic(token: str) -> bool:
    """Whether a byte-level token holds a Cyrillic lead byte."""
    return any(c in CYRILLIC_LEADS for c in token)


def token_bytes(token: str) -> bytes:
    """The raw bytes a byte-level token spells."""
    return bytes(_TO_BYTE[c] for c in token)


@dataclass
class BaseVocab:
    """A byte-level BPE vocabulary as data: kind ("gpt2" or "hf"), token -> id, merges in rank
    order, the ids of special tokens and, for "hf", the tokenizer.json body it came from."""

    kind: str
    vocab: dict
    merges: list
    special: dict = field(default_factory=dict)
    ignore_merges: bool = False
    body: Optional[dict] = None  # tokenizer.json
    source: str = ""

    @property
    def next_id(self) -> int:
        return max([*self.vocab.values(), *self.special.values()]) + 1


def read_base(tok_dir) -> BaseVocab:
    """vocab.json + merges.txt or tokenizer.json of DIR as a BaseVocab; TokenizerError for a kind
    this module cannot extend (SentencePiece, a non-byte-level tokenizer.json)."""
    tok_dir = str(tok_dir)
    vj, mt, tj = (os.path.join(tok_dir, n) for n in ("vocab.json", "merges.txt", "tokenizer.json"))
    if os.path.isfile(vj) and os.path.isfile(mt):
        vocab, merges = load_vocab_and_merges(vj, mt)
        specials = {t: i for t, i in vocab.items() if t.startswith("<") and t.endswith(">") and len(t) > 2}
        return BaseVocab("gpt2", dict(vocab), list(merges), specials, source=tok_dir)
    if os.path.isfile(tj):
        with open(tj, encoding="utf-8") as f:
            try:
                body = json.load(f)
            except json.JSONDecodeError as exc:
                raise TokenizerError(f"{tj} is not valid JSON: {exc}") from None
        model = body.get("model") or {}
        if model.get("type") != "BPE" or not _is_byte_level(body) or model.get("byte_fallback"):
            raise TokenizerError(f"{tj}: only byte-level BPE tokenizers can be extended (GPT-2, Llama-3, "
                                 f"Qwen style); this one is {model.get('type')} with pre-tokenizer "
                                 f"{(body.get('pre_tokenizer') or {}).get('type')}")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        specials = {a["content"]: a["id"] for a in body.get("added_tokens", [])}
        return BaseVocab("hf", dict(model["vocab"]), merges, specials, bool(model.get("ignore_merges")),
                         body, tok_dir)
    if os.path.isfile(os.path.join(tok_dir, "tokenizer.model")):
        raise TokenizerError(f"{tok_dir} holds a SentencePiece tokenizer.model: extension needs a byte-level "
                             "BPE (vocab.json + merges.txt or tokenizer.json)")
    raise TokenizerError(f"{tok_dir} holds no vocab.json + merges.txt or tokenizer.json")


def _is_byte_level(body: dict) -> bool:
    def walk(node):
        if not isinstance(node, dict):
            return False
        return node.get("type") == "ByteLevel" or any(walk(n) for n in node.get("pretokenizers", []))
    return walk(body.get("pre_tokenizer"))


class Splitter:
    """The base tokenizer's own text -> byte-level pieces, and pieces -> its tokens."""

    def __init__(self, base: BaseVocab):
        self.base = base
        if base.kind == "gpt2":
            self.pattern = regex.compile(GPT2_PATTERN)
            self.table = str.maketrans({chr(b): c for b, c in _BYTE.items()})
            self._gpt2 = _gpt2_from_vocab(base.vocab, base.merges)
        else:
            from tokenizers import Tokenizer
            self.tok = Tokenizer.from_str(json.dumps(base.body))

    def pieces(self, text: str) -> list:
        if self.base.kind == "gpt2":
            return [p.encode("utf-8").decode("latin-1").translate(self.table) for p in self.pattern.findall(text)]
        if self.tok.normalizer is not None:
            text = self.tok.normalizer.normalize_str(text)
        return [p for p, _ in self.tok.pre_tokenizer.pre_tokenize_str(text)]

    def segment(self, piece: str) -> list:
        if self.base.kind == "gpt2":
            return self._gpt2._bpe(piece)
        return [t.value for t in self.tok.model.tokenize(piece)]


def _gpt2_from_vocab(vocab: dict, merges: list) -> GPT2BPETokenizer:
    """A GPT2BPETokenizer over in-memory vocab and merges (its _bpe is the reference segmentation)."""
    tok = GPT2BPETokenizer.__new__(GPT2BPETokenizer)
    tok.encoder, tok.decoder = vocab, {i: t for t, i in vocab.items()}
    tok.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
    return tok


def merge_word(symbols: list, ranks: dict) -> list:
    """BPE on one piece: merge the lowest-ranked adjacent pair everywhere, left to right, until none."""
    symbols = list(symbols)
    while len(symbols) > 1:
        rank, pair = min(((ranks[p], p) for p in zip(symbols, symbols[1:]) if p in ranks), default=(None, None))
        if pair is None:
            break
        out, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                out.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                out.append(symbols[i])
                i += 1
        symbols = out
    return symbols


def count_cyrillic_pieces(splitter: Splitter, texts: Iterable[str]) -> Counter:
    counts = Counter()
    for text in texts:
        counts.update(p for p in splitter.pieces(text) if has_cyrillic(p))
    return counts


def continue_bpe(base: BaseVocab, splitter: Splitter, piece_counts: Counter, add: int,
                 min_frequency: int = 2) -> list:
    """The next `add` merges [(a, b)] of BPE training continued on `piece_counts` (see the module
    docstring for which merges are allowed); fewer when the corpus runs out of pairs."""
    pieces = list(piece_counts)
    words = [splitter.segment(p) for p in pieces]
    freqs = [piece_counts[p] for p in pieces]
    where_piece = {p: w for w, p in enumerate(pieces)}
    pair_counts, where = defaultdict(int), defaultdict(set)
    for w, (word, f) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += f
            where[pair].add(w)
    heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)
    ranks = {pair: r for r, pair in enumerate(base.merges)}
    known = set(base.vocab) | set(base.special)
    new_merges, banned = [], set()

    def replace(w, merged_word):
        for p in zip(words[w], words[w][1:]):
            pair_counts[p] -= freqs[w]
            changed.add(p)
        for p in zip(merged_word, merged_word[1:]):
            pair_counts[p] += freqs[w]
            where[p].add(w)
            changed.add(p)
        words[w] = merged_word

    while len(new_merges) < add and heap:
        neg, a, b = heapq.heappop(heap)
        pair = (a, b)
        if pair in banned or pair_counts.get(pair, 0) != -neg:
            continue  # banned, or a stale entry (the current count was pushed separately)
        if -neg < min_frequency:
            break
        merged = a + b
        ranks[pair] = len(ranks)
        if merged in known or not has_cyrillic(merged) or \
                (not base.ignore_merges and merge_word(list(merged), ranks) != [merged]):
            del ranks[pair]
            banned.add(pair)
            continue
        known.add(merged)
        new_merges.append(pair)
        changed = set()
        for w in where.pop(pair, ()):
            word = words[w]
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            if len(out) != len(word):
                replace(w, out)
        whole = where_piece.get(merged)
        if base.ignore_merges and whole is not None and len(words[whole]) > 1:
            replace(whole, [merged])  # the encoder looks a whole piece up in the vocabulary first
        for p in changed:
            c = pair_counts.get(p, 0)
            if c > 0 and p != pair:
                heapq.heappush(heap, (-c, p[0], p[1]))
            elif c <= 0:
                pair_counts.pop(p, None)
    return new_merges


def extended(base: BaseVocab, new_merges: list, ids: Optional[list] = None) -> BaseVocab:
    """The base vocabulary with the new merges appended and their tokens given `ids` (default: the
    next free ids; --replace-unused passes the freed ids first)."""
    vocab, start = dict(base.vocab), base.next_id
    ids = list(range(start, start + len(new_merges))) if ids is None else list(ids)
    for i, (a, b) in zip(ids, new_merges):
        vocab[a + b] = i
    merges = base.merges + list(new_merges)
    body = None
    if base.body is not None:
        body = json.loads(json.dumps(base.body))
        model = body["model"]
        # `tokenizers` numbers an added token that is not in the model's vocabulary after the model's
        # last id, whatever id the file gives it: the special tokens join the model vocabulary at
        # their ids (as GPT-2's <|endoftext|> is), so the new tokens after them leave them in place
        model["vocab"] = dict(sorted({**{t: i for t, i in base.special.items() if t not in vocab},
                                      **vocab}.items(), key=lambda kv: kv[1]))
        as_str = bool(model.get("merges")) and isinstance(model["merges"][0], str)
        model["merges"] = [f"{a} {b}" if as_str else [a, b] for a, b in merges]
    return BaseVocab(base.kind, vocab, merges, dict(base.special), base.ignore_merges, body, base.source)


TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json")


def write_vocab(out_dir, v: BaseVocab) -> list:
    """The vocabulary's files in OUT_DIR (vocab.json + merges.txt, or tokenizer.json); their paths."""
    os.makedirs(out_dir, exist_ok=True)
    if v.kind == "gpt2":
        items = [("vocab.json", lambda f: json.dump(dict(sorted(v.vocab.items(), key=lambda kv: kv[1])), f,
                                                      ensure_ascii=False)),
                 ("merges.txt", lambda f: f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in v.merges)))]
    else:
        items = [("tokenizer.json", lambda f: json.dump(v.body, f, ensure_ascii=False, indent=1))]
    paths = []
    for name, write in items:
        path = os.path.join(out_dir, name)
        with atomic_open(path) as f:
            write(f)
        paths.append(path)
    return paths


def extend_vocab(base: BaseVocab, texts: Iterable[str], add: int, min_frequency: int = 2) -> tuple:
    """(extended BaseVocab, new merges): `add` new tokens from `texts`, or VocabAdaptError naming
    --add when the corpus yields fewer."""
    if add < 1:
        raise VocabAdaptError(f"--add {add} must be at least 1")
    if base.next_id + add > 2**31 - 1:
        raise VocabAdaptError(f"--add {add} would give token ids past 2^31-1 (the largest id the data and "
                              f"model formats hold); the base vocabulary already ends at id {base.next_id - 1}")
    splitter = Splitter(base)
    counts = count_cyrillic_pieces(splitter, texts)
    new = continue_bpe(base, splitter, counts, add, min_frequency)
    if len(new) < add:
        raise VocabAdaptError(f"--corpus yields only {len(new)} new tokens seen at least {min_frequency} times "
                              f"({len(counts)} distinct Cyrillic pieces), fewer than --add {add}: give a larger "
                              "corpus or a smaller --add")
    return extended(base, new), new
