"""Activation memory: the bytes one micro-batch's forward keeps for backward, per rank, derived from what our layers save.

Every term below names the tensor autograd keeps and the op that keeps it (read off model/gpt.py,
attention.py, sparse_attention.py, mlp.py, norms.py, rotary.py, parallel/layers.py and
parallel/cross_entropy.py; tests/unit/test_activation_model.py checks the sums against
planning/measure.py, which counts the saved tensors themselves). Notation: b micro-batch,
s sequence, h hidden, a heads, g KV heads, d head size, f FFN size, t TP, C CP, P bytes per
element of the compute dtype. Per rank, token-wise tensors hold n = b*s/C tokens; with sequence
parallelism the norm, dropout and residual regions are split along the sequence over TP and hold
n/t. Our column-parallel layers (parallel/mappings.py gather_sequence_linear) all-gather their
sequence shard for the matmul but keep only the n/t shard, all-gathering it again in backward, as
Megatron-LM does -- QKV, MLP-up and the output head (`sp_keeps_gathered=False`, the default;
Korthikanti's 34/t); `sp_keeps_gathered=True` gives the cost of keeping the gathered input of n
tokens instead (a plain all-gather followed by F.linear). Attention under
Ulysses CP runs a/(tC) heads over the full s after the all-to-all, which is the same element count
as a/t heads over s/C; q, k, v are then the all-to-all's outputs (the fused QKV output and the
RoPE outputs are not kept), and the attention output comes back from the second all-to-all as
(b, heads, s/C, d), so the projection keeps a transposed copy of it.

`device` picks the kernels our code runs there:
  "cuda"  dense SDPA = flash/efficient kernel (keeps q, k, v, output and fp32 log-sum-exp; the
          output is already laid out (b, s, heads, d), so the projection's input is a view);
          dropout keeps a 1-byte mask; sparse layers run FlexAttention (same tensors as flash,
          KV heads repeated, padded to 128 rows, plus the output's transpose copy). The GPU figures are derived, not
          yet measured (bench/gpu_check.sh is the place).
  "cpu"   dense SDPA at attention dropout 0 = the CPU flash kernel (the same tensors); attention
          dropout > 0 falls back to the math path (scaled q and k, a v copy, softmax, mask and
          dropped probabilities, in fp32, and an output the projection copies); dropout masks and
          LayerNorm statistics have the compute dtype; sparse layers run the `gather` path (a q
          copy, gathered keys and values of each query tile, output, log-sum-exp), sized from the
          real layout.
Constants the model holds (parameters, buffers, the sparse layers' cached masks) are not counted.
"""
from __future__ import annotations

import functools
import json
from typing import Iterable, Optional

from ..config import ConfigError, ModelConfig

RECOMPUTE = ("none", "full")
DEVICES = ("cuda", "cpu")
FP32 = 4
INT64 = 8


def _check(cfg: ModelConfig, micro_batch: int, seq_length: int, tp: int, sp: bool, cp: int,
           recompute: str, dtype_bytes: int, device: str) -> None:
    for name, value in (("micro_batch", micro_batch), ("seq_length", seq_length), ("tp", tp),
                        ("cp", cp), ("dtype_bytes", dtype_bytes)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name}={value!r} must be a positive integer")
    if recompute not in RECOMPUTE:
        raise ConfigError(f"recompute={recompute!r} is unknown; expected one of {RECOMPUTE}")
    if device not in DEVICES:
        raise ConfigError(f"device={device!r} is unknown; expected one of {DEVICES}")
    cfg.validate_parallel(tp)
    split = tp * cp if sp else cp
    if seq_length % split:
        raise ConfigError(f"seq_length={seq_length} is not divisible by {'TP x CP' if sp else 'CP'}"
                          f" = {split}: every rank must hold a whole share of the sequence")
    for name, heads in (("num_attention_heads", cfg.num_attention_heads),
                        ("num_key_value_heads", cfg.num_key_value_heads)):
        if (heads // tp) % cp:
            raise ConfigError(f"{name} per TP rank ({heads // tp}) is not divisible by "
                              f"context-parallel size {cp}")


@functools.lru_cache(maxsize=64)
def _sparse_stats(sparse_json: str, heads: int, ru_gpts: bool, max_pos: int, seq: int,
                  splits: int) -> tuple[int, int, float]:
    """(padded length, kept keys per query tile row-set summed over tiles, causal density) of the
    worst of the `splits` head groups (one per TP x CP rank), for the layout our model builds."""
    import torch

    from ..model.sparse_attention import BlockSparseAttention
    from ..model.sparsity import causal_density, make_layout, split_heads

    sparse = json.loads(sparse_json)
    block = int(sparse.get("block", 16))
    full_len = -(-max_pos // block) * block
    if seq > full_len:
        raise ConfigError(f"seq_length={seq} exceeds the sparse layout's maximum {full_len}")
    if ru_gpts:  # every TP rank built the layout of its local heads (sparsity.layout_for_tp_rank)
        layouts = [make_layout(sparse, heads // splits, full_len)]
    else:
        full = make_layout(sparse, heads, full_len)
        layouts = [split_heads(full, r, splits) for r in range(splits)]
    worst_keys, padded, density = 0, seq, 0.0
    for layout in layouts:
        attn = BlockSparseAttention(layout, block, impl="gather")
        unit = block * attn.tile_blocks
        padded = -(-seq // unit) * unit
        nb = padded // block
        lay = torch.zeros(layout.shape[0], nb, nb, dtype=torch.bool)
        m = min(nb, layout.shape[1])
        lay[:, :m, :m] = layout[:, :m, :m].bool()
        kept = lay & torch.ones(nb, nb, dtype=torch.bool).tril()
        union = BlockSparseAttention._union(kept, attn.tile_blocks)  # (H, n_tiles, nb)
        keys = union.shape[1] * int(union.sum(-1).max()) * block  # n_tiles x U x block
        worst_keys = max(worst_keys, keys)
        nbs = -(-seq // block)
        density = max(density, causal_density(layout[:, :nbs, :nbs]))
    return padded, worst_keys, density


def sparse_density(cfg: ModelConfig, seq_length: int, *, tp: int = 1, cp: int = 1) -> float:
    """Fraction of the causal blocks a sparse layer keeps (worst TP x CP head group), 1.0 when dense."""
    if not any(cfg.sparse_layers()):
        return 1.0
    return _sparse_stats(json.dumps(cfg.sparse_attention, sort_keys=True), cfg.num_attention_heads,
                         cfg.sparse_ru_gpts_head_indexing, cfg.max_position_embeddings,
                         seq_length, tp * cp)[2]


def _attention_core(cfg: ModelConfig, sparse: bool, b: int, s: int, n: float, tp: int, cp: int,
                    P: int, device: str) -> float:
    """Bytes kept by q/k/v, the attention kernel and the output projection's input."""
    a, g, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q_elems = n * a * d / tp  # q, or the attention output, on this rank
    heads = a // tp // cp  # heads this rank attends with, over the full s
    proj_input = q_elems * P  # dense projection keeps its input (the transposed output)
    if sparse:
        padded, keys, _ = _sparse_stats(json.dumps(cfg.sparse_attention, sort_keys=True), a,
                                        cfg.sparse_ru_gpts_head_indexing,
                                        cfg.max_position_embeddings, s, tp * cp)
        if device == "cpu":  # gather: q copy, gathered k and v, output, lse; qkv itself not kept
            return (b * heads * d * (2 * padded + 2 * keys) * P + b * heads * padded * FP32
                    + heads * INT64 + proj_input)  # + the head index the gather keeps
        # flex: q, k, v over all local heads (KV heads repeated for GQA; padded copies unless
        # s is a multiple of 128), output, lse, the projection's transposed copy
        padded = -(-s // 128) * 128
        return 3 * b * heads * padded * d * P + b * heads * padded * (d * P + FP32) + proj_input
    qkv = q_elems * (a + 2 * g) / a * P  # the fused QKV output: q, k, v are views of it
    rope = q_elems * (a + g) / a * P if cfg.is_llama else 0.0  # rotated q and k
    if device == "cpu" and cfg.attention_dropout > 0.0:
        # math path in fp32: scaled q and k and a v copy (KV heads repeated to a), softmax,
        # dropout mask, dropped probabilities; qkv and the RoPE outputs are not kept
        pm = max(P, FP32)
        scores = 3 * b * heads * s * s * pm
        return 3 * q_elems * pm + scores + proj_input
    lse = n * (a // tp) * FP32  # fp32 log-sum-exp per head and query
    if cp > 1:  # flash on the all-to-all's q, k, v (same elements as qkv); output; its copy
        return qkv + q_elems * P + proj_input + lse
    # flash (CUDA and CPU): the output follows q's (b, s, heads, d) layout, so the projection's
    # input is a view of it
    return qkv + rope + q_elems * P + lse


def _norm_bytes(cfg: ModelConfig, tokens: float, P: int, device: str) -> float:
    """One norm: LayerNorm keeps its input, mean and rstd (fp32 on CUDA, the input dtype on the
    CPU); RMSNorm keeps its fp32 input, fp32 rstd and the normalised tensor the weight multiplies."""
    h = cfg.hidden_size
    if cfg.is_llama:
        return tokens * (h * FP32 + FP32 + h * P)
    return tokens * (h * P + 2 * (FP32 if device == "cuda" else P))


def activation_bytes_per_layer(cfg: ModelConfig, *, layer: int, micro_batch: int, seq_length: int,
                               tp: int = 1, sp: bool = False, cp: int = 1, recompute: str = "none",
                               dtype_bytes: int = 2, device: str = "cuda",
                               sp_keeps_gathered: bool = False) -> int:
    """Bytes transformer layer `layer` keeps for backward on one rank for one micro-batch.
    `sp_keeps_gathered`: False (ours and Megatron-LM's): the column-parallel layers keep their
    sequence shard and all-gather it again in backward; True: they keep the all-gathered
    (whole-sequence) input."""
    _check(cfg, micro_batch, seq_length, tp, sp, cp, recompute, dtype_bytes, device)
    if not 0 <= layer < cfg.num_layers:
        raise ConfigError(f"layer={layer} is outside 0..{cfg.num_layers - 1}")
    b, s, P = micro_batch, seq_length, dtype_bytes
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    n = b * s / cp  # tokens of this rank in the tensor-parallel regions
    n_rep = n / tp if sp else n  # tokens of this rank in the norm / dropout / residual regions
    if recompute == "full":
        return int(n_rep * h * P)  # the checkpointed block's input
    mask = 1 if device == "cuda" else P
    total = 2 * _norm_bytes(cfg, n_rep, P, device)
    total += 2 * (n if sp_keeps_gathered else n_rep) * h * P  # QKV and MLP-up inputs
    if cfg.hidden_dropout > 0.0:
        total += 2 * n_rep * h * mask  # dropout masks after attention and MLP
    total += _attention_core(cfg, cfg.sparse_layers()[layer], b, s, n, tp, cp, P, device)
    if cfg.is_llama:  # SwiGLU: gate|up output, silu(gate), silu(gate) * up
        total += 4 * n * f / tp * P
    else:  # GELU input and output
        total += 2 * n * f / tp * P
    return int(round(total))


def activation_bytes(cfg: ModelConfig, *, micro_batch: int, seq_length: int, tp: int = 1,
                     sp: bool = False, cp: int = 1, layers: Optional[Iterable[int]] = None,
                     first_stage: bool = True, last_stage: bool = True, recompute: str = "none",
                     dtype_bytes: int = 2, device: str = "cuda",
                     sp_keeps_gathered: bool = False) -> dict:
    """Saved-for-backward bytes of one micro-batch on one rank: {"layers": [per layer], "embedding",
    "logits_loss", "total", "recompute_working_set"} (the last: with full recompute, the largest
    layer's activations, rebuilt for its backward on top of the total; 0 otherwise)."""
    _check(cfg, micro_batch, seq_length, tp, sp, cp, recompute, dtype_bytes, device)
    layers = list(range(cfg.num_layers)) if layers is None else list(layers)
    kw = dict(micro_batch=micro_batch, seq_length=seq_length, tp=tp, sp=sp, cp=cp,
              dtype_bytes=dtype_bytes, device=device, sp_keeps_gathered=sp_keeps_gathered)
    per_layer = [activation_bytes_per_layer(cfg, layer=i, recompute=recompute, **kw) for i in layers]
    working = 0
    if recompute == "full" and layers:
        working = max(activation_bytes_per_layer(cfg, layer=i, **kw) for i in layers)
    b, s, P, h = micro_batch, seq_length, dtype_bytes, cfg.hidden_size
    n = b * s / cp
    n_rep = n / tp if sp else n
    mask = 1 if device == "cuda" else P
    embedding = 0.0
    if first_stage:
        embedding += n * INT64 if tp == 1 else n * (INT64 + 1)  # token ids (local ids + mask)
        if cfg.is_llama:
            embedding += 2 * n * cfg.head_dim * P  # RoPE cos and sin, shared by all layers
        else:
            embedding += s / cp * INT64  # learned positions: the arange the lookup keeps
        if cfg.hidden_dropout > 0.0:
            embedding += n_rep * h * mask
    logits = 0.0
    if last_stage:
        head_in = n if sp_keeps_gathered else n_rep
        logits += _norm_bytes(cfg, n_rep, P, device) + head_in * h * P  # final norm; head input
        if tp == 1:  # log-softmax output (fp32, real vocabulary), targets, loss weights
            logits += n * (cfg.vocab_size * FP32 + INT64 + FP32)
        else:  # softmax of the local vocabulary slice, in-range mask, local targets, valid, weights
            logits += n * (cfg.padded_vocab_size(tp) // tp * FP32 + 1 + INT64 + 1 + FP32)
    out = {"layers": per_layer, "embedding": int(round(embedding)),
           "logits_loss": int(round(logits)), "recompute_working_set": int(working)}
    out["total"] = sum(per_layer) + out["embedding"] + out["logits_loss"]
    return out


def korthikanti_bytes_per_layer(*, s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False,
                                recompute: str = "none", density: float = 1.0) -> float:
    """Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"),
    Table 2, 16-bit activations, 1-byte dropout masks, materialised attention scores:
      TP:        sbh (10 + 24/t + 5as/(ht))      TP + SP:   sbh (34/t + 5as/(ht))
      selective: the 5as/(ht) term dropped       full:      2sbh (the layer input; 2sbh/t with SP)
    `density` scales the score term for block-sparse layers (only the kept blocks are stored)."""
    if recompute == "full":
        return 2.0 * s * b * h / (t if sp else 1)
    scores = 0.0 if recompute == "selective" else 5.0 * a * s / (h * t) * density
    if recompute not in ("none", "selective"):
        raise ConfigError(f"recompute={recompute!r} is unknown; expected none, selective or full")
    if sp:
        return s * b * h * (34.0 / t + scores)
    return s * b * h * (10.0 + 24.0 / t + scores)
