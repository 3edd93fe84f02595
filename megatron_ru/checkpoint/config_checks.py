"""A checkpoint config's sizes checked before a model is allocated: absurd values, layer count against the weights' names.

A config file can say anything: `num_hidden_layers: 1000000` would have a reader build millions of
names and a model's worth of tensors before any shape comparison fails. These checks run first and
cost only what the weights themselves hold: bounds on each size, and the layer count compared with
the set of layer indices found in the weight names (never with a list built from the config).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Optional

import torch

from ..config import ModelConfig
from ..errors import ConfigError
from ..model.gpt import GPTModel
from ..parallel.state import ParallelState

# Far above any real model (the largest have ~10^2 layers, ~10^4-wide hidden states, ~10^6 tokens).
LIMITS = {"num_layers": 10**5, "hidden_size": 10**6, "num_attention_heads": 10**5,
          "num_key_value_heads": 10**5, "ffn_hidden_size": 10**7, "vocab_size": 10**8,
          "max_position_embeddings": 10**8}


class ConfigSizeError(ConfigError):
    """A config's size disagrees with its weights or is beyond any model; names the file."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_bounds(values, source, names: Optional[Mapping[str, str]] = None) -> None:
    """Every size in LIMITS at most its limit: `values` is a ModelConfig, or a dict of the file's
    own keys, `names` mapping our key to the file's key (also used in the message)."""
    names = names or {}
    for key, limit in LIMITS.items():
        value = values.get(names.get(key, key)) if isinstance(values, Mapping) else getattr(values, key, None)
        if _is_int(value) and value > limit:
            raise ConfigSizeError(f"{source}: {names.get(key, key)}={value} is beyond any model "
                                  f"(limit {limit:.0e}); refused before allocating one")


def layer_indices(names: Iterable[str], pattern: str) -> set:
    """The layer numbers that `pattern` (one group: the index) finds in `names`."""
    regex = re.compile(pattern)
    found = set()
    for name in names:
        m = regex.match(name)
        if m:
            found.add(int(m.group(1)))
    return found


def _describe(found: set) -> str:
    if not found:
        return "no layer tensors"
    lo, hi = min(found), max(found)
    if lo == 0 and hi == len(found) - 1:
        return f"layers 0..{hi} ({len(found)} layers)"
    return f"{len(found)} layer indices between {lo} and {hi}"


def check_layer_count(num_layers: int, names: Iterable[str], pattern: str, source,
                      key: str = "num_layers", *, fewer_ok: bool = False) -> None:
    """`num_layers` equals the layers the weight names hold: indices exactly 0..num_layers-1.
    `fewer_ok`: a config with fewer layers than the weights passes (a later tensor-by-tensor check
    names the first extra tensor; only more layers than the weights would cost memory)."""
    found = layer_indices(names, pattern)
    if len(found) == num_layers and (not found or (min(found) == 0 and max(found) == num_layers - 1)):
        return
    if fewer_ok and num_layers < len(found):
        return
    raise ConfigSizeError(f"{source}: {key}={num_layers}, but the weights hold {_describe(found)}: "
                          "the config and the weights disagree")


def check_layer_count_value(num_layers: int, found_layers: int, source, key: str = "num_layers") -> None:
    """`num_layers` equals a layer count the weights record (e.g. a stacked tensor's first axis)."""
    if num_layers != found_layers:
        raise ConfigSizeError(f"{source}: {key}={num_layers}, but the weights hold {found_layers} "
                              "layers: the config and the weights disagree")


def param_shapes(config: ModelConfig) -> dict:
    """Our parameter name → full shape (real vocabulary rows), from a model on the meta device.
    Call only after the layer count was checked: it builds one entry per layer."""
    with torch.device("meta"):
        model = GPTModel(config, ParallelState(world_size=1, tensor_model_parallel_size=1))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for name in ("embed.weight", "lm_head.weight"):
        if name in shapes:
            shapes[name] = (config.vocab_size, *shapes[name][1:])
    return shapes


__all__ = ["LIMITS", "ConfigSizeError", "check_bounds", "check_layer_count", "check_layer_count_value",
           "layer_indices", "param_shapes"]
