"""Megatron-LM legacy checkpoints: `iter_XXXXXXX/mp_rank_XX/model_optim_rng.pt` + latest_checkpointed_iteration.txt.

The model sits under `model` → `language_model` → `embedding` / `encoder` (older: `transformer`)
/ `output_layer`; `args` (an argparse Namespace) gives the shapes. Fused QKV rows of a rank follow
`checkpoint_version` (Megatron's `fix_query_key_value_ordering`): 0 → (3, np, hn) = our
[q; k; v]; 1.0 → (np, hn, 3); ≥ 2.0 → (ng, np/ng + 2, hn), i.e. (np, 3, hn) without GQA. SwiGLU's
`dense_h_to_4h` rank rows are [gate_local; up_local], our layout. The files are unpickled through
the allow-list (safe_pickle.py): Megatron classes inside them (enums in `args`) become inert
stand-ins, so Megatron need not be installed, and any other global refuses the file.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError, ModelConfig
from .config_checks import check_bounds
from .model_io import CheckpointError, merge_shards, read_file, rename_key
from .rugpts import side_facts, rename as rugpts_rename

RENAMES = [(r"^embedding\.word_embeddings\.", "embed."), (r"^embedding\.position_embeddings\.", "pos_embed."),
           (r"^(?:encoder|transformer)\.(?:final_layernorm|final_norm)\.", "final_norm."),
           (r"^output_layer\.", "lm_head."),
           (r"^(?:encoder|transformer)\.layers\.(\d+)\.(?:input_layernorm|input_norm)\.", r"blocks.\1.norm1."),
           (r"^(?:encoder|transformer)\.layers\.(\d+)\.(?:self_attention|attention)\.query_key_value\.",
            r"blocks.\1.attn.qkv."),
           (r"^(?:encoder|transformer)\.layers\.(\d+)\.(?:self_attention|attention)\.dense\.",
            r"blocks.\1.attn.dense."),
           (r"^(?:encoder|transformer)\.layers\.(\d+)\.(?:post_attention_layernorm|post_attention_norm)\.",
            r"blocks.\1.norm2."),
           (r"^(?:encoder|transformer)\.layers\.(\d+)\.mlp\.dense_h_to_4h\.", r"blocks.\1.mlp.up."),
           (r"^(?:encoder|transformer)\.layers\.(\d+)\.mlp\.dense_4h_to_h\.", r"blocks.\1.mlp.down.")]


def iteration_dir(directory: Path, tag: Optional[str]) -> Path:
    if tag is None:
        marker = directory / "latest_checkpointed_iteration.txt"
        if not marker.is_file():
            raise CheckpointError(f"{marker} is missing: no complete Megatron checkpoint in {directory}")
        it = marker.read_text().strip()
        tag = "release" if it == "release" else f"iter_{int(it):07d}" if it.isdigit() else it
    path = directory / tag
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist (named by latest_checkpointed_iteration.txt)")
    return path


def rank_files(it_dir: Path) -> list[Path]:
    dirs = [d for d in it_dir.iterdir() if d.is_dir() and d.name.startswith("mp_rank_")]
    if any(re.fullmatch(r"mp_rank_\d\d_\d{3}", d.name) for d in dirs):
        raise CheckpointError(f"{it_dir}: pipeline-parallel checkpoints (mp_rank_XX_YYY) are not "
                              "supported; re-save it with --pipeline-model-parallel-size 1")
    ranks = sorted(int(d.name[8:10]) for d in dirs if re.fullmatch(r"mp_rank_\d\d", d.name))
    if not ranks:
        raise CheckpointError(f"{it_dir} has no mp_rank_XX/model_optim_rng.pt")
    files = [it_dir / f"mp_rank_{r:02d}" / "model_optim_rng.pt" for r in range(max(ranks) + 1)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {it_dir} is incomplete: missing {', '.join(missing)}")
    return files


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        elif torch.is_tensor(v):
            out[prefix + k] = v
    return out


def rename(flat: dict, source) -> dict:
    out = {}
    for key, value in flat.items():
        if key.endswith("_extra_state") or "rotary" in key:
            continue
        new = rename_key(key, RENAMES)
        if new is None:
            raise CheckpointError(f"{source}: tensor {key} is not part of a supported Megatron GPT")
        out[new] = value
    return out


def erf_gelu(a: dict) -> bool:
    """Whether a GPT MLP saved with args `a` computed erf-GELU. Megatron's fused bias-GELU
    (`bias_gelu_fusion`, on by default with biases) is the tanh form, as is `--openai-gelu`."""
    if a.get("openai_gelu", False):
        return False
    return a.get("onnx_safe", False) or not (a.get("bias_gelu_fusion", True) and a.get("add_bias_linear", True))


def config_from_args(args, vocab_hint: Optional[int], source, *, core: bool = False) -> ModelConfig:
    """ModelConfig from Megatron's saved `args`. Legacy models (`core=False`) built their rotary
    embedding without `--rotary-base`, i.e. always with base 10000; Megatron-Core uses it."""
    a = vars(args) if args is not None else {}
    if not a:
        raise CheckpointError(f"{source} carries no `args`: its model shapes are unknown")
    if a.get("apply_residual_connection_post_layernorm"):
        raise CheckpointError(f"{source}: apply_residual_connection_post_layernorm is not supported")
    llama = bool(a.get("swiglu"))
    rms = a.get("normalization", "LayerNorm") == "RMSNorm"
    rope = a.get("position_embedding_type", "learned_absolute") == "rope" or a.get("use_rotary_position_embeddings")
    bias = a.get("add_bias_linear", True)
    if (llama, rms, bool(rope), not bias) not in ((True, True, True, True), (False, False, False, False)):
        raise CheckpointError(f"{source}: swiglu={llama}, normalization={a.get('normalization')}, "
                              f"position_embedding_type={a.get('position_embedding_type')}, "
                              f"add_bias_linear={bias} match neither GPT-3 nor Llama")
    if not llama and erf_gelu(a):
        print(f"warning: {source} was trained with erf-GELU; ours is tanh-GELU (logits differ by "
              "about 1e-3)", flush=True)
    rotary_base = float(a.get("rotary_base", 10000) or 10000)
    if llama and not core and rotary_base != 10000:
        print(f"warning: {source} saved rotary_base={a.get('rotary_base')}, but legacy Megatron "
              "models ignore it and rotate with base 10000; using 10000 as the model was trained",
              flush=True)
        rotary_base = 10000.0
    heads = a["num_attention_heads"]
    groups = a.get("num_query_groups") if a.get("group_query_attention") else None
    padded = a.get("padded_vocab_size")
    vocab = vocab_hint or a.get("vocab_size") or padded
    if padded and vocab > padded:
        raise CheckpointError(f"{source}: vocabulary size {vocab} exceeds the padded size {padded}")
    if vocab == padded:
        print(f"warning: real vocabulary size of {source} unknown; keeping all {padded} rows "
              "(pass --vocab-size)", flush=True)
    check_bounds(a, source)  # before any per-layer work (Megatron's args use our names)
    try:
        return ModelConfig(family="llama" if llama else "gpt3", num_layers=a["num_layers"],
                           hidden_size=a["hidden_size"], num_attention_heads=heads,
                           num_key_value_heads=groups or heads, ffn_hidden_size=a.get("ffn_hidden_size"),
                           vocab_size=vocab, max_position_embeddings=a["max_position_embeddings"],
                           norm_eps=a.get("norm_epsilon", a.get("layernorm_epsilon", 1e-5)),
                           rope_theta=rotary_base,
                           tie_word_embeddings=not a.get("untie_embeddings_and_output_weights", False),
                           make_vocab_size_divisible_by=a.get("make_vocab_size_divisible_by", 128))
    except (KeyError, ConfigError) as exc:
        raise CheckpointError(f"{source}: {exc}") from None


def fix_qkv(t: torch.Tensor, version: float, cfg: ModelConfig, tp: int) -> torch.Tensor:
    """One rank's fused QKV rows → [q_local; k_local; v_local]."""
    hn, np_, ng = cfg.head_dim, cfg.num_attention_heads // tp, cfg.num_key_value_heads // tp
    rest = t.shape[1:]
    if version == 0:
        return t
    if version == 1.0:
        if ng != np_:
            raise CheckpointError("checkpoint_version 1.0 with grouped-query attention is not defined")
        return t.reshape(np_, hn, 3, *rest).movedim(2, 0).reshape(t.shape)
    g = t.reshape(ng, np_ // ng + 2, hn, *rest)
    q = g[:, : np_ // ng].reshape(np_ * hn, *rest)
    return torch.cat([q, g[:, -2].reshape(ng * hn, *rest), g[:, -1].reshape(ng * hn, *rest)])


def load_blob(path: Path, *, trust: bool = False):
    """One Megatron checkpoint file through the allow-list (`trust`: any global)."""
    return read_file(path, trust=trust)


def read(directory: Path, tag: Optional[str] = None, *, load: bool = True, trust: bool = False, **hints):
    """(ModelConfig, full state dict or None, meta) of a Megatron-LM legacy checkpoint."""
    it_dir = iteration_dir(directory, tag)
    files = rank_files(it_dir)
    tp = len(files)
    blobs = [load_blob(files[0], trust=trust)] + ([load_blob(f, trust=trust) for f in files[1:]] if load else [])
    first = blobs[0]
    version = float(first.get("checkpoint_version", 0))
    model = first.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{files[0]} has no 'model' entry (keys: {sorted(first)[:8]})")
    ru_gpts = "language_model" not in model  # ru-gpts saved without DeepSpeed: flat GPT3Model names
    if ru_gpts:
        from .rugpts import infer_config
        states = [rugpts_rename(b["model"], f)[0] for b, f in zip(blobs, files)]
        config = infer_config(directory, it_dir, states, [], hints)
    else:
        vocab = hints.get("vocab_size") or side_facts(directory, it_dir).get("vocab_size")
        config = config_from_args(first.get("args"), vocab, files[0])
        config.validate_parallel(tp)
    meta = {"format": "megatron_legacy", "model": config.to_dict(), "tensor_model_parallel_size": tp,
            "checkpoint_version": version, "tokenizer_dir": None, "source_files": [str(f) for f in files]}
    if not load:
        return config, None, meta
    if not ru_gpts:
        states = []
        for blob, f in zip(blobs, files):
            state = rename(flatten(blob["model"]["language_model"]), f)
            for k in [k for k in state if k.endswith("attn.qkv.weight") or k.endswith("attn.qkv.bias")]:
                state[k] = fix_qkv(state[k], version, config, tp)
            states.append(state)
    return config, merge_shards(config, states, it_dir), meta
