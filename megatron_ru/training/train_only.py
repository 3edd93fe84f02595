"""--train-only embeddings|new-rows: the first stage after a vocabulary adaptation trains the vocabulary rows only.

embeddings  the input embedding and the output head (one matrix when tied) train; every other
            parameter is frozen (requires_grad False: out of the optimizer, as a LoRA base is).
new-rows    as `embeddings`, and the gradient of every old row (below the first new id and not
            one --replace-unused freed) is zeroed (each TP rank masks its own slice) and the
            matrices get no weight decay, so with AdamW the old rows stay bit-identical: zero
            gradient, zero moments, zero update.
The first new id comes from --train-only-from, else from the `vocab_adaptation` record that
tools/adapt_vocab.py writes into the config.json of the checkpoint the run starts from (the
reused ids of removed tokens come from the record only). The record travels on: the trainer
writes it into the config.json of every checkpoint it saves, so a run resumed from its own
checkpoints (--load RUN) finds it, and so does a later stage that starts from them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError

MODES = ("embeddings", "new-rows")


def add_arguments(group) -> None:
    group.add_argument("--train-only", choices=MODES, default=None,
                       help="train only the vocabulary rows (embeddings: input embedding and head; "
                            "new-rows: only the rows of tokens added by tools/adapt_vocab.py)")
    group.add_argument("--train-only-from", type=int, default=None, metavar="ID",
                       help="--train-only new-rows: the first new token id (default: the one "
                            "tools/adapt_vocab.py recorded in the loaded checkpoint)")


def validate(args) -> None:
    if getattr(args, "train_only", None) is None:
        if getattr(args, "train_only_from", None) is not None:
            raise ConfigError("--train-only-from needs --train-only new-rows")
        return
    if args.lora_rank:
        raise ConfigError("--train-only and --lora-rank both choose what trains: give one")
    if getattr(args, "pipeline_model_parallel_size", 1) > 1:
        raise ConfigError("--train-only is not supported with pipeline parallelism yet: train the "
                          "vocabulary stage with --pipeline-model-parallel-size 1")
    if args.train_only_from is not None and (args.train_only != "new-rows" or args.train_only_from < 1):
        raise ConfigError(f"--train-only-from {args.train_only_from} applies to --train-only new-rows "
                          "and must be a positive token id")


def recorded(directory) -> Optional[dict]:
    """The `vocab_adaptation` record of DIR/config.json (written by tools/adapt_vocab.py, carried by
    training checkpoints), or None."""
    try:
        meta = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return None
    rec = meta.get("vocab_adaptation") if isinstance(meta, dict) else None
    return rec if isinstance(rec, dict) and "first_new_id" in rec else None


def record_for(args, sources) -> Optional[dict]:
    """The record this run carries: the first source's that has one, --train-only-from overriding
    its first new id."""
    rec = next((r for r in (recorded(d) for d in sources if d) if r is not None), None)
    if getattr(args, "train_only_from", None) is not None:
        rec = {**(rec or {}), "first_new_id": args.train_only_from}
    return rec


def apply(model, args, sources, log) -> Optional[dict]:
    """Freeze the model for args.train_only; `sources`: checkpoint directories the run starts from.
    Returns the vocabulary-adaptation record to write into this run's checkpoints (or None)."""
    rec = record_for(args, sources)
    if not getattr(args, "train_only", None):
        return rec
    vocab = {id(model.embed.weight): model.embed.weight}
    if model.lm_head is not None:
        vocab[id(model.lm_head.weight)] = model.lm_head.weight
    for p in model.parameters():
        p.requires_grad_(id(p) in vocab)
    what = "input embedding and head" if len(vocab) == 2 else "tied embedding"
    if args.train_only == "embeddings":
        log(f"--train-only embeddings: training the {what} only")
        return rec
    if rec is None:
        raise ConfigError("--train-only new-rows: no first new token id: pass --train-only-from ID, or "
                          "start from a checkpoint written by tools/adapt_vocab.py (--finetune --load DIR)")
    first, reused = int(rec["first_new_id"]), [int(i) for i in rec.get("replaced_ids", ())]
    size = model.config.vocab_size
    if first >= size and not reused:
        raise ConfigError(f"--train-only-from {first} is not below the vocabulary size {size}")
    if any(not 0 <= i < size for i in reused):
        raise ConfigError(f"the vocab_adaptation record's replaced_ids reach past the vocabulary size {size}")
    rows = model.embed.weight.shape[0]
    frozen = torch.ones(rows, dtype=torch.bool)  # (local rows,): True where the row is an old token's
    frozen[max(0, min(first - model.vocab_start, rows)):] = False
    local = [i - model.vocab_start for i in reused if 0 <= i - model.vocab_start < rows]
    frozen[local] = False

    def mask(grad):
        return grad.masked_fill(frozen.to(grad.device)[:, None], 0)  # (rows, H): old rows' gradient zero

    for p in vocab.values():
        p.register_hook(mask)
        p.no_weight_decay = True  # optim.param_groups: decay would move the old rows
    log("--train-only new-rows: training "
        + " and ".join(([f"rows {first}..{size - 1}"] if first < size else [])
                       + ([f"the {len(reused)} rows of replaced tokens"] if reused else []))
        + f" of the {what}; the other rows stay as they are")
    return rec
