"""Open any checkpoint: detect a directory's format, read its config and full tensors, build a model from it.

Formats: `megatron_ru` (ours, any TP, ZeRO-3 included: model_io.py), `hf` (GPT2LMHeadModel /
LlamaForCausalLM, safetensors, sharded with an index), `ru_gpts` (DeepSpeed mp_rank files),
`megatron_legacy` (Megatron-LM iter_XXXXXXX/mp_rank_XX/model_optim_rng.pt, pre-Core names),
`megatron_core` (Megatron-Core GPTModel, `--ckpt-format torch`, mp_rank_XX[_YYY] = TP x PP
shards) and `megatron_core_dist` (Megatron-Core `--ckpt-format torch_dist`: PyTorch Distributed
Checkpoint directories). Readers memory-map their files and give full tensors in our names with
the real vocabulary rows, checked against the config (model_io.check_weights_match_config).
This module sits on top of checkpoint/: every reader is below it, convert.py above it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..config import ModelConfig
from ..model.gpt import GPTModel
from ..parallel.state import ParallelState
from . import hf, megatron_core, megatron_core_dist, megatron_legacy, rugpts
from .lora_files import CONFIG_FILE, is_adapter_dir
from .model_io import (CheckpointError, check_weights_match_config, is_own_checkpoint, load_own_state_dict,
                       model_from_state, read_own_config)

FORMATS = ("megatron_ru", "hf", "ru_gpts", "megatron_legacy", "megatron_core", "megatron_core_dist")


def detect_format(directory: Path, *, trust: bool = False) -> str:
    """One of FORMATS; CheckpointError for a missing, unknown or mixed directory. `trust`
    (--trust-checkpoint): pickles may name any global (checkpoint/safe_pickle.py)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if is_own_checkpoint(directory):
        return "megatron_ru"
    if is_adapter_dir(directory):
        raise CheckpointError(
            f"{directory} holds LoRA adapters ({CONFIG_FILE}), not a whole model: sample with "
            "generate.py --load BASE --lora DIR, merge or export them with "
            "tools/convert_checkpoint.py --load DIR, resume their run with --lora-rank R "
            "--pretrained-checkpoint BASE --load DIR --save DIR")
    cfg = directory / "config.json"
    if cfg.is_file():
        try:
            json.loads(cfg.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{cfg} is not valid JSON: {exc}") from None
    found = []
    if hf.is_hf_dir(directory) and any((directory / f).is_file() for f in hf.WEIGHT_FILES):
        found.append("hf")  # (ru-gpts releases ship an HF-style config.json next to mp_rank files)
    torch_files = sorted(directory.glob("*/mp_rank_[0-9][0-9]*/model_optim_rng.pt"))
    if torch_files:
        model = megatron_legacy.load_blob(torch_files[-1], trust=trust).get("model")
        found.append("megatron_core" if megatron_core.is_core_model(model) else "megatron_legacy")
    if any(directory.glob("*/.metadata")) or any(directory.glob("*/*.distcp")) or \
            (directory / ".metadata").is_file() or any(directory.glob("*.distcp")):
        found.append("megatron_core_dist")
    if any(directory.glob("mp_rank_[0-9][0-9]_model_states.pt")) or \
            any(directory.glob("*/mp_rank_[0-9][0-9]_model_states.pt")):
        found.append("ru_gpts")
    if len(found) > 1:
        raise CheckpointError(f"{directory} mixes checkpoint formats ({' and '.join(found)}); "
                              "keep one per directory")
    if not found and hf.is_hf_dir(directory):
        hf.safetensors_files(directory)  # raises: config.json without weights
    if not found:
        raise CheckpointError(
            f"{directory} is not a checkpoint in a known format: expected config.json "
            "(megatron_ru or Hugging Face), <tag>/mp_rank_XX_model_states.pt (ru-gpts) or "
            "iter_XXXXXXX/mp_rank_XX[_YYY]/model_optim_rng.pt (Megatron-LM, legacy or Core) or "
            "iter_XXXXXXX/.metadata + *.distcp (Megatron-Core torch_dist)")
    return found[0]


def _read_hf(directory: Path, load: bool, hints: dict, trust: bool = False):
    cfg_path = directory / "config.json"
    raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    config = hf.restore_extra(hf.config_from_hf(raw, cfg_path), raw, cfg_path, hints.get("sparse_attention"))
    has_tok = any((directory / f).is_file() for f in hf.TOKENIZER_FILES)
    meta = {"format": "hf", "model": config.to_dict(), "tensor_model_parallel_size": 1,
            "tokenizer_dir": str(directory) if has_tok else None}
    saved_tok = (raw.get(hf.EXTRA_KEY) or {}).get("tokenizer") if isinstance(raw.get(hf.EXTRA_KEY), dict) else None
    if isinstance(saved_tok, dict):
        meta["tokenizer"] = saved_tok
    if not load:  # sizes checked against the weights' headers before anything is built
        hf.check_against_weights(config, hf.weight_shapes(directory), cfg_path)
        return config, None, meta
    where, get = hf.read_hf_weights(directory, trust=trust)
    hf.check_against_weights(config, {n: tuple(get(n).shape) for n in where}, cfg_path)
    return config, hf.from_hf(config, get, set(where), str(directory)), meta


def _read(directory: Path, tag: Optional[str], load: bool, hints: dict, trust: bool = False):
    fmt = detect_format(directory, trust=trust)
    if hints.get("sparse_attention") is not None and fmt not in ("ru_gpts", "hf"):
        raise CheckpointError(f"--sparse-config applies to ru-gpts and Hugging Face sources; {directory} "
                              f"is {fmt}, whose sparsity (if any) is part of the checkpoint")
    if fmt == "megatron_ru":
        config, meta = read_own_config(directory)
        meta = {**meta, "tokenizer_dir": str(directory / "tokenizer")
                if (directory / "tokenizer").is_dir() else None}
        full = load_own_state_dict(directory, tag, trust=trust)[1] if load else None
    elif fmt == "hf":
        config, full, meta = _read_hf(directory, load, hints, trust)
    elif fmt == "ru_gpts":
        config, full, meta = rugpts.read(directory, tag, load=load, trust=trust, **hints)
    elif fmt == "megatron_core":
        config, full, meta = megatron_core.read_torch(directory, tag, load=load, trust=trust, **hints)
    elif fmt == "megatron_core_dist":
        config, full, meta = megatron_core_dist.read_dist(directory, tag, load=load, trust=trust, **hints)
    else:
        config, full, meta = megatron_legacy.read(directory, tag, load=load, trust=trust, **hints)
    if full is not None:  # full tensors: exactly the real vocabulary rows
        shape_of = getattr(full, "shape_of", lambda n: tuple(full[n].shape))  # lazy: no merge
        check_weights_match_config(config, [{n: tuple(shape_of(n)) for n in full}], directory,
                                   vocab_rows=config.vocab_size)
    return config, full, meta


def read_any_config(directory: Path, *, trust: bool = False, **hints) -> tuple[ModelConfig, dict]:
    """(ModelConfig, meta) of a directory in any format (meta: format, model, TP, tokenizer_dir)."""
    config, _, meta = _read(Path(directory), None, False, hints, trust)
    return config, meta


def load_any(directory: Path, tag: Optional[str] = None, *, trust: bool = False,
             **hints) -> tuple[ModelConfig, dict, dict]:
    """(ModelConfig, full tensors in our names with real vocabulary rows, meta)."""
    return _read(Path(directory), tag, True, hints, trust)


def read_config(directory: Path, *, trust: bool = False) -> tuple[ModelConfig, dict]:
    """The model config and metadata of a checkpoint directory in any supported format (ours:
    its config.json as written)."""
    if not Path(directory).is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if is_own_checkpoint(directory):
        return read_own_config(directory)
    return read_any_config(Path(directory), trust=trust)


def load_full_state_dict(directory: Path, tag: Optional[str] = None, *,
                         trust: bool = False) -> tuple[ModelConfig, dict]:
    """Full (unsharded) tensors with real vocabulary rows only, and the model config; any format."""
    if is_own_checkpoint(directory):
        return load_own_state_dict(Path(directory), tag, trust=trust)
    config, full, _ = load_any(Path(directory), tag, trust=trust)
    return config, full


def load_model(directory, parallel_state: Optional[ParallelState] = None, *, tag: Optional[str] = None,
               dtype=None, device=None, trust: bool = False, **config_overrides) -> GPTModel:
    """A GPTModel for `parallel_state` (any TP size) from a checkpoint directory in any format."""
    config, full = load_full_state_dict(Path(directory), tag, trust=trust)
    return model_from_state(config, full, parallel_state, dtype=dtype, device=device, **config_overrides)


__all__ = ["FORMATS", "detect_format", "load_any", "load_full_state_dict", "load_model", "read_any_config",
           "read_config"]
