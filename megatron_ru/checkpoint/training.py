"""Training checkpoints: DeepSpeed `save_checkpoint` directories plus our client state.

Client state = iteration, consumed samples (train and valid), and every RNG state, which with
DeepSpeed's module / optimizer / scheduler / loss-scaler state is enough to resume bit-exactly.
Writes are atomic at the directory level: DeepSpeed writes `<tag>.tmp/`, which is renamed to
`<tag>/` before `latest` is replaced, so a run killed mid-save leaves the previous checkpoint
as `latest`. config.json (model, TP size, vocabulary padding, tokenizer) makes the directory
loadable by generate.py and converters without the original flags.
"""
from __future__ import annotations

import os
import random
import shutil
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from .. import runtime
from ..config import ConfigError, ModelConfig
from ..parallel.state import ParallelState
from ..files import atomic_path, atomic_write_text
from . import pipeline_files, safe_pickle, universal
from . import save_dir
from .load import read_config
from .model_io import (CheckpointError, check_weights_match_config, latest_tag, load_module, model_files,
                       write_config, zero3_files, zero3_shapes)

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
RUNTIME_FIELDS = {"hidden_dropout", "attention_dropout", "checkpoint_activations", "sparse_impl",
                  "sequence_parallel"}


def rng_state(ps: ParallelState) -> dict:
    """This rank's RNG streams. Collective at CP > 1: CP ranks draw different streams but only CP
    rank 0 writes the checkpoint, so it carries every CP rank's streams."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "tracker": ps.rng.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if ps.cp_size > 1:
        states = [None] * ps.cp_size
        dist.all_gather_object(states, state, group=ps.cp_group)
        return {"context_parallel": states}
    return state


def set_rng_state(state: dict, ps: ParallelState) -> None:
    if "context_parallel" in state:  # saved at CP > 1: this CP rank's (rank 0's at another CP)
        states = state["context_parallel"]
        state = states[ps.cp_rank] if len(states) == ps.cp_size else states[0]
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    ps.rng.set_state(state["tracker"])


def check_compatible(directory: str, config: ModelConfig, tp_size: int, *, weights_only: bool,
                     tag: Optional[str] = None, trust: bool = False, pp_size: int = 1) -> str:
    """Raise naming every differing field when the checkpoint's model is not this run's, or when
    a file DeepSpeed will unpickle names a global outside the allow-list (`trust`: no scan)."""
    saved, meta = read_config(Path(directory), trust=trust)
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
    src_pp = int(meta.get("pipeline_model_parallel_size", 1))
    tag = tag or latest_tag(Path(directory))
    tag_dir = Path(directory) / tag
    if not weights_only and src_pp != pp_size and (
            min(src_pp, pp_size) == 1 or universal.saved_dp_size(tag_dir) is None):
        raise ConfigError(f"resuming {directory} (saved at PP={src_pp}) at PP={pp_size}: the "
                          "training state moves only between pipeline sizes > 1 saved with ZeRO-1 "
                          "(via a DeepSpeed universal checkpoint); use --finetune to load the "
                          "weights at this layout")
    if pipeline_files.is_pipeline(tag_dir):  # a PP run: weights in DeepSpeed's layer files
        model = sorted(pipeline_files.layer_files(tag_dir).values())
        states = [pipeline_files.rank_state(tag_dir, r, saved.num_layers, trust=trust)
                  for r in range(src_tp)]
        check_weights_match_config(saved, [{k: tuple(v.shape) for k, v in st.items()} for st in states],
                                   tag_dir)
        for f in sorted(set(model) | (set(tag_dir.glob("*.pt")) if not weights_only else set())):
            if not zipfile.is_zipfile(f):
                raise CheckpointError(f"{f} is corrupted or truncated (not a readable torch archive)")
        if not weights_only:
            safe_pickle.check_tree(tag_dir, trust=trust)
        return tag
    model = model_files(Path(directory), tag, src_tp)
    files = set(model)
    if not weights_only:  # resuming reads the optimizer shards too
        files |= set((Path(directory) / tag).glob("*.pt"))
    for f in sorted(files):
        if not zipfile.is_zipfile(f):  # torch.save writes a zip archive; truncation breaks it
            raise CheckpointError(f"{f} is corrupted or truncated (not a readable torch archive)")
    if not weights_only:  # DeepSpeed unpickles them itself: their globals are checked first
        safe_pickle.check_tree(Path(directory) / tag, trust=trust)
    if not zero3_files(Path(directory), tag, src_tp):  # weights vs config.json, named and shaped
        check_weights_match_config(saved, [{k: tuple(v.shape) for k, v in load_module(f, trust=trust).items()}
                                           for f in model], Path(directory) / tag)
    else:  # ZeRO-3: the shapes DeepSpeed recorded for its partitioned parameters
        shapes = zero3_shapes(Path(directory), tag, src_tp, trust=trust)
        if shapes:
            check_weights_match_config(saved, shapes, Path(directory) / tag)
    return tag


def _copy_tokenizer(root: Path, tokenizer_files: dict) -> None:
    """The run's tokenizer files under canonical names, plus the chat template files beside
    them (tokenizer_config.json, chat_template.jinja), so samplers and the server find the
    model's chat template in the checkpoint."""
    from ..data.chat_templates import CHAT_FILES
    tok_dir = root / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    copies = []
    for key, src in tokenizer_files.items():
        if key in CANONICAL:
            copies.append((Path(src), tok_dir / canonical_name(key, src)))  # loaders find them alone
    sources = {Path(src).parent for src, _ in copies}
    copies += [(d / name, tok_dir / name) for d in sorted(sources) for name in CHAT_FILES
               if (d / name).is_file()]
    if tokenizer_files.get("chat_template"):  # the template the SFT data was rendered with wins
        copies.append((Path(tokenizer_files["chat_template"]), tok_dir / "chat_template.jinja"))
    for src, dst in copies:
        if dst.exists() and os.path.samefile(src, dst):  # --vocab-file DIR/tokenizer/vocab.json
            continue
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
    _sentencepiece_json(tok_dir)


def _sentencepiece_json(tok_dir: Path) -> None:
    """A SentencePiece model gets its exact tokenizer.json beside it, so a tokenizer_config.json copied
    from the tokenizer's folder never names a file the checkpoint lacks; a model with no exact form
    keeps no tokenizer_config.json that expects one."""
    import json

    from ..data.hf_tokenizer_json import SentencePieceExportError, sentencepiece_tokenizer_json
    model, target = tok_dir / "tokenizer.model", tok_dir / "tokenizer.json"
    if not model.is_file() or target.is_file():
        return
    try:
        body = sentencepiece_tokenizer_json(model)
    except SentencePieceExportError:
        config = tok_dir / "tokenizer_config.json"
        if config.is_file():
            data = json.loads(config.read_text(encoding="utf-8"))
            if data.pop("tokenizer_class", None) == "PreTrainedTokenizerFast":
                with atomic_path(config) as tmp:
                    Path(tmp).write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
        return
    with atomic_path(target) as tmp:
        Path(tmp).write_text(json.dumps(body, ensure_ascii=False), encoding="utf-8")


class _HeldWrites:
    """DeepSpeed's checkpoint engine with the first write error of this rank held instead of
    raised (later writes are skipped), so every rank still reaches DeepSpeed's closing barrier
    and the ranks then agree on the save's outcome. Its makedirs error is held too (DeepSpeed
    would log and swallow it, and torch then reports a missing parent directory)."""

    def __init__(self, engine) -> None:
        self.target = getattr(engine, "checkpoint_engine", None)
        self.error: Optional[BaseException] = None

    def _held(self, write):
        def call(*args, **kwargs):
            if self.error is not None:
                return None
            try:
                return write(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - held, then agreed by every rank
                self.error = exc
                return None
        return call

    def __enter__(self) -> "_HeldWrites":
        if self.target is not None:
            for name in ("save", "makedirs"):
                setattr(self.target, name, self._held(getattr(self.target, name)))
        return self

    def __exit__(self, *exc) -> None:
        if self.target is not None:
            for name in ("save", "makedirs"):
                vars(self.target).pop(name, None)


def save_training_checkpoint(engine, directory: str, iteration: int, client_state: dict,
                             config: ModelConfig, ps: ParallelState,
                             tokenizer_files: Optional[dict] = None,
                             needed_bytes: Optional[int] = None, trainable_only: bool = False,
                             extra_config: Optional[dict] = None) -> Path:
    """Collective: every rank calls it. Three phases (rank 0 prepares, every rank writes through
    DeepSpeed, rank 0 renames and writes `latest`), each ending in an agreement, so a failure on
    any rank stops every rank together with one line: a full disk or a directory that stopped
    accepting files is named as such (`save_dir.save_failure`). On any failure the partial
    `<tag>.tmp` is removed and the previous checkpoint stays `latest`.
    `trainable_only` (a LoRA run): frozen parameters are left out and no config.json is written
    (the directory is an adapter directory pointing at its base, checkpoint/lora_files.py).
    `extra_config`: more keys for config.json (the vocab_adaptation record, training/train_only.py)."""
    root = Path(directory)
    tag = f"iter_{iteration:07d}"
    tmp, final = root / f"{tag}.tmp", root / tag

    def phase(work) -> None:
        error = None
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - agreed below
            error = save_dir.save_failure(exc, root, tag, needed_bytes)
        runtime.agree(ps, error)

    def prepare() -> None:
        if ps.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a killed save
            if tokenizer_files:
                _copy_tokenizer(root, tokenizer_files)

    def write() -> None:
        with _HeldWrites(engine) as held:
            try:
                runtime.fault_point("save", iteration)  # fails like a write: held, then agreed
            except Exception as exc:  # noqa: BLE001
                held.error = exc
            engine.save_checkpoint(str(root), tag=tmp.name, client_state=client_state,
                                   save_latest=False, exclude_frozen_parameters=trainable_only)
        if held.error is not None:
            raise held.error

    def commit() -> None:
        if ps.rank != 0:
            return
        tokenizer = None
        if tokenizer_files:
            tokenizer = {k: (f"tokenizer/{canonical_name(k, v)}" if k in CANONICAL else v)
                         for k, v in tokenizer_files.items() if k != "chat_template"}
        runtime.fault_point("save_config", iteration)
        if not trainable_only:
            write_config(root, config, ps.tp_size, iteration=iteration, tokenizer=tokenizer,
                         **({"pipeline_model_parallel_size": ps.pp_size} if ps.pp_size > 1 else {}),
                         **(extra_config or {}))
        old = root / f"{tag}.old"
        if final.exists():  # the same tag saved again (a rollback records its skipped window)
            final.rename(old)
        try:
            tmp.rename(final)
            atomic_write_text(root / "latest", tag + "\n")
        except BaseException:
            if final.exists() and not tmp.exists():
                final.rename(tmp)  # removed below
            if old.exists():
                old.rename(final)
            raise
        shutil.rmtree(old, ignore_errors=True)

    try:
        for work in (prepare, write, commit):
            phase(work)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_training_checkpoint(engine, directory: str, *, load_optimizer: bool,
                             tag: Optional[str] = None, strict: bool = True, trust: bool = False) -> dict:
    """Restore module, optimizer, scheduler, loss scaler; returns our client state. `strict`
    False: a LoRA run's checkpoint holds the adapters only (the base is loaded before). DeepSpeed
    unpickles the files itself: each is scanned against the allow-list first (`trust`: not)."""
    tag = tag or latest_tag(Path(directory))
    safe_pickle.check_tree(Path(directory) / tag, trust=trust)
    runtime.fault_point("load")
    path, client = engine.load_checkpoint(directory, tag=tag, load_optimizer_states=load_optimizer,
                                          load_lr_scheduler_states=load_optimizer,
                                          load_module_strict=strict)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {Path(directory) / tag}")
    if load_optimizer:  # DeepSpeed's ZeRO-3 universal loader: shared step, first group's settings
        universal.repair_zero3_load(engine, Path(directory) / tag, trust=trust)
    return client or {}
