"""LoRA adapters on the tensor-parallel layers, split like the layer they wrap (files: checkpoint/lora_files.py).

y = W x + (alpha / r) · B A dropout(x), A (r, in) drawn like PEFT's (Kaiming-uniform), B (out, r)
zero. Tensor parallelism (so TP=2 equals TP=1):
  column-parallel W (rows split): B split by output rows (same sections as W, e.g. q/k/v),
      A replicated; z = A x is identical on all ranks, its gradient is summed over TP
      (copy_to_region) because each rank's B sees only its rows.
  row-parallel W (input columns split): A split by input columns, B replicated; the partial
      z = A_r x_r is all-reduced (reduce_from_region) before B.
  lm_head: the column-parallel output projection (tied or not); B split by vocabulary rows.
  sequence parallel (inputs of column layers / outputs of row layers are sequence shards):
      column: z = A x_shard all-gathered along the sequence; row: z reduce-scattered to the
      shard; the replicated factor (A resp. B) then has its gradient summed over TP.
Adapters hang off the wrapped layer as a child `lora` called from a forward hook, so the base
weights keep their names (checkpoint code is unchanged) and are frozen (requires_grad False,
so they never enter optimizer state). Full (unsharded) adapter tensors are initialised from a
generator seeded by (seed, name) and sliced, so initial adapters do not depend on TP size.

Adapter directories (adapter_config.json + adapter_model.safetensors) are checkpoint/lora_files.py's.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..parallel.layers import ColumnParallelLinear, RowParallelLinear, param_seed, tag
from ..parallel.mappings import (copy_to_region, gather_from_sequence, reduce_from_region,
                                 reduce_scatter_to_sequence, sum_grad_over_group)
from ..parallel.sharding import ShardSpec, shard, unshard
from ..errors import UsageError

TARGETS = ("qkv", "proj", "fc1", "fc2", "lm_head")
ALIASES = {  # Hugging Face module names of both families → ours
    "c_attn": "qkv", "attn.c_proj": "proj", "c_fc": "fc1", "mlp.c_proj": "fc2",
    "o_proj": "proj", "gate_proj": "fc1", "up_proj": "fc1", "down_proj": "fc2",
    "q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv",
}
LAYER_OF = {"qkv": "attn.qkv", "proj": "attn.dense", "fc1": "mlp.up", "fc2": "mlp.down"}


class LoRAError(UsageError):
    """A LoRA flag or adapter directory is wrong; the message names the flag or file."""


def parse_targets(spec) -> list[str]:
    """`qkv,proj,fc1,fc2,lm_head` (or HF names: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,
    down_proj, c_attn, c_fc, attn.c_proj, mlp.c_proj) → our target names, in canonical order."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise LoRAError("--lora-targets is empty; choose from " + ",".join(TARGETS))
    out = set()
    for n in names:
        if n in TARGETS:
            out.add(n)
        elif n in ALIASES:
            out.add(ALIASES[n])
        else:
            raise LoRAError(f"--lora-targets: {n!r} is not a layer of this model; choose from "
                            f"{','.join(TARGETS)} (or {','.join(ALIASES)})")
    for group, whole in ((("q_proj", "k_proj", "v_proj"), "qkv"), (("gate_proj", "up_proj"), "fc1")):
        given = [g for g in group if g in names]
        if given and len(given) != len(group) and whole not in names:
            raise LoRAError(f"--lora-targets: {', '.join(given)} without {', '.join(set(group) - set(given))}"
                            f": they are one fused layer here; list all of them or '{whole}'")
    return [t for t in TARGETS if t in out]


class LoRAAdapter(nn.Module):
    """The low-rank branch of one tensor-parallel linear layer (see the module docstring)."""

    def __init__(self, layer: nn.Module, *, kind: str, rank: int, alpha: float, dropout: float,
                 ps, device=None, dtype=None, sections=None) -> None:
        super().__init__()
        self.kind, self.rank, self.ps = kind, rank, ps
        self.scaling, self.dropout = alpha / rank, dropout
        w = layer.weight
        if kind == "row":
            out_full, in_local = w.shape
            self.A = tag(nn.Parameter(torch.empty(rank, in_local, device=device, dtype=dtype)),
                         ShardSpec(1), ("lora_a",))
            self.B = tag(nn.Parameter(torch.zeros(out_full, rank, device=device, dtype=dtype)), None, ("zeros",))
        else:
            out_local, in_full = w.shape
            self.A = tag(nn.Parameter(torch.empty(rank, in_full, device=device, dtype=dtype)), None, ("lora_a",))
            self.B = tag(nn.Parameter(torch.zeros(out_local, rank, device=device, dtype=dtype)),
                         ShardSpec(0, sections), ("zeros",))

    sequence_parallel = False  # set by GPTModel: activations outside the layers are sequence shards

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.ps.tp_comm
        sp = self.sequence_parallel and group is not None
        if self.dropout > 0 and self.training:
            if self.kind == "row" or sp:  # this rank's features / tokens: its own stream
                with self.ps.rng.fork():
                    x = F.dropout(x, self.dropout, True)
            else:  # replicated input: the default stream is the same on every TP rank
                x = F.dropout(x, self.dropout, True)
        a, b = self.A, self.B
        if not sp:
            z = F.linear(x, a)  # (..., r)
            z = reduce_from_region(z, group) if self.kind == "row" else copy_to_region(z, group)
        elif self.kind == "row":  # x (B, T, in_local) → z (B, T/TP, r); B sees a sequence shard
            z = reduce_scatter_to_sequence(F.linear(x, a), group)
            b = sum_grad_over_group(b, group)
        else:  # x (B, T/TP, in) → z (B, T, r); A sees a sequence shard
            z = gather_from_sequence(F.linear(x, sum_grad_over_group(a, group)), group)
        return F.linear(z, b) * self.scaling  # (..., out or out_local)


def _hook(module, inputs, output):
    return output + module.lora(inputs[0])


def _named_layers(model, targets) -> list[tuple[str, nn.Module, str]]:
    """(name, layer, kind) for every layer a target names; lm_head is handled by the model."""
    out = []
    for i, block in enumerate(model.blocks):
        for t in targets:
            if t == "lm_head":
                continue
            path = LAYER_OF[t]
            layer = block.get_submodule(path)
            kind = "row" if isinstance(layer, RowParallelLinear) else "column"
            assert isinstance(layer, (ColumnParallelLinear, RowParallelLinear)), path
            out.append((f"blocks.{i}.{path}", layer, kind))
    return out


def apply_lora(model, *, rank: int, alpha: float, dropout: float = 0.0, targets=TARGETS,
               seed: int = 1234, freeze: bool = True) -> list[str]:
    """Adds adapters to `model` (a GPTModel) in place; freezes every base parameter. Returns the
    names of the adapter parameters."""
    if rank < 1:
        raise LoRAError(f"--lora-rank {rank} must be >= 1")
    if not 0.0 <= dropout < 1.0:
        raise LoRAError(f"--lora-dropout {dropout} must be in [0, 1)")
    targets = parse_targets(targets)
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    ps, w = model.ps, model.embed.weight
    kw = dict(rank=rank, alpha=alpha, dropout=dropout, ps=ps, device=w.device, dtype=w.dtype)
    for name, layer, kind in _named_layers(model, targets):
        spec = getattr(layer.weight, "shard_spec", None)
        layer.lora = LoRAAdapter(layer, kind=kind, sections=spec.sections if spec else None, **kw)
        layer.register_forward_hook(_hook)
    if "lm_head" in targets:
        head = model.output_weight()
        model.lora_head = LoRAAdapter(_Shape(head), kind="column", **kw)
    model.lora_settings = {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": targets}
    init_adapters(model, seed)
    return [n for n, _ in adapter_parameters(model)]


class _Shape:
    """Stands for the output projection (tied or not), which is no module of its own."""

    def __init__(self, weight):
        self.weight = weight


def adapter_parameters(model) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if ".lora." in n or n.startswith("lora_head.")]


@torch.no_grad()
def init_adapters(model, seed: int) -> None:
    """A: PEFT's kaiming_uniform(a=sqrt(5)) on the full tensor from a (seed, name) generator,
    then this rank's slice; B: zeros."""
    tp_rank, tp = model.ps.tp_rank, model.ps.tp_size
    for name, p in adapter_parameters(model):
        if p.init_spec[0] == "zeros":
            p.zero_()
            continue
        spec = p.shard_spec
        shape = list(p.shape)
        if spec is not None:
            shape[spec.dim] *= tp
        bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform with a=sqrt(5): 1/sqrt(fan_in)
        gen = torch.Generator().manual_seed(param_seed(seed, name))
        full = torch.empty(shape).uniform_(-bound, bound, generator=gen)
        p.copy_(shard(full, spec, tp_rank, tp))


# ---- full adapter tensors -----------------------------------------------------------------------------
def _gathered(model, name: str, p: torch.Tensor) -> torch.Tensor:
    """The full tensor of one adapter parameter (all-gathered over TP; ZeRO-3 partitions gathered)."""
    import torch.distributed as dist
    if hasattr(p, "ds_id"):
        import deepspeed
        with deepspeed.zero.GatheredParameters([p]):
            local = p.detach().clone().float().cpu()
    else:
        local = p.detach().float().cpu()
    spec, ps = p.shard_spec, model.ps
    if spec is None or ps.tp_comm is None:
        return local
    t = local.to(ps.device)
    parts = [torch.empty_like(t) for _ in range(ps.tp_size)]
    dist.all_gather(parts, t, group=ps.tp_comm)
    return unshard([x.cpu() for x in parts], spec)


def adapter_state(model) -> dict:
    """name → full fp32 adapter tensor (collective over TP: every rank must call it). The output
    projection's B keeps the real vocabulary rows only (padding depends on the TP size)."""
    state = {n: _gathered(model, n, p) for n, p in adapter_parameters(model)}
    if "lora_head.B" in state:
        state["lora_head.B"] = state["lora_head.B"][:model.config.vocab_size].clone()
    return state


@torch.no_grad()
def set_adapter_state(model, tensors: dict, source) -> None:
    """Copies full adapter tensors (as `adapter_state` gives them) into this rank's adapters of
    `model` (any TP size); LoRAError naming `source` when a tensor is missing or misshapen."""
    ps = model.ps
    for name, p in adapter_parameters(model):
        if name not in tensors:
            raise LoRAError(f"{source} lacks tensor {name}")
        full = tensors[name]
        if name == "lora_head.B":  # real vocabulary rows on disk: pad to this TP's size
            full = torch.cat([full, full.new_zeros(model.padded_vocab_size - full.shape[0], full.shape[1])])
        local = shard(full, p.shard_spec, ps.tp_rank, ps.tp_size)
        if local.shape != p.shape:
            raise LoRAError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, "
                            f"the model needs {tuple(p.shape)} per rank")
        p.copy_(local)


def merge_into(full: dict, meta: dict, tensors: dict, config: ModelConfig,
               on_tensor: Optional[Callable[[], None]] = None) -> dict:
    """Full base state dict (our names, real vocabulary) + adapters → merged full state dict.
    `on_tensor()` is called after each merged weight (progress)."""
    scale = float(meta["alpha"]) / int(meta["rank"])
    out = dict(full)
    for name in tensors:
        if not name.endswith(".lora.A") and name != "lora_head.A":
            continue
        stem = name[:-len(".A")]
        delta = tensors[stem + ".B"].float() @ tensors[name].float() * scale  # (out, in)
        if stem == "lora_head":
            if config.tie_word_embeddings:
                raise LoRAError("lm_head adapters on a model with tied embeddings cannot be merged "
                                "into its weights (they would change the input embeddings too)")
            key = "lm_head.weight"
        else:
            key = stem[:-len(".lora")] + ".weight"
        base = out[key]
        delta = delta[: base.shape[0]]  # vocabulary rows: the real ones
        out[key] = (base.float() + delta).to(base.dtype)
        if on_tensor is not None:
            on_tensor()
    return out
