"""Benchmark: our lm-eval backend against lm-eval's own `hf` backend, and tools/evaluate.py's
perplexity against a plain Hugging Face loop, on the same weights, batch size and threads.

    python bench/evaluate.py [--quick] [--threads 1] [--batch-size 8]

Items/s: wall time of `lm_eval.simple_evaluate` on the bundled multiple-choice tasks (ru_choice,
ru_yesno: 62 questions, 124 continuations of 2-8 tokens), model loading excluded, each backend
run twice alternately, median. Ours computes one forward per unique context (the choices of a
question share it, scoring.py) where `hf` runs context + continuation once per choice (its
one-token-continuation cache does not apply: our answers are several tokens). Perplexity:
tokens/s of the sliding-window loop (seq 128, stride 64) over the held-out demo text repeated
to ~15 k tokens, against the same windows through GPT2LMHeadModel with masked labels.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_ru import GPTModel, ModelConfig  # noqa: E402
from megatron_ru.checkpoint.model_io import save_model, write_config  # noqa: E402
from megatron_ru.evaluation.perplexity import (Corpus, build_stream, evaluate_corpora,  # noqa: E402
                                               sliding_windows)
from tests import evalkit  # noqa: E402

CASES = [("tiny-gpt3", "tiny-gpt3", {"max_position_embeddings": 256}),
         ("gpt3-125M", "rugpt3-small", {"max_position_embeddings": 256})]
TASKS = ["ru_choice", "ru_yesno"]


def make(tmp: Path, name: str, preset: str, overrides: dict):
    import shutil
    cfg = ModelConfig.from_preset(preset, vocab_size=evalkit.tokenizer().vocab_size, **overrides)
    model = GPTModel(cfg, seed=1).eval()
    ours = tmp / name
    save_model(ours, model)
    shutil.copytree(evalkit.TOKENIZER, ours / "tokenizer")
    write_config(ours, cfg, 1, tokenizer={"type": "GPT2BPETokenizer",
                                         "vocab_file": "tokenizer/vocab.json",
                                         "merge_file": "tokenizer/merges.txt"})
    return cfg, ours, evalkit.export_hf(ours, tmp / (name + "-hf"))


def items_per_second(lm, tm, repeats: int) -> tuple[float, int]:
    import lm_eval
    times, n = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=tm, bootstrap_iters=0,
                                      log_samples=True)
        times.append(time.perf_counter() - t0)
        n = sum(len(v) for v in out["samples"].values())
    return n / statistics.median(times), n


def hf_perplexity_tps(hf, stream, seq, stride, batch) -> tuple[float, float]:
    ids = torch.tensor(stream)
    windows = sliding_windows(len(stream), seq, stride)
    t0, nll, n = time.perf_counter(), 0.0, 0
    with torch.no_grad():
        for length in sorted({w.length for w in windows}):
            group = [w for w in windows if w.length == length]
            for b in range(0, len(group), batch):
                ws = group[b:b + batch]
                x = torch.stack([ids[w.start:w.start + length] for w in ws])
                y = torch.stack([ids[w.start + 1:w.start + length + 1] for w in ws])
                for r, w in enumerate(ws):
                    y[r, :length - w.scored] = -100
                logits = hf(input_ids=x).logits
                nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(),
                                                         reduction="sum").item()
                n += sum(w.scored for w in ws)
    return n / (time.perf_counter() - t0), nll / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny model only")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import lm_eval  # noqa: F401
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager
    import megatron_ru.evaluation.harness  # noqa: F401 - registers megatron_ru
    import transformers

    tm = TaskManager(include_path=str(evalkit.TASKS), include_defaults=False)
    tok = evalkit.tokenizer()
    text = (evalkit.ROOT / "examples" / "data" / "ru_heldout.txt").read_text(encoding="utf-8")
    docs = [tok.tokenize(d) for d in text.split("\n\n") if d.strip()] * 5
    stream = build_stream(docs, tok.eod)
    rows_lm, rows_ppl = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, preset, overrides in CASES[:1] if a.quick else CASES:
            cfg, ours_dir, hf_dir = make(Path(tmp), name, preset, overrides)
            ours = get_model("megatron_ru")(load=str(ours_dir), batch_size=a.batch_size)
            hf = get_model("hf")(pretrained=str(hf_dir), dtype="float32", device="cpu",
                                 batch_size=a.batch_size)
            o_runs, h_runs = [], []
            for _ in range(a.repeats):  # alternate: machine noise hits both alike
                o_runs.append(items_per_second(ours, tm, 1)[0])
                h_runs.append(items_per_second(hf, tm, 1)[0])
            o_ips, h_ips = statistics.median(o_runs), statistics.median(h_runs)
            params = cfg.num_parameters() / 1e6
            rows_lm.append((name, params, o_ips, h_ips))
            model = ours.model
            t0 = time.perf_counter()
            _, total = evaluate_corpora(model, [Corpus("held", docs, 1)], tok.eod, seq_length=128,
                                        stride=64, batch_size=a.batch_size)
            o_tps = total.tokens / (time.perf_counter() - t0)
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
            h_tps, h_loss = hf_perplexity_tps(hf_model, stream, 128, 64, a.batch_size)
            rows_ppl.append((name, params, total.tokens, o_tps, h_tps, total.loss, h_loss))
    print(f"\nlm-eval items/s (ru_choice + ru_yesno, batch {a.batch_size}, {a.threads} thread(s))")
    print("| model | params | ours items/s | hf items/s | ours / hf |")
    print("|---|---:|---:|---:|---:|")
    for name, params, o, h in rows_lm:
        print(f"| {name} | {params:.1f}M | {o:.1f} | {h:.1f} | {o / h:.2f}x |")
    print(f"\nperplexity tokens/s (seq 128, stride 64, batch {a.batch_size})")
    print("| model | params | tokens | ours tok/s | HF loop tok/s | ours / HF | loss ours | loss HF |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, params, n, o, h, lo, lh in rows_ppl:
        print(f"| {name} | {params:.1f}M | {n:,} | {o:,.0f} | {h:,.0f} | {o / h:.2f}x | {lo:.5f} | {lh:.5f} |")


if __name__ == "__main__":
    main()
