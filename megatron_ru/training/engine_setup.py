"""Building the Trainer's model (stage, base weights, LoRA) and DeepSpeed engine (optimizer, LR schedule)."""
from __future__ import annotations

from pathlib import Path

import torch

from .. import runtime
from ..checkpoint.load import load_full_state_dict
from ..checkpoint.model_io import shard_state_dict
from ..model.gpt import GPTModel
from ..planning import selfcheck
from . import hpz, lora_run, pipeline_run, train_only
from .optim import LRSchedule, ScheduledLR, param_groups


def plan_check(t):
    """planning/selfcheck.py for this run (not for LoRA: its frozen base has no optimizer state)."""
    if t.args.lora_rank:
        return None
    try:
        return selfcheck.SelfCheck(t.config, t.ds, t.ps, t.args.seq_length,
                                   t.precision, t.pp_counts, t.log)
    except Exception as exc:  # noqa: BLE001 - a prediction never stops training
        t.log(f"plan check skipped: {exc}")
        return None


def schedule(a) -> LRSchedule:
    warmup = a.lr_warmup_iters if a.lr_warmup_iters is not None else \
        int((a.lr_warmup_fraction or 0.0) * (a.lr_decay_iters or a.train_iters))
    return LRSchedule(lr=a.lr, min_lr=a.min_lr, warmup=warmup,
                      decay_iters=a.lr_decay_iters or a.train_iters, style=a.lr_decay_style)


def build_model(t) -> tuple:
    """(model, pipe, vocab_record) for trainer `t`: `pipe` is what the optimizer steps (the model,
    or this stage's DeepSpeed PipelineModule); `vocab_record` from --train-only (or None)."""
    args, ps = t.args, t.ps
    if ps.pp_size > 1:  # this stage's parameters only (training/pipeline_run.py)
        model = pipeline_run.build_model(t.config, ps, t.pp_counts, args.seed)
    else:
        model = GPTModel(t.config, ps, seed=args.seed)
    if t.base is not None:  # weights only, from any TP size
        _, full = load_full_state_dict(Path(t.base), trust=args.trust_checkpoint)
        model.load_state_dict(shard_state_dict(full, model))
        if t.resume_tag is None:
            t.log(f"loaded weights from {t.base} (iteration, optimizer and data position "
                  "start fresh)")
        del full
    if args.lora_rank:
        lora_run.setup_lora(model, args, t.log)
    # --train-only: vocabulary rows; the vocabulary-adaptation record goes into our checkpoints
    vocab_record = train_only.apply(model, args, (t.base, args.load), t.log)
    # what the optimizer steps: the model, or this stage's DeepSpeed PipelineModule (whose
    # grid's groups our layers then use: the same rank layout)
    pipe = model
    if ps.pp_size > 1:
        pipe = pipeline_run.build_module(model, ps, t.pp_counts)
    return model, pipe, vocab_record


def build_engine(t) -> tuple:
    """(engine, optimizer, scheduler) from deepspeed.initialize over t.model / t.pipe and t.ds."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    args, ps, ds, model, trained = t.args, t.ps, t.ds, t.model, t.pipe
    if t.precision == "fp16" and ps.device.type == "cpu" and \
            not get_accelerator().is_fp16_supported():
        # DeepSpeed refuses fp16 on CPUs without native fp16 arithmetic; PyTorch emulates it
        # (slowly), which is what CPU tests of loss scaling need.
        get_accelerator().is_fp16_supported = lambda: True
        t.log("fp16 on a CPU without native fp16 arithmetic: running emulated (slow)")
    optimizer = scheduler = None
    if "optimizer" not in ds:
        offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device")
        # ZeRO-Offload steps the optimizer on the CPU: DeepSpeed's vectorised CPU AdamW
        # (decoupled decay, compiled on first use) instead of torch's, unless the JSON
        # allows a client optimizer ("zero_force_ds_cpu_optimizer": false).
        if offload == "cpu" and ds.get("zero_force_ds_cpu_optimizer", True):
            from deepspeed.ops.adam import DeepSpeedCPUAdam as adamw
            extra = {"adamw_mode": True}
        else:
            adamw, extra = torch.optim.AdamW, {}
        optimizer = adamw(param_groups(trained, args.weight_decay), lr=args.lr,
                          betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps, **extra)
    if "scheduler" not in ds:  # ours, around whichever optimizer DeepSpeed ends up stepping
        scheduler = lambda opt: ScheduledLR(opt, schedule(args))  # noqa: E731
    if ds.get("zero_optimization", {}).get("stage", 0) == 3:
        # weights used outside their own module's forward (tied / untied output head)
        for p in {id(model.embed.weight): model.embed.weight,
                  id(model.output_weight()): model.output_weight()}.values():
            deepspeed.zero.register_external_parameter(model, p)
    hpz_group = None
    if t.hpz_groups:  # ZeRO++ secondary groups inside the data-parallel groups (hpz.py)
        hpz_group = runtime.checked(ps, hpz.install, t.hpz_groups, ps)
    if ps.pp_size > 1:  # DeepSpeed's PipelineEngine over the stage
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=trained, optimizer=optimizer, lr_scheduler=scheduler,
            config=pipeline_run.pipe_section(t.config, ds),
            model_parameters=None if optimizer else param_groups(trained, args.weight_decay))
        pipeline_run.install_clipping(  # fp32: a non-finite step is skipped (guards)
            engine, ps, on_norm=lambda norm: t.guards.before_update([], norm))
    else:  # DeepSpeed's data-parallel world is DP x CP (ParallelState's `mpu` methods): its
        # batch counts each CP rank's slices as samples
        ds_view = {**ds, "train_batch_size": ds["train_batch_size"] * ps.cp_size}
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_view, mpu=ps,
            model_parameters=None if optimizer else param_groups(model, args.weight_decay))
    if hpz_group is not None:
        runtime.checked(ps, hpz.verify, model, hpz_group)
    if t.plan_check is not None:
        t.plan_check.arm(engine, model)
    return engine, optimizer, scheduler
