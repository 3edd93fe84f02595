"""ModelConfig: one dataclass for both model families (ruGPT-3 and T-lite/Llama), with presets."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import ConfigError  # noqa: F401 (part of this module's interface)
from .sparse_config import (SPARSE_LAYER_MODES, SparsityConfigError, normalize_sparse_attention,
                            sparse_layer_indices)


FAMILIES = ("gpt3", "llama")
SPARSE_MODES = SPARSE_LAYER_MODES + ("dense",)  # dense: ignore the layout, every layer dense


@dataclass
class ModelConfig:
    """Shapes and architecture switches of a GPT model.

    `family="gpt3"`: pre-LayerNorm, tanh-GELU MLP, learned positions, biases, tied embeddings.
    `family="llama"`: RMSNorm, SwiGLU MLP, RoPE, grouped-query attention, no biases, untied head.
    Family-dependent fields left as None get the family default in `__post_init__`.
    """

    family: str = "gpt3"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_key_value_heads: Optional[int] = None  # None: = num_attention_heads (no GQA)
    ffn_hidden_size: Optional[int] = None  # None: 4*h (gpt3), Llama rounding rule (llama)
    vocab_size: int = 50257
    max_position_embeddings: int = 2048
    make_vocab_size_divisible_by: int = 128
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: Optional[bool] = None  # None: True (gpt3), False (llama)
    use_bias: Optional[bool] = None  # None: True (gpt3), False (llama)
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    checkpoint_activations: bool = False
    # Megatron sequence parallelism at TP > 1 (training forwards only; model/gpt.py); a run-time
    # switch like checkpoint_activations: the weights do not depend on it.
    sequence_parallel: bool = False
    # DeepSpeed `sparse_attention` JSON section (None: every layer dense) and which layers use it.
    sparse_attention: Optional[dict] = None
    sparse_mode: str = "alternating"
    # ru-gpts built each TP rank's layout for its *local* heads (pattern = local head % patterns);
    # True reproduces that for its checkpoints. Default: global head index, independent of TP.
    sparse_ru_gpts_head_indexing: bool = False
    # Execution path of sparse layers (same numbers, different speed): auto|gather|flex|reference.
    sparse_impl: str = "auto"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"family={self.family!r} is unknown; expected one of {FAMILIES}")
        llama = self.family == "llama"
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = not llama
        if self.use_bias is None:
            self.use_bias = not llama
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                     "vocab_size", "max_position_embeddings", "make_vocab_size_divisible_by"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}: the head size must be an integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}: each KV head serves a whole "
                "group of query heads")
        if llama and self.head_dim % 2:
            raise ConfigError(f"head size {self.head_dim} must be even for rotary embeddings")
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = _llama_ffn(self.hidden_size) if llama else 4 * self.hidden_size
        if self.ffn_hidden_size <= 0:
            raise ConfigError(f"ffn_hidden_size={self.ffn_hidden_size} must be positive")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.norm_eps <= 0 or self.init_method_std <= 0 or self.rope_theta <= 0:
            raise ConfigError("norm_eps, init_method_std and rope_theta must be positive")
        if self.sparse_mode not in SPARSE_MODES:
            raise ConfigError(f"sparse_mode={self.sparse_mode!r} is unknown; expected one of "
                              f"{SPARSE_MODES}")
        if self.sparse_impl not in ("auto", "gather", "flex", "reference"):
            raise ConfigError(f"sparse_impl={self.sparse_impl!r} is unknown; expected auto, gather, "
                              "flex or reference")
        if self.sparse_attention is not None:
            if not isinstance(self.sparse_attention, dict):
                raise ConfigError("sparse_attention must be a dict (the DeepSpeed JSON section) or None")
            try:
                normalize_sparse_attention(self.sparse_attention)
            except SparsityConfigError as exc:
                raise ConfigError(f"sparse_attention: {exc}") from None

    # ---- derived fields -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def is_llama(self) -> bool:
        return self.family == "llama"

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1) -> int:
        """ceil(V / (divisible_by * TP)) * divisible_by * TP (DESIGN.md §3)."""
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def sparse_layers(self) -> list[bool]:
        """Which layers use block-sparse attention (ru-gpts' --sparse-mode rules)."""
        if self.sparse_attention is None or self.sparse_attention.get("mode", "fixed") == "dense" \
                or self.sparse_mode == "dense":
            return [False] * self.num_layers
        return sparse_layer_indices(self.num_layers, self.sparse_mode)

    def validate_parallel(self, tensor_model_parallel_size: int, context_parallel_size: int = 1) -> None:
        """Raise ConfigError when the model cannot be split over `tensor_model_parallel_size`
        (and, for context parallelism, its heads per TP rank over `context_parallel_size`)."""
        tp = tensor_model_parallel_size
        if not isinstance(tp, int) or tp <= 0:
            raise ConfigError(f"tensor_model_parallel_size={tp!r} must be a positive integer")
        rules = [("num_attention_heads", self.num_attention_heads),
                 ("num_key_value_heads", self.num_key_value_heads),
                 ("ffn_hidden_size", self.ffn_hidden_size)]
        for name, value in rules:
            if value % tp:
                raise ConfigError(
                    f"{name}={value} is not divisible by tensor_model_parallel_size={tp}: "
                    "each tensor-parallel rank must own a whole share")
        cp = context_parallel_size
        for name, value in rules[:2]:
            if cp > 1 and (value // tp) % cp:
                raise ConfigError(
                    f"{name}={value} / tensor_model_parallel_size={tp} = {value // tp} per TP rank "
                    f"is not divisible by --context-parallel-size={cp}: Ulysses attention gives "
                    "each context-parallel rank a whole share of every TP rank's heads")

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameter count at TP=1 (padded vocab), computed analytically."""
        h, f, L = self.hidden_size, self.ffn_hidden_size, self.num_layers
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        b = 1 if self.use_bias else 0
        attn = h * (q + 2 * kv) + b * (q + 2 * kv) + q * h + b * h
        if self.is_llama:
            mlp, norms = 3 * h * f, 2 * h
        else:
            mlp, norms = 2 * h * f + b * (f + h), 4 * h
        per_layer = attn + mlp + norms
        final_norm = h if self.is_llama else 2 * h
        total = L * per_layer + final_norm
        if include_embeddings:
            v = self.padded_vocab_size(1)
            total += v * h * (1 if self.tie_word_embeddings else 2)
            if not self.is_llama:
                total += self.max_position_embeddings * h
        return total

    # ---- construction and serialisation ---------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        values = dict(PRESETS[name])
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {sorted(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {sorted(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _llama_ffn(hidden: int, multiple_of: int = 256) -> int:
    """Llama's FFN rule: 2/3 of 4h, rounded up to a multiple of 256."""
    f = int(2 * 4 * hidden / 3)
    return multiple_of * ((f + multiple_of - 1) // multiple_of)


# ru-gpts 13B: DeepSpeed "fixed" layout on every even layer (configs/gpt3_13b_sparse.json).
RUGPT3_13B_SPARSE = {
    "mode": "fixed",
    "block": 16,
    "different_layout_per_head": True,
    "num_local_blocks": 8,
    "num_global_blocks": 1,
    "attention": "unidirectional",
    "horizontal_global_attention": False,
    "num_different_global_patterns": 8,
}

_GPT3 = dict(family="gpt3", vocab_size=50257, max_position_embeddings=2048)
_LLAMA = dict(family="llama", rope_theta=500000.0, norm_eps=1e-5)

PRESETS: dict[str, dict] = {
    "rugpt3-small": dict(_GPT3, num_layers=12, hidden_size=768, num_attention_heads=12),
    "rugpt3-medium": dict(_GPT3, num_layers=24, hidden_size=1024, num_attention_heads=16),
    "rugpt3-large": dict(_GPT3, num_layers=24, hidden_size=1536, num_attention_heads=16),
    "rugpt3-xl": dict(_GPT3, num_layers=24, hidden_size=2048, num_attention_heads=16),
    "rugpt3-13b": dict(_GPT3, num_layers=40, hidden_size=5120, num_attention_heads=40,
                       sparse_attention=RUGPT3_13B_SPARSE, sparse_mode="alternating"),
    "tlite-8b": dict(_LLAMA, num_layers=32, hidden_size=4096, num_attention_heads=32,
                     num_key_value_heads=8, ffn_hidden_size=14336, vocab_size=128256,
                     max_position_embeddings=8192),
    "tiny-gpt3": dict(_GPT3, num_layers=2, hidden_size=64, num_attention_heads=4,
                      vocab_size=1000, max_position_embeddings=256),
    "tiny-llama": dict(_LLAMA, num_layers=2, hidden_size=64, num_attention_heads=4,
                       num_key_value_heads=2, ffn_hidden_size=176, vocab_size=1000,
                       max_position_embeddings=256),
}
