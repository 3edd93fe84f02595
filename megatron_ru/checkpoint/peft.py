"""LoRA adapter directories → PEFT format (adapter_config.json + adapter_model.safetensors) for the
Hugging Face export of their base, and → merged full weights (through `convert`).

PEFT names: `base_model.model.<HF module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r).
Our fused layers become several HF modules: qkv → q_proj/k_proj/v_proj (GPT-2: c_attn), fused
gate+up → gate_proj/up_proj. A fused layer's delta B·A splits by output rows into exact per-module
deltas B_rows·A, so each HF module gets the same A and its rows of B (the rows `hf.key_map` gives
the base weight). GPT-2's Conv1D stores weights transposed, which PEFT handles itself
(fan_in_fan_out); the LoRA matrices are the same. lm_head keeps the real vocabulary rows of B.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..config import ModelConfig
from ..files import atomic_directory
from ..model.lora import LoRAError
from .lora_files import read_adapters
from . import hf
from .model_io import CheckpointError


def peft_tensors(config: ModelConfig, tensors: dict) -> tuple[dict, list[str]]:
    """(PEFT key → tensor, target module names) for the adapters of `config`."""
    out, modules = {}, []
    for hf_name, ours, op in hf.key_map(config):
        if not ours.endswith(".weight"):
            continue
        stem = ours[:-len(".weight")] + ".lora"
        if stem + ".A" not in tensors or not hf_name.endswith(".weight"):
            continue
        module = hf_name[:-len(".weight")]
        a, b = tensors[stem + ".A"], tensors[stem + ".B"]
        if isinstance(op, tuple):
            b = b[op[1]:op[2]]
        out[f"base_model.model.{module}.lora_A.weight"] = a
        out[f"base_model.model.{module}.lora_B.weight"] = b
        modules.append(module)
    if "lora_head.A" in tensors:
        out["base_model.model.lm_head.lora_A.weight"] = tensors["lora_head.A"]
        out["base_model.model.lm_head.lora_B.weight"] = tensors["lora_head.B"][:config.vocab_size]
        modules.append("lm_head")
    return out, modules


def export_peft(adapter_dir, dst, *, base_name: Optional[str] = None, dtype=torch.float32,
                overwrite: bool = False) -> Path:
    """Writes DST/adapter_config.json + DST/adapter_model.safetensors (atomically, as a directory)."""
    meta, tensors = read_adapters(adapter_dir)
    config = ModelConfig.from_dict(meta["model"])
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst} already exists; choose a new --save directory")
    hf.config_to_hf(config, dtype, None)  # the base must be exportable (raises otherwise)
    weights, modules = peft_tensors(config, tensors)
    if not weights:
        raise LoRAError(f"{adapter_dir}: no adapter tensors to export")
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(meta["rank"]),
        "lora_alpha": float(meta["alpha"]), "lora_dropout": float(meta.get("dropout", 0.0)),
        "target_modules": modules, "fan_in_fan_out": not config.is_llama, "bias": "none",
        "base_model_name_or_path": base_name or meta.get("base"), "inference_mode": True,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(dst) as tmp:
        hf.write_safetensors(tmp / "adapter_model.safetensors",
                             [(k, tuple(t.shape), lambda t=t: t) for k, t in weights.items()], dtype)
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")
    return dst
