"""Exact Hugging Face `tokenizer.json` for a SentencePiece `.model` (BPE and Unigram), without protobuf.

The model file is a protobuf ModelProto; the few fields needed are read straight from the wire format
(pieces with score and type; trainer_spec.model_type; normalizer_spec name, precompiled charsmap,
add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces). The tokenizer.json reproduces
SentencePiece's encoding: normaliser = [Precompiled(charsmap) unless identity] + [Strip + collapse
space runs when remove_extra_whitespaces] + [Prepend("▁") when add_dummy_prefix] + Replace(" ", "▁");
no pre-tokenizer (SentencePiece segments the whole normalised text); the model is BPE with byte
fallback (merges = every split of a piece into two pieces, ranked by the merged piece's score) or
Unigram (pieces with their scores); decoder = Replace("▁", " ") + ByteFallback + Fuse (+ Strip one
leading space when a dummy prefix was added). Control and unknown pieces are special added tokens.

Settings with no exact form (WORD/CHAR models, whitespace as suffix, user-defined pieces) are refused
with one line, and so is any model whose tokenizer.json disagrees with SentencePiece on a fixed set of
probe texts (checked when `tokenizers` is installed).
"""
from __future__ import annotations

import base64
import struct

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2
PROBES = ["Москва — столица России, а London is the capital of Britain.", "a", " a", "  ", "",
          "  lead  trail  ", "x\n\n y\t\tz", "Ω≈ç√∫ 你好 ﬁ ① Ⅻ ｶﾀｶﾅ", "слово,слово.Слово!  ", "🙂🙂 🙂",
          "ёЁй «кавычки» 'quotes' 1234567890 3.14 1,5", "  пробелы   и\tтабы\nи переводы строк  ",
          "\u3000full\u00a0width\u2003spaces", "ÀÉÎõü ǅ ß ẞ", "Привет"]


class SentencePieceExportError(ValueError):
    """A SentencePiece model without an exact tokenizer.json form."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _fields(buf: bytes):
    """(field number, wire type, value) of one protobuf message; value: int or bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise SentencePieceExportError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def read_model(model_file) -> dict:
    """The parts of a SentencePiece ModelProto that tokenizer.json needs."""
    with open(model_file, "rb") as f:
        buf = f.read()
    pieces, model_type = [], UNIGRAM
    norm = {"name": "", "charsmap": b"", "add_dummy_prefix": True, "remove_extra_whitespaces": True,
            "escape_whitespaces": True, "suffix": False}
    try:
        for number, _, value in _fields(buf):
            if number == 1:
                piece = {"piece": "", "score": 0.0, "type": NORMAL}
                for n, _, v in _fields(value):
                    if n == 1:
                        piece["piece"] = v.decode("utf-8")
                    elif n == 2:
                        piece["score"] = struct.unpack("<f", v)[0]
                    elif n == 3:
                        piece["type"] = v
                pieces.append(piece)
            elif number == 2:
                for n, _, v in _fields(value):
                    if n == 3:
                        model_type = v
                    elif n == 24:
                        norm["suffix"] = bool(v)
            elif number == 3:
                for n, _, v in _fields(value):
                    if n == 1:
                        norm["name"] = v.decode("utf-8")
                    elif n == 2:
                        norm["charsmap"] = bytes(v)
                    elif n in (3, 4, 5):
                        norm[{3: "add_dummy_prefix", 4: "remove_extra_whitespaces",
                              5: "escape_whitespaces"}[n]] = bool(v)
    except (IndexError, UnicodeDecodeError, struct.error) as exc:
        raise SentencePieceExportError(f"{model_file} is not a readable SentencePiece model ({exc})") from None
    return {"pieces": pieces, "model_type": model_type, "normalizer": norm}


def _normalizer(norm: dict) -> dict | None:
    steps = []
    if norm["charsmap"] and norm["name"] != "identity":
        steps.append({"type": "Precompiled",
                      "precompiled_charsmap": base64.b64encode(norm["charsmap"]).decode("ascii")})
    if norm["remove_extra_whitespaces"]:
        steps += [{"type": "Strip", "strip_left": True, "strip_right": True},
                  {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]
    if norm["add_dummy_prefix"]:
        steps.append({"type": "Prepend", "prepend": "▁"})
    if norm["escape_whitespaces"]:
        steps.append({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})
    return {"type": "Sequence", "normalizers": steps} if steps else None


def _bpe_merges(pieces: list[dict]) -> list[str]:
    normal = {p["piece"]: (p["score"], i) for i, p in enumerate(pieces) if p["type"] == NORMAL}
    ranked = []
    for piece, (score, i) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, left, right))
    return [f"{a} {b}" for _, _, a, b in sorted(ranked)]


def sentencepiece_tokenizer_json(model_file, *, verify: bool = True) -> dict:
    """The tokenizer.json of a SentencePiece BPE or Unigram model (raises SentencePieceExportError)."""
    model = read_model(model_file)
    pieces, norm = model["pieces"], model["normalizer"]
    if model["model_type"] not in (UNIGRAM, BPE):
        raise SentencePieceExportError(f"{model_file}: SentencePiece WORD/CHAR models have no exact "
                                       "tokenizer.json form; train a BPE or Unigram model")
    if norm["suffix"]:
        raise SentencePieceExportError(f"{model_file} was trained with treat_whitespace_as_suffix, "
                                       "which tokenizer.json cannot reproduce exactly")
    if any(p["type"] == USER_DEFINED for p in pieces):
        raise SentencePieceExportError(f"{model_file} has user-defined pieces, which tokenizer.json "
                                       "cannot match exactly as SentencePiece does")
    byte_fallback = any(p["type"] == BYTE for p in pieces)
    unk_id = next((i for i, p in enumerate(pieces) if p["type"] == UNKNOWN), None)
    added = [{"id": i, "content": p["piece"], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, p in enumerate(pieces) if p["type"] in (CONTROL, UNKNOWN)]
    if model["model_type"] == BPE:
        body = {"type": "BPE", "dropout": None, "unk_token": None if unk_id is None else pieces[unk_id]["piece"],
                "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                "byte_fallback": byte_fallback, "ignore_merges": False,
                "vocab": {p["piece"]: i for i, p in enumerate(pieces)}, "merges": _bpe_merges(pieces)}
    else:
        body = {"type": "Unigram", "unk_id": unk_id, "byte_fallback": byte_fallback,
                "vocab": [[p["piece"], p["score"] if p["type"] in (NORMAL, USER_DEFINED, UNKNOWN) else 0.0]
                          for p in pieces]}
    decoders = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}]
    if byte_fallback:
        decoders.append({"type": "ByteFallback"})
    decoders.append({"type": "Fuse"})
    if norm["add_dummy_prefix"]:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    result = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
              "normalizer": _normalizer(norm), "pre_tokenizer": None, "post_processor": None,
              "decoder": {"type": "Sequence", "decoders": decoders}, "model": body}
    if verify:
        _verify(model_file, result)
    return result


def _verify(model_file, result: dict) -> None:
    """SentencePiece and the tokenizer.json agree on every probe text, or the export is refused."""
    try:
        import json

        import sentencepiece
        import tokenizers
    except ImportError:
        return
    sp = sentencepiece.SentencePieceProcessor()
    sp.Load(str(model_file))
    fast = tokenizers.Tokenizer.from_str(json.dumps(result))
    for text in PROBES:
        if fast.encode(text, add_special_tokens=False).ids != sp.EncodeAsIds(text):
            raise SentencePieceExportError(
                f"{model_file} was trained with normalisation or whitespace rules that tokenizer.json "
                f"cannot reproduce exactly (they differ on {text!r}); train with tools/train_tokenizer.py "
                "--format hf")


def special_tokens(model_file) -> dict:
    """bos/eos/unk/pad token strings as the model defines them (tokenizer_config.json keys)."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    sp.Load(str(model_file))
    return {key: sp.IdToPiece(i) for key, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                                                 ("unk_token", sp.unk_id()), ("pad_token", sp.pad_id()))
            if i >= 0}
