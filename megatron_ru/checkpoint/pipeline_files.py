"""A pipeline-parallel run's model weights: DeepSpeed's per-layer files read as our per-TP-rank state dicts.

DeepSpeed's PipelineEngine writes the weights of pipeline layer i at TP rank r to
`<tag>/layer_{i:02d}-model_{r:02d}-model_states.pt` (a plain state dict), and its
`mp_rank_XX_model_states.pt` files hold no module. The layer list is the one
parallel/pipeline.py builds: 0 = embedding, 1..L = blocks, L+1 = final norm, L+2 = untied head
(the tied head has no file of its own). Renamed to GPTModel names, the layers of TP rank r form
exactly the state dict a TP-only run saves for rank r, so every reader (generate.py, serve,
evaluate, convert_checkpoint, --finetune) reads a PP checkpoint at any TP x PP through
`model_io.load_own_state_dict`.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import UsageError
from . import safe_pickle

LAYER_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")


class PipelineCheckpointError(UsageError):
    """A pipeline checkpoint's layer files are missing or unreadable."""


CheckpointError = PipelineCheckpointError


def layer_files(tag_dir: Path) -> dict[tuple[int, int], Path]:
    """{(layer, tp_rank): path} of the layer files in `tag_dir` (empty: not a pipeline checkpoint)."""
    out = {}
    if Path(tag_dir).is_dir():
        for f in Path(tag_dir).iterdir():
            m = LAYER_FILE.match(f.name)
            if m:
                out[int(m.group(1)), int(m.group(2))] = f
    return out


def is_pipeline(tag_dir: Path) -> bool:
    return bool(layer_files(tag_dir))


def our_name(num_layers: int, layer: int, key: str):
    """GPTModel name of `key` in pipeline layer `layer`'s state dict."""
    if 1 <= layer <= num_layers:
        return f"blocks.{layer - 1}.{key[len('block.'):]}" if key.startswith("block.") else None
    return key


def rank_state(tag_dir: Path, tp_rank: int, num_layers: int, *, trust: bool = False) -> dict:
    """TP rank `tp_rank`'s full-model state dict (GPTModel names) from the layer files."""
    files = {layer: f for (layer, r), f in layer_files(tag_dir).items() if r == tp_rank}
    missing = [i for i in range(num_layers + 2) if i not in files]
    if missing:
        raise CheckpointError(f"pipeline checkpoint {tag_dir} is incomplete: no layer file for "
                              f"layer(s) {missing} of TP rank {tp_rank} "
                              f"(layer_XX-model_{tp_rank:02d}-model_states.pt)")
    state = {}
    for layer in sorted(files):
        try:
            blob = safe_pickle.load(files[layer], trust=trust)
        except safe_pickle.UnsafeCheckpointError:
            raise
        except Exception as exc:  # truncated or foreign: name the file
            raise CheckpointError(f"cannot read {files[layer]}: {exc}") from None
        if not isinstance(blob, dict):
            raise CheckpointError(f"{files[layer]} holds no state dict")
        for key, value in blob.items():
            name = our_name(num_layers, layer, key)
            if name is not None and name not in state:  # the tied head repeats the embedding
                state[name] = value
    return state


def loaders(tag_dir: Path, tp_size: int, num_layers: int, *, trust: bool = False) -> list:
    """One zero-argument loader per TP rank (LazyFullState's interface)."""
    return [lambda r=r: rank_state(tag_dir, r, num_layers, trust=trust) for r in range(tp_size)]
