"""Context parallelism without processes: the rank layout (TP, CP, DP, PP), the size checks, the batch slice."""
import pytest
import torch

from megatron_ru import ModelConfig
from megatron_ru.config import ConfigError
from megatron_ru.data.batch import context_parallel_slice, get_batch
from megatron_ru.parallel.context import check_sequence_length
from megatron_ru.parallel.state import ParallelState, check_world, group_ranks
from megatron_ru.training.arguments import parse_pretrain_args

DATA = ["--data-path", "x"]


def test_rank_layout_is_tp_then_cp_then_dp_then_pp():
    groups = {}
    for kind, ranks in group_ranks(16, 2, 2, cp=2):  # TP2 x CP2 x DP2 x PP2
        groups.setdefault(kind, []).append(ranks)
    assert groups["tp"][:2] == [[0, 1], [2, 3]]
    assert groups["cp"][:3] == [[0, 2], [1, 3], [4, 6]]
    assert groups["dp"][:2] == [[0, 4], [1, 5]]
    assert groups["dp_cp"][:2] == [[0, 2, 4, 6], [1, 3, 5, 7]]  # DeepSpeed's data-parallel group
    assert groups["pp"][:2] == [[0, 8], [1, 9]]
    assert all(len(g) == 8 for g in (groups["tp"], groups["cp"], groups["dp"], groups["pp"]))
    assert [k for k, _ in group_ranks(4, 2)] == ["tp", "tp", "dp", "dp"]  # CP=1: as before
    ps = ParallelState(rank=6, world_size=8, tensor_model_parallel_size=2, context_parallel_size=2)
    assert (ps.tp_rank, ps.cp_rank, ps.dp_rank, ps.dp_size, ps.dp_cp_size) == (0, 1, 1, 2, 4)
    assert ps.get_data_parallel_rank() == 3 and ps.get_data_parallel_world_size() == 4
    assert "TP 2 x CP 2 x DP 2 x PP 1" in ps.layout() and "CP groups [[0, 2], [1, 3], [4, 6], [5, 7]]" in ps.layout()


def test_bad_sizes_are_one_line():
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by .* = 2 x 2 x 1 = 4: world = TP x CP x DP x PP"):
        check_world(6, 2, 1, 2)
    llama = ModelConfig.from_preset("tiny-llama")  # 4 heads, 2 KV heads
    llama.validate_parallel(1, 2)
    with pytest.raises(ConfigError, match=r"num_key_value_heads=2 / tensor_model_parallel_size=2 = 1 per TP rank is "
                                          r"not divisible by --context-parallel-size=2"):
        llama.validate_parallel(2, 2)
    with pytest.raises(ConfigError, match="num_attention_heads=4 .* by --context-parallel-size=8"):
        llama.validate_parallel(1, 8)
    with pytest.raises(ConfigError, match=r"--seq-length=63 is not divisible by --context-parallel-size=2"):
        check_sequence_length(63, 2)
    for extra, flag in ((["--pipeline-model-parallel-size", "2"], "--pipeline-model-parallel-size > 1"),
                        (["--reset-attention-mask"], "--reset-attention-mask")):
        with pytest.raises(ConfigError, match=f"does not combine with {flag}"):
            parse_pretrain_args(DATA + ["--context-parallel-size", "2", *extra])
    with pytest.raises(ConfigError, match="--context-parallel-size=0 must be positive"):
        parse_pretrain_args(DATA + ["--context-parallel-size", "0"])


def test_batch_slice_keeps_global_positions():
    text = torch.tensor([[5, 6, 0, 7, 8, 9, 0, 3, 4]])  # eod = 0
    full = get_batch(text, 0, eod_mask_loss=True, reset_position_ids=True)
    parts = [context_parallel_slice(full, r, 2) for r in range(2)]
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        assert torch.equal(torch.cat([p[key] for p in parts], 1), full[key]), key
    assert parts[1]["position_ids"].tolist() == [[1, 2, 3, 0]]  # restarted per document, not per slice


def test_each_cp_rank_resumes_its_own_rng_streams():
    from megatron_ru.checkpoint.training import set_rng_state
    import random
    import numpy as np
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append({"python": random.getstate(), "numpy": np.random.get_state(),
                       "torch": torch.get_rng_state(), "tracker": None})
    for cp_rank in (0, 1):
        ps = ParallelState(rank=cp_rank, world_size=2, context_parallel_size=2)
        set_rng_state({"context_parallel": states}, ps)
        assert torch.equal(torch.get_rng_state(), states[cp_rank]["torch"])
    set_rng_state({"context_parallel": states}, ParallelState.single())  # resumed at CP = 1: rank 0's
    assert torch.equal(torch.get_rng_state(), states[0]["torch"])
    random.setstate(saved[0]), np.random.set_state(saved[1]), torch.set_rng_state(saved[2])
