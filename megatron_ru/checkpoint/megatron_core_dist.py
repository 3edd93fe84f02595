"""Megatron-Core `--ckpt-format torch_dist` checkpoints, read without Megatron installed.

A PyTorch Distributed Checkpoint directory: `.metadata`, `__R_I.distcp`, `metadata.json`, and the
common state (`args`, ...) in `common.pt` or, in current Megatron-LM, as the object
`common_state/shard_0_1` inside the .distcp files. Tensors are global under their ShardedTensor
keys: per-layer tensors stacked along a leading layer axis (`decoder.layers.self_attention.
linear_qkv.weight` is (L, ...)), TP shards concatenated (so `linear_qkv` rows are the query-group
layout over all heads and SwiGLU `linear_fc1` is [all gate; all up], our layout). The metadata and
objects are unpickled through the allow-list (safe_pickle.py: stand-ins for Megatron classes,
torch's DCP metadata types, nothing else); tensors are read with
`torch.distributed.checkpoint.load(..., no_dist=True)`. Names map as in megatron_core.py.
"""
from __future__ import annotations

import io
import math
import pickle
import re
import warnings
from pathlib import Path
from typing import Optional

import torch

from .megatron_core import LAYER, SKIP, args_dict, check_model_type, make_config, rename
from .megatron_legacy import fix_qkv, iteration_dir, load_blob
from .model_io import CheckpointError, merge_shards
from .safe_pickle import SafeUnpickler, StandIn, UnsafeCheckpointError, load as safe_load, unpickle


class _MetadataStub(StandIn):
    """Stands in for Megatron's subclasses of torch's DCP Metadata."""


class _DCPUnpickler(SafeUnpickler):
    def stand_in(self, module, name):
        return _MetadataStub if name.endswith("Metadata") else StandIn


def _dcp_types() -> dict:
    """The classes a DCP `.metadata` pickle names (torch's dataclasses, a path), beyond the allow-list."""
    import pathlib
    from torch.distributed.checkpoint import filesystem, metadata, planner
    names = [(metadata, n) for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                     "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                     "StorageMeta", "_MEM_FORMAT_ENCODING")] + [(filesystem, "_StorageInfo")]
    names += [(planner, n) for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
                                     "LoadPlan", "ReadItem", "LoadItemType")]  # Megatron's planner_data
    out = {f"{m.__name__}.{n}": getattr(m, n) for m, n in names if hasattr(m, n)}
    out.update({f"pathlib.{n}": getattr(pathlib, n) for n in ("PosixPath", "PurePosixPath")})
    return out


def dist_dir(directory: Path, tag: Optional[str]) -> Path:
    """The iteration directory holding `.metadata` (DIR itself when it is one)."""
    if (directory / ".metadata").is_file() or any(directory.glob("*.distcp")):
        it_dir = directory
    else:
        it_dir = iteration_dir(directory, tag)
    if not (it_dir / ".metadata").is_file():
        raise CheckpointError(f"{it_dir / '.metadata'} is missing: the torch_dist checkpoint is "
                              "incomplete (no PyTorch Distributed Checkpoint metadata)")
    return it_dir


def _metadata(it_dir: Path, *, trust: bool = False):
    from torch.distributed.checkpoint.metadata import Metadata
    path = it_dir / ".metadata"
    try:
        with open(path, "rb") as f:
            raw = unpickle(f, path, trust=trust, unpickler=_DCPUnpickler, extra=_dcp_types())
    except UnsafeCheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if isinstance(raw, Metadata):
        return raw
    state = raw.__dict__.get("state", raw.__dict__)
    if isinstance(state, tuple):  # (dict, slots) from dataclass pickling
        state = {k: v for part in state if isinstance(part, dict) for k, v in part.items()}
    if not isinstance(state, dict) or "state_dict_metadata" not in state:
        raise CheckpointError(f"{path} is not PyTorch Distributed Checkpoint metadata")
    return Metadata(state_dict_metadata=state["state_dict_metadata"],
                    planner_data=state.get("planner_data"), storage_data=state.get("storage_data"),
                    storage_meta=state.get("storage_meta"), version=state.get("version"))


def _dcp_load(it_dir: Path, metadata, wanted: dict) -> dict:
    """dcp.load of `wanted` (name → empty tensor, or None for raw bytes) without a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class Reader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            return metadata

    raw = {}

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):  # keep raw bytes: they may pickle Megatron classes
            raw[read_item.dest_index.fqn] = value.read()

    from torch.distributed.checkpoint.api import CheckpointException

    check_storage(it_dir, metadata, wanted)
    state = {k: (v if v is not None else io.BytesIO()) for k, v in wanted.items()}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=Reader(str(it_dir)), planner=Planner(), no_dist=True)
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        raise CheckpointError(f"cannot read the torch_dist checkpoint {it_dir}: {_first_failure(exc)}") from None
    return {**state, **raw}


def _first_failure(exc: BaseException) -> str:
    """One line for an error of dcp.load: the first rank's own exception, not its traceback."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        exc = next(iter(failures.values()))[0]
    text = " ".join(str(exc).split()).split(". ")[0][:300] or type(exc).__name__
    if isinstance(exc, pickle.UnpicklingError):  # torch.load of a stored item's bytes
        return f"a stored item is corrupt ({type(exc).__name__}: {text})"
    return f"{type(exc).__name__}: {text}"


def check_storage(it_dir: Path, metadata, wanted: dict) -> None:
    """Before anything is allocated: every chunk of every wanted item is stored, in a file that
    exists and holds its byte range, with at least the chunk's bytes (tensors), and the chunks of
    each tensor tile its size. A lying `.metadata` cannot make us allocate more than the files hold."""
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata
    storage = metadata.storage_data if isinstance(metadata.storage_data, dict) else {}
    by_fqn = {}
    for index, info in storage.items():
        by_fqn.setdefault(getattr(index, "fqn", None), []).append((index, info))
    sizes = {}
    for key in wanted:
        entry = metadata.state_dict_metadata[key]
        if isinstance(entry, TensorStorageMetadata):
            _check_chunks(it_dir, key, entry)
            itemsize = torch.empty((), dtype=entry.properties.dtype).element_size()
            needs = {tuple(c.offsets): math.prod(c.sizes) * itemsize for c in entry.chunks}
            places = [(storage.get(MetadataIndex(key, c.offsets)), needs[tuple(c.offsets)]) for c in entry.chunks]
        else:
            places = [(info, 0) for _, info in by_fqn.get(key, [])] or [(None, 0)]
        for info, need in places:
            if info is None:
                raise CheckpointError(f"{it_dir / '.metadata'}: {key} has a chunk that no file stores")
            name = str(info.relative_path)
            if Path(name).name != name or name in ("", ".", ".."):
                raise CheckpointError(f"{it_dir / '.metadata'} places {key} in {name!r}, outside the directory")
            path = it_dir / name
            if name not in sizes:
                if not path.is_file():
                    raise CheckpointError(f"{path} is missing: the torch_dist checkpoint is incomplete "
                                          f"(it stores {key})")
                sizes[name] = path.stat().st_size
            start, length = int(info.offset), int(info.length)
            if start < 0 or length < need or start + length > sizes[name]:
                raise CheckpointError(
                    f"{path} is truncated or its metadata lies: {key} needs bytes [{start}, {start + length}) "
                    f"holding at least {need} bytes; the file has {sizes[name]}")


def _check_chunks(it_dir: Path, key: str, entry) -> None:
    size = tuple(entry.size)
    if any(d < 0 for d in size) or any(len(c.offsets) != len(size) or len(c.sizes) != len(size)
                                       or any(o < 0 or n < 0 or o + n > d for o, n, d in
                                              zip(c.offsets, c.sizes, size)) for c in entry.chunks):
        raise CheckpointError(f"{it_dir / '.metadata'}: a chunk of {key} lies outside its size {list(size)}")
    if sum(math.prod(c.sizes) for c in entry.chunks) != math.prod(size):
        raise CheckpointError(f"{it_dir / '.metadata'}: the chunks of {key} do not cover its size {list(size)}")


def _common_state(it_dir: Path, metadata, *, trust: bool = False) -> dict:
    """Megatron's common (non-tensor) state: common.pt, or the `common_state` object in the DCP."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    if (it_dir / "common.pt").is_file():
        common = load_blob(it_dir / "common.pt", trust=trust)
    else:
        keys = [k for k, v in metadata.state_dict_metadata.items()
                if k.startswith("common_state/") and isinstance(v, BytesStorageMetadata)]
        if not keys:
            raise CheckpointError(f"{it_dir}: neither common.pt nor a common_state object; the saved "
                                  "args (model shapes) are missing")
        raw = _dcp_load(it_dir, metadata, {keys[0]: None})[keys[0]]
        try:
            common = safe_load(io.BytesIO(raw), trust=trust, name=f"{it_dir} (common_state)")
        except UnsafeCheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{it_dir}: cannot read the common_state object: {exc}") from None
        common = common[0] if isinstance(common, list) else common
    if not isinstance(common, dict):
        raise CheckpointError(f"{it_dir}: the common state is a {type(common).__name__}, not a dict")
    return common


def _model_prefix(keys) -> str:
    """torch_dist keys are the ShardedTensor keys; some tools prefix them with `model.`."""
    return "model." if keys and all(k.startswith("model.") for k in keys) else ""


def read_dist(directory: Path, tag: Optional[str] = None, *, load: bool = True, trust: bool = False,
              **hints):
    """(ModelConfig, full state dict or None, meta) of a Megatron-Core `torch_dist` checkpoint."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    it_dir = dist_dir(directory, tag)
    metadata = _metadata(it_dir, trust=trust)
    common = _common_state(it_dir, metadata, trust=trust)
    a = args_dict(common.get("args"), it_dir / "common.pt")
    tensors = {k: v for k, v in metadata.state_dict_metadata.items()
               if isinstance(v, TensorStorageMetadata) and not SKIP.search(k)
               and not k.startswith(("optimizer", "rng_state", "common_state"))}
    prefix = _model_prefix(list(tensors))
    tensors = {k: v for k, v in tensors.items() if k.startswith(prefix)}
    check_model_type([k[len(prefix):] for k in tensors], a, it_dir)
    from .rugpts import side_facts
    vocab = hints.get("vocab_size") or side_facts(directory, it_dir).get("vocab_size")
    config = make_config(common.get("args"), vocab, it_dir)
    meta = {"format": "megatron_core_dist", "megatron_ckpt_format": "torch_dist",
            "model": config.to_dict(), "tensor_model_parallel_size": 1,
            "saved_tensor_model_parallel_size": a.get("tensor_model_parallel_size"),
            "saved_pipeline_model_parallel_size": a.get("pipeline_model_parallel_size"),
            "checkpoint_version": float(common.get("checkpoint_version", 3.0) or 3.0),
            "tokenizer_dir": None, "source_files": [str(it_dir)]}
    if not load:
        return config, None, meta
    for k, v in tensors.items():  # stacked per-layer tensors: layer count before allocation
        if k[len(prefix):].startswith("decoder.layers.") and not re.match(LAYER, k[len(prefix):]):
            if not len(v.size) or v.size[0] != config.num_layers:
                raise CheckpointError(f"{it_dir}: {k} stacks {list(v.size)[:1]} layers, args say "
                                      f"num_layers={config.num_layers}")
    check_storage(it_dir, metadata, tensors)
    wanted = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in tensors.items()}
    loaded = _dcp_load(it_dir, metadata, wanted)
    flat = {}
    for key, t in loaded.items():
        key = key[len(prefix):]
        if key.startswith("decoder.layers.") and not re.match(LAYER, key):  # stacked: (L, ...)
            if t.shape[0] != config.num_layers:
                raise CheckpointError(f"{it_dir}: {key} stacks {t.shape[0]} layers, args say "
                                      f"{config.num_layers}")
            for i in range(t.shape[0]):
                flat[f"decoder.layers.{i}." + key[len("decoder.layers."):]] = t[i]
        else:
            flat[key] = t
    state = rename(flat, it_dir)
    for k in [k for k in state if re.search(r"attn\.qkv\.(weight|bias)$", k)]:
        state[k] = fix_qkv(state[k], 3.0, config, 1)  # global tensor = the TP ranks' rows in order
    return config, merge_shards(config, [state], it_dir), meta


__all__ = ["dist_dir", "read_dist"]
