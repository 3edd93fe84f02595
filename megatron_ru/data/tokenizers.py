"""Tokenizers behind one interface: GPT-2 byte-level BPE (own code), SentencePiece, tokenizer.json.

Every tokenizer exposes `tokenize(text) -> list[int]`, `detokenize(ids) -> str`, `vocab_size`,
`eod` (end-of-document id appended by preprocessing) and `pad`. `build_tokenizer` picks one by the
Megatron `--tokenizer-type` names.
"""
import heapq
import json
import os

import regex
from ..errors import UsageError

# The GPT-2 pre-tokenizer: contractions, letter runs, number runs, other-symbol runs, each with an
# optional leading space; whitespace runs keep their last space for the next word (`\s+(?!\S)`).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

DEFAULT_EOD = "<|endoftext|>"


class TokenizerError(UsageError):
    """A tokenizer file is missing, unreadable or inconsistent; the message names the file."""


def bytes_to_unicode():
    """GPT-2's reversible map byte -> printable unicode char (so BPE works on str, never on spaces)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _check_readable(path, what):
    if path is None:
        raise TokenizerError(f"{what} is required but was not given")
    if not os.path.isfile(path):
        raise TokenizerError(f"{what} not found: {path}")
    if not os.access(path, os.R_OK):
        raise TokenizerError(f"{what} is not readable: {path}")


def load_vocab_and_merges(vocab_file, merge_file):
    """Reads `vocab.json` ({token: id}) and `merges.txt` ("a b" per line); checks they agree."""
    _check_readable(vocab_file, "vocab file (--vocab-file)")
    _check_readable(merge_file, "merges file (--merge-file)")
    try:
        with open(vocab_file, encoding="utf-8") as f:
            encoder = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"vocab file {vocab_file} is not valid JSON: {e}") from None
    if not isinstance(encoder, dict) or not all(isinstance(v, int) for v in encoder.values()):
        raise TokenizerError(f"vocab file {vocab_file} must map token strings to integer ids")
    merges = []
    try:
        with open(merge_file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line or (lineno == 1 and line.startswith("#version")):
                    continue
                parts = line.split(" ")
                if len(parts) != 2:
                    raise TokenizerError(f"{merge_file}:{lineno}: expected 'left right', got {line!r}")
                merges.append((parts[0], parts[1]))
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"merges file {merge_file} cannot be read: {e}") from None
    missing_bytes = [c for c in bytes_to_unicode().values() if c not in encoder]
    if missing_bytes:
        raise TokenizerError(f"vocab file {vocab_file} lacks {len(missing_bytes)} of the 256 byte "
                             f"symbols (e.g. {missing_bytes[0]!r}); is it a byte-level BPE vocab?")
    for lineno, (a, b) in enumerate(merges, 1):
        if a + b not in encoder or a not in encoder or b not in encoder:
            raise TokenizerError(f"merges file {merge_file} does not match vocab file {vocab_file}: "
                                 f"merge #{lineno} {a!r} + {b!r} uses a token missing from the vocab")
    return encoder, merges


class GPT2BPETokenizer:
    """GPT-2 byte-level BPE from vocab.json + merges.txt; same ids as Hugging Face's GPT-2 tokenizer.

    Text is split with `GPT2_PATTERN`, each piece's UTF-8 bytes are mapped to printable chars and
    merged by rank. Pieces repeat a lot in natural text, so their ids are cached (bounded).
    `<|endoftext|>` inside text is *not* special (as in Megatron): only `eod` is appended by tools.
    """

    def __init__(self, vocab_file, merge_file, eod_token=DEFAULT_EOD, cache_size=200_000):
        self.encoder, merges = load_vocab_and_merges(vocab_file, merge_file)
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        byte_encoder = bytes_to_unicode()
        # latin-1 decoding turns bytes 0..255 into chars 0..255; translate maps them to GPT-2 chars.
        self._byte_table = str.maketrans({chr(b): c for b, c in byte_encoder.items()})
        self.byte_decoder = {c: b for b, c in byte_encoder.items()}
        self.pattern = regex.compile(GPT2_PATTERN)
        self.cache = {}
        self.cache_size = cache_size
        if eod_token not in self.encoder:
            raise TokenizerError(f"end-of-document token {eod_token!r} is not in vocab file {vocab_file}")
        self.eod_token = eod_token
        self.eod = self.encoder[eod_token]
        self.pad = self.encoder.get("<pad>", self.eod)

    @property
    def vocab_size(self):
        return len(self.encoder)

    def _bpe(self, word):
        """Merges the chars of one byte-mapped piece; returns the token strings.

        The classic rule (repeatedly merge every occurrence of the lowest-ranked adjacent pair,
        left to right) in O(n log n) for a piece of n chars: the symbols form a linked list and
        the candidate pairs a heap keyed by (rank, position); one rank's occurrences are taken
        from the heap together and merged left to right, exactly as the rescanning loop would."""
        n = len(word)
        if n < 2:
            return list(word)
        ranks = self.bpe_ranks
        sym = list(word)  # sym[i]: the symbol that starts at char i (None once merged away)
        nxt = list(range(1, n + 1))  # next symbol's start (n: none)
        prv = list(range(-1, n - 1))
        heap = [(r, i) for i in range(n - 1) if (r := ranks.get((sym[i], sym[i + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            rank = heap[0][0]
            batch = []
            while heap and heap[0][0] == rank:
                batch.append(heapq.heappop(heap)[1])
            for i in batch:  # ascending positions: the left-to-right pass over this pair
                j = nxt[i] if sym[i] is not None else n
                if j >= n or ranks.get((sym[i], sym[j])) != rank:
                    continue  # stale: a neighbour was merged since this pair was queued
                sym[i] += sym[j]
                sym[j] = None
                k = nxt[i] = nxt[j]
                if k < n:
                    prv[k] = i
                for a, b in ((prv[i], i), (i, k)):
                    if a >= 0 and b < n:
                        r = ranks.get((sym[a], sym[b]))
                        if r is not None and r != rank:  # (a new pair never has this rank)
                            heapq.heappush(heap, (r, a))
        return [t for t in sym if t is not None]

    def tokenize(self, text):
        ids = []
        cache, encoder, table = self.cache, self.encoder, self._byte_table
        for piece in self.pattern.findall(text):
            cached = cache.get(piece)
            if cached is None:
                word = piece.encode("utf-8").decode("latin-1").translate(table)
                cached = [encoder[t] for t in self._bpe(word)]
                if len(cache) >= self.cache_size:
                    cache.clear()
                cache[piece] = cached
            ids.extend(cached)
        return ids

    def detokenize(self, ids):
        text = "".join(self.decoder[int(i)] for i in ids)
        try:
            raw = bytes(self.byte_decoder[c] for c in text)
        except KeyError:  # an added token outside the byte alphabet (e.g. "▁"): keep it as UTF-8
            raw = b"".join(bytes([self.byte_decoder[c]]) if c in self.byte_decoder else c.encode("utf-8")
                           for c in text)
        return raw.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece `.model`; EOD is the model's `</s>` unless `eod_token` names another piece."""

    def __init__(self, model_file, eod_token=None):
        _check_readable(model_file, "SentencePiece model (--tokenizer-model)")
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(model_file)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"SentencePiece model {model_file} cannot be loaded: {e}") from None
        if eod_token is not None:
            eod = self.sp.PieceToId(eod_token)
            if eod == self.sp.unk_id() and eod_token != self.sp.IdToPiece(eod):
                raise TokenizerError(f"end-of-document token {eod_token!r} is not in {model_file}")
            self.eod = eod
        else:
            self.eod = self.sp.eos_id()
            if self.eod < 0:
                raise TokenizerError(f"SentencePiece model {model_file} has no </s>; pass eod_token")
        self.pad = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eod

    @property
    def vocab_size(self):
        return self.sp.GetPieceSize()

    def tokenize(self, text):
        return self.sp.EncodeAsIds(text)

    def detokenize(self, ids):
        return self.sp.DecodeIds([int(i) for i in ids])


_HF_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (e.g. T-lite / Qwen vocabularies); needs `tokenizers`."""

    def __init__(self, tokenizer_file, eod_token=None):
        if tokenizer_file is not None and os.path.isdir(tokenizer_file):
            tokenizer_file = os.path.join(tokenizer_file, "tokenizer.json")
        _check_readable(tokenizer_file, "tokenizer.json (--tokenizer-model)")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise TokenizerError("HFTokenizer needs the `tokenizers` package: pip install tokenizers") from None
        try:
            self.tok = Tokenizer.from_file(tokenizer_file)
        except Exception as e:  # the Rust side raises a plain Exception on bad JSON
            raise TokenizerError(f"{tokenizer_file} is not a valid tokenizer.json: {e}") from None
        vocab = self.tok.get_vocab(with_added_tokens=True)
        names = (eod_token,) if eod_token is not None else _HF_EOD_CANDIDATES
        found = [n for n in names if n in vocab]
        if not found:
            raise TokenizerError(f"no end-of-document token among {names} in {tokenizer_file}; pass eod_token")
        self.eod = vocab[found[0]]
        self.pad = vocab.get("<pad>", vocab.get("<|pad|>", self.eod))
        self._vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self):
        return self._vocab_size

    def tokenize(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer")


def build_tokenizer(tokenizer_type, *, vocab_file=None, merge_file=None, tokenizer_model=None,
                    eod_token=None):
    """Builds a tokenizer by its Megatron `--tokenizer-type` name from the given files."""
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file, eod_token=eod_token or DEFAULT_EOD)
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model, eod_token=eod_token)
    if tokenizer_type in ("HuggingFaceTokenizer", "HFTokenizer"):
        return HFTokenizer(tokenizer_model, eod_token=eod_token)
    raise TokenizerError(f"--tokenizer-type {tokenizer_type!r} is unknown; choose one of {TOKENIZER_TYPES}")


def add_tokenizer_arguments(parser, *, title: str = "tokenizer", type_default=None, type_required: bool = False,
                            type_choices=None, with_path: bool = False, eod_help: str = "end-of-text token "
                            "(default: the tokenizer's own)"):
    """The tokenizer flags (Megatron's names), defined once for every entry point; returns the group.

    Training defaults --tokenizer-type to GPT2BPETokenizer, preprocess_data.py requires it, the model-opening
    tools leave it unset (then the tokenizer saved with the checkpoint is used) and add --tokenizer-path."""
    t = parser.add_argument_group(title)
    t.add_argument("--tokenizer-type", default=type_default, required=type_required, choices=type_choices,
                   help="GPT2BPETokenizer, SentencePieceTokenizer, HuggingFaceTokenizer"
                        + (f" (default {type_default})" if type_default else ""))
    t.add_argument("--vocab-file", help="GPT-2 BPE vocab.json")
    t.add_argument("--merge-file", help="GPT-2 BPE merges.txt")
    t.add_argument("--tokenizer-model", help="SentencePiece .model or Hugging Face tokenizer.json")
    if with_path:
        t.add_argument("--tokenizer-path", metavar="DIR",
                       help="a directory holding vocab.json + merges.txt, tokenizer.json or tokenizer.model")
    t.add_argument("--eod-token", help=eod_help)
    return t
