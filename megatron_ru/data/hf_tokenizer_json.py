"""Writes our tokenizers as Hugging Face `tokenizer.json` + `tokenizer_config.json`.

Byte-level BPE (vocab.json + merges.txt): the `tokenizers` serialisation of GPT-2's fast
tokenizer: a BPE model (vocab, merges as "a b" strings), the ByteLevel pre-tokenizer with GPT-2's
regex and no prefix space, the ByteLevel decoder, and the special tokens as added tokens.

SentencePiece BPE (a `.model` trained by tools/train_tokenizer.py with Llama's settings: identity
normalisation, a dummy prefix, whitespace kept, byte fallback): the Llama-2 form of
`tokenizer.json`: normaliser Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer, a BPE model with
byte fallback whose merges are every split of a piece into two pieces, ranked by the merged
piece's score (SentencePiece's BPE applies the highest-scoring merge first), and the decoder
Replace("▁", " ") + ByteFallback + Fuse + Strip(1 leading space). Other SentencePiece settings
(NFKC normalisation, collapsed whitespace) have no such exact form and are refused.

`tokenizers.Tokenizer.from_file` and `transformers.AutoTokenizer.from_pretrained(DIR)` load
either and give the ids our tokenizer gives (tests/unit/test_hf_tokenizer_json.py).
"""
import json
import os

from ..files import atomic_open
from . import sentencepiece_json as _sp_json
from .tokenizers import load_vocab_and_merges

SentencePieceExportError = _sp_json.SentencePieceExportError  # re-exported

BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def tokenizer_json(vocab: dict, merges: list, special_tokens) -> dict:
    added = [{"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for t in special_tokens if t in vocab]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None, "pre_tokenizer": dict(BYTE_LEVEL),
            "post_processor": {**BYTE_LEVEL, "trim_offsets": False}, "decoder": dict(BYTE_LEVEL),
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]}}


def tokenizer_config(eod_token, max_length: int = 2048, special: dict = None) -> dict:
    if special is None:
        special = {} if eod_token is None else {"bos_token": eod_token, "eos_token": eod_token,
                                                "unk_token": eod_token}
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
            "add_prefix_space": False, "clean_up_tokenization_spaces": False, **special}


def _write_json(path, obj):
    with atomic_open(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)


def write_hf_tokenizer(out_dir, vocab_file, merge_file, special_tokens=("<|endoftext|>",)):
    """OUT_DIR/tokenizer.json and OUT_DIR/tokenizer_config.json (the first special token = eos)."""
    vocab, merges = load_vocab_and_merges(vocab_file, merge_file)
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "tokenizer.json"), os.path.join(out_dir, "tokenizer_config.json")]
    eod = next((t for t in special_tokens if t in vocab), None)
    _write_json(paths[0], tokenizer_json(vocab, merges, special_tokens))
    _write_json(paths[1], tokenizer_config(eod))
    return paths


# SentencePiece trainer options whose encoding the Llama-2 form of tokenizer.json reproduces
SENTENCEPIECE_HF_OPTIONS = dict(model_type="bpe", normalization_rule_name="identity",
                                add_dummy_prefix=True, remove_extra_whitespaces=False,
                                allow_whitespace_only_pieces=True, split_digits=False,
                                byte_fallback=True)


def sentencepiece_tokenizer_json(model_file) -> dict:
    """The exact tokenizer.json of a SentencePiece BPE or Unigram model (data/sentencepiece_json.py)."""
    return _sp_json.sentencepiece_tokenizer_json(model_file)


def sentencepiece_tokenizer_config(model_file, max_length: int = 2048) -> dict:
    """tokenizer_config.json beside the tokenizer.json of a SentencePiece model: bos/eos/unk/pad from
    the model, no bos/eos added (our SentencePieceTokenizer adds none)."""
    names = _sp_json.special_tokens(model_file)
    return {**tokenizer_config(names.get("eos_token"), max_length, special=names),
            "add_bos_token": False, "add_eos_token": False}


def write_sentencepiece_hf_tokenizer(out_dir, model_file):
    """OUT_DIR/tokenizer.json and tokenizer_config.json of a SentencePiece BPE or Unigram model (bos <s>,
    eos </s>: our SentencePieceTokenizer's end of document)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "tokenizer.json"), os.path.join(out_dir, "tokenizer_config.json")]
    _write_json(paths[0], sentencepiece_tokenizer_json(model_file))
    _write_json(paths[1], sentencepiece_tokenizer_config(model_file))
    return paths
