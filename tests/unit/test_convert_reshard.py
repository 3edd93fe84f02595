"""Tensor-parallel resharding by conversion: TP=1 → 2 → 4 → 1 is bit-identical, dtypes convert,
and bad targets / inputs stop with a message and leave nothing at DST."""
import json

import pytest
import torch

from megatron_ru import GPTModel, ModelConfig
from megatron_ru.checkpoint.convert import convert
from megatron_ru.checkpoint.load import detect_format, load_any, load_model
from megatron_ru.checkpoint.model_io import CheckpointError, save_model


@pytest.mark.parametrize("family", ["gpt3", "llama"])
def test_tp_round_trip_is_bit_identical(tmp_path, family):
    cfg = ModelConfig.from_preset(f"tiny-{family}", vocab_size=1001, num_attention_heads=8,
                                  num_key_value_heads=4 if family == "llama" else 8)
    model = GPTModel(cfg, seed=3).eval()
    save_model(tmp_path / "tp1", model)
    convert(tmp_path / "tp1", tmp_path / "tp2", "megatron_ru", target_tp=2, quiet=True)
    convert(tmp_path / "tp2", tmp_path / "tp4", "megatron_ru", target_tp=4, quiet=True)
    convert(tmp_path / "tp4", tmp_path / "back", "megatron_ru", target_tp=1, quiet=True)
    for d, tp in (("tp2", 2), ("tp4", 4)):
        meta = json.loads((tmp_path / d / "config.json").read_text())
        assert meta["tensor_model_parallel_size"] == tp
        assert len(list((tmp_path / d / "release").glob("mp_rank_*_model_states.pt"))) == tp
    a = torch.load(tmp_path / "tp1" / "release" / "mp_rank_00_model_states.pt")["module"]
    b = torch.load(tmp_path / "back" / "release" / "mp_rank_00_model_states.pt")["module"]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randint(0, 1001, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "tp4").eval()(x), model(x))


def test_dtype_conversion_and_no_optimizer_state(tmp_path):
    cfg = ModelConfig.from_preset("tiny-gpt3")
    save_model(tmp_path / "src", GPTModel(cfg, seed=1))
    convert(tmp_path / "src", tmp_path / "bf16", "megatron_ru", dtype="bf16", quiet=True)
    blob = torch.load(tmp_path / "bf16" / "release" / "mp_rank_00_model_states.pt")
    assert set(blob) == {"module", "mp_world_size"}
    assert all(t.dtype == torch.bfloat16 for t in blob["module"].values())
    _, full, _ = load_any(tmp_path / "bf16")
    _, ref, _ = load_any(tmp_path / "src")
    assert all(torch.equal(full[k], ref[k].to(torch.bfloat16)) for k in ref)


def test_bad_targets_and_inputs_write_nothing(tmp_path):
    cfg = ModelConfig.from_preset("tiny-gpt3")  # 4 heads
    save_model(tmp_path / "src", GPTModel(cfg, seed=1))
    with pytest.raises(CheckpointError, match="num_attention_heads=4 is not divisible by "
                                              "tensor_model_parallel_size=3"):
        convert(tmp_path / "src", tmp_path / "out", "megatron_ru", target_tp=3, quiet=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint in a known format"):
        convert(tmp_path / "empty", tmp_path / "out", "hf", quiet=True)
    with pytest.raises(CheckpointError, match="does not exist"):
        detect_format(tmp_path / "nope")
    # a shape mismatch names the tensor and both shapes
    path = tmp_path / "src" / "release" / "mp_rank_00_model_states.pt"
    blob = torch.load(path)
    blob["module"]["blocks.1.mlp.up.weight"] = torch.zeros(100, 64)
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match=r"blocks\.1\.mlp\.up\.weight.*\(100, 64\).*\(256, 64\)"):
        convert(tmp_path / "src", tmp_path / "out", "hf", quiet=True)
    # a missing shard
    cfg2 = ModelConfig.from_preset("tiny-llama")
    save_model(tmp_path / "l", GPTModel(cfg2, seed=1))
    convert(tmp_path / "l", tmp_path / "l2", "megatron_ru", target_tp=2, quiet=True)
    (tmp_path / "l2" / "release" / "mp_rank_01_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="incomplete: missing .*mp_rank_01"):
        convert(tmp_path / "l2", tmp_path / "out", "hf", quiet=True)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
