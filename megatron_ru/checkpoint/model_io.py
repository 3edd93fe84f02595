"""Our checkpoint format (megatron_ru): read and write self-describing directories at any TP size.

Layout (the one DeepSpeed's `save_checkpoint` writes, plus our config.json):

    DIR/config.json                          model config, TP size, padded vocabulary
    DIR/latest                               name of the newest tag (written last)
    DIR/<tag>/mp_rank_XX_model_states.pt     {"module": this TP rank's state_dict, ...}

`load_own_state_dict` merges the TP shards into full tensors (by each parameter's ShardSpec) and
drops vocabulary padding; `shard_state_dict` re-shards them for the target TP size, so a
checkpoint written at TP=4 samples at TP=1 or TP=2 without a conversion step. This is the base
of checkpoint/: the readers of foreign formats import it, never the reverse; opening a directory
in any format is checkpoint/load.py's.
"""
from __future__ import annotations

import functools
import json
import os
import re
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError, ModelConfig
from ..model.gpt import GPTModel
from ..parallel.sharding import shard, unshard
from ..parallel.state import ParallelState
from ..errors import UsageError
from ..files import atomic_path, atomic_write_text
from .config_checks import check_bounds, check_layer_count
from . import pipeline_files, safe_pickle
from .safe_pickle import UnsafeCheckpointError

FORMAT = "megatron_ru"
VOCAB_PARAMS = ("embed.weight", "lm_head.weight")


class CheckpointError(UsageError):
    """A checkpoint directory is missing, incomplete or inconsistent; the message names the file."""


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save to `path` through a temporary sibling (megatron_ru/files.py)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def config_dict(config: ModelConfig, tp_size: int, **extra) -> dict:
    return {"format": FORMAT, "version": 1, "model": config.to_dict(),
            "tensor_model_parallel_size": tp_size,
            "padded_vocab_size": config.padded_vocab_size(tp_size), **extra}


def write_config(directory: Path, config: ModelConfig, tp_size: int, **extra) -> None:
    atomic_write_text(Path(directory) / "config.json",
                      json.dumps(config_dict(config, tp_size, **extra), indent=2, sort_keys=True) + "\n")


def is_own_checkpoint(directory: Path) -> bool:
    """Whether DIR/config.json is ours (a readable JSON whose "format" is megatron_ru)."""
    path = Path(directory) / "config.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def read_own_config(directory: Path) -> tuple[ModelConfig, dict]:
    """The model config and metadata of one of our checkpoint directories."""
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: not a megatron_ru checkpoint directory")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if meta.get("format") != FORMAT or "model" not in meta:
        raise CheckpointError(f"{path} does not describe a {FORMAT} model")
    try:
        config = ModelConfig.from_dict(meta["model"])
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    check_bounds(config, path)  # the weights' shapes are compared when they are read (LazyFullState)
    return config, meta


def latest_tag(directory: Path) -> str:
    path = Path(directory) / "latest"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: no complete checkpoint was saved in {directory}")
    return path.read_text(encoding="utf-8").strip()


def rank_files(directory: Path, tag: str, tp_size: int) -> list[Path]:
    tag_dir = Path(directory) / tag
    files = [tag_dir / f"mp_rank_{r:02d}_model_states.pt" for r in range(tp_size)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {tag_dir} is incomplete: missing {', '.join(missing)}")
    return files


def zero3_files(directory: Path, tag: str, tp_size: int) -> list[Path]:
    """ZeRO-3 model-state files of every TP rank (DeepSpeed writes no mp_rank_XX file then)."""
    tag_dir = Path(directory) / tag
    files = [sorted(tag_dir.glob(f"zero_pp_rank_*_mp_rank_{r:02d}_model_states.pt"))
             for r in range(tp_size)]
    return [f for rank in files for f in rank] if all(files) else []


def read_file(path: Path, *, trust: bool = False):
    """A torch.save file through the allow-list unpickler (checkpoint/safe_pickle.py; `trust`:
    plain torch.load); CheckpointError naming the file when it cannot be read."""
    try:
        return safe_pickle.load(path, trust=trust)
    except UnsafeCheckpointError:
        raise
    except Exception as exc:  # a truncated or foreign file: say which one
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def zero3_shapes(directory: Path, tag: str, tp_size: int, *, trust: bool = False) -> list[dict]:
    """Per TP rank {name: full shape} of a ZeRO-3 checkpoint, from the `param_shapes` (and
    `frozen_param_shapes`) DeepSpeed records in each rank's model-state file (its `module`
    holds empty placeholders); [] when a file does not record them."""
    out = []
    for r in range(tp_size):
        blob = read_file(Path(directory) / tag / f"zero_pp_rank_0_mp_rank_{r:02d}_model_states.pt", trust=trust)
        shapes = {}
        for group in blob.get("param_shapes") or []:
            shapes.update({k: tuple(v) for k, v in group.items()})
        shapes.update({k: tuple(v) for k, v in (blob.get("frozen_param_shapes") or {}).items()})
        if not shapes:
            return []
        out.append(shapes)
    return out


def model_files(directory: Path, tag: str, tp_size: int) -> list[Path]:
    """The per-rank model files of a checkpoint: mp_rank_XX files, or ZeRO-3's partitions."""
    return zero3_files(directory, tag, tp_size) or rank_files(directory, tag, tp_size)


def _meta_model(config: ModelConfig, tp_size: int) -> GPTModel:
    ps = ParallelState(world_size=tp_size, tensor_model_parallel_size=tp_size)
    with torch.device("meta"):
        return GPTModel(config, ps)


def shard_specs(config: ModelConfig, tp_size: int) -> dict:
    """Parameter name → ShardSpec at `tp_size` (from a model built on the meta device)."""
    return {n: getattr(p, "shard_spec", None) for n, p in _meta_model(config, tp_size).named_parameters()}


def _describe(config: ModelConfig) -> str:
    return (f"num_layers={config.num_layers}, hidden_size={config.hidden_size}, "
            f"vocab_size={config.vocab_size}")


def check_weights_match_config(config: ModelConfig, shapes: list, source, *,
                               vocab_rows: Optional[int] = None) -> None:
    """Per-TP-rank {name: shape} of a checkpoint against the model its config describes: every
    tensor present with the shape the config implies, and no weight the config has no place for
    (a truncated model would load silently). Vocabulary rows: any count for padded shards (the
    merge checks them), exactly `vocab_rows` when given (full tensors with the real vocabulary)."""
    model = _meta_model(config, len(shapes))
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if vocab_rows is not None:
        params.update({n: (vocab_rows, *params[n][1:]) for n in VOCAB_PARAMS if n in params})
    buffers = {n for n, _ in model.named_buffers()}
    for rank, rank_shapes in enumerate(shapes):
        for name, expected in params.items():
            got = rank_shapes.get(name)
            if got is None:
                raise CheckpointError(f"parameter {name} is missing from {source}")
            same = got[1:] == expected[1:] if name in VOCAB_PARAMS and vocab_rows is None else got == expected
            if not same:
                where = f" (TP rank {rank} of {len(shapes)})" if len(shapes) > 1 else ""
                raise CheckpointError(f"tensor {name}{where} in {source} has shape {tuple(got)}, its config "
                                      f"({_describe(config)}) implies {tuple(expected)}")
        extra = [n for n in rank_shapes if n not in params and n not in buffers]
        if extra:
            raise CheckpointError(f"tensor {extra[0]} {tuple(rank_shapes[extra[0]])} in {source} has no place "
                                  f"in the model its config describes ({_describe(config)}); "
                                  f"{len(extra)} such tensor(s): config.json and the weights disagree")


def load_own_state_dict(directory: Path, tag: Optional[str] = None, *,
                        trust: bool = False) -> tuple[ModelConfig, dict]:
    """Full (unsharded) tensors with real vocabulary rows only, and the model config, of one of
    our checkpoints (ZeRO-3 ones included); `trust`: unpickle any global (--trust-checkpoint)."""
    config, meta = read_own_config(directory)
    tag = tag or latest_tag(directory)
    tp = int(meta.get("tensor_model_parallel_size", 1))
    if zero3_files(directory, tag, tp) and not (Path(directory) / tag / "mp_rank_00_model_states.pt").is_file():
        return config, load_zero3(Path(directory), tag, config, tp, trust=trust)  # in the optimizer partitions
    if pipeline_files.is_pipeline(Path(directory) / tag):  # a PP run: DeepSpeed's layer files
        loaders = pipeline_files.loaders(Path(directory) / tag, tp, config.num_layers, trust=trust)
    else:
        loaders = [functools.partial(load_module, f, trust=trust) for f in rank_files(directory, tag, tp)]
    return config, LazyFullState(config, loaders, Path(directory) / tag)


def load_zero3(directory: Path, tag: str, config: ModelConfig, tp: int, *, trust: bool = False) -> dict:
    """Full weights of our ZeRO-3 checkpoint, from DeepSpeed's fp32 partitions, one TP rank at
    a time (DeepSpeed's zero_to_fp32 handles one model-parallel rank per directory; it unpickles
    them itself, so they are scanned against the allow-list first)."""
    from deepspeed.utils import zero_to_fp32

    tag_dir = directory / tag
    states = []
    for r in range(tp):
        files = sorted(tag_dir.glob(f"*zero_pp_rank_*_mp_rank_{r:02d}_*states.pt"))
        if not any(f.name.endswith("_optim_states.pt") for f in files):
            raise CheckpointError(f"{tag_dir}: ZeRO-3 checkpoint without the optimizer partitions "
                                  f"of TP rank {r} (*_mp_rank_{r:02d}_optim_states.pt): the weights "
                                  "cannot be rebuilt")
        safe_pickle.check_files(files, trust=trust)
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


def merge_shards(config: ModelConfig, states: list, source) -> dict:
    """Full tensors (real vocabulary rows) from the per-TP-rank state dicts, in our names."""
    return dict(LazyFullState(config, [lambda s=s: s for s in states], source, own_memory=False))


def rename_key(name: str, renames) -> Optional[str]:
    """`name` after the first (pattern, replacement) of `renames` that matches, else None."""
    for pattern, repl in renames:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return None


def load_module(path: Path, *, trust: bool = False) -> dict:
    """The `module` state dict of one DeepSpeed model-states file (memory-mapped)."""
    blob = read_file(path, trust=trust)
    state = blob.get("module") if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        keys = sorted(blob)[:8] if isinstance(blob, dict) else type(blob).__name__
        raise CheckpointError(f"{path} has no 'module' state dict (keys: {keys})")
    return state


class LazyFullState(Mapping):
    """Full tensors (real vocabulary rows) merged from per-TP-rank state dicts when a tensor is
    asked for. `loaders` give each rank's state dict; for checkpoint files they memory-map it
    only while one tensor is merged, so a conversion holds its output plus one tensor, never the
    source and a full copy at once. Names, shard presence and shapes are checked up front."""

    def __init__(self, config: ModelConfig, loaders: list, source, own_memory: bool = True) -> None:
        self.config, self.loaders, self.source = config, list(loaders), source
        self.own_memory = own_memory
        shapes = [{k: tuple(v.shape) for k, v in load().items()} for load in self.loaders]
        # the layer count first: a config may claim 10^6 layers the model below would build
        check_layer_count(config.num_layers, shapes[0], r"blocks\.(\d+)\.", source, fewer_ok=True)
        self.specs = shard_specs(config, len(self.loaders))
        check_weights_match_config(config, shapes, source)
        self.shapes = {}
        for name, spec in self.specs.items():
            parts = [s.get(name) for s in shapes]
            if any(p is None for p in parts):
                raise CheckpointError(f"parameter {name} is missing from {source}")
            shape = list(parts[0])
            if spec is not None and len(parts) > 1:
                shape[spec.dim] = sum(p[spec.dim] for p in parts)
            if name in VOCAB_PARAMS:
                if shape[0] < config.vocab_size:
                    raise CheckpointError(f"tensor {name} in {source} has {shape[0]} rows, fewer "
                                          f"than the vocabulary size {config.vocab_size}")
                shape[0] = config.vocab_size
            self.shapes[name] = tuple(shape)

    def __iter__(self):
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def shape_of(self, name: str) -> tuple:
        return self.shapes[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.specs:
            raise KeyError(name)
        parts = [load()[name] for load in self.loaders]
        tensor = unshard(parts, self.specs[name])
        if name in VOCAB_PARAMS:
            tensor = tensor[: self.config.vocab_size]
        copied = len(parts) > 1 and self.specs[name] is not None  # unshard concatenated
        # own the memory: a view would keep the whole memory-mapped file resident
        return tensor.clone() if self.own_memory and not copied else tensor


def shard_state_dict(full: dict, model: GPTModel) -> dict:
    """This rank's state dict for `model` from full tensors (re-padding the vocabulary)."""
    ps, out = model.ps, {}
    for name, param in model.named_parameters():
        if name not in full:
            raise CheckpointError(f"parameter {name} is missing from the checkpoint")
        tensor = full[name]
        if name in VOCAB_PARAMS:
            pad = model.padded_vocab_size - tensor.shape[0]
            tensor = torch.cat([tensor, tensor.new_zeros(pad, *tensor.shape[1:])])
        local = shard(tensor, getattr(param, "shard_spec", None), ps.tp_rank, ps.tp_size)
        if local.shape != param.shape:
            raise CheckpointError(f"tensor {name}: checkpoint gives {tuple(local.shape)} for this "
                                  f"rank, the model expects {tuple(param.shape)}")
        out[name] = local
    return out


def model_from_state(config: ModelConfig, full: dict, parallel_state: Optional[ParallelState] = None, *,
                     dtype=None, device=None, **config_overrides) -> GPTModel:
    """A GPTModel for `parallel_state` (any TP size) holding the full tensors `full`."""
    if config_overrides:
        config = ModelConfig.from_dict({**config.to_dict(), **config_overrides})
    ps = parallel_state or ParallelState.single()
    model = GPTModel(config, ps, initialize=False, device=device or ps.device, dtype=dtype)
    model.load_state_dict(shard_state_dict(full, model), strict=True)
    return model


def save_model(directory, model: GPTModel, *, tag: str = "release", **extra) -> Path:
    """Write `model` as a checkpoint (rank 0 of each TP group writes its shard; `latest` last).
    Collective when torch.distributed is initialised: call it on every rank."""
    directory, ps = Path(directory), model.ps
    tag_dir = directory / tag
    if ps.rank == 0:
        tag_dir.mkdir(parents=True, exist_ok=True)
    ps.barrier()
    if ps.dp_rank == 0 and ps.cp_rank == 0:  # CP ranks hold the same weights
        _write_rank(tag_dir, ps.tp_rank, ps.tp_size, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    ps.barrier()
    if ps.rank == 0:
        _write_meta(directory, model.config, ps.tp_size, tag, **extra)
    ps.barrier()
    return tag_dir


def save_state_dict(directory, config: ModelConfig, full: dict, tp_size: int, dtype: torch.dtype, *,
                    tag: str = "release", on_tensor=None, **extra) -> Path:
    """Write full tensors (real vocabulary rows, our names) as a checkpoint at `tp_size`, one TP
    rank in memory at a time; `on_tensor()` is called after each tensor (progress). One process."""
    directory = Path(directory)
    specs, padded = shard_specs(config, tp_size), config.padded_vocab_size(tp_size)
    tag_dir = directory / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    for r in range(tp_size):
        state = {}
        for name, spec in specs.items():
            t = full[name]
            if name in VOCAB_PARAMS:
                t = torch.cat([t.to(dtype), t.new_zeros(padded - t.shape[0], *t.shape[1:], dtype=dtype)])
            state[name] = _owned(shard(t, spec, r, tp_size), dtype)
            if on_tensor is not None:
                on_tensor()
        _write_rank(tag_dir, r, tp_size, state)
        del state
    _write_meta(directory, config, tp_size, tag, **extra)
    return tag_dir


def _write_rank(tag_dir: Path, tp_rank: int, tp_size: int, state: dict) -> None:
    atomic_torch_save({"module": state, "mp_world_size": tp_size}, tag_dir / f"mp_rank_{tp_rank:02d}_model_states.pt")


def _write_meta(directory: Path, config: ModelConfig, tp_size: int, tag: str, **extra) -> None:
    """config.json, then `latest` (last: it marks the checkpoint complete)."""
    write_config(directory, config, tp_size, **extra)
    atomic_write_text(directory / "latest", tag + "\n")


def _owned(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` as `dtype` in a storage of its own: torch.save writes whole storages, so a view into a
    memory-mapped file or a fused tensor must be copied; a tensor that owns its storage is not."""
    if t.dtype == dtype and t.is_contiguous() and t.storage_offset() == 0 and \
            t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return torch.empty(t.shape, dtype=dtype).copy_(t)
