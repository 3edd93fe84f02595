"""Megatron-Core checkpoint fixtures built from Core's documented names and layouts (a helper, not a test).

QKV rows per query group, SwiGLU fc1 = [gate; up], TE fused-norm keys, _extra_state entries, PP
layer offsets; written with torch.save (`--ckpt-format torch`) or torch.distributed.checkpoint
(`torch_dist`, per-layer tensors stacked). Used by tests/unit/test_megatron_core.py,
tests/e2e/test_megatron_core_cli.py and the writer script tests/e2e/mcore_dist_writer.py.
"""
import argparse
import io
import sys
import types

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from megatron_ru import GPTModel, ModelConfig

V, PAD_TO = 1000, 128


class FakeEnum:  # pickled as a Megatron class: the reader must not need Megatron to unpickle it
    pass


FakeEnum.__module__ = "megatron._fixture_enums"  # importable under that name for pickling
sys.modules.setdefault(FakeEnum.__module__, types.ModuleType(FakeEnum.__module__)).FakeEnum = FakeEnum


def core_args(cfg: ModelConfig, tp: int, pp: int, te: bool) -> argparse.Namespace:
    llama = cfg.is_llama
    padded = -(-cfg.vocab_size // (PAD_TO * tp)) * PAD_TO * tp
    return argparse.Namespace(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads, group_query_attention=llama,
        num_query_groups=cfg.num_key_value_heads if llama else None,
        max_position_embeddings=cfg.max_position_embeddings,
        position_embedding_type="rope" if llama else "learned_absolute", rotary_base=int(cfg.rope_theta),
        normalization="RMSNorm" if llama else "LayerNorm", norm_epsilon=cfg.norm_eps, swiglu=llama,
        add_bias_linear=not llama, add_qkv_bias=not llama, bias_gelu_fusion=not llama,
        untie_embeddings_and_output_weights=not cfg.tie_word_embeddings, vocab_size=V,
        padded_vocab_size=padded, make_vocab_size_divisible_by=PAD_TO, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, transformer_impl="transformer_engine" if te else "local",
        model_type=FakeEnum())


def full_core(model: GPTModel, tp: int) -> dict:
    """Global Core tensors per layer (TP ranks' rows concatenated), junk vocabulary padding."""
    cfg, sd = model.config, {k: v.detach().clone() for k, v in model.state_dict().items()}
    padded = -(-V // (PAD_TO * tp)) * PAD_TO * tp
    junk = lambda t: torch.cat([t[:V], torch.randn(padded - V, t.shape[1])])  # noqa: E731
    out = {"embedding.word_embeddings.weight": junk(sd["embed.weight"])}
    if "pos_embed.weight" in sd:
        out["embedding.position_embeddings.weight"] = sd["pos_embed.weight"]
    if not cfg.tie_word_embeddings:
        out["output_layer.weight"] = junk(sd["lm_head.weight"])
    for k in ("weight", "bias"):
        if f"final_norm.{k}" in sd:
            out[f"decoder.final_layernorm.{k}"] = sd[f"final_norm.{k}"]
    hn, nq, ng = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    for i in range(cfg.num_layers):
        p, c = f"blocks.{i}.", f"decoder.layers.{i}."
        for kind in ("weight", "bias"):
            if p + f"attn.qkv.{kind}" not in sd:
                continue
            t = sd[p + f"attn.qkv.{kind}"]
            q, k, v = t.split([nq * hn, ng * hn, ng * hn])
            per = nq // ng  # Core: for each query group, its query heads, then its key, its value
            rows = [torch.cat([q[g * per * hn:(g + 1) * per * hn], k[g * hn:(g + 1) * hn],
                               v[g * hn:(g + 1) * hn]]) for g in range(ng)]
            out[c + f"self_attention.linear_qkv.{kind}"] = torch.cat(rows)
            out[c + f"self_attention.linear_proj.{kind}"] = sd[p + f"attn.dense.{kind}"]
            out[c + f"mlp.linear_fc1.{kind}"] = sd[p + f"mlp.up.{kind}"]  # llama: [all gate; all up]
            out[c + f"mlp.linear_fc2.{kind}"] = sd[p + f"mlp.down.{kind}"]
            out[c + f"input_layernorm.{kind}"] = sd.get(p + f"norm1.{kind}")
            out[c + f"pre_mlp_layernorm.{kind}"] = sd.get(p + f"norm2.{kind}")
    return {k: v for k, v in out.items() if v is not None}


def te_names(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        k = k.replace("input_layernorm.", "self_attention.linear_qkv.layer_norm_")
        out[k.replace("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_")] = v
    return out


def rank_slice(key: str, t: torch.Tensor, cfg: ModelConfig, r: int, tp: int) -> torch.Tensor:
    """TP rank r's part of a global Core tensor, as Megatron's parallel layers hold it."""
    col = ("word_embeddings", "output_layer", "linear_qkv.weight", "linear_qkv.bias",
           "linear_fc1.weight", "linear_fc1.bias")
    if "layer_norm" in key or "layernorm" in key or "position_embeddings" in key:
        return t
    if key.endswith("linear_proj.weight") or key.endswith("linear_fc2.weight"):
        return t.chunk(tp, 1)[r]
    if any(key.endswith(c) or c in key for c in col):
        if "linear_fc1" in key and cfg.is_llama:  # rank rows [gate_r; up_r]
            g, u = t.chunk(2)
            return torch.cat([g.chunk(tp)[r], u.chunk(tp)[r]])
        return t.chunk(tp)[r]  # qkv: query groups are contiguous per rank
    return t


def write_torch(d, model, tp, pp, te):
    cfg, glob = model.config, full_core(model, tp)
    glob = te_names(glob) if te else glob
    per = cfg.num_layers // pp
    for s in range(pp):
        for r in range(tp):
            state = {}
            for key, t in glob.items():
                if key.startswith("decoder.layers."):
                    i = int(key.split(".")[2])
                    if not s * per <= i < (s + 1) * per:
                        continue
                    key = key.replace(f"layers.{i}.", f"layers.{i - s * per}.")  # local numbering
                elif key.startswith("embedding.") and s != 0:
                    continue
                elif key.startswith(("decoder.final", "output_layer")) and s != pp - 1:
                    continue
                state[key] = rank_slice(key, t, cfg, r, tp).clone()
            if s == pp - 1 and pp > 1 and cfg.tie_word_embeddings:  # last stage's tied copy
                state["output_layer.weight"] = rank_slice("output_layer", glob["embedding.word_embeddings.weight"],
                                                          cfg, r, tp).clone()
            if te:
                for j in range(per):
                    for m in ("self_attention.linear_qkv", "self_attention.core_attention",
                              "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"):
                        state[f"decoder.layers.{j}.{m}._extra_state"] = io.BytesIO(b"te")
            name = f"mp_rank_{r:02d}" + (f"_{s:03d}" if pp > 1 else "")
            (d / "iter_0000020" / name).mkdir(parents=True)
            torch.save({"model": state, "args": core_args(cfg, tp, pp, te), "checkpoint_version": 3.0,
                        "iteration": 20}, d / "iter_0000020" / name / "model_optim_rng.pt")
    (d / "latest_checkpointed_iteration.txt").write_text("20")


class RawBytesPlanner(DefaultSavePlanner):  # as Megatron's: objects are already serialised
    def transform_object(self, write_item, object):
        return object


def write_dist(d, model, tp, te, common_in_dcp):
    cfg, glob = model.config, full_core(model, tp)
    glob = te_names(glob) if te else glob
    stacked, state = {}, {}
    for key, t in glob.items():
        if key.startswith("decoder.layers."):
            stacked.setdefault("decoder.layers." + key.split(".", 3)[3], []).append(t)
        else:
            state[key] = t
    state.update({k: torch.stack(v) for k, v in stacked.items()})  # (L, ...)
    if te:
        state["decoder.layers.self_attention.linear_qkv._extra_state/shard_0.0_2.1"] = io.BytesIO(b"x")
    common = {"args": core_args(cfg, tp, 1, te), "checkpoint_version": 3.0, "iteration": 20}
    it = d / "iter_0000020"
    it.mkdir(parents=True)
    if common_in_dcp:  # Megatron-LM HEAD: the common state is one object inside the DCP
        buf = io.BytesIO()
        torch.save([common], buf)
        buf.seek(0)
        state["common_state/shard_0_1"] = buf
    else:
        torch.save(common, it / "common.pt")
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(it)), planner=RawBytesPlanner(), no_dist=True)
    (it / "metadata.json").write_text('{"sharded_backend": "torch_dist", "sharded_backend_version": 1}')
    (d / "latest_checkpointed_iteration.txt").write_text("20")


def logits(model, n=24):
    x = torch.randint(0, V, (2, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(x)
