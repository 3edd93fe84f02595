"""Predicted activation bytes (planning/activations.py) against the bytes each gloo rank's forward
really saves for backward (planning/measure.py) under the real TP, sequence- and context-parallel
code: TP2, TP2 + SP (with and without full recompute), CP2, TP2 x CP2 and TP2 x CP2 + SP on one
spawn of 4 ranks (layouts smaller than 4 ranks run with DP 2 beside them); both families, a sparse
and a dense layer each."""
import pytest
import torch

from megatron_ru.config import ModelConfig
from megatron_ru.model.gpt import GPTModel
from megatron_ru.parallel.context import local_slice
from megatron_ru.parallel.state import ParallelState
from megatron_ru.planning.activations import activation_bytes
from megatron_ru.planning.measure import measure_activation_bytes
from tests.helpers import run_ranks

pytestmark = [pytest.mark.mpirun, pytest.mark.slow]
SPARSE = {"mode": "fixed", "block": 8, "different_layout_per_head": True, "num_local_blocks": 4,
          "num_global_blocks": 1, "attention": "unidirectional", "num_different_global_patterns": 4}
LAYOUTS = [  # tp, sp, cp, recompute
    (2, False, 1, "none"), (2, False, 1, "full"), (2, True, 1, "none"), (2, True, 1, "full"),
    (1, False, 2, "none"), (2, False, 2, "none"), (2, True, 2, "none")]
TOL = 0.02  # the goal is 10 %; the model is derived tensor by tensor


def _config(family, sp, recompute):
    # llama: 8 heads / 4 KV heads, so that TP 2 x CP 2 splits the KV heads (1 per rank)
    return ModelConfig(family=family, num_layers=2, hidden_size=64,
                       num_attention_heads=4 if family == "gpt3" else 8,
                       num_key_value_heads=4 if family == "llama" else None,
                       vocab_size=1000, max_position_embeddings=128, sparse_attention=SPARSE,
                       sparse_mode="alternating", sequence_parallel=sp,
                       checkpoint_activations=recompute == "full")


def _worker(rank, world):
    torch.set_num_threads(1)
    states = {}
    for tp, sp, cp, recompute in LAYOUTS:
        key = (tp, cp)
        if key not in states:  # every rank builds every group, in the same order
            states[key] = ParallelState.from_environment(tp, context_parallel_size=cp)
        ps = states[key]
        for family in ("gpt3", "llama"):
            cfg = _config(family, sp, recompute)
            model = GPTModel(cfg, ps)
            gen = torch.Generator().manual_seed(0)
            # the trainer's context_parallel_slice: a contiguous copy of this rank's slice
            tokens, labels = (local_slice(torch.randint(0, 1000, (2, 64), generator=gen), ps)
                              .contiguous() for _ in range(2))
            got = measure_activation_bytes(model, tokens, labels=labels)
            want = activation_bytes(cfg, micro_batch=2, seq_length=64, tp=tp, sp=sp, cp=cp,
                                    recompute=recompute, dtype_bytes=4, device="cpu")
            pairs = list(zip(got["layers"], want["layers"])) + [
                (got[k], want[k]) for k in ("embedding", "logits_loss", "total")]
            what = (family, f"TP{tp}", "SP" if sp else "", f"CP{cp}", recompute, rank)
            for m, p in pairs:
                assert abs(m - p) <= TOL * m, (what, got, want)
            if sp and recompute == "none":  # our SP keeps the QKV / MLP-up input shards only
                kept = activation_bytes(cfg, micro_batch=2, seq_length=64, tp=tp, sp=sp, cp=cp,
                                        dtype_bytes=4, device="cpu", sp_keeps_gathered=True)
                gathered = 2 * (64 * 2 // cp) * (1 - 1 / tp) * 64 * 4  # 2 inputs, n - n/t tokens
                assert kept["layers"][1] - got["layers"][1] == gathered, what


def test_parallel_layouts_prediction_matches_measured():
    run_ranks(_worker, 4)
