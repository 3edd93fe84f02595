"""Checkpoint conversion: detect a directory's format, read it as full tensors, write ours (any TP) or HF.

Sources: every format checkpoint/load.py opens (its FORMATS). Writers: ours (any TP,
model_io.save_state_dict), HF, and Megatron-Core `torch` (any TP). Readers memory-map their files, so a
conversion holds the source once (as file pages) plus what it is writing: HF output is written
tensor by tensor, our output one TP rank at a time. Output goes to a temporary sibling directory
that is renamed to DST only when complete: a failure leaves nothing at DST.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError, ModelConfig
from ..data.progress import Progress
from ..files import atomic_directory
from ..model.lora import merge_into
from . import hf, megatron_core
from .load import load_any, read_any_config
from .lora_files import check_base_shape, read_adapters
from .model_io import FORMAT, CheckpointError, save_state_dict

TARGETS = ("hf", FORMAT, "megatron_core")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MAX_SHARD_BYTES = 5 * 2**30


# ---- writers --------------------------------------------------------------------------------
def _source_dtype(full: dict) -> torch.dtype:
    return next((t.dtype for t in full.values() if t.is_floating_point()), torch.float32)


def _tokenizer_files(tok_dir: Optional[str]) -> list[Path]:
    if not tok_dir:
        return []
    return [Path(tok_dir) / f for f in hf.TOKENIZER_FILES if (Path(tok_dir) / f).is_file()]


def _chat_files(tok_dir: Optional[str]) -> list[Path]:
    """The chat template files beside a tokenizer (carried into our checkpoints' tokenizer/)."""
    from ..data.chat_templates import CHAT_FILES
    return [Path(tok_dir) / f for f in CHAT_FILES if tok_dir and (Path(tok_dir) / f).is_file()]


def _chat_template(tok_dir: Optional[str]) -> Optional[str]:
    """The tokenizer directory's own chat template (Jinja source), or None."""
    from ..data.chat_templates import own_template
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
    tok_cfg = _hf_tokenizer(dst, tok_files, eod_token, config.max_position_embeddings)
    if tok_cfg and chat_template:  # the model's chat template travels with it
        tok_cfg["chat_template"] = chat_template
    if tok_cfg:
        (dst / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
        special = {k: tok_cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in tok_cfg}
        if special:
            (dst / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def _hf_tokenizer(dst: Path, tok_files: list[Path], eod_token: Optional[str], max_length: int) -> dict:
    """Write DST/tokenizer.json when the tokenizer has none (GPT-2 BPE, SentencePiece BPE or Unigram),
    so AutoTokenizer gives our ids with `tokenizers` alone; returns the tokenizer_config.json content.
    A SentencePiece model with no exact tokenizer.json form is refused in one line."""
    from ..data import hf_tokenizer_json as tj
    names = {f.name: f for f in tok_files}
    if "tokenizer.json" in names:
        if "tokenizer.model" in names:  # beside a SentencePiece model: its special tokens
            return tj.sentencepiece_tokenizer_config(names["tokenizer.model"], max_length)
        return hf.tokenizer_config(names, eod_token, max_length)
    if "tokenizer.model" in names:
        try:
            body = tj.sentencepiece_tokenizer_json(names["tokenizer.model"])
        except tj.SentencePieceExportError as exc:
            raise CheckpointError(f"--to hf: {exc}") from None
        (dst / "tokenizer.json").write_text(json.dumps(body, ensure_ascii=False) + "\n")
        return tj.sentencepiece_tokenizer_config(names["tokenizer.model"], max_length)
    if "vocab.json" in names and "merges.txt" in names:
        from ..data.tokenizers import load_vocab_and_merges
        vocab, merges = load_vocab_and_merges(names["vocab.json"], names["merges.txt"])
        specials = [eod_token] if eod_token is not None else []
        (dst / "tokenizer.json").write_text(json.dumps(tj.tokenizer_json(vocab, merges, specials),
                                                       ensure_ascii=False) + "\n")
        return hf.tokenizer_config(["tokenizer.json"], eod_token, max_length)
    return hf.tokenizer_config(names, eod_token, max_length)


def convert(src, dst, to: str, *, target_tp: Optional[int] = None, target_pp: int = 1,
            dtype: Optional[str] = None,
            tag: Optional[str] = None, overwrite: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES,
            quiet: bool = False, megatron_spec: str = "local", adapters: Optional[str] = None,
            trust: bool = False, progress: bool = False, **hints) -> Path:
    """Convert the checkpoint at `src` into `to` (one of TARGETS) at `dst`; returns dst.
    `adapters`: a LoRA adapter directory merged into the weights on the way (checkpoint/lora_files.py);
    `trust`: the source's pickles may name any global (--trust-checkpoint, checkpoint/safe_pickle.py);
    `progress`: a bar for the adapter merge (the conversion's own bar shows unless `quiet`)."""
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
    if target_pp != 1 and to != "megatron_core":
        raise CheckpointError("--target-pipeline-parallel-size applies to --to megatron_core (our own "
                              "checkpoints open at any pipeline size)")
    config, meta = read_any_config(src, trust=trust, **hints)
    tp = target_tp or 1
    try:
        config.validate_parallel(tp)
    except ConfigError as exc:
        raise CheckpointError(f"--target-tensor-parallel-size {tp}: {exc}") from None
    config, full, meta = load_any(src, tag, trust=trust, **hints)
    out_dtype = DTYPES[dtype] if dtype else _source_dtype(full)
    if adapters is not None:
        lora_meta, lora_tensors = read_adapters(adapters)
        check_base_shape(lora_meta, config, adapters)
        pairs = sum(1 for k in lora_tensors if k.endswith(".lora.A") or k == "lora_head.A")
        bar = Progress(f"merging adapters {adapters}", total=pairs, unit="tensors",
                       enabled=progress and not quiet)
        full = merge_into(dict(full), lora_meta, lora_tensors, config, on_tensor=bar.update)
        bar.close()
    dst.parent.mkdir(parents=True, exist_ok=True)
    total = len(hf.key_map(config)) if to == "hf" else len(full) * tp
    sink = open(os.devnull, "w") if quiet else None
    progress = Progress(f"converting {meta['format']} → {to}", total=total, unit="tensors",
                        stream=sink)
    try:
        with atomic_directory(dst) as tmp:
            _write(tmp, to, config, full, tp, out_dtype, meta, progress, max_shard_bytes, megatron_spec, target_pp)
            progress.close()
    finally:
        if sink is not None:
            sink.close()
    return dst


def _write(tmp: Path, to: str, config: ModelConfig, full: dict, tp: int, out_dtype: torch.dtype, meta: dict,
           progress: Progress, max_shard_bytes: int, megatron_spec: str, pp: int = 1) -> None:
    """Fill the temporary output directory `tmp` in the format `to`."""
    tok_files = _tokenizer_files(meta.get("tokenizer_dir"))
    if to == "hf":
        write_hf(tmp, config, full, out_dtype, tok_files, progress, max_shard_bytes,
                 _tokenizer_entry(meta, tok_files) if tok_files else None,
                 chat_template=_chat_template(meta.get("tokenizer_dir")))
        return
    if tok_files:  # ours and Megatron-Core: DST/tokenizer/ with the chat template files
        (tmp / "tokenizer").mkdir()
        for f in tok_files + _chat_files(meta.get("tokenizer_dir")):
            shutil.copyfile(f, tmp / "tokenizer" / f.name)
    if to == "megatron_core":
        megatron_core.write_torch(tmp, config, full, tp, out_dtype, progress, megatron_spec, pp=pp)
    else:
        tokenizer = _tokenizer_entry(meta, tok_files) if tok_files else None
        save_state_dict(tmp, config, full, tp, out_dtype, on_tensor=progress.update, tokenizer=tokenizer)

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


__all__ = ["DTYPES", "TARGETS", "convert", "write_hf"]
