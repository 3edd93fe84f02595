"""Fine-tuning hooks of the Trainer: SFT and LoRA flags, SFT datasets, the global token-mean loss (LoRA runs: lora_run.py).

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
from typing import Optional

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..data.sft_examples import PACKING, build_sft_datasets, sft_batch, template_record


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


def recorded_template(data_path) -> Optional[str]:
    """The chat template file preprocessing recorded with the SFT data (one for all prefixes of
    --data-path; None when none is recorded or the prefixes were rendered with different ones)."""
    from ..data.blended import parse_data_path
    found = {}
    for _, prefix in parse_data_path(data_path):
        path = Path(template_record(prefix))
        if path.is_file():
            found.setdefault(path.read_text(encoding="utf-8"), str(path))
    return next(iter(found.values())) if len(found) == 1 else None


def build_datasets(args, counts, pad_id: int, **validation):
    """`validation`: vocab_size, tokenizer_fingerprint, cache_path, warn (data/sft_examples.py)."""
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
