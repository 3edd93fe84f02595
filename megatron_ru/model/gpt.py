"""GPTModel: embeddings → transformer blocks → final norm → vocab-parallel head; one class for
training and sampling, for both families (ruGPT-3 / GPT-3 and T-lite / Llama)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from ..parallel import context
from ..parallel.cross_entropy import IGNORE_INDEX, vocab_parallel_cross_entropy
from ..parallel.layers import (ColumnParallelLinear, VocabParallelEmbedding,
                               initialize_parameters, tag)
from ..parallel.mappings import copy_to_region, gather_sequence_linear, scatter_to_sequence
from ..parallel.state import ParallelState
from .attention import Attention
from .kv_cache import KVCache
from .mlp import MLP
from .sparse_attention import BlockSparseAttention
from .sparsity import layout_for_tp_rank
from .norms import LayerNorm, RMSNorm
from .rotary import inverse_frequencies, rope_cos_sin


def build_sparse_attention(config: ModelConfig, ps: ParallelState,
                           device=None) -> Optional[BlockSparseAttention]:
    """This rank's heads of the layout for max_position_embeddings (rounded up to the block),
    shared by all sparse layers; None when every layer is dense. With context parallelism the
    rank attends for its CP share of its TP rank's heads (parallel/context.py): those rows."""
    if not any(config.sparse_layers()):
        return None
    block = int(config.sparse_attention.get("block", 16))
    seq = -(-config.max_position_embeddings // block) * block
    with torch.device("cpu"):  # small, and buildable even while the model is built on meta
        layout = layout_for_tp_rank(config.sparse_attention, config.num_attention_heads, seq,
                                    ps.tp_rank, ps.tp_size,
                                    ru_gpts_compat=config.sparse_ru_gpts_head_indexing)
        share = layout.shape[0] // ps.cp_size
        layout = layout[ps.cp_rank * share:(ps.cp_rank + 1) * share]  # (H_local / CP, nb, nb)
    sparse = BlockSparseAttention(layout, block, impl=config.sparse_impl)
    if device is not None and torch.device(device).type != "meta":
        sparse.to(device)
    return sparse


class _RealVocabLinear(torch.autograd.Function):
    """x @ weight[:v].T whose weight gradient is written straight into a padded-size buffer
    (autograd's slice backward would allocate, zero-fill and copy the whole table)."""

    @staticmethod
    def forward(ctx, x, weight, v):
        ctx.save_for_backward(x, weight)
        ctx.v = v
        return F.linear(x, weight[:v])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        v = ctx.v
        grad_x = grad @ weight[:v] if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty_like(weight)
            torch.mm(grad.reshape(-1, v).t(), x.reshape(-1, x.shape[-1]), out=grad_w[:v])
            grad_w[v:].zero_()
        return grad_x, grad_w, None


class TransformerBlock(nn.Module):
    """Pre-norm block: x + drop(attn(norm(x))), then x + drop(mlp(norm(x)))."""

    def __init__(self, config: ModelConfig, ps: ParallelState, layer_idx: int, *,
                 sparse: Optional[BlockSparseAttention] = None, device=None, dtype=None) -> None:
        super().__init__()
        norm = RMSNorm if config.is_llama else LayerNorm
        self.norm1 = norm(config.hidden_size, config.norm_eps, device=device, dtype=dtype)
        self.attn = Attention(config, ps, layer_idx, sparse=sparse, device=device, dtype=dtype)
        self.norm2 = norm(config.hidden_size, config.norm_eps, device=device, dtype=dtype)
        self.mlp = MLP(config, ps, device=device, dtype=dtype)
        self.dropout, self.ps = config.hidden_dropout, ps

    sequence_parallel = False  # x is this TP rank's shard of the sequence (B, T/TP, H)

    def forward(self, x, rope=None, cache: Optional[KVCache] = None, positions=None,
                attention_mask=None):
        x = x + self._dropout(self.attn(self.norm1(x), rope, cache, positions, attention_mask))
        return x + self._dropout(self.mlp(self.norm2(x)))

    def _dropout(self, y):
        if not (self.training and self.dropout > 0.0):
            return y
        if self.sequence_parallel:  # each TP rank holds other tokens: its own RNG stream
            with self.ps.rng.fork():
                return F.dropout(y, self.dropout, True)
        # Replicated activations: the default RNG stream is identical on all TP ranks.
        return F.dropout(y, self.dropout, True)


class GPTModel(nn.Module):
    """`forward(tokens, positions=None, cache=None, labels=None)` returns this rank's
    vocabulary slice of the logits (B, T, V_local), or the mean loss when `labels` are given.
    `loss_mask` (B, T) weights the loss; `attention_mask` (B, 1, T, T), True = masked out
    (Megatron's convention, e.g. from --reset-attention-mask), replaces the causal mask in
    dense layers.

    With context parallelism (`parallel_state.cp_size` > 1, training only) `tokens` etc. are
    this CP rank's slice of each sequence and the loss is the whole sequences' mean.

    `parallel_state=None` means one process and no parallelism. Weights are drawn from `seed`
    independently of the TP size. Build under `torch.device("meta")` to count parameters of
    large presets without memory.

    `config.sequence_parallel` at TP > 1 (Megatron's sequence parallelism) applies to training
    forwards with autograd on and without a cache: from the embedding to the final norm every
    activation outside attention and MLP is this rank's shard of the sequence (B, T/TP, H); the
    hidden states are gathered again before the head. Sampling, evaluation (eval mode or no_grad)
    and KV-cache decoding run the plain TP path, so a model trained this way loads and samples
    like any other.
    """

    def __init__(self, config: ModelConfig, parallel_state: Optional[ParallelState] = None, *,
                 seed: int = 1234, initialize: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        ps = parallel_state or ParallelState.single()
        ps.validate(config)
        self.config, self.ps = config, ps
        h, std = config.hidden_size, config.init_method_std
        self.padded_vocab_size = config.padded_vocab_size(ps.tp_size)
        self.embed = VocabParallelEmbedding(self.padded_vocab_size, h, parallel_state=ps,
                                            real_rows=config.vocab_size, init_std=std,
                                            device=device, dtype=dtype)
        self.pos_embed = None
        if not config.is_llama:
            self.pos_embed = nn.Embedding(config.max_position_embeddings, h, device=device, dtype=dtype)
            tag(self.pos_embed.weight, None, ("normal", std))
        sparse = build_sparse_attention(config, ps, device)
        self.blocks = nn.ModuleList(
            TransformerBlock(config, ps, i, sparse=sparse if is_sparse else None, device=device,
                             dtype=dtype)
            for i, is_sparse in enumerate(config.sparse_layers()))
        norm = RMSNorm if config.is_llama else LayerNorm
        self.final_norm = norm(h, config.norm_eps, device=device, dtype=dtype)
        self.lm_head = None
        if not config.tie_word_embeddings:
            self.lm_head = ColumnParallelLinear(h, self.padded_vocab_size, parallel_state=ps,
                                                bias=False, init_std=std, device=device, dtype=dtype)
            self.lm_head.weight.init_spec = ("normal_rows", std, config.vocab_size)
        self.logits_head: Optional[nn.Module] = None  # inference/quantize.py may set a quantized head
        self.checkpoint_activations = config.checkpoint_activations
        self.sequence_parallel = bool(config.sequence_parallel) and ps.tp_size > 1
        self._sp_active = False
        if initialize:  # False: weights left uninitialised, to be loaded from a checkpoint
            self.reset_parameters(seed)

    @property
    def vocab_start(self) -> int:
        return self.embed.vocab_start

    def reset_parameters(self, seed: int) -> None:
        initialize_parameters(self, seed, self.ps.tp_rank, self.ps.tp_size)

    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    # ---- forward --------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, labels: Optional[torch.Tensor] = None,
                loss_mask: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                logits_index: Optional[torch.Tensor | str] = None) -> torch.Tensor:
        """`logits_index`: compute logits only at index (B,) of each row, or "last" → (B, V_local)
        (sampling needs one position; skips the vocabulary projection elsewhere)."""
        b, t = tokens.shape
        start = cache.length if cache is not None else 0
        if self.ps.cp_size > 1:  # tokens: this CP rank's slice of each sequence (parallel/context.py)
            if cache is not None or attention_mask is not None:
                raise ValueError("a context-parallel model takes sequence slices for training: "
                                 "no KV cache and no attention mask (sample at CP = 1)")
            start = self.ps.cp_rank * t  # the slice's global positions
        max_pos = self.config.max_position_embeddings
        explicit = positions  # per-row positions (only meaningful with a cache)
        if positions is None:
            if start + t > max_pos:
                raise ValueError(f"sequence reaches position {start + t} but the model has "
                                 f"max_position_embeddings={max_pos}")
            positions = torch.arange(start, start + t, device=tokens.device).expand(b, t)
        elif not torch.compiler.is_compiling() and positions.numel() and \
                int(positions.max()) >= max_pos:  # compiled callers check positions themselves
            raise ValueError(f"positions reach {int(positions.max())} but the model has "
                             f"max_position_embeddings={max_pos}")
        if cache is not None:
            cache.begin(t, explicit)
        # sequence parallelism saves activation memory for backward: only where there is one
        self.set_sequence_parallel(self.sequence_parallel and self.training and cache is None
                                   and logits_index is None and torch.is_grad_enabled())
        if self._sp_active and t % self.ps.tp_size:
            raise ValueError(f"sequence parallelism: sequence length {t} is not divisible by the "
                             f"tensor-parallel size {self.ps.tp_size}")
        x = self.embed_tokens(tokens, positions)  # (B, T, H); sequence parallel: (B, T/TP, H)
        rope = self.rope(positions, x.dtype)
        use_ckpt = self.checkpoint_activations and self.training and cache is None
        for block in self.blocks:
            if use_ckpt:
                x = checkpoint(block, x, rope, None, None, attention_mask, use_reentrant=False,
                               context_fn=self.ps.rng.checkpoint_context())
            else:
                x = block(x, rope, cache, explicit, attention_mask)
        if cache is not None:
            cache.advance()
        if logits_index is not None:
            if isinstance(logits_index, str):
                x = x[:, -1]  # (B, H)
            else:
                x = x[torch.arange(b, device=x.device), logits_index]  # (B, H)
        logits = self.compute_logits(self.final_norm(x))
        if labels is None:
            return logits
        return self.loss(logits, labels, loss_mask)

    def set_sequence_parallel(self, active: bool) -> None:
        """Switch the layers between sequence-parallel (B, T/TP, H) activations and replicated
        ones (B, T, H); `forward` calls it for every pass (adapters added later included).
        Nothing to do while it stays off (decoding, compiled or not, never pays for it)."""
        active = bool(active) and self.ps.tp_size > 1
        if not active and not self._sp_active:
            return
        group = self.ps.tp_comm if active else None
        for module in self.modules():
            if hasattr(module, "sequence_parallel_group"):  # norms: sum their grads over TP
                module.sequence_parallel_group = group
            elif hasattr(module, "sequence_parallel") and module is not self:
                module.sequence_parallel = active
        self._sp_active = active

    # ---- pieces of the forward, shared with the pipeline stages (parallel/pipeline.py) -------
    def embed_tokens(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) at positions (B, T) → hidden states (B, T, H), dropout applied.
        Sequence parallel: this rank's shard (B, T/TP, H); the learned position embeddings are
        looked up for all T and cut to the shard (backward all-gathers: the table's gradient is
        the whole sequence's, the same on every TP rank)."""
        x = self.embed(tokens)  # (B, T, H); sequence parallel: reduce-scattered to (B, T/TP, H)
        if self.pos_embed is not None:
            pos = self.pos_embed(positions)  # (B, T, H)
            x = x + (scatter_to_sequence(pos, self.ps.tp_comm) if self._sp_active else pos)
        if self._sp_active and self.training and self.config.hidden_dropout > 0.0:
            with self.ps.rng.fork():  # other tokens on every TP rank: its own stream
                return F.dropout(x, self.config.hidden_dropout, True)
        return F.dropout(x, self.config.hidden_dropout, self.training)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> Optional[tuple]:
        """RoPE (cos, sin) for positions (B, T) (llama family); None for learned positions."""
        if not self.config.is_llama:
            return None
        return rope_cos_sin(positions, self._inverse_frequencies(positions.device), dtype)

    def _inverse_frequencies(self, device) -> torch.Tensor:
        """RoPE inverse frequencies, computed once per device (not a buffer: meta-safe, and
        never stored in checkpoints)."""
        cache = self.__dict__.setdefault("_inv_freq", {})
        key = str(device)
        if key not in cache:
            cache[key] = inverse_frequencies(self.config.head_dim, self.config.rope_theta).to(device)
        return cache[key]

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H) → (B, T, V_local). TP=1: exactly the real vocabulary. TP>1: this rank's
        padded slice, with padding columns at -inf so they never win a softmax or a sample."""
        group, v = self.ps.tp_comm, self.config.vocab_size
        lora = getattr(self, "lora_head", None)  # LoRA on the output projection (model/lora.py)
        if self._sp_active:  # (B, T/TP, H) → (B, T, V_local); keeps the shard, not the gathered x
            logits = gather_sequence_linear(x, self.output_weight(), None, group)
            return self._mask_padding(logits if lora is None else logits + lora(x))
        if self.logits_head is not None:  # x (B, T, H) → (B, T, V_local) by the head module
            logits = self.logits_head(x if group is None else copy_to_region(x, group))
            if group is None:
                logits = logits[..., :v]
                return logits if lora is None else logits + lora(x)[..., :v]
        elif group is None:
            logits = _RealVocabLinear.apply(x, self.output_weight(), v)
            return logits if lora is None else logits + lora(x)[..., :v]
        else:
            logits = F.linear(copy_to_region(x, group), self.output_weight())
        if lora is not None:
            logits = logits + lora(x)
        return self._mask_padding(logits)

    def _mask_padding(self, logits: torch.Tensor) -> torch.Tensor:
        real_end = self.config.vocab_size - self.vocab_start
        if real_end < logits.shape[-1]:
            logits = logits.clone()
            logits[..., max(real_end, 0):] = float("-inf")
        return logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor,
             loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean token loss over labels != -100 (weighted by `loss_mask` when given)."""
        per_token = vocab_parallel_cross_entropy(logits, labels, self.ps.tp_comm, self.vocab_start)
        weights = (labels != IGNORE_INDEX).float()
        if loss_mask is not None:
            weights = weights * loss_mask.float()
        if self.ps.cp_size > 1:  # this rank's slice: the mean over the whole sequences
            return context.sequence_mean((per_token * weights).sum(), weights.sum(), self.ps)
        return (per_token * weights).sum() / weights.sum().clamp(min=1.0)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Full logits over the real vocabulary (B, T, V) on every TP rank (no autograd)."""
        group = self.ps.tp_comm
        if group is None:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.ps.tp_size)]
        dist.all_gather(parts, logits.contiguous(), group=group)
        return torch.cat(parts, dim=-1)[..., : self.config.vocab_size]

    def new_cache(self, batch_size: int, max_length: Optional[int] = None, dtype=None,
                  static_window: bool = False) -> KVCache:
        cfg = self.config
        param = self.embed.weight
        return KVCache(num_layers=cfg.num_layers, batch_size=batch_size,
                       max_length=max_length or cfg.max_position_embeddings,
                       kv_heads=cfg.num_key_value_heads // self.ps.tp_size, head_dim=cfg.head_dim,
                       device=param.device, dtype=dtype or param.dtype, static_window=static_window)
