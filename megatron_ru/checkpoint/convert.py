"""Checkpoint conversion: detect a directory's format, read it as full tensors, write ours (any TP) or HF.

Formats: `megatron_ru` (ours, any TP, ZeRO-3 included), `hf` (GPT2LMHeadModel / LlamaForCausalLM,
safetensors, sharded with an index), `ru_gpts` (DeepSpeed mp_rank files), `megatron_legacy`
(Megatron-LM iter_XXXXXXX/mp_rank_XX/model_optim_rng.pt, pre-Core names), `megatron_core`
(Megatron-Core GPTModel, `--ckpt-format torch`, mp_rank_XX[_YYY] = TP x PP shards) and
`megatron_core_dist` (Megatron-Core `--ckpt-format torch_dist`: PyTorch Distributed Checkpoint
directories). Writers: ours (any TP), HF, and Megatron-Core `torch` (any TP). Readers memory-map their files, so a
conversion holds the source once (as file pages) plus what it is writing: HF output is written
tensor by tensor, our output one TP rank at a time. Output goes to a temporary sibling directory
that is renamed to DST only when complete: a failure leaves nothing at DST.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError, ModelConfig
from ..data.progress import Progress
from ..model.gpt import GPTModel
from ..parallel.sharding import shard
from ..parallel.state import ParallelState
from . import hf, megatron_core, megatron_core_dist, megatron_legacy, rugpts
from .model_io import (FORMAT, VOCAB_PARAMS, CheckpointError, _shard_specs, atomic_torch_save,
                       config_dict, is_own_checkpoint, load_full_state_dict,
                       merge_shards, read_own_config)

FORMATS = ("megatron_ru", "hf", "ru_gpts", "megatron_legacy", "megatron_core", "megatron_core_dist")
TARGETS = ("hf", FORMAT, "megatron_core")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MAX_SHARD_BYTES = 5 * 2**30


def detect_format(directory: Path) -> str:
    """One of FORMATS; CheckpointError for a missing, unknown or mixed directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if is_own_checkpoint(directory):
        return "megatron_ru"
    from ..model.lora import CONFIG_FILE, is_adapter_dir
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
        model = megatron_legacy.load_blob(torch_files[-1]).get("model")
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


def _read_hf(directory: Path, load: bool, hints: dict):
    cfg_path = directory / "config.json"
    raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    config = hf.restore_extra(hf.config_from_hf(raw, cfg_path), raw, cfg_path, hints.get("sparse_attention"))
    has_tok = any((directory / f).is_file() for f in hf.TOKENIZER_FILES)
    meta = {"format": "hf", "model": config.to_dict(), "tensor_model_parallel_size": 1,
            "tokenizer_dir": str(directory) if has_tok else None}
    saved_tok = (raw.get(hf.EXTRA_KEY) or {}).get("tokenizer") if isinstance(raw.get(hf.EXTRA_KEY), dict) else None
    if isinstance(saved_tok, dict):
        meta["tokenizer"] = saved_tok
    if not load:
        hf.safetensors_files(directory) if not (directory / "pytorch_model.bin").is_file() else None
        return config, None, meta
    where, get = hf.read_hf_weights(directory)
    return config, hf.from_hf(config, get, set(where), str(directory)), meta


def _read(directory: Path, tag: Optional[str], load: bool, hints: dict):
    fmt = detect_format(directory)
    if hints.get("sparse_attention") is not None and fmt not in ("ru_gpts", "hf"):
        raise CheckpointError(f"--sparse-config applies to ru-gpts and Hugging Face sources; {directory} "
                              f"is {fmt}, whose sparsity (if any) is part of the checkpoint")
    if fmt == "megatron_ru":
        config, meta = read_own_config(directory)
        meta = {**meta, "tokenizer_dir": str(directory / "tokenizer")
                if (directory / "tokenizer").is_dir() else None}
        full = load_full_state_dict(directory, tag)[1] if load else None
    elif fmt == "hf":
        config, full, meta = _read_hf(directory, load, hints)
    elif fmt == "ru_gpts":
        config, full, meta = rugpts.read(directory, tag, load=load, **hints)
    elif fmt == "megatron_core":
        config, full, meta = megatron_core.read_torch(directory, tag, load=load, **hints)
    elif fmt == "megatron_core_dist":
        config, full, meta = megatron_core_dist.read_dist(directory, tag, load=load, **hints)
    else:
        config, full, meta = megatron_legacy.read(directory, tag, load=load, **hints)
    if full is not None:
        check_shapes(config, full, directory)
    return config, full, meta


def read_any_config(directory: Path, **hints) -> tuple[ModelConfig, dict]:
    """(ModelConfig, meta) of a directory in any format (meta: format, model, TP, tokenizer_dir)."""
    config, _, meta = _read(Path(directory), None, False, hints)
    return config, meta


def load_any(directory: Path, tag: Optional[str] = None, **hints) -> tuple[ModelConfig, dict, dict]:
    """(ModelConfig, full tensors in our names with real vocabulary rows, meta)."""
    return _read(Path(directory), tag, True, hints)


def check_shapes(config: ModelConfig, full: dict, source) -> None:
    """Every parameter present with its full shape (vocabulary rows = real vocabulary)."""
    with torch.device("meta"):
        model = GPTModel(config, ParallelState.single(), initialize=False)
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for name in VOCAB_PARAMS:
        if name in expected:
            expected[name] = (config.vocab_size, *expected[name][1:])
    shape_of = getattr(full, "shape_of", lambda n: tuple(full[n].shape))  # lazy: no merge
    for name, shape in expected.items():
        if name not in full:
            raise CheckpointError(f"{source}: tensor {name} is missing")
        if tuple(shape_of(name)) != shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(shape_of(name))}, "
                                  f"the model config implies {shape}")
    extra = sorted(set(full) - set(expected))
    if extra:
        raise CheckpointError(f"{source}: unexpected tensors {extra[:5]}")


def load_zero3(directory: Path, tag: str, config: ModelConfig, tp: int) -> dict:
    """Full weights of our ZeRO-3 checkpoint, from DeepSpeed's fp32 partitions, one TP rank at
    a time (DeepSpeed's zero_to_fp32 handles one model-parallel rank per directory)."""
    from deepspeed.utils import zero_to_fp32

    tag_dir = directory / tag
    states = []
    for r in range(tp):
        files = sorted(tag_dir.glob(f"*zero_pp_rank_*_mp_rank_{r:02d}_*states.pt"))
        if not any(f.name.endswith("_optim_states.pt") for f in files):
            raise CheckpointError(f"{tag_dir}: ZeRO-3 checkpoint without the optimizer partitions "
                                  f"of TP rank {r} (*_mp_rank_{r:02d}_optim_states.pt): the weights "
                                  "cannot be rebuilt")
        with tempfile.TemporaryDirectory() as tmp:
            for f in files:
                os.symlink(f.resolve(), Path(tmp) / f.name)
            try:
                with open(os.devnull, "w") as quiet:
                    stdout, sys.stdout = sys.stdout, quiet
                    try:
                        state = zero_to_fp32._get_fp32_state_dict_from_zero_checkpoint(tmp, False)
                    finally:
                        sys.stdout = stdout
            except Exception as exc:
                raise CheckpointError(f"{tag_dir}: cannot rebuild the ZeRO-3 weights of TP rank "
                                      f"{r}: {exc}") from None
        # zero_to_fp32 returns lazy 'GatheredTensor's; .contiguous() materialises each
        states.append({k: (v if torch.is_tensor(v) else v.contiguous()).detach() for k, v in state.items()})
    return merge_shards(config, states, tag_dir)


# ---- writers --------------------------------------------------------------------------------
def _source_dtype(full: dict) -> torch.dtype:
    return next((t.dtype for t in full.values() if t.is_floating_point()), torch.float32)


def write_ours(dst: Path, config: ModelConfig, full: dict, tp: int, dtype: torch.dtype,
               tokenizer: Optional[dict], progress: Progress) -> None:
    """DST/config.json, DST/release/mp_rank_XX_model_states.pt (one rank in memory at a time)."""
    specs = _shard_specs(config, tp)
    padded = config.padded_vocab_size(tp)
    (dst / "release").mkdir()
    for r in range(tp):
        state = {}
        for name, spec in specs.items():
            t = full[name]
            if name in VOCAB_PARAMS:
                t = torch.cat([t.to(dtype), t.new_zeros(padded - t.shape[0], *t.shape[1:], dtype=dtype)])
            state[name] = _owned(shard(t, spec, r, tp), dtype)
            progress.update()
        atomic_torch_save({"module": state, "mp_world_size": tp},
                          dst / "release" / f"mp_rank_{r:02d}_model_states.pt")
        del state
    (dst / "config.json").write_text(json.dumps(config_dict(config, tp, tokenizer=tokenizer),
                                                indent=2, sort_keys=True) + "\n")
    (dst / "latest").write_text("release\n")


def _owned(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` as `dtype` in a storage of its own: torch.save writes whole storages, so a view into a
    memory-mapped file or a fused tensor must be copied; a tensor that owns its storage is not."""
    if t.dtype == dtype and t.is_contiguous() and t.storage_offset() == 0 and \
            t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return torch.empty(t.shape, dtype=dtype).copy_(t)


def _tokenizer_files(tok_dir: Optional[str]) -> list[Path]:
    if not tok_dir:
        return []
    return [Path(tok_dir) / f for f in hf.TOKENIZER_FILES if (Path(tok_dir) / f).is_file()]


def _chat_files(tok_dir: Optional[str]) -> list[Path]:
    """The chat template files beside a tokenizer (carried into our checkpoints' tokenizer/)."""
    from ..data.chat import CHAT_FILES
    return [Path(tok_dir) / f for f in CHAT_FILES if tok_dir and (Path(tok_dir) / f).is_file()]


def _chat_template(tok_dir: Optional[str]) -> Optional[str]:
    """The tokenizer directory's own chat template (Jinja source), or None."""
    from ..data.chat import own_template
    own = own_template(tok_dir)
    return own[0] if own else None


def _eod(files: list[Path], recorded: Optional[dict]) -> tuple[Optional[str], Optional[int]]:
    """(token, id) of the end-of-text token of any tokenizer type, as our tokenizers pick it
    (the eod_token recorded at training first)."""
    from ..data.tokenizers import TokenizerError, build_tokenizer
    names = {f.name: str(f) for f in files}
    wanted = (recorded or {}).get("eod_token")
    for eod_token in ([wanted] if wanted else []) + [None, "</s>", "<eos>", "<|endoftext|>"]:
        try:
            if "tokenizer.json" in names:
                tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=names["tokenizer.json"],
                                      eod_token=eod_token)
                return tok.tok.id_to_token(tok.eod), tok.eod
            if "vocab.json" in names and "merges.txt" in names:
                tok = build_tokenizer("GPT2BPETokenizer", vocab_file=names["vocab.json"],
                                      merge_file=names["merges.txt"], eod_token=eod_token)
                return tok.decoder[tok.eod] if hasattr(tok, "decoder") else \
                    {v: k for k, v in tok.encoder.items()}[tok.eod], tok.eod
            if "tokenizer.model" in names:
                tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=names["tokenizer.model"],
                                      eod_token=eod_token)
                return tok.sp.IdToPiece(tok.eod), tok.eod
        except (TokenizerError, KeyError, ImportError):
            continue
        return None, None
    return None, None


def write_hf(dst: Path, config: ModelConfig, full: dict, dtype: torch.dtype, tok_files: list[Path],
             progress: Progress, max_shard_bytes: int, tokenizer: Optional[dict] = None,
             chat_template: Optional[str] = None) -> None:
    if any(config.sparse_layers()):
        warnings.warn(f"layers {[i for i, s in enumerate(config.sparse_layers()) if s]} use "
                      "block-sparse attention; Hugging Face will run them dense, so its outputs "
                      "differ from ours on sequences longer than the sparse local window",
                      stacklevel=2)
    eod_token, eod_id = _eod(tok_files, tokenizer)
    (dst / "config.json").write_text(json.dumps(hf.config_to_hf(config, dtype, eod_id, tokenizer),
                                                indent=2) + "\n")
    (dst / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": eod_id, "eos_token_id": eod_id} if eod_id is not None else {}) + "\n")
    hf.write_hf_weights(dst, hf.to_hf(config, full), dtype, max_shard_bytes,
                        progress=lambda _name: progress.update())
    for f in tok_files:
        shutil.copyfile(f, dst / f.name)
    tok_cfg = hf.tokenizer_config((f.name for f in tok_files), eod_token, config.max_position_embeddings)
    if tok_cfg and chat_template:  # the model's chat template travels with it
        tok_cfg["chat_template"] = chat_template
    if tok_cfg:
        (dst / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
        if eod_token is not None:
            (dst / "special_tokens_map.json").write_text(json.dumps(
                {"bos_token": eod_token, "eos_token": eod_token, "unk_token": eod_token}, indent=2) + "\n")


def convert(src, dst, to: str, *, target_tp: Optional[int] = None, dtype: Optional[str] = None,
            tag: Optional[str] = None, overwrite: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES,
            quiet: bool = False, megatron_spec: str = "local", adapters: Optional[str] = None,
            **hints) -> Path:
    """Convert the checkpoint at `src` into `to` (one of TARGETS) at `dst`; returns dst.
    `adapters`: a LoRA adapter directory merged into the weights on the way (model/lora.py)."""
    src, dst = Path(src), Path(dst)
    if to not in TARGETS:
        raise CheckpointError(f"--to {to!r} is unknown; expected one of {', '.join(TARGETS)}")
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r} is unknown; expected {', '.join(DTYPES)}")
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst} already exists; choose a new --save directory")
    if src.resolve() == dst.resolve():
        raise CheckpointError("--load and --save name the same directory")
    if to == "hf" and target_tp not in (None, 1):
        raise CheckpointError("--target-tensor-parallel-size applies to --to megatron_ru / megatron_core")
    config, meta = read_any_config(src, **hints)
    tp = target_tp or 1
    try:
        config.validate_parallel(tp)
    except ConfigError as exc:
        raise CheckpointError(f"--target-tensor-parallel-size {tp}: {exc}") from None
    config, full, meta = load_any(src, tag, **hints)
    out_dtype = DTYPES[dtype] if dtype else _source_dtype(full)
    if adapters is not None:
        from ..model.lora import check_base_shape, merge_into, read_adapters
        lora_meta, lora_tensors = read_adapters(adapters)
        check_base_shape(lora_meta, config, adapters)
        full = merge_into(dict(full), lora_meta, lora_tensors, config)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp."))
    total = len(hf.key_map(config)) if to == "hf" else len(full) * tp
    sink = open(os.devnull, "w") if quiet else None
    progress = Progress(f"converting {meta['format']} → {to}", total=total, unit="tensors",
                        stream=sink)
    try:
        tok_files = _tokenizer_files(meta.get("tokenizer_dir"))
        chat_files = _chat_files(meta.get("tokenizer_dir")) if tok_files else []
        if to == "hf":
            write_hf(tmp, config, full, out_dtype, tok_files, progress, max_shard_bytes,
                     _tokenizer_entry(meta, tok_files) if tok_files else None,
                     chat_template=_chat_template(meta.get("tokenizer_dir")))
        elif to == "megatron_core":
            megatron_core.write_torch(tmp, config, full, tp, out_dtype, progress, megatron_spec)
            if tok_files:
                (tmp / "tokenizer").mkdir()
                for f in tok_files + chat_files:
                    shutil.copyfile(f, tmp / "tokenizer" / f.name)
        else:
            tokenizer = None
            if tok_files:
                (tmp / "tokenizer").mkdir()
                for f in tok_files + chat_files:
                    shutil.copyfile(f, tmp / "tokenizer" / f.name)
                tokenizer = _tokenizer_entry(meta, tok_files)
            write_ours(tmp, config, full, tp, out_dtype, tokenizer, progress)
        progress.close()
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        if sink is not None:
            sink.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _tokenizer_entry(meta: dict, files: list[Path]) -> dict:
    if isinstance(meta.get("tokenizer"), dict):  # ours, or an HF export of ours
        return meta["tokenizer"]
    names = {f.name for f in files}
    if {"vocab.json", "merges.txt"} <= names:
        return {"type": "GPT2BPETokenizer", "vocab_file": "tokenizer/vocab.json",
                "merge_file": "tokenizer/merges.txt"}
    if "tokenizer.json" in names:
        return {"type": "HuggingFaceTokenizer", "tokenizer_model": "tokenizer/tokenizer.json"}
    return {"type": "SentencePieceTokenizer", "tokenizer_model": "tokenizer/tokenizer.model"}


__all__ = ["FORMATS", "convert", "detect_format", "load_any", "load_zero3", "read_any_config"]
