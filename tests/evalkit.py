"""Shared fixtures of the evaluation tests: a tiny checkpoint with the demo tokenizer and its HF export."""
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
