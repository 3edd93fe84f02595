"""Resuming: the checkpoint a run resumes from or takes weights from (checked first), and its restore."""
from __future__ import annotations

from pathlib import Path

from .. import runtime
from ..checkpoint import universal
from ..checkpoint import training as ckpt
from ..config import ConfigError
from . import lifecycle, lora_run


def plan(args, ps, config, ds: dict, log) -> tuple:
    """(resume_tag, base): the checkpoint tag this run resumes from (not with --finetune) and whose
    weights the model starts from (--finetune / --pretrained-checkpoint / LoRA base), both checked
    against `config`. A resume at another DP (or PP > 1) size goes through a universal checkpoint
    (converted here) and sets ds["checkpoint"]["load_universal"]."""
    resume_tag = base = None
    if args.load:
        resume_tag = lifecycle.resume_tag(args, log)
    if args.lora_rank and resume_tag is not None:  # a LoRA run: its base, then its state
        base = lora_run.lora_resume_base(args, resume_tag, ps.tp_size)
        ckpt.check_compatible(base, config, ps.tp_size, weights_only=True,
                              trust=args.trust_checkpoint)
    elif resume_tag is not None:
        ckpt.check_compatible(args.load, config, ps.tp_size, weights_only=False,
                              tag=resume_tag, trust=args.trust_checkpoint,
                              pp_size=ps.pp_size)
    else:
        base = args.load if args.finetune else args.pretrained_checkpoint
        if base is not None:
            ckpt.check_compatible(base, config, ps.tp_size, weights_only=True,
                                  trust=args.trust_checkpoint)
        elif args.lora_rank:
            raise ConfigError("--lora-rank needs a base model: --finetune --load BASE, or "
                              "--pretrained-checkpoint BASE (with --load RUN --save RUN the "
                              f"run resumes once RUN holds a checkpoint; {args.load} has none)")
    if args.save:
        lifecycle.check_save_holds_this_run(args, config, resuming=resume_tag)
    if resume_tag is not None and args.lora_rank:
        if universal.plan_resume(args.load, resume_tag, ps.dp_cp_size)[1]:
            raise ConfigError(f"{args.load}/{resume_tag} was saved at another data-parallel "
                              "size; a LoRA run resumes at the size it was saved at (or start "
                              "a new one: --finetune --load BASE)")
    elif resume_tag is not None:  # another DP (or PP > 1) size: via a universal checkpoint
        resume_tag, load_universal = universal.plan_resume(args.load, resume_tag,
                                                           ps.dp_cp_size, ps.pp_size)
        if load_universal and ps.tp_size > 1 and ds.get("zero_optimization", {}).get("stage") == 3:
            raise ConfigError(  # DeepSpeed 0.19 narrows whole tensors into TP-shard partitions
                f"{args.load}/{resume_tag.removesuffix(universal.SUFFIX)} was saved at "
                "another data-parallel size "
                f"(DP x CP); DeepSpeed cannot resume ZeRO-3 state at --tensor-model-parallel-size "
                f"{ps.tp_size} through a universal checkpoint: resume at the saved DP x CP size, "
                "or start from the weights with --finetune --load")
        if load_universal:
            ds.setdefault("checkpoint", {})["load_universal"] = True
            target = Path(args.load) / resume_tag
            if ps.rank == 0 and not universal.is_universal(target):
                source = target.name[:-len(universal.SUFFIX)]
                log(f"{args.load}/{source} was saved at another data-parallel or pipeline "
                    f"size: converting it to a DeepSpeed universal checkpoint {target}")
                universal.convert(Path(args.load) / source, target, trust=args.trust_checkpoint)
    return resume_tag, base


def restore(trainer) -> None:
    """Load `trainer.resume_tag` into its engine: iteration, data position, RNG, the guards' state."""
    args, ps = trainer.args, trainer.ps
    client = ckpt.load_training_checkpoint(trainer.engine, args.load, tag=trainer.resume_tag,
                                           load_optimizer=not args.no_load_optim,
                                           strict=not args.lora_rank,
                                           trust=args.trust_checkpoint)
    trainer.iteration = trainer.loaded_iteration = int(client.get("iteration", 0))
    trainer.consumed = int(client.get("consumed_samples", 0))
    trainer.consumed_valid = int(client.get("consumed_valid_samples", 0))
    if "rng" in client:
        ckpt.set_rng_state(client["rng"], ps)
    runtime.checked(ps, trainer.guards.restore, client)  # data settings as the checkpoint's
    trainer.ensure_train_samples()
    trainer.log(f"resumed from {args.load} at iteration {trainer.iteration} "
                f"({trainer.consumed} samples consumed)")
