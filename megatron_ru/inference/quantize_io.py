"""Quantized checkpoints: write one (TP=1, full tensors) and load it at any TP size without the
fp weights; `load_for_inference` reads the weights for loading.open_model (quantized or fp).

A quantized checkpoint is an ordinary megatron_ru directory whose config.json has a
"quantization" entry ({method, group_size, head}) and whose state dict holds, for each linear
layer, `qweight` / `scale` (/ `group_mult`) instead of `weight`. The quantized numbers do not
depend on the TP size (see quantize.py), so loading only cuts them like the layers they replace.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint.load import load_model, read_config
from ..checkpoint.model_io import (VOCAB_PARAMS, CheckpointError, atomic_torch_save, latest_tag,
                                   load_module, rank_files)
from ..config import ModelConfig
from ..files import atomic_write_text
from ..model.gpt import GPTModel
from ..parallel.sharding import shard
from ..parallel.state import ParallelState
from .quantize import QuantizeError, QuantLinear, QuantSpec, install_shells, quantize, quantize_tensor


def load_for_inference(directory, ps: ParallelState, *, tag: Optional[str] = None, dtype=None,
                       device=None, spec: Optional[QuantSpec] = None, trust: bool = False,
                       **overrides) -> GPTModel:
    """A model for sampling: a quantized checkpoint loads as such; an fp one is quantized at
    load when `spec` is given (each rank its shards), else loaded as is. `trust`: the files'
    pickles may name any global (--trust-checkpoint, checkpoint/safe_pickle.py)."""
    config, meta = read_config(Path(directory), trust=trust)
    saved = meta.get("quantization")
    if saved is None:
        model = load_model(directory, ps, tag=tag, dtype=dtype, device=device, trust=trust, **overrides)
        return quantize(model, spec=spec) if spec is not None else model
    stored = QuantSpec.from_dict(saved, kernel=spec.kernel if spec else "auto")
    if spec is not None and (spec.method, spec.head) != (stored.method, stored.head):
        raise QuantizeError(f"{directory} is already quantized ({stored.method}, head="
                            f"{stored.head}); drop --quantize or pass the same settings")
    if spec is not None and spec.method == "int4" and spec.group_size != stored.group_size:
        raise QuantizeError(f"{directory} was quantized with --group-size {stored.group_size}, "
                            f"not {spec.group_size}")
    if overrides:
        config = ModelConfig.from_dict({**config.to_dict(), **overrides})
    return _load_quantized(Path(directory), config, meta, stored, ps, tag, dtype, device, trust)


def _load_quantized(directory: Path, config: ModelConfig, meta: dict, spec: QuantSpec,
                    ps: ParallelState, tag, dtype, device, trust: bool = False) -> GPTModel:
    if int(meta.get("tensor_model_parallel_size", 1)) != 1:
        raise CheckpointError(f"{directory}: quantized checkpoints are written at TP=1")
    # initialize=False: torch.empty, whose pages are never touched before the shells replace
    # the fp linear weights, so resident memory stays at the quantized size
    model = GPTModel(config, ps, initialize=False, device=device or ps.device, dtype=dtype)
    install_shells(model, spec)
    full = load_module(rank_files(directory, tag or latest_tag(directory), 1)[0], trust=trust)  # mmap
    state = {}
    for name, target in model.state_dict().items():
        if name not in full:
            raise CheckpointError(f"tensor {name} is missing from quantized checkpoint {directory}")
        state[name] = _local(model, name, full[name], config, spec)
        if state[name].shape != target.shape:
            raise CheckpointError(f"tensor {name}: checkpoint gives {tuple(state[name].shape)} "
                                  f"for this rank, the model expects {tuple(target.shape)}")
    model.load_state_dict(state, strict=True)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.prepare()
    return model.eval()


def _local(model: GPTModel, name: str, tensor: torch.Tensor, config: ModelConfig,
           spec: QuantSpec) -> torch.Tensor:
    """This rank's slice of a full stored tensor (vocabulary re-padded for this TP size)."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    pad = model.padded_vocab_size - config.vocab_size
    if isinstance(owner, QuantLinear):
        if owner.kind == "head":  # rows = vocabulary: keep the real ones, pad like fresh zeros
            zero = quantize_tensor(torch.zeros(pad, owner.in_local), spec)[attr]
            tensor = torch.cat([tensor[: config.vocab_size], zero])
            return _shard_rows(tensor, model.ps)
        return shard(tensor, owner.shard_specs[attr], model.ps.tp_rank, model.ps.tp_size)
    if name in VOCAB_PARAMS:
        tensor = torch.cat([tensor[: config.vocab_size], tensor.new_zeros(pad, *tensor.shape[1:])])
    param = model.get_parameter(name)
    return shard(tensor, getattr(param, "shard_spec", None), model.ps.tp_rank, model.ps.tp_size)


def _shard_rows(tensor: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    return torch.chunk(tensor, ps.tp_size, dim=0)[ps.tp_rank]


def quantize_checkpoint(directory, spec: QuantSpec, tag: Optional[str] = None) -> None:
    """Rewrite an fp TP=1 megatron_ru checkpoint in place as a quantized one (each file
    atomically; config.json last)."""
    directory = Path(directory)
    config, meta = read_config(directory)
    if int(meta.get("tensor_model_parallel_size", 1)) != 1:
        raise CheckpointError(f"{directory}: quantize a TP=1 checkpoint")
    if meta.get("quantization"):
        raise QuantizeError(f"{directory} is already quantized")
    tag = tag or latest_tag(directory)
    model = load_model(directory, ParallelState.single(), tag=tag)
    quantize(model, spec=QuantSpec(spec.method, spec.group_size, spec.head, "dequant"))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    atomic_torch_save({"module": state, "mp_world_size": 1},
                      directory / tag / "mp_rank_00_model_states.pt")
    meta["quantization"] = model.quant_spec.to_dict()  # with the group size resolved
    atomic_write_text(directory / "config.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")


def convert_quantized(src, dst, spec: QuantSpec, *, tag: Optional[str] = None,
                      dtype: Optional[str] = None, overwrite: bool = False, quiet: bool = False,
                      trust: bool = False, **hints) -> Path:
    """Any supported checkpoint → a quantized megatron_ru checkpoint at `dst` (written under a
    temporary name, renamed when complete)."""
    from ..checkpoint.convert import convert
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst} already exists; choose a new --save directory")
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp."))
    try:
        tmp = work / "ckpt"
        convert(src, tmp, "megatron_ru", target_tp=1, tag=tag, dtype=dtype, quiet=quiet, trust=trust, **hints)
        quantize_checkpoint(tmp, spec)
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dst
