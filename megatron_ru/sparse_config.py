"""`sparse_attention` sections validated and completed the way DeepSpeed reads them, and the choice of sparse layers.

Pure Python (no torch): `config.py` imports it; `model/sparsity.py` builds block layouts on top of it.
"""
from __future__ import annotations

import types
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import UsageError

__all__ = ["DEFAULT_LAYOUT_SEED", "SPARSE_LAYER_MODES", "SparsityConfigError", "normalize_sparse_attention",
           "is_sparse_layer", "sparse_layer_indices", "fail"]

DEFAULT_LAYOUT_SEED = 1234
SPARSE_LAYER_MODES = ("all", "alternating", "top_bottom")
_MISSPELLED = "num_differnt_global_patterns"  # old DeepSpeed spelling, still found in ru-gpts configs

# Keys and defaults per mode: DeepSpeed's JSON defaults (runtime/constants.py) for the five modes its config
# parser knows, so that a section means what it meant to ru-gpts (DeepSpeedConfig -> SparsityConfig(**section)).
# BigBird is the one place they differ from the class defaults: num_random_blocks is 0 here, 1 in the class.
# local_sliding_window is not parsed by DeepSpeedConfig; its defaults are LocalSlidingWindowSparsityConfig's.
_DEFAULTS = types.MappingProxyType({
    "dense": types.MappingProxyType({"block": 16, "different_layout_per_head": False}),
    "fixed": types.MappingProxyType({
        "block": 16, "different_layout_per_head": False, "num_local_blocks": 4, "num_global_blocks": 1,
        "attention": "bidirectional", "horizontal_global_attention": False, "num_different_global_patterns": 1}),
    "variable": types.MappingProxyType({
        "block": 16, "different_layout_per_head": False, "num_random_blocks": 0, "local_window_blocks": (4,),
        "global_block_indices": (0,), "global_block_end_indices": None, "attention": "bidirectional",
        "horizontal_global_attention": False}),
    "bigbird": types.MappingProxyType({
        "block": 16, "different_layout_per_head": False, "num_random_blocks": 0, "num_sliding_window_blocks": 3,
        "num_global_blocks": 1, "attention": "bidirectional"}),
    "bslongformer": types.MappingProxyType({
        "block": 16, "different_layout_per_head": False, "num_sliding_window_blocks": 3,
        "global_block_indices": (0,), "global_block_end_indices": None, "attention": "bidirectional"}),
    "local_sliding_window": types.MappingProxyType({
        "block": 16, "num_sliding_window_blocks": 3, "attention": "unidirectional"}),
})
_INT_MIN = {"block": 1, "num_local_blocks": 1, "num_global_blocks": 1, "num_different_global_patterns": 1,
            "num_random_blocks": 0, "num_sliding_window_blocks": 0}
_INT_LISTS = ("local_window_blocks", "global_block_indices", "global_block_end_indices")


class SparsityConfigError(UsageError):
    """A `sparse_attention` section that DeepSpeed would reject, or that is malformed (bad type, unknown key)."""


def fail(key: str, rule: str) -> None:
    """Raise the one-line SparsityConfigError for `sparse_attention.KEY` breaking `rule`."""
    raise SparsityConfigError(f"sparse_attention.{key}: {rule}")


def _check_int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fail(key, f"must be an integer >= {minimum}, got {value!r}")
    return value


def normalize_sparse_attention(sparse_attention: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a `sparse_attention` section and return it complete: every key of its mode, defaults filled in.

    `mode` defaults to "fixed" (as in DeepSpeed). Raises SparsityConfigError on an unknown mode or key, a value of
    the wrong type and every rule DeepSpeed's SparsityConfig constructors enforce; the old spelling
    `num_differnt_global_patterns` is accepted with a warning. Seq-length rules are checked by `make_layout`.
    """
    if not isinstance(sparse_attention, Mapping):
        raise SparsityConfigError(f"sparse_attention must be a JSON object (dict), got {type(sparse_attention).__name__}")
    section = dict(sparse_attention)
    mode = section.pop("mode", "fixed")
    if not isinstance(mode, str) or mode not in _DEFAULTS:
        fail("mode", f"unknown mode {mode!r}; expected one of {sorted(_DEFAULTS)}")
    defaults = _DEFAULTS[mode]
    if mode == "fixed" and _MISSPELLED in section:
        if "num_different_global_patterns" in section:
            fail(_MISSPELLED, "given together with num_different_global_patterns; keep only the latter")
        warnings.warn(f"sparse_attention.{_MISSPELLED} is a misspelling; read as num_different_global_patterns",
                      stacklevel=2)
        section["num_different_global_patterns"] = section.pop(_MISSPELLED)
    for key in section:
        if key not in defaults:
            fail(key, f"unknown key for mode {mode!r}; allowed keys: {sorted(defaults)}")
    cfg = {**defaults, **section}
    for key, value in cfg.items():
        if key in _INT_MIN:  # bigbird may have no global blocks; fixed divides by num_global_blocks
            _check_int(key, value, 0 if (mode, key) == ("bigbird", "num_global_blocks") else _INT_MIN[key])
        elif key in ("different_layout_per_head", "horizontal_global_attention"):
            if value not in (True, False):  # accepts 0/1 like DeepSpeed's truthiness, rejects strings
                fail(key, f"must be true or false, got {value!r}")
            cfg[key] = bool(value)
        elif key == "attention":
            if value not in ("unidirectional", "bidirectional"):
                fail(key, f"must be 'unidirectional' or 'bidirectional', got {value!r}")
        elif key in _INT_LISTS and value is not None:
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                fail(key, f"must be a list of integers, got {value!r}")
            cfg[key] = [_check_int(key, v, 0) for v in value]
    mode_rules = {"fixed": _check_fixed, "variable": _check_variable, "bslongformer": _check_global_ranges}
    if mode in mode_rules:
        mode_rules[mode](cfg)
    return {"mode": mode, **cfg}


def _check_horizontal(cfg: dict) -> None:
    if cfg["horizontal_global_attention"] and cfg["attention"] != "bidirectional":
        fail("horizontal_global_attention", "only bidirectional attention supports horizontal global attention")


def _check_fixed(cfg: dict) -> None:
    local, glob, patterns = cfg["num_local_blocks"], cfg["num_global_blocks"], cfg["num_different_global_patterns"]
    if local % glob:
        fail("num_local_blocks", f"({local}) must be divisible by num_global_blocks ({glob})")
    _check_horizontal(cfg)
    if patterns > 1 and not cfg["different_layout_per_head"]:
        fail("num_different_global_patterns", f"({patterns}) must be 1 unless different_layout_per_head is true")
    if patterns > local // glob:
        fail("num_different_global_patterns",
              f"({patterns}) must be <= num_local_blocks / num_global_blocks = {local} / {glob} = {local // glob}")


def _check_variable(cfg: dict) -> None:
    windows = cfg["local_window_blocks"]
    if not windows or windows[-1] == 0:
        fail("local_window_blocks", f"must be non-empty and end with a positive size (it repeats), got {windows}")
    _check_global_ranges(cfg)
    _check_horizontal(cfg)


def _check_global_ranges(cfg: dict) -> None:
    starts, ends = cfg["global_block_indices"], cfg["global_block_end_indices"]
    if ends is None:
        return
    if len(starts) != len(ends):
        fail("global_block_end_indices", f"length {len(ends)} must equal global_block_indices length {len(starts)}")
    for start, end in zip(starts, ends):
        if start >= end:
            fail("global_block_end_indices", f"each end must be > its start index, got start {start} >= end {end}")


def is_sparse_layer(layer: int, num_layers: int, sparse_mode: str) -> bool:
    """Whether layer `layer` (0-based) uses block-sparse attention, as ru-gpts chooses it.

    all: every layer; alternating: even layers (0, 2, ...) sparse, odd dense; top_bottom: layers < num_layers // 2.
    """
    if sparse_mode not in SPARSE_LAYER_MODES:
        raise ValueError(f"sparse_mode must be one of {list(SPARSE_LAYER_MODES)}, got {sparse_mode!r}")
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} must be in [0, {num_layers})")
    if sparse_mode == "alternating":
        return layer % 2 == 0
    if sparse_mode == "top_bottom":
        return layer < num_layers // 2
    return True


def sparse_layer_indices(num_layers: int, sparse_mode: str) -> list[bool]:
    """Per layer, whether it is block-sparse (see `is_sparse_layer`)."""
    return [is_sparse_layer(i, num_layers, sparse_mode) for i in range(num_layers)]
