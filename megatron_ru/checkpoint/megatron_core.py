"""Megatron-Core GPTModel checkpoints: names and layouts, `--ckpt-format torch` read and write.

`torch`: `iter_XXXXXXX/mp_rank_XX[_YYY]/model_optim_rng.pt`, `model` = the flat state dict of one
(TP rank, PP stage) with Core names (`embedding.word_embeddings`, `decoder.layers.N.self_attention.
linear_qkv`, ...; N counts from 0 in every stage). Both specs are read: local (`input_layernorm`,
`pre_mlp_layernorm`) and Transformer Engine (norms fused as `linear_qkv.layer_norm_weight`,
`linear_fc1.layer_norm_weight`); TE's `_extra_state` entries are skipped. Layouts per TP rank:
`linear_qkv` rows are (query groups, q heads per group + 2, head dim); SwiGLU `linear_fc1` rows are
[gate_rank; up_rank]. Megatron classes pickled in `args` are replaced by stand-ins, so Megatron
need not be installed. `torch_dist` directories: megatron_core_dist.py.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Optional

import torch

from ..config import ModelConfig
from .megatron_legacy import config_from_args, fix_qkv, flatten, iteration_dir, load_blob
from .model_io import CheckpointError, merge_shards, rename_key

LAYER = r"^decoder\.layers\.(\d+)\."
RENAMES = [(r"^embedding\.word_embeddings\.", "embed."), (r"^embedding\.position_embeddings\.", "pos_embed."),
           (r"^decoder\.final_(?:layernorm|norm)\.", "final_norm."), (r"^output_layer\.", "lm_head."),
           (LAYER + r"input_layernorm\.", r"blocks.\1.norm1."),
           (LAYER + r"self_attention\.linear_qkv\.layer_norm_(weight|bias)$", r"blocks.\1.norm1.\2"),
           (LAYER + r"self_attention\.linear_qkv\.", r"blocks.\1.attn.qkv."),
           (LAYER + r"self_attention\.linear_proj\.", r"blocks.\1.attn.dense."),
           (LAYER + r"pre_mlp_layernorm\.", r"blocks.\1.norm2."),
           (LAYER + r"mlp\.linear_fc1\.layer_norm_(weight|bias)$", r"blocks.\1.norm2.\2"),
           (LAYER + r"mlp\.linear_fc1\.", r"blocks.\1.mlp.up."),
           (LAYER + r"mlp\.linear_fc2\.", r"blocks.\1.mlp.down.")]
# Our name → Core name (local spec); the TE spec moves the two norms into the next linear layer.
EXPORT = {"embed": "embedding.word_embeddings", "pos_embed": "embedding.position_embeddings",
          "final_norm": "decoder.final_layernorm", "lm_head": "output_layer",
          "norm1": "input_layernorm", "attn.qkv": "self_attention.linear_qkv",
          "attn.dense": "self_attention.linear_proj", "norm2": "pre_mlp_layernorm",
          "mlp.up": "mlp.linear_fc1", "mlp.down": "mlp.linear_fc2"}
TE_NORMS = {"norm1": "self_attention.linear_qkv.layer_norm_", "norm2": "mlp.linear_fc1.layer_norm_"}
UNSUPPORTED = [(r"\.mlp\.(experts|router|shared_experts)\.", "a mixture-of-experts (MoE) model"),
               (r"(^|\.)mixer\.|mamba", "a Mamba / hybrid model"),
               (r"^(lm_head|binary_head|pooler)\.", "a BERT model"),
               (r"^encoder\.|cross_attention|inter_attention", "an encoder-decoder (T5) model"),
               (r"\.(q_layernorm|k_layernorm)\.", "a model with QK layer norm"),
               (r"^mtp\.", "a model with multi-token-prediction layers")]
SKIP = re.compile(r"_extra_state|rotary_pos_emb|inv_freq")


# ---- names -----------------------------------------------------------------------------------
def check_model_type(keys, args: dict, source) -> None:
    """Refuse models we cannot represent, by saved args and by tensor names."""
    if args.get("num_experts"):
        raise CheckpointError(f"{source} is a mixture-of-experts model (num_experts="
                              f"{args['num_experts']}); only dense GPT / Llama models are supported")
    keys = list(keys)
    for pattern, what in UNSUPPORTED:  # pattern first: BERT's encoder.* keys are not T5's
        for key in keys:
            if re.search(pattern, key):
                raise CheckpointError(f"{source} is {what} (tensor {key}); only dense GPT / Llama "
                                      "Megatron-Core models are supported")


def rename(flat: dict, source, layer_offset: int = 0) -> dict:
    """Core names of one PP stage (local layer numbers) → ours (global layer numbers)."""
    out = {}
    for key, value in flat.items():
        if SKIP.search(key):
            continue
        new = rename_key(key, RENAMES)
        if new is None:
            raise CheckpointError(f"{source}: tensor {key} is not part of a Megatron-Core GPTModel")
        m = re.match(r"blocks\.(\d+)\.", new)
        if m:
            new = f"blocks.{int(m.group(1)) + layer_offset}." + new[m.end():]
        out[new] = value
    return out


def args_dict(args, source) -> dict:
    if args is None:
        raise CheckpointError(f"{source} carries no `args`: its model shapes are unknown")
    a = vars(args) if not isinstance(args, dict) else args
    if a.get("virtual_pipeline_model_parallel_size"):
        raise CheckpointError(f"{source}: virtual pipeline stages (model0, model1, ...) are not "
                              "supported; re-save without --num-layers-per-virtual-pipeline-stage")
    if a.get("use_rope_scaling") or (a.get("rotary_percent") or 1.0) != 1.0 or a.get("rotary_interleaved"):
        raise CheckpointError(f"{source}: rope scaling, rotary_percent < 1 or interleaved rotary "
                              "embeddings are not supported")
    if a.get("add_bias_linear", True) != a.get("add_qkv_bias", a.get("add_bias_linear", True)):
        raise CheckpointError(f"{source}: add_qkv_bias differs from add_bias_linear; not supported")
    if a.get("apply_layernorm_1p"):
        raise CheckpointError(f"{source}: apply_layernorm_1p (zero-centered gamma) is not supported")
    return a


def make_config(args, vocab_hint: Optional[int], source) -> ModelConfig:
    a = args_dict(args, source)
    ns = argparse.Namespace(**a)
    return config_from_args(ns, vocab_hint, source, core=True)


# ---- ckpt-format torch -------------------------------------------------------------------------
def rank_grid(it_dir: Path) -> list[list[Path]]:
    """files[pp_stage][tp_rank] of `mp_rank_XX` (PP 1) or `mp_rank_XX_YYY` directories."""
    names = [d.name for d in it_dir.iterdir() if d.is_dir() and d.name.startswith("mp_rank_")]
    pp_names = [n for n in names if re.fullmatch(r"mp_rank_\d\d_\d{3}", n)]
    tp_names = [n for n in names if re.fullmatch(r"mp_rank_\d\d", n)]
    if pp_names and tp_names:
        raise CheckpointError(f"{it_dir} mixes mp_rank_XX and mp_rank_XX_YYY directories")
    if not names or not (pp_names or tp_names):
        raise CheckpointError(f"{it_dir} has no mp_rank_XX/model_optim_rng.pt")
    if tp_names:
        tp, pp = max(int(n[8:10]) for n in tp_names) + 1, 1
        files = [[it_dir / f"mp_rank_{r:02d}" / "model_optim_rng.pt" for r in range(tp)]]
    else:
        tp = max(int(n[8:10]) for n in pp_names) + 1
        pp = max(int(n[11:14]) for n in pp_names) + 1
        files = [[it_dir / f"mp_rank_{r:02d}_{s:03d}" / "model_optim_rng.pt" for r in range(tp)]
                 for s in range(pp)]
    missing = [str(f) for stage in files for f in stage if not f.is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {it_dir} is incomplete: missing {', '.join(missing[:4])}")
    return files


def is_core_model(model) -> bool:
    """Whether the `model` entry of a model_optim_rng.pt uses Core names."""
    return isinstance(model, dict) and any(str(k).startswith(("decoder.", "embedding.", "output_layer"))
                                           for k in model)


def _stage_model(blob: dict, path: Path) -> dict:
    if "model0" in blob or "model1" in blob:
        raise CheckpointError(f"{path}: virtual pipeline stages (model0, model1, ...) are not supported")
    model = blob.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{path} has no 'model' entry (keys: {sorted(blob)[:8]})")
    return flatten(model)


def read_torch(directory: Path, tag: Optional[str] = None, *, load: bool = True, trust: bool = False,
               **hints):
    """(ModelConfig, full state dict or None, meta) of a Megatron-Core `--ckpt-format torch` checkpoint."""
    it_dir = iteration_dir(directory, tag)
    files = rank_grid(it_dir)
    pp, tp = len(files), len(files[0])
    first = load_blob(files[0][0], trust=trust)
    a = args_dict(first.get("args"), files[0][0])
    check_model_type(_stage_model(first, files[0][0]), a, files[0][0])
    from .rugpts import side_facts
    vocab = hints.get("vocab_size") or side_facts(directory, it_dir).get("vocab_size")
    config = make_config(first.get("args"), vocab, files[0][0])
    config.validate_parallel(tp)
    meta = {"format": "megatron_core", "megatron_ckpt_format": "torch", "model": config.to_dict(),
            "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
            "checkpoint_version": float(first.get("checkpoint_version", 3.0)),
            "tokenizer_dir": str(directory / "tokenizer") if (directory / "tokenizer").is_dir() else None,
            "source_files": [str(f) for stage in files for f in stage]}
    if not load:
        return config, None, meta
    states = [{} for _ in range(tp)]
    offset = 0
    for s, stage in enumerate(files):
        layers = None
        for r, f in enumerate(stage):
            flat = _stage_model(first if (s, r) == (0, 0) else load_blob(f, trust=trust), f)
            check_model_type(flat, a, f)
            local = {int(m.group(1)) for k in flat for m in [re.match(LAYER, k)] if m}
            if layers is not None and local != layers:
                raise CheckpointError(f"{f}: layers {sorted(local)} differ from TP rank 0 of the stage")
            layers = local
            if local != set(range(len(local))):
                raise CheckpointError(f"{f}: layer numbers {sorted(local)} are not 0..{len(local) - 1}")
            state = rename(flat, f, offset)
            if s != 0 and config.tie_word_embeddings:
                state.pop("lm_head.weight", None)  # the last stage's copy of the tied embedding
            if s != pp - 1 and config.tie_word_embeddings is False and "lm_head.weight" in state:
                raise CheckpointError(f"{f}: output_layer outside the last pipeline stage")
            for k in [k for k in state if re.search(r"attn\.qkv\.(weight|bias)$", k)]:
                state[k] = fix_qkv(state[k], 3.0, config, tp)
            clash = set(state) & set(states[r])
            if clash:
                raise CheckpointError(f"{f}: tensors {sorted(clash)[:3]} also appear in another stage")
            states[r].update(state)
        offset += len(layers or ())
    if offset != config.num_layers:
        raise CheckpointError(f"{it_dir}: the stages hold {offset} layers, args say {config.num_layers}")
    return config, merge_shards(config, states, it_dir), meta


# ---- export: ckpt-format torch ------------------------------------------------------------------
def core_args(config: ModelConfig, tp: int) -> argparse.Namespace:
    """The `args` Megatron-LM reads back with --use-checkpoint-args (plain types only)."""
    llama = config.is_llama
    return argparse.Namespace(
        num_layers=config.num_layers, hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size, num_attention_heads=config.num_attention_heads,
        group_query_attention=config.num_key_value_heads != config.num_attention_heads,
        num_query_groups=config.num_key_value_heads, kv_channels=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, seq_length=config.max_position_embeddings,
        position_embedding_type="rope" if llama else "learned_absolute",
        add_position_embedding=not llama, use_rotary_position_embeddings=llama,
        rotary_base=int(config.rope_theta) if float(config.rope_theta).is_integer() else config.rope_theta,
        rotary_percent=1.0, rotary_interleaved=False, add_bias_linear=config.use_bias,
        add_qkv_bias=config.use_bias, swiglu=llama, squared_relu=False,
        untie_embeddings_and_output_weights=not config.tie_word_embeddings, apply_layernorm_1p=False,
        normalization="RMSNorm" if llama else "LayerNorm", norm_epsilon=config.norm_eps,
        openai_gelu=not llama, bias_gelu_fusion=not llama, apply_query_key_layer_scaling=False,
        attention_dropout=config.attention_dropout, hidden_dropout=config.hidden_dropout,
        vocab_size=config.vocab_size, padded_vocab_size=config.padded_vocab_size(tp),
        make_vocab_size_divisible_by=config.make_vocab_size_divisible_by,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, num_experts=None,
        transformer_impl="local", ckpt_format="torch", iteration=0, consumed_train_samples=0,
        consumed_valid_samples=0)


def to_core_rank(config: ModelConfig, local: dict, tp: int, spec: str = "local") -> dict:
    """One TP rank's state dict in our names → Core names (qkv rows regrouped per query group)."""
    hn = config.head_dim
    np_, ng = config.num_attention_heads // tp, config.num_key_value_heads // tp
    out = {}
    for name, t in local.items():
        m = re.match(r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.dense|mlp\.up|mlp\.down)\.(\w+)$", name)
        if m:
            i, part, kind = m.groups()
            if part == "attn.qkv":
                q, k, v = t.split([np_ * hn, ng * hn, ng * hn])
                rest = t.shape[1:]
                t = torch.cat([q.reshape(ng, np_ // ng * hn, *rest), k.reshape(ng, hn, *rest),
                               v.reshape(ng, hn, *rest)], dim=1).reshape(t.shape)
            if spec == "te" and part in TE_NORMS:
                out[f"decoder.layers.{i}.{TE_NORMS[part]}{kind}"] = t
            else:
                out[f"decoder.layers.{i}.{EXPORT[part]}.{kind}"] = t
        else:
            head, kind = name.rsplit(".", 1)
            out[f"{EXPORT[head]}.{kind}"] = t
    return out


def write_torch(dst: Path, config: ModelConfig, full: dict, tp: int, dtype: torch.dtype, progress,
                spec: str = "local", pp: int = 1) -> None:
    """DST/latest_checkpointed_iteration.txt = release, DST/release/mp_rank_XX/model_optim_rng.pt, or with
    `pp` > 1 mp_rank_XX_YYY per (TP rank, stage): Megatron-Core GPTModel names, checkpoint_version 3.0,
    args for --use-checkpoint-args. Stages hold num_layers / pp consecutive layers numbered from 0 (as
    Megatron-Core saves them), the embeddings on the first, the final norm and output layer on the last;
    with tied embeddings the last stage also holds its copy of the word embeddings as output_layer."""
    from ..parallel.sharding import shard
    from .model_io import VOCAB_PARAMS, atomic_torch_save, shard_specs
    if spec not in ("local", "te"):
        raise CheckpointError(f"--megatron-spec {spec!r} is unknown; expected local or te")
    if any(config.sparse_layers()):
        raise CheckpointError("Megatron-Core has no block-sparse attention: this model's sparse "
                              "layers cannot be exported (convert a --sparse-mode dense copy)")
    if pp < 1 or config.num_layers % pp:
        raise CheckpointError(f"--target-pipeline-parallel-size {pp}: must divide num_layers="
                              f"{config.num_layers} (Megatron-Core splits layers evenly)")
    specs, padded = shard_specs(config, tp), config.padded_vocab_size(tp)
    args = core_args(config, tp)
    args.pipeline_model_parallel_size = pp
    args.transformer_impl = "transformer_engine" if spec == "te" else "local"
    per_stage = config.num_layers // pp
    for r in range(tp):
        local = {}
        for name, sp in specs.items():
            t = full[name].to(dtype)
            if name in VOCAB_PARAMS:
                t = torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])])
            local[name] = shard(t, sp, r, tp)
            progress.update()
        for stage in range(pp):
            part = _stage_part(config, local, stage, pp, per_stage)
            state = {k: v.clone().contiguous() for k, v in to_core_rank(config, part, tp, spec).items()}
            rank_dir = dst / "release" / (f"mp_rank_{r:02d}" if pp == 1 else f"mp_rank_{r:02d}_{stage:03d}")
            rank_dir.mkdir(parents=True)
            atomic_torch_save({"model": state, "args": args, "checkpoint_version": 3.0, "iteration": 0},
                              rank_dir / "model_optim_rng.pt")
    (dst / "latest_checkpointed_iteration.txt").write_text("release")


def _stage_part(config: ModelConfig, local: dict, stage: int, pp: int, per_stage: int) -> dict:
    """One pipeline stage's tensors of a TP rank's state dict (our names), layers renumbered from 0."""
    if pp == 1:
        return local
    first, last, lo = stage == 0, stage == pp - 1, stage * per_stage
    part = {}
    for name, t in local.items():
        m = re.match(r"blocks\.(\d+)\.(.*)$", name)
        if m:
            i = int(m.group(1))
            if lo <= i < lo + per_stage:
                part[f"blocks.{i - lo}.{m.group(2)}"] = t
        elif name.startswith(("embed.", "pos_embed.")):
            if first:
                part[name] = t
            if last and name == "embed.weight" and config.tie_word_embeddings:
                part["lm_head.weight"] = t  # the last stage's copy of the tied embedding
        elif last:
            part[name] = t
    return part


__all__ = ["write_torch", "core_args", "is_core_model", "read_torch", "to_core_rank"]
