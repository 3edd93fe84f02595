"""Shared fixtures of the evaluation tests: a tiny checkpoint with the demo tokenizer and its HF export, lm-eval runs, inputs."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from megatron_ru import GPTModel, ModelConfig
from megatron_ru.checkpoint.model_io import save_model, write_config
from megatron_ru.data.tokenizers import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "examples" / "data" / "tokenizer"
TASKS = ROOT / "megatron_ru" / "evaluation" / "tasks"
TASK_NAMES = ["ru_choice", "ru_yesno", "ru_answer"]  # the bundled tasks the harness tests run
TEXT = ("Москва — столица России. Река течёт к морю, и лодки плывут по ней медленно.\n\n"
        "Пчёлы собирают мёд с цветов. Летом в саду пахнет яблоками, а вечером поют птицы.\n\n"
        "Поезд пришёл на станцию ровно в полдень; пассажиры вышли на платформу.\n")


def tokenizer():
    return build_tokenizer("GPT2BPETokenizer", vocab_file=str(TOKENIZER / "vocab.json"),
                           merge_file=str(TOKENIZER / "merges.txt"))


def make_checkpoint(directory: Path, *, family: str = "gpt3", max_positions: int = 64,
                    seed: int = 3) -> Path:
    """A tiny model with non-trivial weights (biases and norms perturbed), saved with its tokenizer."""
    vocab = tokenizer().vocab_size
    cfg = ModelConfig.from_preset(f"tiny-{family}", vocab_size=vocab, init_method_std=0.2,
                                  max_position_embeddings=max_positions)
    model = GPTModel(cfg, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    save_model(directory, model)
    shutil.copytree(TOKENIZER, Path(directory) / "tokenizer")
    write_config(directory, cfg, 1, tokenizer={"type": "GPT2BPETokenizer",
                                              "vocab_file": "tokenizer/vocab.json",
                                              "merge_file": "tokenizer/merges.txt"})
    return Path(directory)


def export_hf(src: Path, dst: Path) -> Path:
    from megatron_ru.checkpoint.convert import convert
    return convert(src, dst, "hf", quiet=True)


def lm_eval_run(model: str, model_args: str):
    """lm_eval.simple_evaluate of TASK_NAMES (bundled tasks only, samples logged, no bootstrap)."""
    import importlib

    import lm_eval
    from lm_eval.tasks import TaskManager
    importlib.import_module("megatron_ru.evaluation.harness")  # registers the `megatron_ru` model
    tm = TaskManager(include_path=str(TASKS), include_defaults=False)
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=TASK_NAMES, task_manager=tm,
                                   batch_size=4, log_samples=True, bootstrap_iters=0)


def per_item(result, task):
    """An lm-eval result's logged samples of `task`, by document id."""
    return sorted(result["samples"][task], key=lambda s: s["doc_id"])


def write_inputs(directory: Path, text_file: Path) -> list:
    """TEXT in two more spellings next to `text_file`: a .bin/.idx prefix and a JSON-lines file."""
    import json
    from megatron_ru.data.indexed_dataset import IndexedDatasetBuilder
    from megatron_ru.evaluation import cli
    docs = cli.read_text_documents(text_file, "text")
    tok, prefix = tokenizer(), str(Path(directory) / "held_text_document")
    with IndexedDatasetBuilder(prefix, dtype="uint16") as b:
        for d in docs:
            b.add_document(tok.tokenize(d) + [tok.eod])
    jsonl = Path(directory) / "held.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return [str(text_file), prefix, str(jsonl)]

