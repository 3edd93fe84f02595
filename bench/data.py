"""Benchmarks the data pipeline and prints a markdown table: tokenizer, preprocessing, index build.

    python bench/data.py [--repeat 40] [--docs 10000000]

Tokenizer MB/s is compared with Hugging Face `tokenizers` (Rust) on the same text and vocabulary,
one document at a time on one thread. Preprocessing runs tools/preprocess_data.py in-process with
1 and 2 workers. Index build times doc/sample/shuffle indices for synthetic document sizes.
"""
import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # single-thread HF, like ours

import numpy as np  # noqa: E402

from megatron_ru.data.blended import build_blend_indices  # noqa: E402
from megatron_ru.data.gpt_dataset import GPTDataset  # noqa: E402
from megatron_ru.data.order import build_indices  # noqa: E402
from megatron_ru.data.indexed_dataset import IndexedDatasetBuilder  # noqa: E402
from megatron_ru.data.tokenizers import GPT2BPETokenizer  # noqa: E402

TOK_DIR = os.path.join(ROOT, "examples", "data", "tokenizer")
CORPUS = os.path.join(ROOT, "examples", "data", "ru_demo.txt")


def timed(fn, *args, **kw):
    start = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - start, out


def bench_tokenizers(docs, repeat, rows):
    vocab, merges = os.path.join(TOK_DIR, "vocab.json"), os.path.join(TOK_DIR, "merges.txt")
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    first = docs[: len(docs) // repeat]  # one copy of the corpus: every piece is new
    ours = GPT2BPETokenizer(vocab, merges)
    cold, _ = timed(lambda: [ours.tokenize(d) for d in first])
    warm, ids = timed(lambda: [ours.tokenize(d) for d in docs])
    first_bytes = sum(len(d.encode("utf-8")) for d in first)
    rows.append(("GPT2BPETokenizer (ours), empty cache, 1 corpus copy", f"{first_bytes / cold / 1e6:.2f} MB/s", ""))
    rows.append((f"GPT2BPETokenizer (ours), warm cache, {nbytes / 1e6:.1f} MB", f"{nbytes / warm / 1e6:.2f} MB/s", ""))
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        rows.append(("HF tokenizers", "not installed", ""))
        return
    hf = Tokenizer(models.BPE.from_file(vocab, merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf_cold, _ = timed(lambda: [hf.encode(d, add_special_tokens=False).ids for d in first])
    hf_time, hf_ids = timed(lambda: [hf.encode(d, add_special_tokens=False).ids for d in docs])
    assert hf_ids == ids, "parity broken: HF and ours disagree"
    rows.append(("HF tokenizers (Rust), 1 thread, first pass, 1 corpus copy",
                 f"{first_bytes / hf_cold / 1e6:.2f} MB/s", f"ours = {hf_cold / cold:.2f}x HF"))
    rows.append(("HF tokenizers (Rust), 1 thread, warm cache", f"{nbytes / hf_time / 1e6:.2f} MB/s",
                 f"ours = {hf_time / warm:.2f}x HF"))


def bench_preprocess(docs, tmp, rows):
    spec = importlib.util.spec_from_file_location("preprocess_data", os.path.join(ROOT, "tools", "preprocess_data.py"))
    tool = importlib.util.module_from_spec(spec)
    sys.modules["preprocess_data"] = tool  # workers pickle its functions by module name
    spec.loader.exec_module(tool)
    src = os.path.join(tmp, "bench.jsonl")
    with open(src, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    size = os.path.getsize(src)
    for workers in (1, 2):
        args = tool.parse_args(["--input", src, "--tokenizer-type", "GPT2BPETokenizer",
                                "--vocab-file", os.path.join(TOK_DIR, "vocab.json"),
                                "--merge-file", os.path.join(TOK_DIR, "merges.txt"), "--append-eod",
                                "--output-prefix", os.path.join(tmp, f"w{workers}"), "--workers", str(workers)])
        seconds, _ = timed(tool.run, args, open(os.devnull, "w"))
        rows.append((f"preprocess_data.py, {workers} worker(s), {size / 1e6:.1f} MB jsonl",
                     f"{size / seconds / 1e6:.2f} MB/s", f"{len(docs) / seconds:,.0f} docs/s"))


def bench_indices(num_docs, tmp, rows):
    rng = np.random.default_rng(0)
    sizes = np.clip(rng.lognormal(5.5, 1.0, size=num_docs), 1, 60000).astype(np.int32)  # mean ~400 tokens
    seconds, (doc_index, sample_index, shuffle_index, _) = timed(
        build_indices, sizes, np.arange(num_docs), 2048, None, 1234)
    rows.append((f"index build, {num_docs / 1e6:.0f} M documents, {sizes.sum(dtype=np.int64) / 1e9:.1f} B tokens, "
                 f"seq 2048", f"{seconds:.2f} s", f"{len(shuffle_index):,} samples; Megatron: minutes"))
    seconds, _ = timed(build_blend_indices, [0.85, 0.1, 0.05], 10_000_000)
    rows.append(("blend index, 10 M samples, 3 datasets", f"{seconds:.2f} s", ""))
    # random access through the packed dataset
    prefix = os.path.join(tmp, "synthetic")
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for n in sizes[:100_000]:
            builder.add_document(rng.integers(0, 50000, size=int(n)))
    ds = GPTDataset(prefix, np.arange(100_000), name="train", seq_length=2048, num_samples=None, seed=1,
                    cache_path=os.path.join(tmp, "cache"))
    seconds, _ = timed(lambda: [ds[i] for i in range(min(len(ds), 5000))])
    rows.append(("GPTDataset[i], seq 2048, mmap", f"{min(len(ds), 5000) / seconds:,.0f} samples/s", ""))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=40, help="copies of the demo corpus to tokenize")
    p.add_argument("--docs", type=int, default=10_000_000, help="documents for the index build")
    args = p.parse_args(argv)
    with open(CORPUS, encoding="utf-8") as f:
        docs = [b for b in f.read().split("\n\n") if b.strip()] * args.repeat
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bench_tokenizers(docs, args.repeat, rows)
        bench_preprocess(docs * 5, tmp, rows)  # enough work to amortise starting the workers
        bench_indices(args.docs, tmp, rows)
    print(f"| benchmark ({os.cpu_count()} CPU cores) | result | note |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
