"""Trains a GPT-2 style byte-level BPE (vocab.json + merges.txt) in pure Python, no dependencies.

Text is pre-tokenized with the GPT-2 regex and counted once; merges then work on the distinct
pieces, with pair counts updated incrementally and a lazy max-heap, so a merge costs time
proportional to the pieces that contain the pair (seconds for a few MB of text).
"""
import heapq
import json
import os
from collections import Counter, defaultdict

import regex

from ..files import atomic_open
from .progress import Progress
from .tokenizers import GPT2_PATTERN, bytes_to_unicode


def count_pieces(texts, progress=None):
    """Counter of GPT-2 pre-tokens, each already mapped to byte-level chars."""
    pattern = regex.compile(GPT2_PATTERN)
    table = str.maketrans({chr(b): c for b, c in bytes_to_unicode().items()})
    raw = Counter()
    for text in texts:
        raw.update(pattern.findall(text))
        if progress is not None:
            progress.update(1, len(text.encode("utf-8")))
    return Counter({p.encode("utf-8").decode("latin-1").translate(table): n for p, n in raw.items()})


def train_bpe(piece_counts, vocab_size, special_tokens=("<|endoftext|>",), min_frequency=2, progress=None):
    """Returns (vocab {token: id}, merges [(a, b)]). Ids: 256 byte chars, merges, then specials.

    Ties between equally frequent pairs go to the lexicographically smallest (a, b) strings, so
    the result is deterministic.
    """
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet[:]  # id -> string
    ids = {t: i for i, t in enumerate(tokens)}
    words = [[ids[c] for c in piece] for piece in piece_counts]
    freqs = list(piece_counts.values())
    pair_counts = defaultdict(int)
    where = defaultdict(set)  # pair -> word indices that may contain it (a superset)
    for w, (word, f) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += f
            where[pair].add(w)
    heap = [(-c, tokens[a], tokens[b], (a, b)) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)
    merges = []
    target = vocab_size - len(special_tokens)
    while len(tokens) < target and heap:
        neg, _, _, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg:
            continue  # stale entry; the current count was pushed separately
        if -neg < min_frequency:
            break
        a, b = pair
        merged_str = tokens[a] + tokens[b]
        new = ids.get(merged_str)
        if new is None:  # two merges may spell the same token ("ab"+"c", "a"+"bc"): one id
            new = ids[merged_str] = len(tokens)
            tokens.append(merged_str)
        merges.append((tokens[a], tokens[b]))
        changed = set()
        for w in where.pop(pair):
            word, f = words[w], freqs[w]
            if len(word) < 2:
                continue
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == a and word[i + 1] == b:
                    merged.append(new)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            if len(merged) == len(word):
                continue  # the pair was merged away earlier
            for p in zip(word, word[1:]):
                pair_counts[p] -= f
                changed.add(p)
            for p in zip(merged, merged[1:]):
                pair_counts[p] += f
                where[p].add(w)
                changed.add(p)
            words[w] = merged
        pair_counts.pop(pair, None)
        for p in changed:
            c = pair_counts.get(p, 0)
            if c > 0 and p != pair:
                heapq.heappush(heap, (-c, tokens[p[0]], tokens[p[1]], p))
            elif c <= 0:
                pair_counts.pop(p, None)
        if progress is not None:
            progress.update(1)
    for special in special_tokens:
        if special not in ids:  # text may already have produced it as an ordinary token
            ids[special] = len(tokens)
            tokens.append(special)
    return dict(ids), merges


def save_bpe(out_dir, vocab, merges):
    """Writes vocab.json and merges.txt (Hugging Face / GPT-2 layout) atomically."""
    os.makedirs(out_dir, exist_ok=True)
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    for name, write in (("vocab.json", lambda f: json.dump(vocab, f, ensure_ascii=False)),
                        ("merges.txt", lambda f: f.write(merges_text))):
        path = os.path.join(out_dir, name)
        with atomic_open(path) as f:
            write(f)
    return os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt")


def train_bpe_from_texts(texts, vocab_size, out_dir, special_tokens=("<|endoftext|>",), min_frequency=2,
                         stream=None):
    """Counts, trains and saves; progress bars go to `stream` (default stderr)."""
    counts = count_pieces(texts, Progress("count", unit="docs", stream=stream))
    merge_bar = Progress("merges", total=max(vocab_size - 256 - len(special_tokens), 0), unit="merges",
                         stream=stream)
    vocab, merges = train_bpe(counts, vocab_size, special_tokens, min_frequency, merge_bar)
    merge_bar.close()
    return save_bpe(out_dir, vocab, merges)
