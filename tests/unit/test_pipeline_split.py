"""Pipeline parallelism without processes: the rank layout, the layer split (uniform, balanced,
explicit) and its cost model, the checks that refuse bad input, and checkpoint name mapping."""
import pytest

from megatron_ru import ConfigError, ModelConfig, ParallelState
from megatron_ru.checkpoint.pipeline_files import our_name
from megatron_ru.parallel import pipeline
from megatron_ru.parallel.state import group_ranks
from megatron_ru.training.arguments import TrainArgs, parse_pretrain_args
from megatron_ru.training import pipeline_run


def cfg(**kw):
    return ModelConfig.from_preset("tiny-gpt3", **{"num_layers": 6, **kw})


def test_rank_layout_tp_innermost_then_dp_then_pp():
    ps = ParallelState(rank=5, world_size=8, tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert (ps.tp_rank, ps.dp_rank, ps.pp_rank, ps.dp_size) == (1, 0, 1, 2)
    assert not ps.is_first_stage and ps.is_last_stage
    groups = group_ranks(8, 2, 2)
    assert [r for k, r in groups if k == "tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [r for k, r in groups if k == "dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert [r for k, r in groups if k == "pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert "world 8 = TP 2 x DP 2 x PP 2" in ps.layout()
    assert "pp" not in dict(group_ranks(4, 2, 1))  # TP x DP runs create what they always did
    with pytest.raises(ConfigError, match="world size 6 is not divisible by --tensor-model-parallel-size "
                                          "x --pipeline-model-parallel-size = 2 x 2 = 4"):
        ParallelState(rank=0, world_size=6, tensor_model_parallel_size=2, pipeline_model_parallel_size=2)


def test_splits_and_costs():
    c = cfg()
    assert pipeline.split_layers(c, 4, "uniform") == [2, 2, 1, 1]
    assert pipeline.split_layers(c, 3, "1,2,3") == [1, 2, 3]
    assert pipeline.stage_bounds([1, 2, 3]) == [0, 2, 4, 9]  # [embed, 6 blocks, norm, head]
    # a large vocabulary makes the head costly: balanced gives the last stage fewer layers
    big = cfg(vocab_size=50000)
    counts = pipeline.split_layers(big, 2, "balanced", seq_length=64)
    assert sum(counts) == 6 and counts[1] < counts[0]
    costs = pipeline.layer_costs(big, 64)
    assert max(pipeline.stage_costs(counts, costs)) <= max(pipeline.stage_costs([3, 3], costs))
    # block-sparse layers are cheaper: with alternating layers balanced is not uniform
    sparse = {"mode": "fixed", "block": 8, "num_local_blocks": 4, "num_global_blocks": 1, "attention": "unidirectional",
              "different_layout_per_head": True, "num_different_global_patterns": 1}
    s = ModelConfig.from_preset("tiny-gpt3", num_layers=8, hidden_size=64, max_position_embeddings=1024,
                                sparse_attention=sparse, sparse_mode="top_bottom")
    density = pipeline_run.sparse_density(s, 1024)
    assert density < 0.5
    costs = pipeline.layer_costs(s, 1024, density)
    assert costs[1][0] < costs[1][-1]  # sparse (first half) vs dense layers
    assert pipeline.split_layers(s, 2, "balanced", seq_length=1024, sparse_density=density)[0] > 4
    text = pipeline.describe_split([4, 4], costs, s.sparse_layers())
    assert "stage 0: layers 0-3 (4 sparse, 0 dense) + embedding" in text


@pytest.mark.parametrize("pp, split, message", [
    (7, "uniform", "--pipeline-model-parallel-size=7 is larger than --num-layers=6"),
    (2, "2,3", "--pipeline-split=2,3 sums to 5 layers but --num-layers=6"),
    (2, "1,2,3", "names 3 stages but --pipeline-model-parallel-size=2"),
    (2, "0,6", "every stage needs at least one layer"),
    (2, "half", "must be uniform, balanced or a comma-separated list"),
])
def test_bad_splits(pp, split, message):
    with pytest.raises(ConfigError, match=message):
        pipeline.split_layers(cfg(), pp, split)


def _check(args_kw=None, zero=0, accum=4):
    args = TrainArgs(data_path=["x"], pipeline_model_parallel_size=2, **(args_kw or {}))
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": accum,
          "train_batch_size": 2 * accum * 2, "zero_optimization": {"stage": zero}}
    ps = ParallelState(rank=0, world_size=4, pipeline_model_parallel_size=2)
    return pipeline_run.check(args, ds, cfg(), ps, print)


def test_checks_before_compute():
    assert _check() == [3, 3]
    with pytest.raises(ConfigError, match="needs ZeRO stage 0 or 1 .* asks for stage 2"):
        _check(zero=2)
    with pytest.raises(ConfigError, match=r"micro-batches per step = global batch 4 / \(micro batch 2 x "
                                          r"data-parallel size 2\) = 1 is smaller than"):
        _check(accum=1)
    refused = [({"lora_rank": 4}, "--lora-rank"), ({"eval_tasks": "hellaswag"}, "--eval-tasks"),
               ({"dataset_type": "sft", "sft_packing": "packed"}, "--sft-packing packed"),
               ({"reset_position_ids": True}, "--reset-position-ids")]
    for kw, flag in refused:
        with pytest.raises(ConfigError, match=f"^{flag} is not supported with "
                                              "--pipeline-model-parallel-size=2 \\(> 1\\): "):
            _check(kw)
    assert _check({"dataset_type": "sft"}) == [3, 3]  # SFT rows padded one per row: supported


def test_virtual_pipeline_stages_refused():
    with pytest.raises(ConfigError, match="--num-layers-per-virtual-pipeline-stage: interleaved"):
        parse_pretrain_args(["--data-path", "x", "--num-layers-per-virtual-pipeline-stage", "2"])


def test_layer_file_names():
    assert our_name(4, 0, "embed.weight") == "embed.weight"
    assert our_name(4, 3, "block.attn.qkv.weight") == "blocks.2.attn.qkv.weight"
    assert our_name(4, 5, "final_norm.weight") == "final_norm.weight"
    assert our_name(4, 6, "lm_head.weight") == "lm_head.weight"


def test_universal_info_and_plan_of_a_pipeline_checkpoint(tmp_path):
    """A PP checkpoint: `--to universal` refuses it with one line (nothing written); a resume
    at another PP size > 1 converts it even at the same DP size; the universal info names the
    PipelineModule's parameters, the tied embedding pipeline-replicated."""
    from megatron_ru.checkpoint import universal
    from megatron_ru.errors import UsageError
    src = tmp_path / "ckpt"
    tag = src / "iter_0000002"
    tag.mkdir(parents=True)
    (src / "config.json").write_text('{"format": "megatron_ru", "pipeline_model_parallel_size": 2}')
    (src / "latest").write_text("iter_0000002\n")
    for name in ("layer_00-model_00-model_states.pt", "mp_rank_00_model_states.pt",
                 "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        (tag / name).write_bytes(b"")
    with pytest.raises(UsageError, match="^--to universal: .* saved with pipeline parallelism; "):
        universal.convert_directory(str(src), str(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert universal.plan_resume(str(src), "iter_0000002", 1, 2) == ("iter_0000002", False)
    assert universal.plan_resume(str(src), "iter_0000002", 1, 4) == ("iter_0000002_universal", True)
    assert universal.plan_resume(str(src), "iter_0000002", 2, 2) == ("iter_0000002_universal", True)

    c = cfg()
    ps = ParallelState(rank=0, world_size=1)
    model = pipeline_run.build_model(c, ps, [c.num_layers], seed=1)
    import types
    fake = types.SimpleNamespace(named_parameters=lambda: [
        ("tied_modules.embed.embed.weight", model.embed.weight),
        ("1.block.attn.qkv.weight", model.blocks[0].attn.qkv.weight)])
    info = universal.checkpoint_info(fake)
    assert info["pipeline_replicated_parameter_patterns"] == [r"tied_modules\.embed\.embed\.weight$"]
    assert "pipeline_replicated_parameter_patterns" not in universal.checkpoint_info(model)
