"""Training checkpoints: DeepSpeed `save_checkpoint` directories plus our client state.

Client state = iteration, consumed samples (train and valid), and every RNG state, which with
DeepSpeed's module / optimizer / scheduler / loss-scaler state is enough to resume bit-exactly.
Writes are atomic at the directory level: DeepSpeed writes `<tag>.tmp/`, which is renamed to
`<tag>/` before `latest` is replaced, so a run killed mid-save leaves the previous checkpoint
as `latest`. config.json (model, TP size, vocabulary padding, tokenizer) makes the directory
loadable by generate.py and converters without the original flags.
"""
from __future__ import annotations

import random
import shutil
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import ConfigError, ModelConfig
from ..parallel.state import ParallelState
from .model_io import (CheckpointError, atomic_write_text, latest_tag, model_files, read_config,
                       write_config)

# Tokenizer files as stored in a checkpoint's tokenizer/ directory (the names HF and
# generate.py's --tokenizer-path look for).
CANONICAL = ("vocab_file", "merge_file", "tokenizer_model")


def canonical_name(key: str, src: str) -> str:
    if key == "vocab_file":
        return "vocab.json"
    if key == "merge_file":
        return "merges.txt"
    return "tokenizer.json" if str(src).endswith(".json") else "tokenizer.model"


# Fields that may change between a checkpoint and a resumed run without changing the model.
RUNTIME_FIELDS = {"hidden_dropout", "attention_dropout", "checkpoint_activations", "sparse_impl"}


def rng_state(ps: ParallelState) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "tracker": ps.rng.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, ps: ParallelState) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    ps.rng.set_state(state["tracker"])


def check_compatible(directory: str, config: ModelConfig, tp_size: int, *, weights_only: bool) -> str:
    """Raise naming every differing field when the checkpoint's model is not this run's."""
    saved, meta = read_config(Path(directory))
    a, b = saved.to_dict(), config.to_dict()
    diff = [f"{k}: checkpoint {a[k]!r} vs flags {b[k]!r}" for k in sorted(a)
            if k not in RUNTIME_FIELDS and a[k] != b.get(k)]
    if diff:
        raise ConfigError(f"checkpoint {directory} holds a different model; differing fields: "
                          + "; ".join(diff))
    src_tp = int(meta.get("tensor_model_parallel_size", 1))
    if meta.get("format") != "megatron_ru":  # HF / ru-gpts / Megatron-LM: weights only
        if not weights_only:
            raise ConfigError(f"{directory} is a {meta.get('format')} checkpoint without our training "
                              "state; add --finetune to start from its weights")
        return None
    if not weights_only and src_tp != tp_size:
        raise ConfigError(f"resuming {directory} (saved at TP={src_tp}) at TP={tp_size} would lose "
                          "the optimizer state; use --finetune to load the weights at a new TP size")
    tag = latest_tag(Path(directory))
    for f in model_files(Path(directory), tag, src_tp):
        if not zipfile.is_zipfile(f):  # torch.save writes a zip archive; truncation breaks it
            raise CheckpointError(f"{f} is corrupted or truncated (not a readable torch archive)")
    return tag


def save_training_checkpoint(engine, directory: str, iteration: int, client_state: dict,
                             config: ModelConfig, ps: ParallelState,
                             tokenizer_files: Optional[dict] = None) -> Path:
    """Collective: every rank calls it."""
    root = Path(directory)
    tag = f"iter_{iteration:07d}"
    tmp, final = root / f"{tag}.tmp", root / tag
    if ps.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a killed save
        if tokenizer_files:
            tok_dir = root / "tokenizer"
            tok_dir.mkdir(exist_ok=True)
            for key, src in tokenizer_files.items():
                if key in CANONICAL:  # canonical names: loaders find them without config.json
                    shutil.copyfile(src, tok_dir / canonical_name(key, src))
    ps.barrier()
    engine.save_checkpoint(str(root), tag=tmp.name, client_state=client_state, save_latest=False)
    ps.barrier()
    if ps.rank == 0:
        tokenizer = None
        if tokenizer_files:
            tokenizer = {k: (f"tokenizer/{canonical_name(k, v)}" if k in CANONICAL else v)
                         for k, v in tokenizer_files.items()}
        write_config(root, config, ps.tp_size, iteration=iteration, tokenizer=tokenizer)
        old = root / f"{tag}.old"
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        atomic_write_text(root / "latest", tag + "\n")
    ps.barrier()
    return final


def load_training_checkpoint(engine, directory: str, *, load_optimizer: bool) -> dict:
    """Restore module, optimizer, scheduler, loss scaler; returns our client state."""
    tag = latest_tag(Path(directory))
    path, client = engine.load_checkpoint(directory, tag=tag, load_optimizer_states=load_optimizer,
                                          load_lr_scheduler_states=load_optimizer)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {Path(directory) / tag}")
    return client or {}
