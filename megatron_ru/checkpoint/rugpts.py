"""ru-gpts (ai-forever/ru-gpts) DeepSpeed checkpoints: `<dir>/<tag>/mp_rank_XX_model_states.pt`.

Each file holds {"module": this MP rank's GPT3Model state dict}. The fused `query_key_value`
rows of a rank are [q_local; k_local; v_local] (ColumnParallelLinear with stride 3) — exactly our
fused-QKV shard — so ranks merge with our ShardSpecs once the names are mapped. Sparse layers carry
`attention.sparse_self_attention.master_layout` buffers: dropped, but their presence tells which
layers are sparse and their first dimension the heads per rank. The vocabulary is padded; the real
size comes from `vocab_size=` (CLI `--vocab-size`), a vocab.json / config.json next to the
weights, or a matching preset, in that order (otherwise the padded size is kept, with a warning).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch

from ..config import PRESETS, ConfigError, ModelConfig
from ..model.sparsity import layout_for_tp_rank, sparse_layer_indices
from .config_checks import check_bounds, check_layer_count
from .model_io import CheckpointError, load_module, merge_shards, rename_key

RENAMES = [(r"^word_embeddings\.", "embed."), (r"^position_embeddings\.", "pos_embed."),
           (r"^transformer\.final_layernorm\.", "final_norm."),
           (r"^transformer\.layers\.(\d+)\.input_layernorm\.", r"blocks.\1.norm1."),
           (r"^transformer\.layers\.(\d+)\.attention\.query_key_value\.", r"blocks.\1.attn.qkv."),
           (r"^transformer\.layers\.(\d+)\.attention\.dense\.", r"blocks.\1.attn.dense."),
           (r"^transformer\.layers\.(\d+)\.post_attention_layernorm\.", r"blocks.\1.norm2."),
           (r"^transformer\.layers\.(\d+)\.mlp\.dense_h_to_4h\.", r"blocks.\1.mlp.up."),
           (r"^transformer\.layers\.(\d+)\.mlp\.dense_4h_to_h\.", r"blocks.\1.mlp.down.")]
RANK_FILE = re.compile(r"^mp_rank_(\d\d)_model_states\.pt$")


def strip_prefixes(name: str) -> str:
    for prefix in ("module.", "model."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


def rename(state: dict, source) -> tuple[dict, dict]:
    """(our-named tensors, {layer: master_layout}) from one rank's ru-gpts state dict."""
    out, layouts = {}, {}
    for key, value in state.items():
        name = strip_prefixes(key)
        if "sparse_self_attention" in name:
            m = re.match(r"^transformer\.layers\.(\d+)\.", name)
            if m and name.endswith("master_layout"):
                layouts[int(m.group(1))] = value
            continue
        new = rename_key(name, RENAMES)
        if new is None:
            raise CheckpointError(f"{source}: tensor {key} is not part of a ru-gpts GPT-3 model")
        out[new] = value
    return out, layouts


def find_tag(directory: Path, tag: Optional[str]) -> Path:
    """The directory holding mp_rank_XX_model_states.pt: `tag`, `latest`, or the iteration in
    latest_checkpointed_iteration.txt (as `N`, `iter_000000N`, `global_stepN`), or DIR itself."""
    if tag is not None:
        candidates = [directory / tag]
    elif (directory / "latest").is_file():
        candidates = [directory / (directory / "latest").read_text().strip()]
    elif (directory / "latest_checkpointed_iteration.txt").is_file():
        it = (directory / "latest_checkpointed_iteration.txt").read_text().strip()
        candidates = [directory / it]
        if it.isdigit():
            candidates += [directory / f"iter_{int(it):07d}", directory / f"global_step{it}"]
    else:
        candidates = [directory] + sorted((p for p in directory.iterdir() if p.is_dir()),
                                          key=lambda p: p.stat().st_mtime, reverse=True)
    for c in candidates:
        if c.is_dir() and any(RANK_FILE.match(f.name) for f in c.iterdir()):
            return c
    raise CheckpointError(f"no mp_rank_XX_model_states.pt under {directory} (looked in "
                          f"{', '.join(str(c) for c in candidates[:4])})")


def rank_files(tag_dir: Path) -> list[Path]:
    ranks = sorted(int(RANK_FILE.match(f.name).group(1)) for f in tag_dir.iterdir()
                   if RANK_FILE.match(f.name))
    missing = [f"mp_rank_{r:02d}_model_states.pt" for r in range(max(ranks) + 1) if r not in ranks]
    if missing:
        raise CheckpointError(f"checkpoint {tag_dir} is incomplete: missing {', '.join(missing)}")
    return [tag_dir / f"mp_rank_{r:02d}_model_states.pt" for r in ranks]


def side_facts(directory: Path, tag_dir: Path) -> dict:
    """Facts from JSON files next to the weights: HF-style config.json, a DeepSpeed config."""
    facts = {}
    for d in (tag_dir, directory):
        for f in sorted(d.glob("*.json")):
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                continue
            if not isinstance(data, dict):
                continue
            if f.name == "vocab.json":
                facts.setdefault("vocab_size", len(data))
                continue
            for ours, keys in (("num_attention_heads", ("num_attention_heads", "n_head")),
                               ("vocab_size", ("vocab_size",))):
                for k in keys:
                    if isinstance(data.get(k), int):
                        facts.setdefault(ours, data[k])
            if isinstance(data.get("sparse_attention"), dict):
                facts.setdefault("sparse_attention", data["sparse_attention"])
    return facts


def infer_config(directory: Path, tag_dir: Path, states: list, rank_layouts: list, hints: dict) -> ModelConfig:
    """ModelConfig from tensor shapes plus hints (CLI), side files and presets, in that order;
    `rank_layouts[r]` = {layer: master_layout} of rank r."""
    mp, s0 = len(states), states[0]
    layouts = rank_layouts[0] if rank_layouts else {}
    need = ("embed.weight", "pos_embed.weight", "blocks.0.mlp.up.weight")
    for name in need:
        if name not in s0:
            raise CheckpointError(f"{tag_dir}: tensor {name} (ru-gpts name) is missing")
    hidden = s0["embed.weight"].shape[1]
    layers = 1 + max(int(k.split(".")[1]) for k in s0 if k.startswith("blocks."))
    check_layer_count(layers, s0, r"blocks\.(\d+)\.", tag_dir, "the highest layer number + 1")
    padded = sum(s["embed.weight"].shape[0] for s in states)
    side = side_facts(directory, tag_dir)
    preset = next((p for p in PRESETS.values() if p.get("family") == "gpt3"
                   and p["hidden_size"] == hidden and p["num_layers"] == layers), {})
    heads = hints.get("num_attention_heads") or (
        layouts[min(layouts)].shape[0] * mp if layouts else None) or side.get(
        "num_attention_heads") or preset.get("num_attention_heads")
    if heads is None:
        raise CheckpointError(f"{tag_dir}: the number of attention heads cannot be read from the "
                              "weights; pass --num-attention-heads (or put an HF config.json there)")
    vocab = hints.get("vocab_size") or side.get("vocab_size") or preset.get("vocab_size")
    if vocab is None or vocab > padded:
        vocab = padded
        print(f"warning: real vocabulary size of {tag_dir} unknown; keeping all {padded} rows "
              "(pass --vocab-size)", flush=True)
    sparse, mode = None, "alternating"
    if layouts:
        flags = [i in layouts for i in range(layers)]
        mode = next((m for m in ("alternating", "all", "top_bottom")
                     if sparse_layer_indices(layers, m) == flags), None)
        if mode is None:
            raise CheckpointError(f"{tag_dir}: sparse layers {sorted(layouts)} follow none of the "
                                  "modes alternating / all / top_bottom")
        sparse = hints.get("sparse_attention") or side.get("sparse_attention") or \
            preset.get("sparse_attention")
        if sparse is None:
            raise CheckpointError(f"{tag_dir} has sparse layers {sorted(layouts)} but no sparsity "
                                  "config: pass --sparse-config DEEPSPEED.json")
    try:
        config = ModelConfig(family="gpt3", num_layers=layers, hidden_size=hidden,
                             num_attention_heads=heads,
                             ffn_hidden_size=s0["blocks.0.mlp.up.weight"].shape[0] * mp,
                             vocab_size=vocab, max_position_embeddings=s0["pos_embed.weight"].shape[0],
                             sparse_attention=sparse, sparse_mode=mode)
    except ConfigError as exc:
        raise CheckpointError(f"{tag_dir}: {exc}") from None
    check_bounds(config, tag_dir)  # sizes read from side files, or a lying layer name
    if layouts:
        config.sparse_ru_gpts_head_indexing = _head_indexing(config, rank_layouts, tag_dir)
    return config


def _head_indexing(config: ModelConfig, rank_layouts: list, tag_dir: Path) -> bool:
    """Which head indexing reproduces the stored master_layout of every rank: global (False) or
    ru-gpts' per-rank local one (True; exact only at the source TP size)."""
    mp = len(rank_layouts)
    stored = [lay[min(lay)] for lay in rank_layouts]  # one sparse layer per rank decides
    seq = stored[0].shape[-1] * int(config.sparse_attention.get("block", 16))
    for compat in (False, True):
        built = [layout_for_tp_rank(config.sparse_attention, config.num_attention_heads, seq, r, mp,
                                    ru_gpts_compat=compat) for r in range(mp)]
        if all(b.shape == s.shape and torch.equal(b.to(s.dtype), s) for b, s in zip(built, stored)):
            if compat and mp > 1:
                print(f"warning: {tag_dir} was trained with ru-gpts' per-rank sparse layouts: "
                      f"outputs are exact at TP={mp} only", flush=True)
            return compat
    raise CheckpointError(f"{tag_dir}: the stored sparse master_layout matches neither the global "
                          "nor ru-gpts' per-rank layout of the sparsity config; check --sparse-config")


def read(directory: Path, tag: Optional[str] = None, *, load: bool = True, trust: bool = False, **hints):
    """(ModelConfig, full state dict or None, meta) of a ru-gpts checkpoint."""
    tag_dir = find_tag(directory, tag)
    files = rank_files(tag_dir)
    states, layouts = [], []
    for f in files:
        state, lay = rename(load_module(f, trust=trust), f)
        states.append(state)
        layouts.append(lay)
    config = infer_config(directory, tag_dir, states, layouts if any(layouts) else [], hints)
    meta = {"format": "ru_gpts", "model": config.to_dict(), "tensor_model_parallel_size": len(files),
            "tokenizer_dir": str(directory) if (directory / "vocab.json").is_file() else None,
            "source_files": [str(f) for f in files]}
    if not load:
        return config, None, meta
    return config, merge_shards(config, states, tag_dir), meta
