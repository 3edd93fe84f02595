r"""Tokenizes jsonl or plain-text documents into Megatron `.bin/.idx` files (Megatron's CLI flags).

    python tools/preprocess_data.py --input corpus.jsonl --json-keys text \
        --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt \
        --append-eod --output-prefix out/corpus --workers 2
    -> out/corpus_text_document.bin / .idx

Plain text: one document per line (`--input-format lines`) or per blank-line-separated block
(`blocks`); `auto` picks jsonl for *.jsonl/*.json and otherwise blocks when the file has a
blank line. Output is written to temporary names and renamed at the end, so Ctrl-C or a bad line
leaves no partial files; a bad line is reported as FILE:LINE and the exit status is 1.
"""
import argparse
import collections
import glob
import gzip
import json
import multiprocessing
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from megatron_ru.data.indexed_dataset import IndexedDatasetBuilder, best_fitting_dtype  # noqa: E402
from megatron_ru.data.progress import Progress  # noqa: E402
from megatron_ru.data.validate import tokenizer_files, write_tokenizer_record  # noqa: E402
from megatron_ru.data.tokenizers import (TOKENIZER_TYPES, TokenizerError,  # noqa: E402
                                         add_tokenizer_arguments, build_tokenizer)  # noqa: E402
from megatron_ru.errors import UsageError  # noqa: E402

BATCH_DOCS = 128


class InputError(UsageError):
    """Bad input data; the message starts with FILE:LINE."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--input", nargs="+", required=True, help="files or globs (.jsonl, .json, .txt; .gz ok)")
    g.add_argument("--input-format", choices=("auto", "jsonl", "lines", "blocks"), default="auto")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="jsonl keys to extract (one output each)")
    g = p.add_argument_group("supervised fine-tuning (--dataset-type sft; megatron_ru/data/sft_examples.py)")
    g.add_argument("--dataset-type", choices=("text", "sft"), default="text",
                   help="sft: JSON lines of {messages}, {prompt, response} or {text} -> PREFIX.bin/.idx "
                        "+ PREFIX_loss_mask.bin/.idx (1 = assistant token)")
    g.add_argument("--chat-template", help="llama3, rugpt3, a Jinja file or a tokenizer_config.json "
                   "(default: the tokenizer's tokenizer_config.json chat_template)")
    g.add_argument("--prompt-key", default="prompt")
    g.add_argument("--response-key", default="response")
    g.add_argument("--train-on-prompt", action="store_true", help="loss on every token, not only replies")
    g = add_tokenizer_arguments(p, type_required=True, type_choices=TOKENIZER_TYPES + ("HFTokenizer",),
                                eod_help="end-of-document token (default <|endoftext|> / </s>)")
    g.add_argument("--append-eod", action="store_true", help="append EOD to every document")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/.idx")
    g.add_argument("--dataset-impl", default="mmap", choices=("mmap",), help="only mmap (Megatron compat)")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--log-interval", type=float, default=None, help="seconds between progress lines")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    return args


def expand_inputs(patterns):
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise InputError(f"--input {pattern!r} matches no file")
        for path in matches:
            if not os.path.exists(path) or os.path.isdir(path):  # pipes and devices are fine
                raise InputError(f"--input file not found: {path}")
            if not os.access(path, os.R_OK):
                raise InputError(f"--input file is not readable: {path}")
            files.append(path)
    return files


def _open(path):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def detect_format(path, requested):
    if requested != "auto":
        return requested
    stem = path[:-3] if path.endswith(".gz") else path
    if stem.endswith((".jsonl", ".json")):
        return "jsonl"
    if not os.path.isfile(path):  # a pipe or FIFO: peeking would consume it
        raise InputError(f"--input {path} is not a regular file: give --input-format "
                              "jsonl, lines or blocks explicitly")
    with _open(path) as f:
        return "blocks" if any(not line.strip() for line in f) else "lines"


def read_documents(path, fmt):
    """Yields (path, first line number, raw bytes) per document; decoding happens in workers."""
    with _open(path) as f:
        if fmt in ("jsonl", "lines"):
            for lineno, line in enumerate(f, 1):
                line = line.rstrip(b"\r\n")
                if line.strip():
                    yield path, lineno, line
            return
        block, start = [], None
        for lineno, line in enumerate(f, 1):
            line = line.rstrip(b"\r\n")
            if line.strip():
                if not block:
                    start = lineno
                block.append(line)
            elif block:
                yield path, start, b"\n".join(block)
                block = []
        if block:
            yield path, start, b"\n".join(block)


def batched(docs, size):
    batch = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class Encoder:
    """Turns raw document bytes into token-id arrays, one per json key."""

    def __init__(self, args):
        self.tokenizer = build_tokenizer(args.tokenizer_type, vocab_file=args.vocab_file,
                                         merge_file=args.merge_file, tokenizer_model=args.tokenizer_model,
                                         eod_token=args.eod_token)
        self.keys, self.append_eod = args.json_keys, args.append_eod
        self.dtype = best_fitting_dtype(self.tokenizer.vocab_size)

    def texts(self, path, lineno, raw, fmt):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if fmt != "jsonl":
            return [text]
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        out = []
        for key in self.keys:
            if not isinstance(record.get(key), str):
                raise InputError(f"{path}:{lineno}: key {key!r} (--json-keys) is missing or not a string")
            out.append(record[key])
        return out

    def encode(self, batch, fmt):
        """Batch of (path, lineno, raw) -> (per key: (tokens back to back, lengths), docs, empty, bytes).

        A document with no tokens in a key is kept as Megatron's preprocess_data.py keeps it: an
        empty document (length 0 here: no sequence, no end-of-document token, one more
        document-index entry). Compact arrays keep the parent's share of the work small.
        """
        per_key = [([], []) for _ in self.keys]
        nbytes = empty = 0
        for path, lineno, raw in batch:
            nbytes += len(raw)
            ids = [self.tokenizer.tokenize(text) for text in self.texts(path, lineno, raw, fmt)]
            empty += not any(ids)
            for (flat, lengths), tokens in zip(per_key, ids):
                if self.append_eod and tokens:
                    tokens.append(self.tokenizer.eod)
                flat.extend(tokens)
                lengths.append(len(tokens))
        arrays = [(np.asarray(flat, dtype=self.dtype), np.asarray(lengths, dtype=np.int64))
                  for flat, lengths in per_key]
        return arrays, len(batch), empty, nbytes


# One Encoder per worker process, built by the pool initializer (tokenizers are costly to pickle
# per task); the parent never reads it.
_WORKER = {}


def _init_worker(args):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (cleanly, once)
    _WORKER["encoder"] = Encoder(args)


def _encode_in_worker(task):
    batch, fmt = task
    return _WORKER["encoder"].encode(batch, fmt)


def start_pool(args):
    """A pool whose helper threads and workers never receive SIGINT: Ctrl-C reaches the main
    thread (and interrupts its waits) instead of a pool thread, which would leave it hanging."""
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return ctx.Pool(args.workers, initializer=_init_worker, initargs=(args,))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def encode_in_pool(pool, tasks, window):
    """Results in input order, at most `window` batches in flight. The main thread reads the
    input (not a pool thread), so a stalled input never blocks `pool.terminate()`."""
    pending = collections.deque()
    for task in tasks:
        pending.append(pool.apply_async(_encode_in_worker, (task,)))
        while len(pending) >= window or (pending and pending[0].ready()):
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def run(args, stream=None):
    stream = stream or sys.stderr
    if args.dataset_type == "sft":
        from megatron_ru.data.sft_examples import run_sft
        return run_sft(args, expand_inputs(args.input), stream)
    files = expand_inputs(args.input)
    encoder = Encoder(args)  # also validates the tokenizer files before any work starts
    dtype = encoder.dtype
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    formats = [detect_format(path, args.input_format) for path in files]
    if len(args.json_keys) > 1 and any(fmt != "jsonl" for fmt in formats):
        raise InputError("several --json-keys need jsonl inputs; plain text has one text per document")
    keys = args.json_keys if "jsonl" in formats else ["text"]
    prefixes = [f"{args.output_prefix}_{key}_document" for key in keys]
    builders = [IndexedDatasetBuilder(prefix, dtype) for prefix in prefixes]
    progress = Progress("preprocess", unit="docs", stream=stream,
                        **({"log_interval": args.log_interval} if args.log_interval else {}))
    pool = None
    counts = {"docs": 0, "empty": 0, "tokens": 0}
    try:
        tasks = ((batch, fmt) for path, fmt in zip(files, formats)
                 for batch in batched(read_documents(path, fmt), BATCH_DOCS))
        if args.workers > 1:
            pool = start_pool(args)
            results = encode_in_pool(pool, tasks, window=4 * args.workers)
        else:
            results = (encoder.encode(batch, fmt) for batch, fmt in tasks)
        for arrays, ndocs, empty, nbytes in results:
            for builder, (tokens, lengths) in zip(builders, arrays):
                builder.add_documents(tokens, lengths, empty_documents=True)
            counts["docs"] += ndocs
            counts["empty"] += empty
            counts["tokens"] += int(arrays[0][0].size)
            progress.update(ndocs, nbytes)
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        for builder in builders:
            builder.finalize()
        files = tokenizer_files(args.vocab_file, args.merge_file, args.tokenizer_model)
        for prefix in prefixes:  # read by training: warns or stops when its tokenizer differs
            write_tokenizer_record(prefix, tokenizer_type=args.tokenizer_type,
                                   vocab_size=encoder.tokenizer.vocab_size, files=files)
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool.join()
        for builder in builders:
            builder.abort()
        raise
    progress.close()
    for prefix in prefixes:
        stream.write(f"wrote {prefix}.bin/.idx: {counts['docs']} documents, {counts['tokens']} tokens "
                     f"({np.dtype(dtype).name}), {counts['empty']} of them empty (kept as Megatron keeps them)\n")
    return prefixes


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        run(args)
    except (InputError, TokenizerError, OSError) as e:
        sys.stderr.write(f"preprocess_data.py: error: {e}\n")
        return 1
    except UsageError as e:  # SFT data and chat templates (megatron_ru/data/chat_templates.py, sft.py)
        sys.stderr.write(f"preprocess_data.py: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("preprocess_data.py: interrupted; no output written\n")
        return 130
    sys.stderr.write(f"done in {time.perf_counter() - start:.1f}s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
