"""tools/adapt_vocab.py: extend a checkpoint's byte-level BPE vocabulary from a corpus, splice new rows, save, report.

    adapt_vocab.py --load CKPT --corpus FILE [FILE...] --add N --save OUT [--init mean]
        [--donor-tokenizer DIR|tokenizer.json] [--replace-unused K]
    adapt_vocab.py --report --load CKPT --corpus FILE [--heldout-en FILE]

CKPT: any checkpoint format checkpoint/load.py opens, with its tokenizer (or --tokenizer-path).
OUT: one of our checkpoints with the adapted tokenizer in OUT/tokenizer/ (and the chat template
files beside it), so generate.py, tools/evaluate.py, tools/serve.py and convert_checkpoint.py use
it with no tokenizer flags. The tokenizer's guarantees are checked before anything is written
(data/vocab_checks.py); OUT appears whole or not at all. The report (fertility before / after
on held-out Russian and English text, the model's bits per byte before and right after) is
printed and saved as OUT/vocab_report.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..checkpoint.load import load_any, read_any_config
from ..checkpoint.model_io import model_from_state, save_state_dict
from ..config import ModelConfig
from ..data import vocab_adapt as va
from ..data.chat_templates import CHAT_FILES
from ..data.vocab_checks import chat_tokens, check_extension, fertility, open_tokenizer
from ..data.vocab_plan import adapt
from ..errors import UsageError
from ..evaluation.perplexity import Corpus, evaluate_corpora
from ..files import atomic_directory
from .vocab_splice import INIT_METHODS, splice

REPORT_FILE = "vocab_report.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/adapt_vocab.py", description=__doc__.split("\n")[0])
    p.add_argument("--load", required=True, help="the base checkpoint (any format convert_checkpoint.py reads)")
    p.add_argument("--corpus", nargs="+", required=True, metavar="FILE",
                   help="UTF-8 text, one document per line (with --report: the Russian text to measure)")
    p.add_argument("--add", type=int, help="how many new tokens (default with --replace-unused K: K)")
    p.add_argument("--donor-tokenizer", metavar="PATH",
                   help="take the new tokens from this tokenizer's Cyrillic tokens (vocab.json + merges.txt "
                        "directory, or tokenizer.json), most used on the corpus first, each made reachable "
                        "by merges from the base's pieces (default: continue BPE training on the corpus)")
    p.add_argument("--replace-unused", type=int, default=0, metavar="K",
                   help="the first K new tokens take the ids of K tokens the corpus and held-out text never "
                        "use (rare, non-Cyrillic, not special, no part of a kept token); --add K keeps the "
                        "vocabulary size"),
    p.add_argument("--save", help="output checkpoint directory (ours)")
    p.add_argument("--init", choices=INIT_METHODS, default="mean", help="new rows' initialisation (default mean)")
    p.add_argument("--min-frequency", type=int, default=2, help="a new token is seen at least this often")
    p.add_argument("--heldout", nargs="+", metavar="FILE",
                   help="held-out Russian text for the report (default: the corpus' last 10%% of lines, "
                        "which are then left out of the vocabulary training)")
    p.add_argument("--heldout-en", nargs="+", metavar="FILE", help="held-out English text for the report")
    p.add_argument("--report", action="store_true", help="only measure CKPT (fertility, bits per byte)")
    p.add_argument("--tokenizer-path", metavar="DIR", help="the base tokenizer (default: the checkpoint's)")
    p.add_argument("--eod-token", help="end-of-text token (default: the one recorded with the checkpoint)")
    p.add_argument("--tensor-model-parallel-size", type=int, help="TP size of the output (default: CKPT's)")
    p.add_argument("--seq-length", type=int, default=256, help="window of the bits-per-byte evaluation")
    p.add_argument("--no-eval", action="store_true", help="skip the bits-per-byte evaluation")
    p.add_argument("--seed", type=int, default=1234, help="seed of --init random")
    p.add_argument("--trust-checkpoint", action="store_true", help="unpickle any global (trusted files only)")
    return p


def _lines(paths) -> list:
    out = []
    for path in paths or []:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--corpus/--heldout {path} cannot be read as UTF-8 text: {exc}") from None
        out += [line for line in text.splitlines() if line.strip()]
    return out


def _check_args(args) -> None:
    if args.report:
        return
    if args.add is None and args.replace_unused:
        args.add = args.replace_unused
    if args.replace_unused < 0:
        raise UsageError(f"--replace-unused {args.replace_unused} must not be negative")
    if args.donor_tokenizer and not Path(args.donor_tokenizer).exists():
        raise UsageError(f"--donor-tokenizer {args.donor_tokenizer} does not exist")
    missing = [f for f, v in (("--add", args.add), ("--save", args.save)) if v is None]
    if missing:
        raise UsageError(f"{' and '.join(missing)} required (or --report to only measure --load)")
    if Path(args.save).resolve() == Path(args.load).resolve():
        raise UsageError(f"--save {args.save} is --load: write the adapted model to a new directory")
    if args.seq_length < 2:
        raise UsageError(f"--seq-length {args.seq_length} must be at least 2")


def bits_per_byte(config: ModelConfig, full: dict, tok, docs: list, seq_length: int) -> float:
    """The model's bits per byte on `docs` (one process, fp32), via evaluation/perplexity.py."""
    model = model_from_state(config, {k: v.float() for k, v in full.items()}, dtype=torch.float32).eval()
    corpus = Corpus("heldout", [tok.tokenize(d) for d in docs], sum(len(d.encode("utf-8")) for d in docs))
    seq = min(seq_length, config.max_position_embeddings)
    _, total = evaluate_corpora(model, [corpus], tok.eod, seq_length=seq, stride=seq)
    return total.bits_per_byte


def measure(tok, texts: dict, config=None, full=None, seq_length: int = 256) -> dict:
    """{language: fertility figures (+ bits_per_byte when a model is given)}."""
    out = {}
    for lang, docs in texts.items():
        if not docs:
            continue
        row = fertility(tok, "\n".join(docs)).as_dict()
        if full is not None:
            row["bits_per_byte"] = round(bits_per_byte(config, full, tok, docs, seq_length), 4)
        out[lang] = row
    return out


COLUMNS = ("tokens_per_word", "chars_per_token", "bytes_per_token", "words_in_2_tokens", "bits_per_byte")


def format_report(report: dict) -> str:
    lines = [f"{'':14}{'lang':6}" + "".join(f"{c:>19}" for c in COLUMNS)]
    for stage in ("before", "after"):
        for lang, row in (report.get(stage) or {}).items():
            lines.append(f"{stage:14}{lang:6}" + "".join(f"{row.get(c, ''):>19}" for c in COLUMNS))
    return "\n".join(lines)


def _tokenizer_dir(args, meta: dict) -> Path:
    d = args.tokenizer_path or meta.get("tokenizer_dir")
    if not d or not Path(d).is_dir():
        raise UsageError(f"--load {args.load} carries no tokenizer: pass --tokenizer-path DIR")
    return Path(d)


def _eod(args, meta: dict):
    return args.eod_token or (meta.get("tokenizer") or {}).get("eod_token")


def main(argv=None, log=print) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    config, meta = read_any_config(Path(args.load), trust=args.trust_checkpoint)
    tok_dir, eod = _tokenizer_dir(args, meta), _eod(args, meta)
    docs = _lines(args.corpus)
    heldout = _lines(args.heldout)
    if not heldout and not args.report:
        cut = len(docs) - max(len(docs) // 10, 1)
        docs, heldout = docs[:cut], docs[cut:]
    texts = {"ru": heldout or docs, "en": _lines(args.heldout_en)}
    base_tok = open_tokenizer(tok_dir, eod)
    if base_tok.vocab_size > config.vocab_size:
        raise UsageError(f"--load {args.load} has {config.vocab_size} vocabulary rows but its tokenizer "
                         f"{tok_dir} has {base_tok.vocab_size} ids: they do not belong together")
    if args.report:
        config, full, _ = load_any(Path(args.load), trust=args.trust_checkpoint)
        report = {"before": measure(base_tok, texts, config, None if args.no_eval else full, args.seq_length)}
        log(format_report(report))
        return 0
    t0 = time.time()
    base = va.read_base(tok_dir)
    pinned = [*chat_tokens(tok_dir), *([eod] if eod else [])]
    plan = adapt(base, docs, args.add, min_frequency=args.min_frequency, donor=args.donor_tokenizer,
                 replace_unused=args.replace_unused, other_texts=[*heldout, *texts["en"]], pinned=pinned)
    ext, new_tokens = plan.vocab, plan.new_tokens
    log(f"adapt_vocab: {len(new_tokens)} new tokens from {len(docs)} lines in {time.time() - t0:.1f}s "
        + (f"({len(plan.donor_tokens)} of --donor-tokenizer, the rest intermediate merges) " if args.donor_tokenizer
           else "")
        + (f"({len(plan.removed)} in the rows of removed unused tokens, " if plan.removed else "(")
        + f"{len(new_tokens) - len(plan.removed)} appended from id {base.next_id})")
    with tempfile.TemporaryDirectory() as tmp:
        new_dir = Path(tmp) / "tokenizer"
        va.write_vocab(new_dir, ext)
        for name in CHAT_FILES:
            if (tok_dir / name).is_file():
                shutil.copyfile(tok_dir / name, new_dir / name)
        checks = check_extension(tok_dir, new_dir, new_tokens, docs[:2000], texts["en"], eod_token=eod,
                                 removed=plan.removed)
        new_tok = open_tokenizer(new_dir, eod)
        config, full, _ = load_any(Path(args.load), trust=args.trust_checkpoint)
        splitter = va.Splitter(plan.kept)  # new rows from kept tokens only
        pieces = [[plan.kept.vocab[t] for t in splitter.segment(tok)] for tok in new_tokens]
        counts = _piece_counts(base_tok, docs) if args.init == "freq" else None
        vocab_size = max(config.vocab_size, base.next_id + len(new_tokens) - len(plan.removed))
        new_full = splice(full, base.next_id, vocab_size, pieces, args.init, counts=counts,
                          std=config.init_method_std, seed=args.seed, ids=plan.ids)
        new_config = ModelConfig.from_dict({**config.to_dict(), "vocab_size": vocab_size})
        tp = args.tensor_model_parallel_size or int(meta.get("tensor_model_parallel_size", 1))
        report = {"init": args.init, "added": len(new_tokens), "replaced": len(plan.removed),
                  "donor_tokens": len(plan.donor_tokens), "vocab_size": vocab_size,
                  "padded_vocab_size": new_config.padded_vocab_size(tp), "tensor_model_parallel_size": tp,
                  "checks": checks}
        ev = None if args.no_eval else full
        report["before"] = measure(base_tok, texts, config, ev, args.seq_length)
        report["after"] = measure(new_tok, texts, new_config, None if args.no_eval else new_full, args.seq_length)
        dtype = next((t.dtype for t in full.values() if t.is_floating_point()), torch.float32)
        entry = ({"type": "GPT2BPETokenizer", "vocab_file": "tokenizer/vocab.json", "merge_file": "tokenizer/merges.txt"}
                 if ext.kind == "gpt2" else
                 {"type": "HuggingFaceTokenizer", "tokenizer_model": "tokenizer/tokenizer.json"})
        if eod:
            entry["eod_token"] = eod
        record = {"base": str(Path(args.load).resolve()), "init": args.init, "first_new_id": base.next_id,
                  "added": len(new_tokens)}
        if plan.removed:
            record["replaced_ids"] = sorted(plan.removed.values())
        if args.donor_tokenizer:
            record["donor"] = str(Path(args.donor_tokenizer).resolve())
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        with atomic_directory(Path(args.save)) as out:
            shutil.copytree(new_dir, out / "tokenizer")
            save_state_dict(out, new_config, new_full, tp, dtype, tokenizer=entry,
                            vocab_adaptation=record)
            (out / REPORT_FILE).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    log(format_report(report))
    log(f"adapt_vocab: saved {args.save} (vocabulary {vocab_size}, padded {report['padded_vocab_size']} "
        f"at TP {tp}; checks: {checks})")
    return 0


def _piece_counts(tok, docs: list) -> dict:
    """How often each base token occurs in the corpus (weights of --init freq)."""
    counts: dict = {}
    for d in docs:
        for i in tok.tokenize(d):
            counts[i] = counts.get(i, 0) + 1
    return counts
