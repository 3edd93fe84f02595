"""Megatron-Core import/export: fixtures built here from Core's documented names and layouts
(QKV rows per query group, SwiGLU fc1 = [gate; up], TE fused-norm keys, _extra_state entries, PP
layer offsets), saved with torch.save (`--ckpt-format torch`) and torch.distributed.checkpoint
(`torch_dist`, per-layer tensors stacked); logits after import equal the source model's."""
import argparse
import io
import sys
import types

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from megatron_ru import GPTModel, ModelConfig
from megatron_ru.checkpoint.convert import convert
from megatron_ru.checkpoint.load import detect_format, load_any, load_model, read_config
from megatron_ru.checkpoint.model_io import CheckpointError

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


def tiny(family, tied=None):
    cfg = ModelConfig.from_preset(f"tiny-{family}", num_layers=4, num_attention_heads=8, vocab_size=V,
                                  num_key_value_heads=4 if family == "llama" else 8, max_position_embeddings=64,
                                  tie_word_embeddings=tied)
    return GPTModel(cfg, seed=3)


@pytest.fixture(scope="module")
def models():
    return {"gpt3": tiny("gpt3"), "llama": tiny("llama"), "gpt3-untied": tiny("gpt3", tied=False)}


@pytest.mark.parametrize("family,tp,pp,te", [("gpt3", 1, 1, False), ("gpt3", 2, 2, True), ("llama", 2, 1, True),
                                             ("llama", 4, 2, False), ("gpt3-untied", 2, 2, False)])
def test_core_torch_format_imports_with_logit_parity(tmp_path, models, family, tp, pp, te):
    model = models[family]
    write_torch(tmp_path / "core", model, tp, pp, te)
    assert detect_format(tmp_path / "core") == "megatron_core"
    config, meta = read_config(tmp_path / "core")
    assert (meta["tensor_model_parallel_size"], meta["pipeline_model_parallel_size"]) == (tp, pp)
    assert config.vocab_size == V and config.rope_theta == model.config.rope_theta
    assert (logits(load_model(tmp_path / "core")) - logits(model)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family,tp,te,common_in_dcp", [("gpt3", 2, False, False), ("llama", 2, True, True),
                                                        ("gpt3-untied", 1, True, True)])
def test_core_torch_dist_imports_with_logit_parity(tmp_path, models, family, tp, te, common_in_dcp):
    model = models[family]
    write_dist(tmp_path / "dist", model, tp, te, common_in_dcp)
    assert detect_format(tmp_path / "dist") == "megatron_core_dist"
    assert (logits(load_model(tmp_path / "dist")) - logits(model)).abs().max().item() <= 1e-5
    assert (logits(load_model(tmp_path / "dist" / "iter_0000020")) - logits(model)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family,tp,spec", [("llama", 2, "local"), ("gpt3", 4, "te")])
def test_core_export_reimports_bit_identically(tmp_path, models, family, tp, spec):
    model = models[family]
    ref = {k: v[:V] if k in ("embed.weight", "lm_head.weight") else v for k, v in model.state_dict().items()}
    write_torch(tmp_path / "src", model, 1, 1, False)
    convert(tmp_path / "src", tmp_path / "out", "megatron_core", target_tp=tp, quiet=True, megatron_spec=spec)
    blob = torch.load(tmp_path / "out" / "release" / "mp_rank_01" / "model_optim_rng.pt", weights_only=False)
    assert blob["args"].tensor_model_parallel_size == tp and blob["checkpoint_version"] == 3.0
    assert ("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in blob["model"]) == (spec == "te")
    src = write_torch_fixture_rank(model, tp, 1, spec == "te")
    assert set(blob["model"]) == set(src) and all(torch.equal(blob["model"][k], src[k]) for k in src
                                                  if "word_embeddings" not in k and "output_layer" not in k)
    config, full, meta = load_any(tmp_path / "out")
    assert meta["format"] == "megatron_core" and config == model.config
    assert set(full) == set(ref) and all(torch.equal(full[k], ref[k]) for k in ref)


def write_torch_fixture_rank(model, tp, r, te):
    """The hand-mapped Core state dict of TP rank r (PP 1), without _extra_state."""
    glob = full_core(model, tp)
    glob = te_names(glob) if te else glob
    return {k: rank_slice(k, t, model.config, r, tp) for k, t in glob.items()}


def test_core_bad_inputs(tmp_path, models):
    write_torch(tmp_path / "moe", models["gpt3"], 1, 1, False)
    f = tmp_path / "moe" / "iter_0000020" / "mp_rank_00" / "model_optim_rng.pt"
    blob = torch.load(f, weights_only=False)
    blob["model"]["decoder.layers.0.mlp.experts.linear_fc1.weight0"] = torch.zeros(2, 2)
    torch.save(blob, f)
    with pytest.raises(CheckpointError, match="mixture-of-experts"):
        convert(tmp_path / "moe", tmp_path / "out", "megatron_ru", quiet=True)
    write_torch(tmp_path / "pp", models["gpt3"], 2, 2, False)
    (tmp_path / "pp" / "iter_0000020" / "mp_rank_01_001" / "model_optim_rng.pt").unlink()
    with pytest.raises(CheckpointError, match="incomplete: missing .*mp_rank_01_001"):
        convert(tmp_path / "pp", tmp_path / "out", "megatron_ru", quiet=True)
    write_dist(tmp_path / "dist", models["gpt3"], 1, False, False)
    (tmp_path / "dist" / "iter_0000020" / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"\.metadata is missing"):
        convert(tmp_path / "dist", tmp_path / "out", "hf", quiet=True)
    write_torch(tmp_path / "dist", models["gpt3"], 1, 1, False)  # torch files next to torch_dist
    with pytest.raises(CheckpointError, match="mixes checkpoint formats"):
        convert(tmp_path / "dist", tmp_path / "out", "hf", quiet=True)
    assert not (tmp_path / "out").exists()
    from megatron_ru.checkpoint.megatron_core import check_model_type
    for keys, what in ((["encoder.layers.0.self_attention.linear_qkv.weight", "binary_head.weight"], "BERT"),
                       (["encoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.0.cross_attention.x"], "T5"),
                       (["decoder.layers.0.mixer.in_proj.weight"], "Mamba")):
        with pytest.raises(CheckpointError, match=what):
            check_model_type(keys, {}, "x.pt")


def test_legacy_rotary_base_and_gelu_warning(capsys, models):
    from megatron_ru.checkpoint.megatron_legacy import config_from_args
    llama = core_args(models["llama"].config, 1, 1, False)
    llama.rotary_base = 500000
    assert config_from_args(llama, V, "legacy.pt").rope_theta == 10000.0  # legacy Megatron ignored it
    assert "ignore it and rotate with base 10000" in capsys.readouterr().out
    assert config_from_args(llama, V, "core.pt", core=True).rope_theta == 500000.0
    gpt = core_args(models["gpt3"].config, 1, 1, False)
    del gpt.bias_gelu_fusion  # default legacy configuration: fused bias-GELU = tanh form
    config_from_args(gpt, V, "legacy.pt")
    assert "erf-GELU" not in capsys.readouterr().out
    gpt.bias_gelu_fusion = False
    config_from_args(gpt, V, "legacy.pt")
    assert "erf-GELU" in capsys.readouterr().out


def test_checkpoint_saved_by_megatron_core_itself(tmp_path):
    """The writer is megatron.core.dist_checkpointing.save (the installed megatron-core)."""
    pytest.importorskip("megatron.core.dist_checkpointing")
    import subprocess
    from tests.unit import mcore_dist_writer
    proc = subprocess.run([sys.executable, mcore_dist_writer.__file__, str(tmp_path / "mc"), "llama", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert detect_format(tmp_path / "mc") == "megatron_core_dist"
    model = mcore_dist_writer.model_for("llama")
    assert (logits(load_model(tmp_path / "mc")) - logits(model)).abs().max().item() <= 1e-5


class MCoreMetadata:  # as megatron-core 0.15 pickled its DCP metadata: a Megatron class
    pass


MCoreMetadata.__module__ = FakeEnum.__module__
sys.modules[FakeEnum.__module__].MCoreMetadata = MCoreMetadata


def test_torch_dist_metadata_pickled_as_a_megatron_class(tmp_path, models):
    import pickle
    write_dist(tmp_path / "d", models["llama"], 2, te=True, common_in_dcp=False)
    path = tmp_path / "d" / "iter_0000020" / ".metadata"
    meta = pickle.loads(path.read_bytes())
    fake = MCoreMetadata()
    fake.__dict__.update(vars(meta))
    path.write_bytes(pickle.dumps(fake))
    assert (logits(load_model(tmp_path / "d")) - logits(models["llama"])).abs().max().item() <= 1e-5
