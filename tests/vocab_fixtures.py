"""Small base vocabularies for the vocabulary-adaptation tests: the demo BPE cut to its first merges.

A prefix of a BPE's merges is itself a BPE, so cutting the demo tokenizer to 40 merges gives an
"English-centric" base that spells Russian nearly byte by byte, as GPT-2 and Llama-3 do.
"""
import json
import os
from pathlib import Path

import regex

from megatron_ru.data import vocab_adapt as va
from tests.helpers import ROOT

DEMO_TOKENIZER = ROOT / "examples" / "data" / "tokenizer"
CORPUS = ROOT / "examples" / "data" / "ru_demo.txt"
HELDOUT = ROOT / "examples" / "data" / "ru_heldout.txt"
ENGLISH = ("The quick brown fox jumps over the lazy dog, twice: at 9:30 and at 10:45.\n"
           "Tokenizers split text into pieces; a model sees ids, not letters.\n"
           "She said \"hello\" -- and left. Prices rose 12% in 2023 (see table 3).\n")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                 "{{ m['content'] }}<|eot_id|>{% endfor %}")


ENGLISH_WORDS = ("""A base vocabulary trained on English spends its rows on words such as weather, harbour,
    kitchen, pencil, window, garden, bicycle, journey, morning, evening, umbrella, blanket, candle, ladder,
    mirror, orchard, pillow, river, saddle, thunder, valley, whistle, yellow, zipper, anchor, basket, cotton,
    dragon, engine, feather, glacier, hammer, island, jungle, kettle, lantern, meadow, needle, oyster, parrot,
    quilt, rocket, spider, tunnel, velvet, wagon, walnut, falcon, biscuit, cabinet, dolphin, emerald, fossil,
    granite, helmet, iceberg, jacket, kingdom, lobster, marble, nectar, outpost, pebble, rabbit, sandal,
    tractor, vessel, warden, compass, ribbon, copper, silver, timber, lemon, ginger, pepper, butter""")


def english_words():
    """Distinct words of ENGLISH_WORDS, in order."""
    words = [w.lower() for w in regex.findall(r"\p{L}+", ENGLISH_WORDS)]
    return list(dict.fromkeys(w for w in words if len(w) > 2))


def _cut(merges_kept: int, english: bool = False):
    """The demo BPE's first merges; `english`: then merges spelling " word" for each English word
    (left to right), so the base has non-Cyrillic tokens the Russian corpus never uses."""
    base = va.read_base(DEMO_TOKENIZER)
    keep = base.merges[:merges_kept]
    vocab = {c: i for i, c in enumerate(va.bytes_to_unicode().values())}
    for a, b in keep:
        vocab.setdefault(a + b, len(vocab))
    for word in english_words() if english else ():
        word = "\u0120" + word  # Ġ: the byte-level space
        for k in range(2, len(word) + 1):
            if word[:k] not in vocab:
                keep.append((word[:k - 1], word[k - 1]))
                vocab[word[:k]] = len(vocab)
    return vocab, keep


def gpt2_base(d: Path, merges_kept: int = 40, english: bool = False) -> Path:
    """vocab.json + merges.txt in D: bytes, the first merges, <|endoftext|> last."""
    vocab, keep = _cut(merges_kept, english)
    vocab["<|endoftext|>"] = len(vocab)
    va.write_vocab(d, va.BaseVocab("gpt2", vocab, keep))
    return Path(d)


def llama3_base(d: Path, merges_kept: int = 40, english: bool = False) -> Path:
    """A Llama-3 style tokenizer.json in D (Split regex + ByteLevel, ignore_merges, merges as pairs,
    the special tokens after the model's vocabulary) and a tokenizer_config.json with a chat template."""
    vocab, keep = _cut(merges_kept, english)
    added = [{"id": len(vocab) + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, s in enumerate(LLAMA_SPECIALS)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    body = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
                byte_level]},
            "post_processor": None, "decoder": {**byte_level, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": True, "vocab": vocab, "merges": [[a, b] for a, b in keep]}}
    os.makedirs(d, exist_ok=True)
    (Path(d) / "tokenizer.json").write_text(json.dumps(body, ensure_ascii=False), encoding="utf-8")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": "<|end_of_text|>", "chat_template": CHAT_TEMPLATE,
              "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added}}
    (Path(d) / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return Path(d)


def corpus_lines():
    return [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
