"""One vocabulary adaptation from its flags: where new tokens come from (continued BPE or --donor-tokenizer) and which ids they take (appended, or --replace-unused).

    continued BPE   data/vocab_adapt.py   (default)
    donor           data/vocab_donor.py   (--donor-tokenizer)
    replace unused  data/vocab_replace.py (--replace-unused K: the first K new tokens take the ids of
                    K removed tokens, the rest are appended after the largest old id)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

from . import vocab_adapt as va
from . import vocab_donor, vocab_replace


@dataclass
class Adaptation:
    """The adapted vocabulary, its new merges (tokens a + b, in the order of `ids`), their ids, the
    removed tokens {token: old id} and the base with them removed (`kept`: what new rows come from)."""

    vocab: va.BaseVocab
    merges: list
    ids: list
    removed: dict = field(default_factory=dict)
    kept: Optional[va.BaseVocab] = None
    donor_tokens: list = field(default_factory=list)

    @property
    def new_tokens(self) -> list:
        return [a + b for a, b in self.merges]


def adapt(base: va.BaseVocab, texts: list, add: int, *, min_frequency: int = 2, donor=None,
          replace_unused: int = 0, other_texts: Iterable[str] = (), pinned: Iterable[str] = ()) -> Adaptation:
    """`add` new tokens learned on `texts`; with replace_unused K the first K take the ids of tokens
    that neither `texts` nor `other_texts` (held-out text) use. VocabAdaptError naming the flag when
    it cannot be done."""
    if add < 1:
        raise va.VocabAdaptError(f"--add {add} must be at least 1")
    if not 0 <= replace_unused <= add:
        raise va.VocabAdaptError(f"--replace-unused {replace_unused} must be between 0 and --add {add} "
                                 "(the first K new tokens take the freed ids)")
    if base.next_id + add - replace_unused > 2**31 - 1:
        raise va.VocabAdaptError(f"--add {add} would give token ids past 2^31-1 (the largest id the data and "
                                 f"model formats hold); the base vocabulary already ends at id {base.next_id - 1}")
    splitter, kept, removed = va.Splitter(base), base, []
    if replace_unused:
        used = vocab_replace.used_tokens(splitter, [*texts, *other_texts])
        removed = vocab_replace.choose_unused(base, used, replace_unused, pinned)
        kept = vocab_replace.without(base, removed)
        splitter = va.Splitter(kept)
    taken = []
    if donor is not None:
        counts = vocab_donor.donor_counts(donor, texts)
        merges, taken = vocab_donor.donor_merges(kept, splitter, counts, add, min_frequency)
        what = (f"--donor-tokenizer {donor} yields only {len(merges)} new tokens ({len(taken)} of its Cyrillic "
                f"tokens used at least {min_frequency} times on the corpus, made reachable)")
    else:
        counts = va.count_cyrillic_pieces(splitter, texts)
        merges = va.continue_bpe(kept, splitter, counts, add, min_frequency)
        what = (f"--corpus yields only {len(merges)} new tokens seen at least {min_frequency} times "
                f"({len(counts)} distinct Cyrillic pieces)")
    if len(merges) < add:
        raise va.VocabAdaptError(f"{what}, fewer than --add {add}: give a larger corpus or a smaller --add")
    ids = sorted(base.vocab[t] for t in removed) + list(range(base.next_id, base.next_id + add - len(removed)))
    return Adaptation(va.extended(kept, merges, ids), merges, ids, {t: base.vocab[t] for t in removed}, kept,
                      taken)
