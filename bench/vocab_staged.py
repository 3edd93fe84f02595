"""Vocabulary adaptation end to end: pretrain a small gpt3 on Russian with GPT-2's vocabulary, adapt, train in two stages, compare with plain continued training (bits per byte, words/s).

    python bench/vocab_staged.py                          # fetches fortunes-ru and GPT-2's vocabulary
    python bench/vocab_staged.py --fortunes DIR --gpt2 DIR --work /tmp/vs --keep

Inputs (never committed): Debian's fortunes-ru (every 10th fortune held out; the rest alternate
between the pretraining text and the continuation text) and GPT-2's vocab.json + merges.txt.
Every step is the real tool in its own process: tools/preprocess_data.py, pretrain_gpt.py (one
process, fp32, dropout 0), tools/adapt_vocab.py.

    base      P steps of pretraining on the pretraining half (cosine LR)
    adapted   tools/adapt_vocab.py --add N --init mean on the continuation half
    stage 1   K1 steps --train-only new-rows, then stage 2: K2 steps of full training
    baseline  the base model continued with full training and the base vocabulary on the same text,
              checkpoints at K1+K2 steps (equal steps = equal tokens and compute) and at the step
              count that reads as many bytes of text as the adapted run (equal text)

Continued training uses a constant LR after a short warm-up, so a checkpoint in the middle of the
baseline run is a fair stopping point. Bits per byte: evaluation/perplexity.py on the held-out
fortunes (the first --held-bytes of them), windows of --seq tokens. Generation: the same prompts
(the first 3 words of held-out fortunes), greedy, each run until --words words of continuation;
adapted (after stage 2) and baseline alternate prompt by prompt, repetition by repetition, in
this process with the same thread count; words/s = words / wall time of the generate calls.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import vocab_inputs  # noqa: E402
from megatron_ru.data.indexed_dataset import IndexedDataset  # noqa: E402
from megatron_ru.data.tokenizers import bytes_to_unicode  # noqa: E402
from megatron_ru.evaluation.perplexity import Corpus, evaluate_corpora  # noqa: E402
from megatron_ru.inference import Generator  # noqa: E402
from megatron_ru.inference.loading import ModelOptions, open_model  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fortunes", help="an extracted usr/share/games/fortunes/ru (default: apt-get download)")
    p.add_argument("--gpt2", help="a directory with GPT-2's vocab.json + merges.txt (default: npm pack)")
    p.add_argument("--work", help="working directory (default: a temporary one, removed unless --keep)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--add", type=int, default=3000, help="new tokens")
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--k1", type=int, default=20, help="stage 1 steps (--train-only new-rows)")
    p.add_argument("--k2", type=int, default=60, help="stage 2 steps (full training)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--held-bytes", type=int, default=60000)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--words", type=int, default=20, help="words of continuation per prompt")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the figures here")
    return p.parse_args(argv)


def run(cmd: list, log: Path) -> float:
    """Run a tool of ours; its output goes to `log`; returns wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    t0 = time.time()
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        sys.exit(f"{cmd[0]} failed (exit {r.returncode}); see {log}:\n" + log.read_text()[-2000:])
    return time.time() - t0


def preprocess(text: Path, tok_dir: Path, prefix: Path, log: Path) -> int:
    run(["tools/preprocess_data.py", "--input", text, "--input-format", "lines", "--tokenizer-type",
         "GPT2BPETokenizer", "--vocab-file", tok_dir / "vocab.json", "--merge-file", tok_dir / "merges.txt",
         "--append-eod", "--workers", "2", "--output-prefix", prefix], log)
    return int(IndexedDataset(f"{prefix}_text_document").num_tokens)


def train(a, w: Path, name: str, data: str, steps: int, lr: float, extra: list, save_interval=None) -> float:
    cmd = ["pretrain_gpt.py", "--data-path", data, "--split", "100,0,0", "--data-cache-path", w / "cache",
           "--seq-length", a.seq, "--micro-batch-size", a.batch, "--train-iters", steps, "--lr", lr,
           "--weight-decay", "0.01", "--clip-grad", "1.0", "--seed", "1234", "--log-interval", max(steps // 4, 1),
           "--save", w / name, "--save-interval", save_interval or steps, "--threads", a.threads,
           "--metrics-file", w / f"{name}.jsonl", *extra]
    return run(cmd, w / f"{name}.log")


def bits_per_byte(path: Path, docs: list, seq: int, tag=None) -> dict:
    m = open_model(ModelOptions(load=str(path), tag=tag))
    tok = m.tokenizer
    corpus = Corpus("held", [tok.tokenize(d) for d in docs], sum(len(d.encode("utf-8")) for d in docs))
    _, total = evaluate_corpora(m.model, [corpus], tok.eod, seq_length=seq, stride=seq)
    return {"bits_per_byte": total.bits_per_byte, "tokens": total.tokens, "bytes": total.bytes}


class WordCounter:
    """Words begun in a continuation, counted from the tokens' bytes as they come (a word begins where
    a non-space byte follows a space byte; the continuation starts mid-text, after the prompt's last
    word), so the stop test costs O(1) a token; GPT-2 byte-level vocabularies (vocab.json)."""

    def __init__(self, tok):
        inv = {c: b for b, c in bytes_to_unicode().items()}
        self.bytes = {i: bytes(inv[c] for c in s if c in inv) for i, s in tok.decoder.items()}

    def counter(self, limit: int):
        """A stop test for Generator.generate: true when word `limit` + 1 begins. It keeps the words
        seen (at most `limit`) in `.words`."""
        state = {"seen": 0, "space": False, "words": 0}

        def stop(_row, tokens) -> bool:
            for t in tokens[state["seen"]:]:
                for b in self.bytes.get(int(t), b""):
                    space = b in b" \t\n\r"
                    if state["space"] and not space:
                        state["words"] += 1
                    state["space"] = space
            state["seen"] = len(tokens)
            return state["words"] > limit

        stop.state = state
        return stop


def speed(models: dict, prompts: list, a) -> dict:
    """Greedy generation until `a.words` words, the models alternating; words/s and tokens/s."""
    gens = {}
    for name, (path, tag) in models.items():
        m = open_model(ModelOptions(load=str(path), tag=tag))
        gens[name] = (Generator(m.model, eod=None), m.tokenizer, WordCounter(m.tokenizer))  # no early end
    stats = {n: {"words": 0, "tokens": 0, "seconds": 0.0, "rep_wps": [], "samples": []} for n in models}
    order = list(models)
    for rep in range(a.repeats + 1):  # repetition 0 warms up and is not counted
        rep_stats = {n: [0, 0.0] for n in models}
        for prompt in prompts:
            for name in (order if rep % 2 == 0 else order[::-1]):
                gen, tok, wc = gens[name]
                ids = tok.tokenize(prompt)
                stop = wc.counter(a.words)
                t0 = time.perf_counter()
                out = gen.generate([ids], max_new_tokens=gen.max_length - len(ids), stop=stop)[0]
                dt = time.perf_counter() - t0
                n = min(stop.state["words"], a.words)
                if rep == 1:
                    stats[name]["samples"].append(prompt + tok.detokenize(out.tokens))
                if rep:
                    s = stats[name]
                    s["words"] += n
                    s["tokens"] += len(out.tokens)
                    s["seconds"] += dt
                    rep_stats[name][0] += n
                    rep_stats[name][1] += dt
        if rep:
            for n in models:
                stats[n]["rep_wps"].append(rep_stats[n][0] / rep_stats[n][1])
    for s in stats.values():
        s["words_per_s"] = s["words"] / s["seconds"]
        s["tokens_per_s"] = s["tokens"] / s["seconds"]
        s["median_rep_words_per_s"] = statistics.median(s["rep_wps"])
    return stats


def main(argv=None) -> int:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    w = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="vocab_staged_"))
    w.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    docs = vocab_inputs.fortunes_docs(w / "fetch", a.fortunes)
    gpt2 = vocab_inputs.gpt2_tokenizer(w / "fetch", a.gpt2)
    train_docs, held_docs = vocab_inputs.split_fortunes(docs)
    texts = {"pre": train_docs[0::2], "cont": train_docs[1::2]}
    for name, lines in texts.items():
        (w / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    held, size = [], 0
    for d in held_docs:
        if size >= a.held_bytes:
            break
        held.append(d)
        size += len(d.encode("utf-8"))
    (w / "held.txt").write_text("\n".join(held) + "\n", encoding="utf-8")
    times = {}
    print(f"fortunes-ru: {len(docs):,} fortunes; pretraining text {len(texts['pre']):,}, continuation "
          f"{len(texts['cont']):,}, held out {len(held_docs):,} (bits per byte on the first {len(held)}, "
          f"{size:,} bytes)", flush=True)

    model = ["--model-family", "gpt3", "--num-layers", a.layers, "--hidden-size", a.hidden,
             "--num-attention-heads", max(a.hidden // 64, 2), "--max-position-embeddings", a.seq,
             "--hidden-dropout", "0", "--attention-dropout", "0"]
    gpt2_flags = ["--vocab-file", gpt2 / "vocab.json", "--merge-file", gpt2 / "merges.txt"]
    preprocess(w / "pre.txt", gpt2, w / "pre", w / "pre_prep.log")
    cont_base_tokens = preprocess(w / "cont.txt", gpt2, w / "cont", w / "cont_prep.log")
    times["base"] = train(a, w, "base", w / "pre_text_document", a.pretrain_steps, 2e-3,
                          model + gpt2_flags + ["--lr-decay-style", "cosine", "--min-lr", "2e-4",
                                                "--lr-warmup-iters", "20"])
    print(f"base: {a.pretrain_steps} steps in {times['base']:.0f} s", flush=True)
    t0 = time.time()
    run(["tools/adapt_vocab.py", "--load", w / "base", "--corpus", w / "cont.txt", "--heldout", w / "held.txt", "--add", a.add, "--init", "mean", "--no-eval", "--save", w / "adapted"],
        w / "adapt.log")
    times["adapt"] = time.time() - t0
    print(f"adapted: +{a.add} tokens in {times['adapt']:.0f} s", flush=True)
    cont_new_tokens = preprocess(w / "cont.txt", w / "adapted/tokenizer", w / "cont_ad", w / "cont_ad_prep.log")
    cont = ["--use-checkpoint-args", "--finetune", "--lr-decay-style", "constant", "--lr-warmup-iters", "10"]
    times["stage1"] = train(a, w, "stage1", w / "cont_ad_text_document", a.k1, 2e-3,
                            cont + ["--load", w / "adapted", "--train-only", "new-rows"])
    times["stage2"] = train(a, w, "stage2", w / "cont_ad_text_document", a.k2, 5e-4,
                            cont + ["--load", w / "stage1"])
    print(f"stages: {a.k1} + {a.k2} steps in {times['stage1']:.0f} + {times['stage2']:.0f} s", flush=True)
    k = a.k1 + a.k2
    ratio = cont_base_tokens / cont_new_tokens  # base tokens per adapted token on the same text
    equal_text = max(k, round(k * ratio))
    times["baseline"] = train(a, w, "baseline", w / "cont_text_document", equal_text, 5e-4,
                              cont + ["--load", w / "base"], save_interval=k)
    print(f"baseline: {equal_text} steps in {times['baseline']:.0f} s", flush=True)

    rows = [("base", w / "base", None), ("adapted, before training", w / "adapted", None),
            (f"after stage 1 ({a.k1} steps new rows)", w / "stage1", None),
            (f"after stage 2 (+{a.k2} steps full)", w / "stage2", None),
            (f"baseline, equal steps ({k})", w / "baseline", f"iter_{k:07d}"),
            (f"baseline, equal text ({equal_text} steps)", w / "baseline", None)]
    t0 = time.time()
    bpb = {name: bits_per_byte(path, held, a.seq, tag) for name, path, tag in rows}
    times["eval"] = time.time() - t0
    prompts = [" ".join(d.split()[:3]) for d in held_docs if len(d.split()) >= 6][:a.prompts]
    t0 = time.time()
    gen = speed({"adapted": (w / "stage2", None), "baseline": (w / "baseline", f"iter_{k:07d}")}, prompts, a)
    times["generate"] = time.time() - t0
    times["total"] = time.time() - t_start

    vocab = [json.loads((w / p / "config.json").read_text())["model"]["vocab_size"] for p in ("base", "adapted")]
    res = {"args": vars(a), "rows": [r[0] for r in rows], "bits_per_byte": bpb, "generation": gen,
           "times": times, "equal_text_steps": equal_text, "tokens": [cont_base_tokens, cont_new_tokens],
           "vocab": vocab, "held": {"docs": len(held), "bytes": size, "words": sum(len(d.split()) for d in held)},
           "prompts": prompts}
    print(report(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, ensure_ascii=False))
    if a.work or a.keep:
        print(f"kept {w}")
    else:
        shutil.rmtree(w)
    return 0


def report(res: dict) -> str:
    """The Markdown tables of a run (`res`: what main() gathered; also saved by --json)."""
    a, bpb, gen, held = res["args"], res["bits_per_byte"], res["generation"], res["held"]
    base_tokens, new_tokens = res["tokens"]
    out = [f"\nModel: gpt3, {a['layers']} layers x {a['hidden']} hidden, seq {a['seq']}, batch {a['batch']}, fp32, "
           f"{a['threads']} threads; vocabulary {res['vocab'][0]:,} -> {res['vocab'][1]:,}; continuation text: "
           f"{base_tokens:,} base tokens = {new_tokens:,} adapted tokens ({base_tokens / new_tokens:.2f}x)\n",
           f"| model | tokens scored (per word) | bits per byte on {held['bytes']:,} held-out bytes |",
           "|---|---|---|"]
    for name in res["rows"]:
        n = bpb[name]["tokens"]
        out.append(f"| {name} | {n:,} ({n / held['words']:.2f}) | {bpb[name]['bits_per_byte']:.3f} |")
    tpw = {"adapted": bpb[res["rows"][3]]["tokens"] / held["words"], "baseline": bpb[res["rows"][4]]["tokens"] / held["words"]}
    out += ["", f"| generation (greedy, {len(res['prompts'])} prompts x {a['words']} words, {a['repeats']} reps) "
            "| words/s | tokens/s | generated tokens/word | tokens/s / held-out tokens/word |", "|---|---|---|---|---|"]
    for name, s in gen.items():
        out.append(f"| {name} | {s['words_per_s']:.1f} | {s['tokens_per_s']:.1f} | {s['tokens'] / max(s['words'], 1):.2f} "
                   f"| {s['tokens_per_s'] / tpw[name]:.1f} |")
    ad, bl = gen["adapted"], gen["baseline"]
    out.append(f"\nwords/s adapted / baseline: {ad['words_per_s'] / bl['words_per_s']:.2f}x (per repetition: "
               f"{[round(x / y, 2) for x, y in zip(ad['rep_wps'], bl['rep_wps'])]}); at held-out tokens/word: "
               f"{ad['tokens_per_s'] / tpw['adapted'] / (bl['tokens_per_s'] / tpw['baseline']):.2f}x")
    out += [f"{name} sample: {s['samples'][0]!r}" for name, s in gen.items()]
    out.append("times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in res["times"].items()))
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
