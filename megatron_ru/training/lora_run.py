"""LoRA runs in the Trainer: adapters put on the model, the base a resumed run was trained on, the size of a
save, and the adapter files written beside DeepSpeed's state (flags: finetune.py; modules: model/lora.py)."""
from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from ..config import ConfigError


def setup_lora(model, args, log) -> None:
    from ..model.lora import apply_lora
    names = apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha or 2.0 * args.lora_rank,
                       dropout=args.lora_dropout, targets=args.lora_targets, seed=args.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"LoRA rank {args.lora_rank} on {','.join(model.lora_settings['targets'])}: {len(names)} adapter "
        f"tensors, {trainable:,} trainable of {total:,} parameters on this rank (base frozen)")


def lora_resume_base(args, tag: str, tp_size: int) -> str:
    """The base of the LoRA run in --load (its adapter_config.json; --pretrained-checkpoint when
    the recorded base has moved), after checking that this run's LoRA settings and TP size are
    the saved run's."""
    import os

    from ..checkpoint.lora_files import CONFIG_FILE, read_meta
    from ..model.lora import parse_targets
    load = Path(args.load)
    if (load / "config.json").is_file():
        raise ConfigError(f"--lora-rank with --load {load}: it holds a whole model's training "
                          "checkpoint, not a LoRA run; start LoRA from it with --finetune --load "
                          f"{load}, or --pretrained-checkpoint {load} --load RUN --save RUN")
    meta = read_meta(load)
    if not meta:
        raise ConfigError(f"{load}/{tag} has no {CONFIG_FILE} beside it (it names the LoRA run's base "
                          "and settings): not a LoRA run this toolkit can resume")
    base, given = meta.get("base"), args.pretrained_checkpoint
    if base and Path(base).is_dir():
        if given and os.path.realpath(given) != os.path.realpath(base):
            raise ConfigError(f"--pretrained-checkpoint {given}, but the LoRA run in {load} was "
                              f"trained on {base}")
    elif given and Path(given).is_dir():
        base = given  # the recorded base moved: the given one (its shapes are checked next)
    else:
        raise ConfigError(f"the LoRA run in {load} was trained on {base or '(no base recorded)'}, "
                          "which does not exist: pass its new place with --pretrained-checkpoint")
    want = {"rank": args.lora_rank, "alpha": args.lora_alpha or 2.0 * args.lora_rank,
            "dropout": args.lora_dropout, "tensor_model_parallel_size": tp_size}
    for key, value in want.items():
        if key in meta and float(meta[key]) != float(value):
            flag = "--tensor-model-parallel-size" if key.startswith("tensor") else f"--lora-{key}"
            raise ConfigError(f"{flag} {value}, but the LoRA run in {load} was saved with {key} "
                              f"{meta[key]}: resume with the same settings (a LoRA run resumes at "
                              "its TP and data-parallel sizes)")
    if "targets" in meta and list(parse_targets(args.lora_targets)) != list(meta["targets"]):
        raise ConfigError(f"--lora-targets {args.lora_targets}, but the LoRA run in {load} was "
                          f"saved with {','.join(meta['targets'])}: resume with the same LoRA settings")
    return base


def lora_checkpoint_bytes(config, args) -> int:
    """Disk for one LoRA save by an estimate: the adapters (rank x (in + out) per targeted
    layer) in fp32 with two Adam moments and a 16-bit copy (16 bytes each), doubled for slack."""
    from ..model.lora import parse_targets
    h, f, r = config.hidden_size, config.ffn_hidden_size, args.lora_rank
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    qkv_out = h + 2 * kv * (h // config.num_attention_heads)
    fc1_out = 2 * f if getattr(config, "family", "") == "llama" else f
    sizes = {"qkv": h + qkv_out, "proj": 2 * h, "fc1": h + fc1_out, "fc2": f + h}
    targets = set(parse_targets(args.lora_targets))
    per_layer = sum(n for name, n in sizes.items() if name in targets)
    head = h + config.vocab_size if "lm_head" in targets else 0
    return 2 * 16 * r * (per_layer * config.num_layers + head)


def save_lora(trainer) -> str:
    """Adapters only (full tensors, any TP) + a pointer to the base, into --save."""
    from ..checkpoint.lora_files import save_adapters
    ps = trainer.ps
    path = save_adapters(trainer.model, trainer.args.save, base=trainer.base,
                         write=ps.rank == 0, iteration=trainer.iteration,
                         tensor_model_parallel_size=ps.tp_size)
    args = trainer.args
    if path is not None and args.dataset_type == "sft":  # the SFT data's chat template goes with the adapters
        from ..files import atomic_write_text
        from .finetune import recorded_template
        template = recorded_template(args.data_path)
        if template:
            atomic_write_text(Path(path) / "chat_template.jinja", Path(template).read_text(encoding="utf-8"))
    if ps.world_size > 1:
        dist.barrier()
    return str(path or trainer.args.save)
