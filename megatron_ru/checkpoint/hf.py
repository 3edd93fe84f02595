"""Hugging Face interop: GPT2LMHeadModel / LlamaForCausalLM configs and key maps, sharded safetensors directories.

Key map entries are (hf_name, our_name, op): op "id" copies, "T" transposes (GPT-2 Conv1D stores
[in, out]), ("rows", a, b) says the HF tensor is rows [a, b) of our fused tensor (Llama q/k/v in
our fused qkv, gate/up in our fused mlp.up). HF Llama uses the same half-split RoPE as we do, so
q/k weights need no permutation. Safetensors files are read and written by safetensors_io.py
(headers checked first, tensors over a private memory map), sharded by size with an index; the
config's sizes are checked against the weights' headers before a key map or model is built.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from ..config import ConfigError, ModelConfig
from .config_checks import check_bounds, check_layer_count, param_shapes
from .model_io import CheckpointError, read_file
from .safetensors_io import (DTYPE_NAMES, SAFETENSORS_DTYPES, read_safetensors,  # noqa: F401
                             read_shapes, write_safetensors)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
ARCHITECTURES = {"GPT2LMHeadModel": "gpt3", "LlamaForCausalLM": "llama"}
# HF tensors that are buffers or tied copies, never weights of their own.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def is_hf_dir(directory: Path) -> bool:
    cfg = directory / "config.json"
    if not cfg.is_file():
        return False
    try:
        meta = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(meta, dict) and ("architectures" in meta or "model_type" in meta)


# ---- configs ------------------------------------------------------------------------------
def config_from_hf(meta: dict, path: Path) -> ModelConfig:
    """Our ModelConfig from an HF config.json dict; unsupported features stop with a message."""
    archs = meta.get("architectures") or []
    arch = archs[0] if archs else {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}.get(
        meta.get("model_type"), meta.get("model_type"))
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: architecture {arch!r} is not supported; supported: "
                              f"{', '.join(ARCHITECTURES)}")

    def unsupported(what: str):
        raise CheckpointError(f"{path}: {arch} with {what} is not supported")

    try:
        if arch == "GPT2LMHeadModel":
            if meta.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
                unsupported(f"activation_function={meta['activation_function']!r} (we use tanh-GELU)")
            for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
                if meta.get(flag):
                    unsupported(f"{flag}=true")
            if meta.get("scale_attn_weights") is False:
                unsupported("scale_attn_weights=false")
            return ModelConfig(family="gpt3", num_layers=meta["n_layer"], hidden_size=meta["n_embd"],
                               num_attention_heads=meta["n_head"],
                               ffn_hidden_size=meta.get("n_inner") or 4 * meta["n_embd"],
                               vocab_size=meta["vocab_size"],
                               max_position_embeddings=meta.get("n_positions", 1024),
                               norm_eps=meta.get("layer_norm_epsilon", 1e-5),
                               tie_word_embeddings=meta.get("tie_word_embeddings", True))
        if meta.get("hidden_act", "silu") != "silu":
            unsupported(f"hidden_act={meta['hidden_act']!r}")
        if meta.get("attention_bias") or meta.get("mlp_bias"):
            unsupported("attention_bias/mlp_bias")
        rope = meta.get("rope_parameters") or meta.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", None):
            unsupported(f"rope scaling {kind!r}")
        heads = meta["num_attention_heads"]
        if meta.get("head_dim") not in (None, meta["hidden_size"] // heads):
            unsupported(f"head_dim={meta['head_dim']} != hidden_size / num_attention_heads")
        return ModelConfig(family="llama", num_layers=meta["num_hidden_layers"],
                           hidden_size=meta["hidden_size"], num_attention_heads=heads,
                           num_key_value_heads=meta.get("num_key_value_heads") or heads,
                           ffn_hidden_size=meta["intermediate_size"], vocab_size=meta["vocab_size"],
                           max_position_embeddings=meta.get("max_position_embeddings", 2048),
                           norm_eps=meta.get("rms_norm_eps", 1e-6),
                           rope_theta=float(rope.get("rope_theta", meta.get("rope_theta", 10000.0))),
                           tie_word_embeddings=meta.get("tie_word_embeddings", False))
    except KeyError as exc:
        raise CheckpointError(f"{path}: field {exc} is missing") from None
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


EXTRA_KEY = "megatron_ru"  # config.json key HF ignores: our full model config (sparsity) + tokenizer


def restore_extra(config: ModelConfig, meta: dict, path, sparse_hint: Optional[dict] = None) -> ModelConfig:
    """`config` (from HF's own fields) with what only our extra key says: sparse layout and mode,
    vocabulary padding, ... When the HF fields were edited since export, only the sparse settings
    are taken. `sparse_hint` (--sparse-config) wins over the saved layout, with a warning."""
    saved = (meta.get(EXTRA_KEY) or {}).get("model") if isinstance(meta.get(EXTRA_KEY), dict) else None
    values = config.to_dict()
    if isinstance(saved, dict):
        same = all(saved.get(k) == v for k, v in values.items() if k in HF_FIELDS)
        keep = saved if same else {k: saved[k] for k in SPARSE_FIELDS if k in saved}
        values.update({k: v for k, v in keep.items() if k in values})
    if sparse_hint is not None:
        if values.get("sparse_attention") not in (None, sparse_hint):
            print(f"warning: --sparse-config replaces the sparse_attention section saved in {path}",
                  flush=True)
        values["sparse_attention"] = sparse_hint
    try:
        return ModelConfig.from_dict(values)
    except ConfigError as exc:
        raise CheckpointError(f"{path} ({EXTRA_KEY} / --sparse-config): {exc}") from None


HF_FIELDS = ("family", "num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
             "ffn_hidden_size", "vocab_size", "max_position_embeddings", "norm_eps",
             "tie_word_embeddings", "use_bias")
SPARSE_FIELDS = ("sparse_attention", "sparse_mode", "sparse_ru_gpts_head_indexing")


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype, eod: Optional[int],
                 tokenizer: Optional[dict] = None) -> dict:
    """HF config.json of `cfg`; EXTRA_KEY keeps what HF cannot say (sparse layout and mode,
    vocabulary padding, the tokenizer entry) so an import back is lossless."""
    extra = {EXTRA_KEY: {"model": cfg.to_dict(), **({"tokenizer": tokenizer} if tokenizer else {})}}
    return {**_config_to_hf(cfg, dtype, eod), **extra}


def _config_to_hf(cfg: ModelConfig, dtype: torch.dtype, eod: Optional[int]) -> dict:
    tokens = {} if eod is None else {"bos_token_id": eod, "eos_token_id": eod}
    dtype_name = str(dtype).removeprefix("torch.")
    if not cfg.is_llama:
        if not cfg.use_bias or not cfg.tie_word_embeddings:
            raise CheckpointError("GPT2LMHeadModel needs biases and tied embeddings")
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                "vocab_size": cfg.vocab_size, "n_positions": cfg.max_position_embeddings,
                "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers, "n_head": cfg.num_attention_heads,
                "n_inner": cfg.ffn_hidden_size, "activation_function": "gelu_new",
                "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.hidden_dropout,
                "embd_pdrop": cfg.hidden_dropout, "attn_pdrop": cfg.attention_dropout,
                "initializer_range": cfg.init_method_std, "tie_word_embeddings": True,
                "torch_dtype": dtype_name, **tokens}
    if cfg.use_bias:
        raise CheckpointError("LlamaForCausalLM export needs a model without biases")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.ffn_hidden_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
            "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "initializer_range": cfg.init_method_std,
            "tie_word_embeddings": bool(cfg.tie_word_embeddings), "torch_dtype": dtype_name, **tokens}


# ---- key map ------------------------------------------------------------------------------
def key_map(cfg: ModelConfig) -> list[tuple[str, str, object]]:
    """(hf_name, our_name, op) for every HF weight of `cfg`'s architecture."""
    out = []
    if not cfg.is_llama:
        out += [("transformer.wte.weight", "embed.weight", "id"),
                ("transformer.wpe.weight", "pos_embed.weight", "id")]
        for i in range(cfg.num_layers):
            h, o = f"transformer.h.{i}.", f"blocks.{i}."
            for hf_mod, our_mod, transpose in (("ln_1", "norm1", False), ("ln_2", "norm2", False),
                                               ("attn.c_attn", "attn.qkv", True),
                                               ("attn.c_proj", "attn.dense", True),
                                               ("mlp.c_fc", "mlp.up", True),
                                               ("mlp.c_proj", "mlp.down", True)):
                out.append((f"{h}{hf_mod}.weight", f"{o}{our_mod}.weight", "T" if transpose else "id"))
                out.append((f"{h}{hf_mod}.bias", f"{o}{our_mod}.bias", "id"))
        out += [("transformer.ln_f.weight", "final_norm.weight", "id"),
                ("transformer.ln_f.bias", "final_norm.bias", "id")]
        return out
    q, kv, f = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, \
        cfg.ffn_hidden_size
    out.append(("model.embed_tokens.weight", "embed.weight", "id"))
    for i in range(cfg.num_layers):
        h, o = f"model.layers.{i}.", f"blocks.{i}."
        out += [(f"{h}input_layernorm.weight", f"{o}norm1.weight", "id"),
                (f"{h}self_attn.q_proj.weight", f"{o}attn.qkv.weight", ("rows", 0, q)),
                (f"{h}self_attn.k_proj.weight", f"{o}attn.qkv.weight", ("rows", q, q + kv)),
                (f"{h}self_attn.v_proj.weight", f"{o}attn.qkv.weight", ("rows", q + kv, q + 2 * kv)),
                (f"{h}self_attn.o_proj.weight", f"{o}attn.dense.weight", "id"),
                (f"{h}post_attention_layernorm.weight", f"{o}norm2.weight", "id"),
                (f"{h}mlp.gate_proj.weight", f"{o}mlp.up.weight", ("rows", 0, f)),
                (f"{h}mlp.up_proj.weight", f"{o}mlp.up.weight", ("rows", f, 2 * f)),
                (f"{h}mlp.down_proj.weight", f"{o}mlp.down.weight", "id")]
    out.append(("model.norm.weight", "final_norm.weight", "id"))
    if not cfg.tie_word_embeddings:
        out.append(("lm_head.weight", "lm_head.weight", "id"))
    return out


def from_hf(cfg: ModelConfig, get: Callable[[str], torch.Tensor], names: set,
            source: str) -> dict:
    """Our full state dict (real vocabulary rows) from HF tensors fetched by name."""
    entries = key_map(cfg)
    wanted = {e[0] for e in entries}
    unknown = sorted(n for n in names - wanted if not n.endswith(IGNORED_SUFFIXES)
                     and not (n == "lm_head.weight" and cfg.tie_word_embeddings))
    if unknown:
        raise CheckpointError(f"{source}: unexpected tensors {unknown[:5]} for this architecture")
    full, parts = {}, {}
    for hf_name, ours, op in entries:
        if hf_name not in names:
            raise CheckpointError(f"{source}: tensor {hf_name} is missing")
        t = get(hf_name)
        if op == "T":
            t = t.t()
        if isinstance(op, tuple):
            parts.setdefault(ours, []).append((op, t))
            if op[2] == _fused_rows(cfg, ours):
                pieces = parts.pop(ours)
                for (_, a, b), p in pieces:
                    if p.shape[0] != b - a:
                        raise CheckpointError(f"{source}: tensor {hf_name}-group piece has "
                                              f"{p.shape[0]} rows, expected {b - a}")
                full[ours] = torch.cat([p for _, p in pieces])
        else:
            full[ours] = t
    return full


def _fused_rows(cfg: ModelConfig, ours: str) -> int:
    if ours.endswith("attn.qkv.weight"):
        return (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    return 2 * cfg.ffn_hidden_size


def to_hf(cfg: ModelConfig, full: dict) -> list[tuple[str, tuple, Callable[[], torch.Tensor]]]:
    """(hf_name, shape, make) per HF tensor; `make()` builds it on demand (streaming writes)."""
    plan = []
    for hf_name, ours, op in key_map(cfg):
        src = full[ours]
        if op == "T":
            shape, make = (src.shape[1], src.shape[0]), (lambda s=src: s.t())
        elif isinstance(op, tuple):
            shape, make = (op[2] - op[1], *src.shape[1:]), (lambda s=src, a=op[1], b=op[2]: s[a:b])
        else:
            shape, make = tuple(src.shape), (lambda s=src: s)
        plan.append((hf_name, tuple(shape), make))
    return plan


# ---- safetensors ----------------------------------------------------------------------------
def _index_map(index: Path) -> dict:
    """The weight_map of model.safetensors.index.json: tensor name → shard file name (checked)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise CheckpointError(f"{index} is not a JSON object with a weight_map ({exc})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
    bad = [f for f in set(weight_map.values()) if Path(f).name != f or f in ("", ".", "..")]
    if bad:
        raise CheckpointError(f"{index} names shard {bad[0]!r} outside its directory")
    return weight_map


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({directory / f for f in _index_map(index).values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{directory} has a config.json but no model.safetensors "
                          "(or model.safetensors.index.json)")


def weight_shapes(directory: Path) -> Optional[dict]:
    """name → shape of every tensor in the safetensors files, from their (checked) headers alone;
    a name in two shards, or placed elsewhere than the index says, is refused. None for a
    pytorch_model.bin directory (its shapes come with loading)."""
    files = safetensors_files(directory) if not _is_bin_dir(directory) else None
    if files is None:
        return None
    shapes, where = {}, {}
    for f in files:
        for name, shape in read_shapes(f).items():
            if name in shapes:
                raise CheckpointError(f"tensor {name} appears in both {where[name]} and {f}")
            shapes[name], where[name] = shape, f
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        for name, shard in _index_map(index).items():
            if name not in where or where[name].name != shard:
                raise CheckpointError(f"{index} places tensor {name} in {shard}, which does not hold it")
    return shapes


def _is_bin_dir(directory: Path) -> bool:
    return not (directory / "model.safetensors").is_file() and \
        not (directory / "model.safetensors.index.json").is_file() and (directory / "pytorch_model.bin").is_file()


HF_KEYS = {"gpt3": {"num_layers": "n_layer", "hidden_size": "n_embd", "num_attention_heads": "n_head",
                    "ffn_hidden_size": "n_inner", "max_position_embeddings": "n_positions"},
           "llama": {"num_layers": "num_hidden_layers", "ffn_hidden_size": "intermediate_size"}}
LAYER_PATTERNS = {"gpt3": r"transformer\.h\.(\d+)\.", "llama": r"model\.layers\.(\d+)\."}


def check_against_weights(config: ModelConfig, shapes: Optional[dict], source) -> None:
    """The config's sizes against the HF tensors' shapes before any model or key map is built:
    sane bounds, the layer count equal to the layer indices in the names, then every tensor's
    shape as the config implies it (None: bounds only)."""
    keys = HF_KEYS[config.family]
    check_bounds(config, source, keys)
    if shapes is None:
        return
    check_layer_count(config.num_layers, shapes, LAYER_PATTERNS[config.family], source, keys["num_layers"])
    ours = param_shapes(config)
    for hf_name, our_name, op in key_map(config):
        got = shapes.get(hf_name)
        if got is None or our_name not in ours:
            continue  # from_hf names what is missing
        want = ours[our_name]
        want = want[::-1] if op == "T" else (op[2] - op[1], *want[1:]) if isinstance(op, tuple) else want
        if tuple(got) != tuple(want):
            raise CheckpointError(f"tensor {hf_name} has shape {tuple(got)}, {source} "
                                  f"(num_layers={config.num_layers}, hidden_size={config.hidden_size}, "
                                  f"vocab_size={config.vocab_size}) implies {tuple(want)}")


def write_hf_weights(directory: Path, plan: list, dtype: torch.dtype, max_shard_bytes: int,
                     progress=None) -> list[Path]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index when over max_shard_bytes."""
    esize = torch.empty((), dtype=dtype).element_size()
    shards, current, size = [], [], 0
    for item in plan:
        nbytes = esize * int(torch.Size(item[1]).numel())
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        write_safetensors(directory / "model.safetensors", shards[0], dtype, progress)
        return [directory / "model.safetensors"]
    paths, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(directory / name, shard, dtype, progress)
        paths.append(directory / name)
        for item in shard:
            weight_map[item[0]] = name
            total += esize * int(torch.Size(item[1]).numel())
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return paths


def read_hf_weights(directory: Path, *, trust: bool = False) -> tuple[dict, Callable[[str], torch.Tensor]]:
    """(name → source file, getter) over all safetensors shards (or a pytorch_model.bin, unpickled
    through the allow-list, safe_pickle.py; `trust`: any global)."""
    tensors, where = {}, {}
    bin_file = directory / "pytorch_model.bin"
    if not (directory / "model.safetensors").is_file() and \
            not (directory / "model.safetensors.index.json").is_file() and bin_file.is_file():
        tensors = read_file(bin_file, trust=trust)
        where = {k: bin_file for k in tensors}
        return where, tensors.__getitem__
    for f in safetensors_files(directory):
        for name, t in read_safetensors(f).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name} appears in both {where[name]} and {f}")
            tensors[name], where[name] = t, f
    return where, tensors.__getitem__


# ---- tokenizer files ------------------------------------------------------------------------
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer.model")


def tokenizer_config(files: Iterable[str], eod_token: Optional[str], max_length: int) -> dict:
    files = set(files)
    if "tokenizer.json" in files:
        cls = "PreTrainedTokenizerFast"
    elif {"vocab.json", "merges.txt"} <= files:
        cls = "GPT2Tokenizer"
    elif "tokenizer.model" in files:
        cls = "LlamaTokenizer"
    else:
        return {}
    special = {} if eod_token is None else {"bos_token": eod_token, "eos_token": eod_token,
                                            "unk_token": eod_token}
    return {"tokenizer_class": cls, "model_max_length": max_length, "add_prefix_space": False,
            "clean_up_tokenization_spaces": False, **special}
