"""LoRA adapter directories on disk: write, detect, read, and attach them to a model (modules: model/lora.py).

Adapter directory: adapter_config.json {"format": "megatron_ru_lora", "base", "rank", "alpha",
"dropout", "targets", "model"} + adapter_model.safetensors (full tensors, our names
`<layer>.lora.A` / `.lora.B`); TP-independent, written atomically (config last).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from ..config import ModelConfig
from ..errors import UsageError
from ..files import atomic_path, atomic_write_text
from ..model.lora import LoRAError, adapter_state, apply_lora, set_adapter_state
from .hf import read_safetensors, write_safetensors

FORMAT = "megatron_ru_lora"
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def save_adapters(model, directory, *, base: Optional[str], write: bool = True, **extra) -> Optional[Path]:
    """Writes the adapter directory (TP rank 0 of DP rank 0 writes; all ranks must call)."""
    state = adapter_state(model)
    if not write:
        return None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        write_safetensors(Path(tmp), [(n, tuple(t.shape), lambda t=t: t) for n, t in state.items()],
                          torch.float32)
    meta = {"format": FORMAT, "version": 1, "base": os.path.abspath(base) if base else None,
            **model.lora_settings, "model": model.config.to_dict(), **extra}
    atomic_write_text(directory / CONFIG_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return directory


def is_adapter_dir(directory) -> bool:
    return (Path(directory) / CONFIG_FILE).is_file() and read_meta(Path(directory)).get("format") == FORMAT


def read_meta(directory) -> dict:
    """adapter_config.json of `directory` as a dict; {} when missing or unreadable."""
    try:
        meta = json.loads((Path(directory) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def read_adapters(directory) -> tuple[dict, dict]:
    """(adapter_config.json dict, name → full tensor); LoRAError naming the file when broken."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LoRAError(f"adapter directory {directory} does not exist")
    meta = read_meta(directory)
    if meta.get("format") != FORMAT:
        raise LoRAError(f"{directory / CONFIG_FILE} is missing or not a megatron_ru LoRA adapter config")
    if not (directory / WEIGHTS_FILE).is_file():
        raise LoRAError(f"{directory} has no {WEIGHTS_FILE}")
    try:
        tensors = read_safetensors(directory / WEIGHTS_FILE)
    except UsageError as exc:
        raise LoRAError(str(exc)) from None
    return meta, tensors


def base_of(meta: dict, directory, override: Optional[str] = None) -> str:
    """The base checkpoint an adapter directory points at (or `override`); LoRAError if gone."""
    base = override or meta.get("base")
    if not base or not Path(base).is_dir():
        raise LoRAError(f"the adapters in {directory} need their base model: {base or '(none recorded)'} "
                        "does not exist; pass the base checkpoint explicitly")
    return base


def check_base_shape(meta: dict, config: ModelConfig, directory) -> None:
    """The base must have the shapes the adapters were trained on."""
    want = meta.get("model", {})
    for key in ("family", "num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "ffn_hidden_size", "vocab_size"):
        have = getattr(config, key, None)
        if key in want and want[key] != have:
            raise LoRAError(f"the adapters in {directory} were trained on a base with {key}={want[key]}, "
                            f"this base has {key}={have}")


def attach_adapters(model, directory) -> dict:
    """Adds the adapters of `directory` to `model` (any TP size) for inference; returns the meta."""
    directory = Path(directory)
    meta, tensors = read_adapters(directory)
    check_base_shape(meta, model.config, directory)
    apply_lora(model, rank=int(meta["rank"]), alpha=float(meta["alpha"]), dropout=0.0,
               targets=meta["targets"])
    set_adapter_state(model, tensors, directory / WEIGHTS_FILE)
    return meta


__all__ = ["CONFIG_FILE", "FORMAT", "WEIGHTS_FILE", "attach_adapters", "base_of", "check_base_shape",
           "is_adapter_dir", "read_adapters", "read_meta", "save_adapters"]
