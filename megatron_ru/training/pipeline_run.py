"""Pretraining with pipeline parallelism: checks before compute, the stage model and DeepSpeed's
PipelineEngine, one step / one evaluation micro-batch loop, the loss on every rank.

The engine is DeepSpeed's (parallel/pipeline.py says why and how stages are cut). A step is
`engine.train_batch(it)`: 1F1B over `gradient_accumulation_steps` micro-batches, tied-embedding
gradients summed over the first and last stage, DP all-reduce, optimizer step; the loss is
averaged on the last stage and broadcast to every stage by the engine, so every rank logs it.
"""
from __future__ import annotations

from ..config import ConfigError
from ..data.batch import get_batch
from ..model.gpt import GPTModel
from ..model.sparsity import causal_density, make_layout
from ..parallel import pipeline


def sparse_density(config, seq_length: int) -> float:
    if not any(config.sparse_layers()):
        return 1.0
    block = int(config.sparse_attention.get("block", 16))
    padded = -(-seq_length // block) * block
    return causal_density(make_layout(config.sparse_attention, config.num_attention_heads, padded))


def check(args, ds: dict, config, ps, log) -> list[int]:
    """Refuse what the pipeline cannot run (one line each, before compute); returns the layers
    per stage and prints the split with its per-stage cost estimate."""
    pp = ps.pp_size
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage >= 2:
        raise ConfigError(f"--pipeline-model-parallel-size={pp} needs ZeRO stage 0 or 1 (DeepSpeed's "
                          f"pipeline engine partitions no gradients); the DeepSpeed config asks for "
                          f"stage {stage}")
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    if accum < pp:
        raise ConfigError(
            f"micro-batches per step = global batch {ds['train_batch_size']} / (micro batch {micro} x "
            f"data-parallel size {ps.dp_size}) = {accum} is smaller than "
            f"--pipeline-model-parallel-size={pp}: raise --global-batch-size to at least "
            f"{pp * micro * ps.dp_size}")
    refused = [  # (flag, given, what to do instead)
        ("--lora-rank", args.lora_rank, "train LoRA with tensor / data parallelism at PP=1"),
        ("--reset-attention-mask", args.reset_attention_mask, "drop it, or train at PP=1"),
        ("--reset-position-ids", args.reset_position_ids, "drop it, or train at PP=1"),
        ("--eval-tasks", args.eval_tasks, "evaluate the saved checkpoints with tools/run_lm_eval.py"),
        ("--sft-packing packed", args.sft_packing == "packed", "use --sft-packing pad, or train at PP=1")]
    for flag, on, instead in refused:
        if on:
            raise ConfigError(f"{flag} is not supported with --pipeline-model-parallel-size={pp} "
                              f"(> 1): {instead}")
    counts = pipeline.split_layers(config, pp, args.pipeline_split, seq_length=args.seq_length,
                                   sparse_density=sparse_density(config, args.seq_length),
                                   tp_size=ps.tp_size)
    return counts


def describe(config, counts, args, ps) -> str:
    costs = pipeline.layer_costs(config, args.seq_length, sparse_density(config, args.seq_length),
                                 ps.tp_size)
    return (f"pipeline split ({args.pipeline_split}): {counts} layers per stage\n"
            + pipeline.describe_split(counts, costs, config.sparse_layers()))


def build_model(config, ps, counts, seed: int) -> GPTModel:
    """The one GPTModel, on meta except this stage's parameters (seeded as at PP=1)."""
    model = GPTModel(config, ps, seed=seed, initialize=False, device="meta")
    pipeline.materialize_stage(model, counts, ps.pp_rank, seed, ps.device)
    return model


def build_module(model, ps, counts):
    """DeepSpeed's PipelineModule; afterwards our layers talk through the grid's own groups."""
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the initialised group
    module = pipeline.build_pipeline_module(model, ps, counts)
    grid = module._grid
    ours = {"tp": sorted(grid.slice_group), "dp": sorted(grid.dp_group), "pp": sorted(grid.pp_group)}
    mine = {k: sorted(r for r in ranks) for k, ranks in _my_groups(ps).items()}
    if ours != mine:
        raise ConfigError(f"DeepSpeed's pipeline grid {ours} disagrees with our rank layout {mine}")
    ps.adopt_groups(grid.get_slice_parallel_group(), grid.get_data_parallel_group(),
                    grid.get_pipe_parallel_group())
    # the stages never call GPTModel.forward: sequence parallelism is switched on once, here,
    # over the adopted TP group (training and evaluation alike: one sequence length)
    model.set_sequence_parallel(model.sequence_parallel)
    return module


def pipe_section(config, ds: dict) -> dict:
    """The DeepSpeed config with what sequence parallelism needs from the pipeline engine."""
    if not config.sequence_parallel:
        return ds
    return {**ds, "pipeline": {**ds.get("pipeline", {}), **pipeline.SEQUENCE_PARALLEL_PIPE}}


def _my_groups(ps) -> dict:
    from ..parallel.state import group_ranks
    out = {}
    for kind, ranks in group_ranks(ps.world_size, ps.tp_size, ps.pp_size):
        if ps.rank in ranks:
            out[kind] = ranks
    return out


def install_clipping(engine, ps, on_norm=None) -> None:
    """fp32 ZeRO-0 clipping with the right global norm. DeepSpeed's `clip_grad_norm_` counts a
    replicated parameter only on model-parallel rank 0 of the grid's TP x PP slice (so stage > 0
    drops its norms and biases) and counts the tied embedding twice; here: sharded parameters on
    every TP rank, replicated ones on TP rank 0 of each stage, the tied copy once, summed over
    the slice. The coefficient is DeepSpeed's: min(1, max_norm / (norm + 1e-6)). `on_norm(norm)`
    runs before the step on every rank (the guards' skip of a non-finite fp32 step)."""
    import torch
    import torch.distributed as dist

    def clip():
        params = [p for p in engine.module.parameters() if p.grad is not None]
        norms = [p.grad.detach().float().norm(2) for p in params
                 if not getattr(p, "ds_pipe_replicated", False)
                 and (ps.tp_rank == 0 or getattr(p, "shard_spec", None) is not None)]
        total = torch.stack(norms).pow(2).sum() if norms else torch.zeros((), device=ps.device)
        total = total.reshape(1).to(ps.device)
        dist.all_reduce(total, group=engine.grid.get_model_parallel_group())
        total = total.sqrt()
        coef = torch.clamp(engine.gradient_clipping() / (total + 1e-6), max=1.0)
        for p in params:
            p.grad.detach().mul_(coef)
        engine._global_grad_norm = float(total)
        if on_norm is not None:
            on_norm(float(total))

    engine.clip_fp32_gradients = clip


class PipeBatches:
    """Our loader's micro-batches as DeepSpeed's (tokens, (labels, loss_mask)) pairs. Only the
    first and last stage read (the same samples: same DP rank, same order)."""

    def __init__(self, loader, eod: int, eod_mask_loss: bool, device) -> None:
        self.loader, self.eod, self.mask, self.device = loader, eod, eod_mask_loss, device

    def __iter__(self):
        return self

    def __next__(self):
        b = get_batch(next(self.loader)["text"], self.eod, eod_mask_loss=self.mask)
        dev = self.device
        return b["tokens"].to(dev), (b["labels"].to(dev), b["loss_mask"].to(dev))


class PipeSFTBatches:
    """SFT micro-batches (GlobalTokenMean's, weights agreed over the stage's DP group) as
    (tokens, (labels, loss_mask, weight)); the last stage's LossFn applies the weight."""

    def __init__(self, weighted, device) -> None:
        self.weighted, self.device = weighted, device

    def __iter__(self):
        return self

    def __next__(self):
        import torch
        b, dev = next(self.weighted), self.device
        weight = torch.tensor(b["weight"], dtype=torch.float64, device=dev)
        return b["tokens"].to(dev), (b["labels"].to(dev), b["loss_mask"].to(dev), weight)


def train_step(trainer, data_iter) -> dict:
    """One optimizer step over the pipeline; the record the loop logs (loss from the last stage)."""
    engine, guards, step = trainer.engine, trainer.guards, trainer.iteration + 1
    skipped_before = engine.skipped_steps
    scale = (float("inf") if guards.inject("overflow", step) else 1.0) * \
        (30.0 if guards.inject("spike", step) else 1.0)  # fault injection (tests)
    trainer.pipe.loss_fn.scale = scale
    try:
        loss = engine.train_batch(data_iter=data_iter)
    finally:
        vars(engine.optimizer).pop("step", None)  # undo a guard's one-step skip (install_clipping)
    trainer.iteration += 1
    trainer.consumed += trainer.ds["train_batch_size"]
    gn = engine.get_global_grad_norm()
    return {"loss": float(loss), "grad_norm": None if gn is None else float(gn),
            "skipped": engine.skipped_steps - skipped_before}


def eval_batch(trainer, data_iter) -> float:
    """The mean loss of one step's micro-batches, broadcast from the last stage to all."""
    return float(trainer.engine.eval_batch(data_iter=data_iter, compute_loss=True, bcast_loss=True))
