r"""Trains a byte-level BPE (vocab.json + merges.txt) or SentencePiece tokenizer on text files.

    python tools/train_tokenizer.py --input examples/data/ru_demo.txt --vocab-size 4096 \
        --output-dir examples/data/tokenizer
    python tools/train_tokenizer.py --type sentencepiece --input a.txt b.jsonl --vocab-size 8000 \
        --output-dir out/sp            # -> out/sp/tokenizer.model
    python tools/train_tokenizer.py --format hf --input a.txt --vocab-size 8000 --output-dir out/hf
                                   # -> out/hf/tokenizer.json + tokenizer_config.json
    python tools/train_tokenizer.py --type sentencepiece --format hf --input a.txt --vocab-size 8000 \
        --output-dir out/sp-hf         # -> tokenizer.model + tokenizer.json + tokenizer_config.json

Inputs are plain text (each line or blank-line block a document) or jsonl (`--json-key`).
BPE is trained by our own pure-Python trainer (megatron_ru/data/bpe_trainer.py); the files load
in GPT2BPETokenizer and in Hugging Face's GPT-2 tokenizer alike. `--format hf` writes the same
BPE as one `tokenizer.json` (+ tokenizer_config.json), for --tokenizer-type HuggingFaceTokenizer,
`tokenizers` and `transformers.AutoTokenizer`. With `--type sentencepiece`, `--format hf` trains
with Llama's SentencePiece settings (identity normalisation, whitespace kept, byte fallback) and
writes `tokenizer.model` plus the equivalent Llama-2-style `tokenizer.json`: both give the same ids
(megatron_ru/data/hf_tokenizer_json.py).
Exit status: 0, 2 for bad input (one line naming the file or flag), 1 for other failures.
"""
import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ru.data.bpe_trainer import train_bpe_from_texts  # noqa: E402
from megatron_ru.data.hf_tokenizer_json import (SENTENCEPIECE_HF_OPTIONS,  # noqa: E402
                                                SentencePieceExportError, write_hf_tokenizer,
                                                write_sentencepiece_hf_tokenizer)
from megatron_ru.data.progress import Progress  # noqa: E402
from megatron_ru.errors import UsageError  # noqa: E402


class InputError(UsageError):
    """Bad input file or line; the message names it."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="text or jsonl files")
    p.add_argument("--json-key", default="text", help="key holding the text in jsonl inputs")
    p.add_argument("--type", choices=("bpe", "sentencepiece"), default="bpe")
    p.add_argument("--format", choices=("gpt2", "hf"), default="gpt2",
                   help="BPE output: vocab.json + merges.txt (gpt2) or tokenizer.json + "
                        "tokenizer_config.json (hf); with --type sentencepiece, hf adds the "
                        "tokenizer.json of the .model")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--min-frequency", type=int, default=2, help="BPE: least count of a merged pair")
    p.add_argument("--special-tokens", nargs="*", default=["<|endoftext|>"],
                   help="BPE: added after the merges (the first is the default end of document)")
    p.add_argument("--output-dir", required=True)
    args = p.parse_args(argv)
    if args.vocab_size < 257 + len(args.special_tokens) and args.type == "bpe":
        p.error(f"--vocab-size {args.vocab_size} is smaller than the 256 byte symbols plus special tokens")
    return args


def iter_texts(paths, json_key):
    """Yields one document string at a time from text or jsonl files."""
    for path in paths:
        if not os.path.isfile(path):
            raise InputError(f"--input file not found: {path}")
        is_jsonl = path.endswith((".jsonl", ".json"))
        with open(path, encoding="utf-8", errors="strict") as f:
            try:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    if not is_jsonl:
                        yield line
                        continue
                    try:
                        yield json.loads(line)[json_key]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise InputError(f"{path}:{lineno}: bad jsonl record ({type(e).__name__}: {e})") from None
            except UnicodeDecodeError as e:
                raise InputError(f"{path}: not valid UTF-8 ({e.reason})") from None


def train_sentencepiece(args):
    import sentencepiece

    os.makedirs(args.output_dir, exist_ok=True)
    prefix = os.path.join(args.output_dir, "tokenizer")
    fd, tmp_path = tempfile.mkstemp(suffix=".txt")
    try:  # one document per line for SentencePiece; the temporary copy goes away in any case
        progress = Progress("read", unit="docs")
        with os.fdopen(fd, "w", encoding="utf-8") as tmp:
            for text in iter_texts(args.input, args.json_key):
                tmp.write(text.replace("\n", " ").strip() + "\n")
                progress.update(1, len(text.encode("utf-8")))
        progress.close()
        sys.stderr.write("training SentencePiece (its own log follows)...\n")
        # SentencePiece writes tokenizer.model/.vocab itself, at the very end.
        options = dict(model_type="bpe", byte_fallback=True)
        if args.format == "hf":  # settings whose encoding tokenizer.json reproduces exactly
            options = dict(SENTENCEPIECE_HF_OPTIONS)
        try:
            sentencepiece.SentencePieceTrainer.Train(
                input=tmp_path, model_prefix=prefix, vocab_size=args.vocab_size,
                character_coverage=1.0, pad_id=3, minloglevel=1, **options)
        except RuntimeError as e:  # its checks of the request, e.g. a vocabulary the text cannot fill
            raise InputError(f"SentencePiece refused --vocab-size {args.vocab_size} on --input "
                             f"{' '.join(args.input)}: {' '.join(str(e).split())}") from None
    finally:
        os.remove(tmp_path)
    outputs = [prefix + ".model", prefix + ".vocab"]
    if args.format == "hf":
        outputs += write_sentencepiece_hf_tokenizer(args.output_dir, prefix + ".model")
    return outputs


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.type == "bpe" and args.format == "hf":
            with tempfile.TemporaryDirectory() as tmp:
                vocab, merges = train_bpe_from_texts(iter_texts(args.input, args.json_key), args.vocab_size,
                                                     tmp, tuple(args.special_tokens), args.min_frequency)
                outputs = write_hf_tokenizer(args.output_dir, vocab, merges, tuple(args.special_tokens))
        elif args.type == "bpe":
            outputs = train_bpe_from_texts(iter_texts(args.input, args.json_key), args.vocab_size,
                                           args.output_dir, tuple(args.special_tokens), args.min_frequency)
        else:
            outputs = train_sentencepiece(args)
    except InputError as e:
        sys.stderr.write(f"train_tokenizer.py: error: {e}\n")
        return 2
    except (OSError, RuntimeError, SentencePieceExportError) as e:
        sys.stderr.write(f"train_tokenizer.py: error: {e}\n")
        return 1
    for path in outputs:
        sys.stderr.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
