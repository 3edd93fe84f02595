"""Fine-tuning hooks of the Trainer: SFT flags, SFT datasets, the global token-mean loss, LoRA setup.

Loss = mean over every target token of the global batch (all micro-batches of the step on all
data-parallel ranks). Before a step each rank reads its `accum` micro-batches, counts their target
tokens and all-reduces the count N over the DP group. Micro-batch m's loss is the model's mean over
its n_m targets rescaled to n_m * accum * dp / N: DeepSpeed divides by accum (gradient
accumulation) and by dp (gradient averaging), so the summed gradient is that of
sum(token losses) / N. A conversation's tokens therefore weigh the same on whichever row, micro-batch
or rank they land, and the logged loss is the same global mean.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..data.sft import PACKING, build_sft_datasets, sft_batch


def add_arguments(p: argparse.ArgumentParser) -> None:
    f = p.add_argument_group("fine-tuning (SFT data, LoRA)")
    f.add_argument("--dataset-type", choices=("text", "sft"), default="text",
                   help="sft: --data-path prefixes written by preprocess_data.py --dataset-type sft "
                        "(loss only on assistant tokens, via PREFIX_loss_mask)")
    f.add_argument("--sft-packing", choices=PACKING, default="pad",
                   help="pad: one conversation per row; packed: several per row, positions "
                        "restarted and attention kept inside each conversation")
    f.add_argument("--sft-overlong", choices=("truncate", "error"), default="truncate",
                   help="conversations longer than --seq-length + 1 tokens: cut (with a warning) or stop")
    f.add_argument("--lora-rank", type=int, default=0, help="LoRA rank; 0 = full fine-tuning")
    f.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    f.add_argument("--lora-dropout", type=float, default=0.0)
    f.add_argument("--lora-targets", default="qkv,proj,fc1,fc2",
                   help="layers with adapters: qkv,proj,fc1,fc2,lm_head (or q_proj,k_proj,v_proj,"
                        "o_proj,gate_proj,up_proj,down_proj / c_attn,c_fc,attn.c_proj,mlp.c_proj)")


def validate(args) -> None:
    if args.lora_rank < 0:
        raise ConfigError(f"--lora-rank={args.lora_rank} must be >= 0")
    if args.lora_rank and not (args.load or args.pretrained_checkpoint):
        raise ConfigError("--lora-rank needs a base model: --finetune --load BASE, or "
                          "--pretrained-checkpoint BASE --load RUN --save RUN (resumable)")
    if args.dataset_type != "sft" and args.sft_packing != "pad":
        raise ConfigError("--sft-packing needs --dataset-type sft")


def build_datasets(args, counts, pad_id: int, **validation):
    """`validation`: vocab_size, tokenizer_fingerprint, cache_path, warn (data/sft.py)."""
    return build_sft_datasets(args.data_path, args.split, args.seq_length, args.seed, counts,
                              packing=args.sft_packing, overlong=args.sft_overlong, pad_id=pad_id,
                              **validation)


class GlobalTokenMean:
    """Wraps a micro-batch iterator: reads `accum` micro-batches ahead, agrees the step's target
    count N over the DP group and tags each micro-batch with its loss weight (module docstring)."""

    def __init__(self, it, accum: int, ps, packed: bool) -> None:
        self.it, self.accum, self.ps, self.packed = it, accum, ps, packed
        self.buffer: list = []

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self.buffer:
            batches = [sft_batch(next(self.it), packed=self.packed) for _ in range(self.accum)]
            counts = torch.tensor([float(b["loss_mask"].sum()) for b in batches], dtype=torch.float64)
            total = counts.sum().to(self.ps.device)
            if self.ps.dp_size > 1:
                dist.all_reduce(total, group=self.ps.dp_group)
            scale = self.accum * self.ps.dp_size / max(float(total), 1.0)
            for b, n in zip(batches, counts.tolist()):
                b["weight"] = n * scale
            self.buffer = batches
        return self.buffer.pop(0)


def forward(engine, b: dict, device) -> torch.Tensor:
    """The weighted loss of one prepared SFT micro-batch (see GlobalTokenMean)."""
    opt = {k: (None if b[k] is None else b[k].to(device)) for k in ("position_ids", "attention_mask")}
    loss = engine(b["tokens"].to(device), positions=opt["position_ids"], labels=b["labels"].to(device),
                  loss_mask=b["loss_mask"].to(device), attention_mask=opt["attention_mask"])
    return loss * b["weight"]


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
    if ps.world_size > 1:
        dist.barrier()
    return str(path or trainer.args.save)
