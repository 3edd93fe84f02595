"""Writes a byte-level BPE (vocab.json + merges.txt) as Hugging Face `tokenizer.json` + `tokenizer_config.json`.

The JSON follows the `tokenizers` serialisation of GPT-2's fast tokenizer: a BPE model (vocab,
merges as "a b" strings), the ByteLevel pre-tokenizer with GPT-2's regex and no prefix space, the
ByteLevel decoder, and the special tokens as added tokens. `tokenizers.Tokenizer.from_file` and
`transformers.AutoTokenizer.from_pretrained(DIR)` load it and give the ids GPT2BPETokenizer gives.
"""
import json
import os

from .tokenizers import load_vocab_and_merges

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


def tokenizer_config(eod_token, max_length: int = 2048) -> dict:
    special = {} if eod_token is None else {"bos_token": eod_token, "eos_token": eod_token,
                                            "unk_token": eod_token}
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
            "add_prefix_space": False, "clean_up_tokenization_spaces": False, **special}


def _write_json(path, obj):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
    os.replace(tmp, path)


def write_hf_tokenizer(out_dir, vocab_file, merge_file, special_tokens=("<|endoftext|>",)):
    """OUT_DIR/tokenizer.json and OUT_DIR/tokenizer_config.json (the first special token = eos)."""
    vocab, merges = load_vocab_and_merges(vocab_file, merge_file)
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "tokenizer.json"), os.path.join(out_dir, "tokenizer_config.json")]
    eod = next((t for t in special_tokens if t in vocab), None)
    _write_json(paths[0], tokenizer_json(vocab, merges, special_tokens))
    _write_json(paths[1], tokenizer_config(eod))
    return paths
