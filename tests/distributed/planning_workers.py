"""Per-rank body of the planner's model-state test: real DeepSpeed engines (gloo, 4 CPU ranks) vs planning/states.py.

One spawn of 4 ranks loops over every layout in-process. A layout smaller than 4 ranks runs as
independent copies side by side (e.g. TP 1 x DP 2 on ranks {0,1} and {2,3}), so every rank
always takes part. Each engine runs one step (to create the optimizer state), then a second
forward and backward; the bytes it holds are measured before the second optimizer step.
"""
import torch
import torch.distributed as dist

from megatron_ru import GPTModel, ModelConfig, ParallelState
from megatron_ru.parallel.state import group_ranks
from megatron_ru.planning.held import held_bytes
from megatron_ru.planning.states import model_state_bytes, rank_params
from megatron_ru.training import pipeline_run
from megatron_ru.training.optim import param_groups

# odd sizes on purpose: padding of flat groups and partitions; a small persistence threshold
# so ZeRO-3 holds some parameters whole and partitions the others
CONFIGS = {
    "gpt3": dict(family="gpt3", num_layers=2, hidden_size=40, num_attention_heads=4, ffn_hidden_size=72,
                 vocab_size=200, max_position_embeddings=16),
    "llama": dict(family="llama", num_layers=2, hidden_size=40, num_attention_heads=4,
                  num_key_value_heads=2, ffn_hidden_size=72, vocab_size=200, max_position_embeddings=16),
}
THRESHOLD = 500
MICRO, SEQ = 2, 8


def _groups(world, tp, dp, pp=1):
    """A ParallelState over a copy of TP x DP x PP ranks; every rank creates every group."""
    size = tp * dp * pp
    rank = dist.get_rank()
    mine = {}
    for copy in range(world // size):
        for kind, ranks in group_ranks(size, tp, pp):
            ranks = [copy * size + r for r in ranks]
            group = dist.new_group(ranks)
            if rank in ranks:
                mine[kind] = group
    return ParallelState(rank=rank % size, world_size=size, tensor_model_parallel_size=tp,
                         tp_group=mine["tp"], dp_group=mine["dp"], pipeline_model_parallel_size=pp,
                         pp_group=mine.get("pp"))


def _ds(ps, zero, precision, accum=1):
    ds = {"train_batch_size": MICRO * accum * ps.dp_size, "train_micro_batch_size_per_gpu": MICRO,
          "gradient_accumulation_steps": accum, "steps_per_print": 10**9,
          "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": zero, "stage3_param_persistence_threshold": THRESHOLD}}
    if precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 4}
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    return ds


def _measure_before_step(engine):
    """held_bytes(engine) taken inside the next optimizer step, before it updates."""
    box = {}
    opt = engine.optimizer
    step = opt.step

    def measured_step(*args, **kwargs):
        box.setdefault("held", held_bytes(engine))
        return step(*args, **kwargs)

    opt.step = measured_step
    return box


def _one(ps, family, zero, precision):
    import deepspeed

    cfg = ModelConfig(**CONFIGS[family])
    ps.seed(1)
    model = GPTModel(cfg, ps, seed=1)
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-3)
    if zero == 3:
        deepspeed.zero.register_external_parameter(model, model.embed.weight)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=_ds(ps, zero, precision), mpu=ps)
    tokens = torch.randint(0, cfg.vocab_size, (MICRO, SEQ), generator=torch.Generator().manual_seed(5))
    box = None
    for step in range(2):
        if step == 1:
            box = _measure_before_step(engine)
        engine.backward(engine(tokens, labels=tokens))
        engine.step()
    predicted = model_state_bytes(rank_params(cfg, ps.tp_size), zero=zero, dp=ps.dp_size,
                                  dp_rank=ps.dp_rank, precision=precision,
                                  persistence_threshold=THRESHOLD)
    return box["held"], predicted


def _one_pipeline(ps, family, zero, precision):
    import deepspeed

    cfg = ModelConfig(**CONFIGS[family])
    counts = pipeline_run.pipeline.split_layers(cfg, ps.pp_size, "uniform")
    model = pipeline_run.build_model(cfg, ps, counts, seed=1)
    module = pipeline_run.build_module(model, ps, counts)
    opt = torch.optim.AdamW(param_groups(module, 0.01), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=module, optimizer=opt, config=_ds(ps, zero, precision, accum=2))
    g = torch.Generator().manual_seed(5)
    batches = [(t[:, :-1], (t[:, 1:], torch.ones(MICRO, SEQ)))
               for t in (torch.randint(0, cfg.vocab_size, (MICRO, SEQ + 1), generator=g) for _ in range(4))]
    it = iter(batches)
    engine.train_batch(it)
    box = _measure_before_step(engine)
    engine.train_batch(it)
    predicted = model_state_bytes(rank_params(cfg, ps.tp_size, counts, ps.pp_rank), zero=zero,
                                  dp=ps.dp_size, dp_rank=ps.dp_rank, precision=precision,
                                  pipeline=True)
    return box["held"], predicted


def model_states(rank, world, layouts, pipeline_layouts, out_path):
    """Every (family, TP, DP, ZeRO, precision) layout: measured vs predicted per kind; rank 0
    writes the table (the test asserts on it) after every rank compared its own numbers."""
    from deepspeed.accelerator import get_accelerator
    get_accelerator().is_fp16_supported = lambda: True  # emulated fp16 on CPU, as the trainer does
    ParallelState.from_environment(1)  # initialises the default group (gloo)
    rows = []
    for family, tp, dp, zero, precision in layouts:
        ps = _groups(world, tp, dp)
        held, predicted = _one(ps, family, zero, precision)
        rows.append(((family, tp, dp, 1, zero, precision), held, predicted))
    for family, tp, dp, pp, zero, precision in pipeline_layouts:
        ps = _groups(world, tp, dp, pp)
        held, predicted = _one_pipeline(ps, family, zero, precision)
        rows.append(((family, tp, dp, pp, zero, precision), held, predicted))
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        import json
        with open(out_path, "w") as f:
            json.dump([[r, row] for r, rows_ in enumerate(gathered) for row in rows_], f)
