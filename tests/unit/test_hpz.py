"""ZeRO++ hpZ: the secondary groups for our rank layout, and every impossible size refused with one line."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_ru.config import ConfigError
from megatron_ru.parallel.state import group_ranks
from megatron_ru.training import ds_config, hpz

ROOT = Path(__file__).resolve().parents[2]
P = "--deepspeed_config c.json"


def _layout(h, world, tp=1, pp=1, node=8, rank=0, local_rank=0, cp=1):
    zero = hpz.zero_groups(world, tp, pp, cp)
    return hpz.check_layout(h, world=world, tp=tp, pp=pp, zero_groups=zero, ranks_per_node=node,
                            rank=rank, local_rank=local_rank, path=P, cp=cp)


def test_tp1_groups_are_deepspeeds_consecutive_ranks():
    groups = _layout(4, 16, node=8)
    assert groups == hpz.deepspeed_groups(16, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11],
                                                     [12, 13, 14, 15]]


def test_tp2_groups_stay_inside_the_data_parallel_groups():
    # 16 ranks, TP 2: DP groups [0,2,...,14] and [1,3,...,15]; h=4 -> 8 consecutive ranks = a node
    groups = _layout(4, 16, tp=2, node=8)
    assert groups == [[0, 2, 4, 6], [8, 10, 12, 14], [1, 3, 5, 7], [9, 11, 13, 15]]
    assert groups != hpz.deepspeed_groups(16, 4)  # DeepSpeed's own would mix TP shards
    assert "ours are used" in hpz.describe(groups, 16, 4, 8)


def test_with_context_parallelism_groups_are_consecutive_members_of_dp_x_cp():
    """ZeRO partitions over DP x CP (ParallelState's mpu group); the secondary groups are h
    consecutive members of it (CP ranks first): h = CP gives the CP groups, larger h spans DP."""
    zero = hpz.zero_groups(16, 2, cp=2)  # TP 2 x CP 2 x DP 4
    assert zero == [r for k, r in group_ranks(16, 2, 1, 2) if k == "dp_cp"]
    assert zero == [[0, 2, 4, 6, 8, 10, 12, 14], [1, 3, 5, 7, 9, 11, 13, 15]]
    cp_groups = [r for k, r in group_ranks(16, 2, 1, 2) if k == "cp"]
    assert sorted(_layout(2, 16, tp=2, cp=2)) == sorted(cp_groups)
    assert _layout(4, 16, tp=2, cp=2) == [[0, 2, 4, 6], [8, 10, 12, 14], [1, 3, 5, 7], [9, 11, 13, 15]]
    # TP 1 x CP 2 x DP 2: DeepSpeed's own consecutive groups, which are ours
    groups = _layout(2, 4, cp=2, node=4)
    assert groups == hpz.deepspeed_groups(4, 2) == [[0, 1], [2, 3]]
    assert hpz.describe(groups, 4, 2, 4, cp=2) == (
        "ZeRO++ hpZ: secondary parameter shards over groups of 2 data-parallel ranks (DP x CP) "
        "[[0, 1], [2, 3]], 4 ranks per node")
    # every group lies inside one ZeRO group and one node, and the groups cover every rank once
    for tp, cp, dp, h, node in [(1, 2, 4, 8, 8), (2, 2, 2, 2, 8), (2, 4, 2, 4, 8), (4, 2, 1, 2, 8)]:
        world = tp * cp * dp
        groups = _layout(h, world, tp=tp, cp=cp, node=node)
        zero = hpz.zero_groups(world, tp, cp=cp)
        assert sorted(r for g in groups for r in g) == list(range(world))
        assert all(any(set(g) <= set(z) for z in zero) and len({r // node for r in g}) == 1
                   for g in groups)
    with pytest.raises(ConfigError, match=r"zero_hpz_partition_size=8 is larger than the "
                                          r"data-parallel size 4 \(DP 2 x CP 2\)"):
        _layout(8, 8, tp=2, cp=2)
    with pytest.raises(ConfigError, match=r"zero_hpz_partition_size=3 does not divide the "
                                          r"data-parallel size 4 \(DP 2 x CP 2\)"):
        _layout(3, 4, cp=2)
    with pytest.raises(ConfigError, match=r"the secondary group \[0, 2, 4, 6\] spans TP 2 x h 4 "):
        _layout(4, 16, tp=2, cp=2, node=4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(h=3, world=8), "zero_optimization.zero_hpz_partition_size=3 does not divide the "
                         "data-parallel size 8 (world 8 / TP 1)"),
    (dict(h=8, world=8, tp=2), "zero_optimization.zero_hpz_partition_size=8 is larger than the "
                               "data-parallel size 4 (world 8 / TP 2)"),
    (dict(h=2, world=8, pp=2), "cannot be combined with --pipeline-model-parallel-size=2"),
    (dict(h=4, world=16, tp=2, node=4), "the secondary group [0, 2, 4, 6] spans TP 2 x h 4 = 8 "
                                        "consecutive ranks but a node runs 4 ranks"),
    (dict(h=8, world=16, node=4), "the secondary group [0, 1, 2, 3, 4, 5, 6, 7] spans 8 ranks but "
                                  "a node runs 4 ranks"),
    (dict(h=2, world=8, node=4, rank=1, local_rank=0), "ranks are not placed in consecutive "
                                                       "blocks per node"),
])
def test_impossible_sizes_are_refused_with_one_line(kwargs, message):
    with pytest.raises(ConfigError) as e:
        _layout(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(P)


def _args(path):
    return SimpleNamespace(deepspeed_config=str(path), micro_batch_size=2, global_batch_size=None,
                           fp16=False, bf16=False, clip_grad=1.0)


def test_shipped_hpz_config_and_the_static_refusals(tmp_path):
    ds, _, _ = ds_config.build(_args(ROOT / "configs" / "ds_zero3_hpz.json"), 8, lambda m: None)
    assert hpz.partition_size(ds) == 8 and ds["zero_optimization"]["stage"] == 3
    quant = json.loads((ROOT / "configs" / "ds_zero3_hpz_quantized.json").read_text())
    assert quant["zero_optimization"]["zero_quantized_weights"] is True
    cases = [({"stage": 3, "mics_shard_size": 8}, "zero_optimization.mics_shard_size: MiCS was "
              "removed in DeepSpeed 0.19; use zero_hpz_partition_size"),
             ({"stage": 2, "zero_hpz_partition_size": 2}, "zero_optimization.zero_hpz_partition_size "
              "is ZeRO++, which needs zero_optimization.stage 3 (got stage 2)"),
             ({"stage": 1, "zero_quantized_gradients": True}, "zero_quantized_gradients is ZeRO++"),
             ({"stage": 3, "zero_hpz_partition_size": "8"}, "zero_hpz_partition_size must be an "
              "integer"),
             ({"stage": 3, "zero_hpz_partition_size": -1}, "must be 0 or more, got -1")]
    path = tmp_path / "c.json"
    for zero, message in cases:
        path.write_text(json.dumps({"zero_optimization": zero}))
        with pytest.raises(ConfigError) as e:
            ds_config.build(_args(path), 2, lambda m: None)
        assert message in str(e.value), (zero, str(e.value))


def test_quantized_weights_refused_on_cpu():
    ps = SimpleNamespace(tp_size=1)
    with pytest.raises(ConfigError, match="zero_quantized_weights needs DeepSpeed's quantizer "
                                          "kernels .QuantizerBuilder., which the cpu accelerator"):
        hpz.check_quantization({"zero_optimization": {"zero_quantized_weights": True}}, ps, P)
    with pytest.raises(ConfigError, match="zero_quantized_gradients cannot be combined with "
                                          "--tensor-model-parallel-size=2"):
        hpz.check_quantization({"zero_optimization": {"zero_quantized_gradients": True}},
                               SimpleNamespace(tp_size=2), P)
    hpz.check_quantization({"zero_optimization": {"stage": 3}}, ps, P)  # off: nothing to check
