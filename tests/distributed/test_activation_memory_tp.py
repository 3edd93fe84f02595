"""Predicted activation bytes at TP=2 (planning/activations.py) against the bytes each gloo rank's
forward really saves for backward (planning/measure.py): both families, sparse and dense layers."""
import pytest
import torch

from megatron_ru.config import ModelConfig
from megatron_ru.model.gpt import GPTModel
from megatron_ru.parallel.state import ParallelState
from megatron_ru.planning.activations import activation_bytes
from megatron_ru.planning.measure import measure_activation_bytes
from tests.helpers import run_ranks

pytestmark = [pytest.mark.mpirun, pytest.mark.slow]
SPARSE = {"mode": "fixed", "block": 8, "different_layout_per_head": True, "num_local_blocks": 4,
          "num_global_blocks": 1, "attention": "unidirectional", "num_different_global_patterns": 4}


def _worker(rank, world):
    ps = ParallelState.from_environment(tensor_model_parallel_size=world)
    for family in ("gpt3", "llama"):
        for recompute in ("none", "full"):
            cfg = ModelConfig(family=family, num_layers=2, hidden_size=64, num_attention_heads=4,
                              num_key_value_heads=2 if family == "llama" else None,
                              vocab_size=1000, max_position_embeddings=128,
                              sparse_attention=SPARSE, sparse_mode="alternating",
                              checkpoint_activations=recompute == "full")
            model = GPTModel(cfg, ps)
            gen = torch.Generator().manual_seed(0)
            tokens, labels = (torch.randint(0, 1000, (2, 64), generator=gen) for _ in range(2))
            got = measure_activation_bytes(model, tokens, labels=labels)
            want = activation_bytes(cfg, micro_batch=2, seq_length=64, tp=world,
                                    recompute=recompute, dtype_bytes=4, device="cpu")
            pairs = list(zip(got["layers"], want["layers"])) + [
                (got[k], want[k]) for k in ("embedding", "logits_loss", "total")]
            for m, p in pairs:
                assert abs(m - p) <= 0.02 * m, (family, recompute, rank, got, want)


def test_tp2_prediction_matches_measured():
    run_ranks(_worker, 2)
