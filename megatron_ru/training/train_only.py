"""--train-only embeddings|new-rows: the first stage after a vocabulary adaptation trains the vocabulary rows only.

embeddings  the input embedding and the output head (one matrix when tied) train; every other
            parameter is frozen (requires_grad False: out of the optimizer, as a LoRA base is).
new-rows    as `embeddings`, and the gradient of rows below the first new id is zeroed (each TP
            rank masks its own slice) and the matrices get no weight decay, so with AdamW the old
            rows stay bit-identical: zero gradient, zero moments, zero update.
The first new id comes from --train-only-from, else from the `vocab_adaptation` record that
tools/adapt_vocab.py writes into the config.json of the checkpoint the run starts from.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

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


def recorded_first_new(directory) -> Optional[int]:
    """The first new id tools/adapt_vocab.py recorded in DIR/config.json, or None."""
    try:
        meta = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return None
    rec = meta.get("vocab_adaptation") if isinstance(meta, dict) else None
    return int(rec["first_new_id"]) if isinstance(rec, dict) and "first_new_id" in rec else None


def apply(model, args, sources, log) -> None:
    """Freeze the model for args.train_only; `sources`: checkpoint directories the run starts from."""
    if not getattr(args, "train_only", None):
        return
    vocab = {id(model.embed.weight): model.embed.weight}
    if model.lm_head is not None:
        vocab[id(model.lm_head.weight)] = model.lm_head.weight
    for p in model.parameters():
        p.requires_grad_(id(p) in vocab)
    what = "input embedding and head" if len(vocab) == 2 else "tied embedding"
    if args.train_only == "embeddings":
        log(f"--train-only embeddings: training the {what} only")
        return
    first = args.train_only_from
    for d in sources:
        first = first if first is not None else (recorded_first_new(d) if d else None)
    if first is None:
        raise ConfigError("--train-only new-rows: no first new token id: pass --train-only-from ID, or "
                          "start from a checkpoint written by tools/adapt_vocab.py (--finetune --load DIR)")
    if first >= model.config.vocab_size:
        raise ConfigError(f"--train-only-from {first} is not below the vocabulary size {model.config.vocab_size}")
    keep = max(0, min(first - model.vocab_start, model.embed.weight.shape[0]))  # local old rows

    def mask(grad):
        grad = grad.clone()
        grad[:keep] = 0  # rows of old tokens on this TP rank: (keep, H)
        return grad

    for p in vocab.values():
        p.register_hook(mask)
        p.no_weight_decay = True  # optim.param_groups: decay would move the old rows
    log(f"--train-only new-rows: training rows {first}..{model.config.vocab_size - 1} of the {what}; "
        f"rows below {first} stay as they are")
