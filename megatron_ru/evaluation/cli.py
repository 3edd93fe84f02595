"""tools/evaluate.py: perplexity, loss and bits per byte of a checkpoint on text, JSON lines or
.bin/.idx inputs, per input and overall, as a table on stdout and a JSON file (--output)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .. import runtime
from ..data.indexed_dataset import IndexedDataset, dataset_exists
from ..inference.loading import ModelOptions, add_inference_arguments
from .loading import open_for_scoring, parallel_state
from ..data.progress import Progress, progress_wanted
from .perplexity import Corpus, EvalInputError, check_ids, count_windows, evaluate_corpora


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/evaluate.py",
        description="Sliding-window perplexity and bits per byte of a checkpoint (any format "
                    "generate.py reads, with the same model flags: --lora, --quantize, any TP size "
                    "under mpirun --np N).")
    add_inference_arguments(p)  # --load --tag --lora --dtype --quantize, tokenizer flags (as generate.py)
    e = p.add_argument_group("evaluation")
    e.add_argument("--input", "--eval-data", dest="inputs", nargs="+", required=True,
                   metavar="PATH", help="text files (documents separated by blank lines, or one "
                   "per line), JSON lines (*.jsonl, --json-key), or .bin/.idx PREFIXes")
    e.add_argument("--json-key", default="text", help="field of a JSON-lines record (default text)")
    e.add_argument("--seq-length", type=int, help="window length (default: the model's maximum)")
    e.add_argument("--stride", type=int,
                   help="step between windows; each token gets >= seq_length - stride tokens of "
                        "context (default: seq_length // 2)")
    e.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    e.add_argument("--untrained", action="store_true",
                   help="score the checkpoint's model at initialisation (weights drawn from "
                        "--seed as pretrain_gpt.py draws them): the baseline training improves on")
    e.add_argument("--seed", type=int, default=1234, help="initialisation seed for --untrained")
    e.add_argument("--output", metavar="FILE", help="write the results as JSON (atomically)")
    e.add_argument("--progress", action="store_true",
                   help="show progress (windows, tokens/s, ETA) on stderr even when it is not a "
                        "terminal (on a terminal it is shown anyway)")
    e.add_argument("--quiet", action="store_true", help="no progress")
    runtime.add_arguments(p)
    return p


def read_text_documents(path: Path, json_key: str) -> list[str]:
    """Documents of a text or JSON-lines file (blank-line blocks, else lines; jsonl: one per line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EvalInputError(f"--input {path} is not UTF-8 text: {exc}") from None
    if path.suffix in (".jsonl", ".json"):
        docs = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvalInputError(f"--input {path}:{lineno}: not valid JSON ({exc})") from None
            if not isinstance(record, dict) or not isinstance(record.get(json_key), str):
                raise EvalInputError(f"--input {path}:{lineno}: no string field {json_key!r} "
                                     "(--json-key)")
            docs.append(record[json_key])
        return [d for d in docs if d]
    lines = text.split("\n")
    if any(not line.strip() for line in lines[:-1]):  # blank-line separated blocks
        blocks, block = [], []
        for line in lines:
            if line.strip():
                block.append(line.rstrip("\r"))
            elif block:
                blocks.append("\n".join(block))
                block = []
        return blocks + (["\n".join(block)] if block else [])
    return [line.rstrip("\r") for line in lines if line.strip()]


def read_corpus(spec: str, tokenizer, json_key: str) -> Corpus:
    path = Path(spec)
    if path.is_file():
        docs = read_text_documents(path, json_key)
        ids = [tokenizer.tokenize(d) for d in docs]
        nbytes = sum(len(d.encode("utf-8")) for d in docs)
    elif dataset_exists(spec):
        ds = IndexedDataset(spec)
        ids = [[int(t) for t in ds[i]] for i in range(len(ds))]
        # bytes of the text the ids stand for (end-of-document tokens stand for none)
        nbytes = sum(len(tokenizer.detokenize([t for t in d if t != tokenizer.eod]).encode("utf-8"))
                     for d in ids)
    else:
        raise EvalInputError(f"--input {spec} is neither a file nor a .bin/.idx prefix")
    if not any(len(d) for d in ids):
        raise EvalInputError(f"--input {spec} holds no text to evaluate")
    return Corpus(spec, ids, nbytes)


def format_table(per: dict, total, seq_length: int, stride: int) -> str:
    rows = [(name, s) for name, s in per.items()] + ([("overall", total)] if len(per) > 1 else [])
    width = max(len(n) for n, _ in rows)
    head = (f"{'input':<{width}} {'tokens':>10} {'bytes':>11} {'loss':>8} {'perplexity':>11} "
            f"{'bits/byte':>9}")
    lines = [f"windows of {seq_length} tokens, stride {stride}", head, "-" * len(head)]
    for name, s in rows:
        lines.append(f"{name:<{width}} {s.tokens:>10,} {s.bytes:>11,} {s.loss:>8.4f} "
                     f"{s.perplexity:>11.2f} {s.bits_per_byte:>9.4f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    options = ModelOptions.from_args(args)  # --fp16/--bf16, TP size, --quantize, --lora
    for flag, value in (("--batch-size", args.batch_size), ("--seq-length", args.seq_length)):
        if value is not None and value < 1:
            raise EvalInputError(f"{flag} {value} must be >= 1")
    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise EvalInputError(f"--output {args.output}: directory {Path(args.output).parent} "
                             "does not exist")
    runtime.start_watchdog(args.hang_timeout_minutes)
    ps = parallel_state(args.tp, 60.0 * args.distributed_timeout_minutes)

    def prepare():
        opened = open_for_scoring(options, ps, untrained_seed=args.seed if args.untrained else None)
        model, tok = opened.model, opened.tokenizer
        limit = model.config.max_position_embeddings
        seq = args.seq_length or limit
        if seq > limit:
            raise EvalInputError(f"--seq-length {seq} exceeds the model's "
                                 f"max_position_embeddings={limit}")
        stride = args.stride if args.stride is not None else max(seq // 2, 1)
        if not 1 <= stride <= seq:
            raise EvalInputError(f"--stride {stride} must be in [1, --seq-length {seq}]")
        corpora = [read_corpus(spec, tok, args.json_key) for spec in args.inputs]
        for c in corpora:
            check_ids(c, model.config.vocab_size, f"--input {c.name}")
        return opened, corpora, seq, stride

    opened, corpora, seq, stride = runtime.checked(ps if ps.world_size > 1 else None, prepare)
    model, tok = opened.model, opened.tokenizer
    t0 = time.perf_counter()
    bar = None
    if ps.rank == 0 and progress_wanted(args.progress, args.quiet):  # rank 0 counts its own windows
        bar = Progress("evaluating", total=count_windows(corpora, tok.eod, seq_length=seq, stride=stride,
                                                         dp_rank=ps.dp_rank, dp_size=ps.dp_size),
                       unit="windows", extra_unit="tokens", interval=1.0, log_interval=10.0)
    per, total = evaluate_corpora(model, corpora, tok.eod, seq_length=seq, stride=stride,
                                  batch_size=args.batch_size, ps=ps,
                                  on_batch=(lambda w, t: bar.update(w, extra=t)) if bar else None)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0
    if ps.rank == 0:
        print(format_table(per, total, seq, stride), flush=True)
        print(f"[{total.tokens:,} tokens in {elapsed:.2f} s: {total.tokens / max(elapsed, 1e-9):,.0f} "
              f"tokens/s, {ps}]", file=sys.stderr, flush=True)
        if args.output:
            from ..files import atomic_write_text
            result = {"load": args.load, "untrained": args.untrained, "seq_length": seq,
                      "stride": stride,
                      **({"lora": opened.options.lora} if opened.options.lora else {}),
                      **({"quantization": options.quant.to_dict()} if options.quant else {}),
                      "tensor_model_parallel_size": ps.tp_size,
                      "inputs": {n: s.as_dict() for n, s in per.items()},
                      "overall": total.as_dict()}
            atomic_write_text(Path(args.output), json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return 0
