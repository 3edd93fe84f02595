"""Megatron-Core import/export: fixtures built from Core's documented names and layouts
(tests/mcore_fixtures.py), saved with torch.save (`--ckpt-format torch`) and
torch.distributed.checkpoint (`torch_dist`, per-layer tensors stacked); logits after import equal
the source model's. A checkpoint written by Megatron-Core itself: tests/e2e/test_megatron_core_cli.py."""
import sys

import pytest
import torch

from megatron_ru import GPTModel, ModelConfig
from megatron_ru.checkpoint.convert import convert
from megatron_ru.checkpoint.load import detect_format, load_any, load_model, read_config
from megatron_ru.checkpoint.model_io import CheckpointError
from tests.mcore_fixtures import (V, FakeEnum, core_args, full_core, logits, rank_slice, te_names, write_dist,
                                  write_torch)



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


@pytest.mark.parametrize("family,tp,pp", [("gpt3", 2, 2), ("llama", 1, 4), ("gpt3-untied", 2, 2)])
def test_core_export_at_a_pipeline_size_matches_core_layout_and_reimports(tmp_path, models, family, tp, pp):
    """--to megatron_core --target-pipeline-parallel-size P: mp_rank_XX_YYY with Core's stage contents
    (local layer numbers, embeddings first, final norm + output layer last, the tied copy on the last
    stage) tensor for tensor as the hand-mapped fixture, and it reads back to the same weights."""
    model = models[family]
    write_torch(tmp_path / "src", model, 1, 1, False)
    write_torch(tmp_path / "want", model, tp, pp, False)
    convert(tmp_path / "src", tmp_path / "out", "megatron_core", target_tp=tp, target_pp=pp, quiet=True)
    for s in range(pp):
        for r in range(tp):
            name = f"mp_rank_{r:02d}_{s:03d}" if pp > 1 else f"mp_rank_{r:02d}"
            got = torch.load(tmp_path / "out" / "release" / name / "model_optim_rng.pt", weights_only=False)
            want = torch.load(tmp_path / "want" / "iter_0000020" / name / "model_optim_rng.pt", weights_only=False)
            assert got["args"].pipeline_model_parallel_size == pp
            assert set(got["model"]) == set(want["model"]), name
            for k, t in want["model"].items():
                if "word_embeddings" in k or "output_layer.weight" in k:  # only the real rows: padding is free
                    real = max(0, min(t.shape[0], V - r * t.shape[0]))
                    assert real > 0 and torch.equal(got["model"][k][:real], t[:real]), (name, k)
                else:
                    assert torch.equal(got["model"][k], t), (name, k)
    ref = {k: v[:V] if k in ("embed.weight", "lm_head.weight") else v for k, v in model.state_dict().items()}
    config, full, meta = load_any(tmp_path / "out")
    assert meta["pipeline_model_parallel_size"] == pp and config == model.config
    assert set(full) == set(ref) and all(torch.equal(full[k], ref[k]) for k in ref)
    with pytest.raises(CheckpointError, match="must divide num_layers"):
        convert(tmp_path / "src", tmp_path / "bad", "megatron_core", target_pp=3, quiet=True)
