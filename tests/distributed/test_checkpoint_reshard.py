"""Checkpoints written at one TP size load bit-exactly at another (TP=2 → 1, 1 → 2, 2 → 4)."""
import pytest
import torch

from megatron_ru import GPTModel, ModelConfig
from megatron_ru.checkpoint.load import load_model
from megatron_ru.checkpoint.model_io import CheckpointError, save_model
from tests.distributed import workers
from tests.helpers import run_ranks

pytestmark = [pytest.mark.mpirun, pytest.mark.slow]


def test_tp2_checkpoint_loads_at_tp1_and_tp4(tmp_path):
    run_ranks(workers.save_sharded, 2, str(tmp_path))
    assert (tmp_path / "latest").read_text().strip() == "step5"
    assert sorted(p.name for p in (tmp_path / "step5").iterdir()) == [
        "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]
    model = load_model(tmp_path)
    ref = GPTModel(ModelConfig(**workers.MODEL_CONFIGS["llama"]), seed=9)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name  # weights are bit-identical after TP=2 → 1
    run_ranks(workers.load_resharded, 4, str(tmp_path))


def test_tp1_checkpoint_loads_at_tp2(tmp_path):
    save_model(tmp_path, GPTModel(ModelConfig(**workers.MODEL_CONFIGS["llama"]), seed=9))
    run_ranks(workers.load_resharded, 2, str(tmp_path))


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    tmp_path.joinpath("config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_model(tmp_path)
    save_model(tmp_path, GPTModel(ModelConfig.from_preset("tiny-gpt3"), seed=1), tag="t1")
    (tmp_path / "t1" / "mp_rank_00_model_states.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read .*mp_rank_00_model_states.pt"):
        load_model(tmp_path)
    (tmp_path / "t1" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="incomplete: missing .*mp_rank_00"):
        load_model(tmp_path)
