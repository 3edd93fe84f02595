"""Pipeline parallelism: stages cut from the one GPTModel, the layer split, tied-embedding sync.

The engine is DeepSpeed's `PipelineModule` / `PipelineEngine` (1F1B schedule, tied weights via
`TiedLayerSpec`, ZeRO 0/1). Its layer list is made of the GPTModel's own modules, wrapped in
thin adapters that take and return one activation tensor:

    index 0        EmbedPipe (embed + pos_embed)           first stage; tied with the head (gpt3)
    1 .. L         BlockPipe(i) (model.blocks[i])          split over stages (`--pipeline-split`)
    L + 1          FinalNormPipe (model.final_norm)        last stage
    L + 2          HeadPipe (lm_head), or the tied EmbedPipe run as the head

With sequence parallelism the stages pass this TP rank's sequence shard (B, T/TP, H) and the
head gathers it (GPTModel.compute_logits); DeepSpeed must then send every TP rank's activations
whole (`pipe_partitioned` / `grad_partitioned` off: `SEQUENCE_PARALLEL_PIPE`).

The loss (vocabulary-parallel cross entropy with the loss mask) is the model's own `loss`. The
GPTModel is built on the meta device and only this stage's parameters are materialised and
initialised (by name, so weights equal the single-process model's for the same seed). Every
stage holds at least one transformer layer (a stage of only the embedding hangs DeepSpeed).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ConfigError, ModelConfig

SPLITS = ("uniform", "balanced")
# DeepSpeed's `pipeline` section for sequence parallelism: by default the engine cuts a stage's
# output into TP pieces and sends one per TP rank, which is only right when all TP ranks hold
# the same activations (they hold different sequence shards here).
SEQUENCE_PARALLEL_PIPE = {"pipe_partitioned": False, "grad_partitioned": False}


# ---- the split -------------------------------------------------------------------------------
def layer_costs(config: ModelConfig, seq_length: int, sparse_density: float = 1.0,
                tp_size: int = 1) -> tuple[float, list[float], float]:
    """Forward FLOPs per token of (embedding, each transformer layer, final norm + head + loss).
    A layer: 2 x its weight count (QKV, projection, MLP) + 2 x s x h of causal attention (scores
    and values, half the square), the attention part scaled by `sparse_density` (fraction of the
    causal blocks kept) in block-sparse layers. The head: 2 x h x V_pad; the embedding: a lookup,
    counted as h (it costs memory, not FLOPs)."""
    h, d = config.hidden_size, config.head_dim
    qkv = h * (config.num_attention_heads + 2 * config.num_key_value_heads) * d
    mlp_mats = 3 if config.is_llama else 2
    weights = qkv + config.num_attention_heads * d * h + mlp_mats * h * config.ffn_hidden_size
    attention = 2.0 * seq_length * h
    blocks = [2.0 * weights + attention * (sparse_density if sparse else 1.0)
              for sparse in config.sparse_layers()]
    head = 2.0 * h * config.padded_vocab_size(tp_size)
    return float(h), blocks, head


def stage_costs(counts: list[int], costs: tuple[float, list[float], float]) -> list[float]:
    embed, blocks, head = costs
    out, start = [], 0
    for i, n in enumerate(counts):
        c = sum(blocks[start:start + n]) + (embed if i == 0 else 0.0)
        out.append(c + (head if i == len(counts) - 1 else 0.0))
        start += n
    return out


def _balanced(costs: tuple[float, list[float], float], pp: int) -> list[int]:
    """Contiguous split of the layers into `pp` non-empty stages minimising the costliest stage
    (embedding on the first, head on the last); exact, by dynamic programming."""
    embed, blocks, head = costs
    n = len(blocks)
    prefix = [0.0]
    for c in blocks:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][j]: minimal max cost placing layers [0, j) on stages 0..k-1
    best = [[inf] * (n + 1) for _ in range(pp + 1)]
    cut = [[0] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = 0.0
    for k in range(1, pp + 1):
        for j in range(k, n - (pp - k) + 1):
            for i in range(k - 1, j):
                c = prefix[j] - prefix[i] + (embed if k == 1 else 0.0) + (head if k == pp else 0.0)
                value = max(best[k - 1][i], c)
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    counts, j = [], n
    for k in range(pp, 0, -1):
        i = cut[k][j]
        counts.append(j - i)
        j = i
    return counts[::-1]


def split_layers(config: ModelConfig, pp: int, split: str = "uniform", *, seq_length: int = 1024,
                 sparse_density: float = 1.0, tp_size: int = 1) -> list[int]:
    """Transformer layers per stage for `--pipeline-split uniform|balanced|L0,L1,...`."""
    n = config.num_layers
    if pp > n:
        raise ConfigError(f"--pipeline-model-parallel-size={pp} is larger than --num-layers={n}: "
                          "every pipeline stage needs at least one transformer layer")
    if split == "uniform":
        return [n // pp + (1 if s < n % pp else 0) for s in range(pp)]
    if split == "balanced":
        return _balanced(layer_costs(config, seq_length, sparse_density, tp_size), pp)
    try:
        counts = [int(x) for x in split.split(",")]
    except ValueError:
        raise ConfigError(f"--pipeline-split={split!r} must be uniform, balanced or a comma-separated "
                          "list of layer counts, one per stage (e.g. 5,6,6,7)") from None
    if len(counts) != pp:
        raise ConfigError(f"--pipeline-split={split} names {len(counts)} stages but "
                          f"--pipeline-model-parallel-size={pp}")
    if any(c < 1 for c in counts):
        raise ConfigError(f"--pipeline-split={split}: every stage needs at least one layer")
    if sum(counts) != n:
        raise ConfigError(f"--pipeline-split={split} sums to {sum(counts)} layers but --num-layers={n}")
    return counts


def describe_split(counts: list[int], costs: tuple[float, list[float], float],
                   sparse: Optional[list[bool]] = None) -> str:
    """One line per stage: its layers and estimated share of the forward FLOPs."""
    per_stage = stage_costs(counts, costs)
    total, lines, start = sum(per_stage), [], 0
    for s, (n, c) in enumerate(zip(counts, per_stage)):
        extra = (["embedding"] if s == 0 else []) + (["norm + head + loss"] if s == len(counts) - 1 else [])
        kinds = ""
        if sparse is not None and any(sparse):
            ns = sum(sparse[start:start + n])
            kinds = f" ({ns} sparse, {n - ns} dense)"
        lines.append(f"  stage {s}: layers {start}-{start + n - 1}{kinds}"
                     f"{' + ' + ', '.join(extra) if extra else ''}: {100 * c / total:.1f}% of the "
                     f"estimated forward FLOPs")
        start += n
    return "\n".join(lines)


def stage_bounds(counts: list[int]) -> list[int]:
    """DeepSpeed's `parts` over the layer list [embed, L blocks, norm, head]."""
    parts = [0]
    for s, n in enumerate(counts):
        parts.append(parts[-1] + n + (1 if s == 0 else 0))
    parts[-1] += 2
    return parts


# ---- the stage adapters (the GPTModel's own modules) -------------------------------------------
class _Piece(nn.Module):
    """Base of the adapters: keeps the GPTModel out of the module tree (no parameter of another
    stage is registered here)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.__dict__["_model"] = model


class EmbedPipe(_Piece):
    """tokens (B, T) → hidden (B, T, H); as the tied head: hidden → logits (`head_forward`)."""

    def __init__(self, model, head: bool = False) -> None:
        super().__init__(model)
        self.embed = model.embed
        self.pos_embed = None if head else model.pos_embed  # the head copy needs the table only

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return self._model.embed_tokens(tokens, positions)  # (B, T, H)


def head_forward(module: EmbedPipe, x):
    """The tied embedding used as the output projection on the last stage."""
    return module._model.compute_logits(x)


class BlockPipe(_Piece):
    """One transformer block; RoPE tables (llama) are recomputed per stage for positions 0..T-1."""

    def __init__(self, model, index: int) -> None:
        super().__init__(model)
        self.index = index
        self.block = model.blocks[index]

    def forward(self, x):
        m = self._model
        t = x.shape[1] * (m.ps.tp_size if m._sp_active else 1)  # sequence parallel: x (B, T/TP, H)
        positions = torch.arange(t, device=x.device).expand(x.shape[0], -1)
        rope = m.rope(positions, x.dtype)
        if m.checkpoint_activations and self.training:
            return checkpoint(self.block, x, rope, None, None, None, use_reentrant=False,
                              context_fn=m.ps.rng.checkpoint_context())
        return self.block(x, rope)


class FinalNormPipe(_Piece):
    def __init__(self, model) -> None:
        super().__init__(model)
        self.final_norm = model.final_norm

    def forward(self, x):
        return self.final_norm(x)


class HeadPipe(_Piece):
    """The untied output projection (llama): hidden → this rank's vocabulary slice of logits."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.lm_head = model.lm_head

    def forward(self, x):
        return self._model.compute_logits(x)


class LossFn:
    """DeepSpeed's `loss_fn(outputs, labels)`: the model's own loss; labels = (labels, loss_mask)
    or, for SFT data, (labels, loss_mask, weight): the micro-batch's mean times its float64 weight
    (training/finetune.py's GlobalTokenMean), as the single-stage SFT step computes it."""

    def __init__(self, model) -> None:
        self.model = model
        self.scale = 1.0  # fault injection in tests (training/guards.py): inf or a spike factor
        self.__name__ = "vocab_parallel_cross_entropy"

    def __call__(self, logits, labels):
        target, mask, *weight = labels
        loss = self.model.loss(logits, target, mask)
        if weight:
            loss = loss * float(weight[0])  # a Python float, as finetune.forward multiplies
        return loss if self.scale == 1.0 else loss * self.scale


# ---- building a stage --------------------------------------------------------------------------
def owned_prefixes(config: ModelConfig, counts: list[int], stage: int) -> list[str]:
    """GPTModel parameter-name prefixes this stage holds."""
    start = sum(counts[:stage])
    out = [f"blocks.{i}." for i in range(start, start + counts[stage])]
    last = stage == len(counts) - 1
    if stage == 0:
        out += ["embed.", "pos_embed."]
    if last and config.tie_word_embeddings:
        out += ["embed."]
    if last:
        out += ["final_norm.", "lm_head."]
    return out


def materialize_stage(model, counts: list[int], stage: int, seed: int, device) -> None:
    """Give the parameters of this stage storage and their seeded values (a GPTModel built on
    meta with initialize=False); the other stages' parameters stay on meta."""
    prefixes = owned_prefixes(model.config, counts, stage)
    for name, module in model.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            full = f"{name}.{pname}" if name else pname
            if not p.is_meta or not any(full.startswith(x) for x in prefixes):
                continue
            new = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                               requires_grad=p.requires_grad)
            new.__dict__.update(p.__dict__)  # init_spec, shard_spec
            setattr(module, pname, new)
    with torch.no_grad():
        model.reset_parameters(seed)  # meta parameters are skipped


def build_pipeline_module(model, ps, counts: list[int], *, topology=None):
    """DeepSpeed's PipelineModule over the stage adapters of `model`, split as `counts`."""
    from deepspeed.pipe import TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    cfg = model.config
    if topology is None:  # axes ['pipe', 'data', 'model']: model (TP) innermost, pipe outermost
        topology = PipeModelDataParallelTopology(num_pp=ps.pp_size, num_mp=ps.tp_size, num_dp=ps.dp_size)
    layers: list = []
    if cfg.tie_word_embeddings:
        layers.append(TiedLayerSpec("embed", EmbedPipe, model, tied_weight_attr=["embed.weight"]))
    else:
        layers.append(EmbedPipe(model) if ps.is_first_stage else _Placeholder())
    start = sum(counts[:ps.pp_rank])
    mine = range(start, start + counts[ps.pp_rank])
    layers += [BlockPipe(model, i) if i in mine else _Placeholder() for i in range(cfg.num_layers)]
    layers.append(FinalNormPipe(model) if ps.is_last_stage else _Placeholder())
    if cfg.tie_word_embeddings:
        layers.append(TiedLayerSpec("embed", EmbedPipe, model, head=not ps.is_first_stage,
                                    forward_fn=head_forward, tied_weight_attr=["embed.weight"]))
    else:
        layers.append(HeadPipe(model) if ps.is_last_stage else _Placeholder())
    parts = ",".join(str(p) for p in stage_bounds(counts))
    return _FixedSplitPipeline(layers=layers, topology=topology, loss_fn=LossFn(model),
                               partition_method=f"parts:{parts}", activation_checkpoint_interval=0)


class _Placeholder(nn.Module):
    """Stands for a layer of another stage in the layer list (never built or run here)."""

    def forward(self, x):  # pragma: no cover - DeepSpeed only builds this stage's layers
        raise RuntimeError("a layer of another pipeline stage ran on this one")


def _fixed_split_class():
    from deepspeed.pipe import PipelineModule

    class FixedSplitPipeline(PipelineModule):
        """PipelineModule whose stage boundaries are given (`partition_method="parts:0,3,..."`)."""

        def _partition_layers(self, method="uniform"):
            self.parts = [int(x) for x in method.split(":", 1)[1].split(",")]
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    return FixedSplitPipeline


def _FixedSplitPipeline(**kwargs):  # noqa: N802 - a class made on first use (DeepSpeed is heavy)
    return _fixed_split_class()(**kwargs)
