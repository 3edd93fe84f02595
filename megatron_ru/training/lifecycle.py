"""The run lifecycle of pretrain_gpt.py: output checks before compute, auto-resume, when to stop.

- `check_outputs`: --save / --metrics-file / --tensorboard-dir usable (every rank checks; the
  trainer agrees on the outcome), with room for one checkpoint.
- `resume_tag`: the `--load X --save X` idiom — no checkpoint yet → fresh start; leftovers of an
  interrupted save are ignored (the lock holder removes them); `latest`, else the newest complete one.
- `check_save_holds_this_run`: a --save directory with checkpoints is only reused by a run that
  resumes from it.
- `apply_checkpoint_args`: --use-checkpoint-args, the model settings from --load's config.json.
- `StopPolicy`: SIGTERM / first SIGINT, --exit-interval, --exit-duration-in-mins; every rank stops
  at the same iteration (one small all-reduce per step).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .. import runtime
from .arguments import TrainArgs
from ..checkpoint import save_dir
from ..checkpoint.training import RUNTIME_FIELDS
from ..checkpoint.load import read_config
from ..checkpoint.model_io import CheckpointError, is_own_checkpoint
from ..config import ConfigError, ModelConfig


def _same_dir(a: Optional[str], b: Optional[str]) -> bool:
    return bool(a and b) and os.path.realpath(a) == os.path.realpath(b)


def check_outputs(args: TrainArgs, ps, checkpoint_bytes: int) -> None:
    """Raise (UsageError family) when an output path cannot be used; called on every rank."""
    if args.tensorboard_dir and ps.rank == 0:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"--tensorboard-dir needs the tensorboard package ({exc}); "
                              "pip install tensorboard") from None
    if args.metrics_file and ps.rank == 0:
        path = Path(args.metrics_file)
        if path.is_dir():
            raise ConfigError(f"--metrics-file {path} is a directory")
        for parent in [path.parent, *path.parent.parents]:
            if parent.exists():
                if not parent.is_dir():
                    raise ConfigError(f"--metrics-file {path}: {parent} is a file, not a directory")
                if not os.access(parent, os.W_OK):
                    raise ConfigError(f"--metrics-file {path}: {parent} is not writable")
                break
    if args.save:
        save_dir.check_writable(args.save, checkpoint_bytes)
    if args.tensorboard_dir and ps.rank == 0 and Path(args.tensorboard_dir).is_file():
        raise ConfigError(f"--tensorboard-dir {args.tensorboard_dir} is a file")


def resume_tag(args: TrainArgs, log: Callable) -> Optional[str]:
    """The tag to resume from (None: start fresh; --finetune loads weights only, elsewhere)."""
    if args.finetune:
        return None
    tag = save_dir.latest_or_newest(args.load)
    if tag is not None:
        latest = Path(args.load) / "latest"
        if not latest.is_file():
            log(f"note: {latest} is missing (a run stopped before writing it): resuming from the "
                f"newest complete checkpoint {tag}")
        return tag
    leftovers = sorted(p.name for p in Path(args.load).glob("iter_*.tmp")) \
        if Path(args.load).is_dir() else []
    if _same_dir(args.load, args.save):
        # the auto-resume idiom, first launch
        what = f" (only leftovers of an interrupted save: {', '.join(leftovers)})" if leftovers else ""
        start = f"--pretrained-checkpoint {args.pretrained_checkpoint}" if args.pretrained_checkpoint \
            else "scratch"
        log(f"no checkpoint in {args.load} yet{what}: starting from {start}")
        return None
    if not Path(args.load).is_dir():
        raise CheckpointError(f"--load {args.load} does not exist")
    if leftovers:
        raise CheckpointError(f"--load {args.load} holds no complete checkpoint, only leftovers "
                              f"of an interrupted save ({', '.join(leftovers)})")
    if not is_own_checkpoint(Path(args.load)) and not any(Path(args.load).iterdir()):
        raise CheckpointError(f"--load {args.load} is empty: no checkpoint to resume from "
                              "(for the auto-resume idiom give the same directory to --save)")
    return "latest"  # a foreign directory: check_compatible names what it is


def check_save_holds_this_run(args: TrainArgs, config: ModelConfig, resuming: Optional[str]) -> None:
    """Refuse a --save that already holds checkpoints, unless this run resumes from it."""
    root = Path(args.save)
    tag = save_dir.latest_or_newest(args.save)
    if tag is None or (_same_dir(args.load, args.save) and resuming is not None):
        return
    from ..checkpoint.lora_files import is_adapter_dir
    if is_adapter_dir(root):
        raise CheckpointError(
            f"--save {root} already holds a LoRA run (latest {tag}); resume it with --lora-rank R "
            f"--pretrained-checkpoint BASE --load {root} --save {root} (its LoRA flags), or choose an "
            "empty --save directory")
    what = "another model's" if not is_own_checkpoint(root) else None
    if what is None:
        saved, _ = read_config(root)
        a, b = saved.to_dict(), config.to_dict()
        diff = [k for k in sorted(a) if a[k] != b.get(k) and k not in RUNTIME_FIELDS]
        what = f"another model's (differing: {', '.join(diff)})" if diff else "this model's"
    raise CheckpointError(
        f"--save {root} already holds {what} checkpoints (latest {tag}); resume from them with "
        f"--load {root}, or choose an empty --save directory")


def apply_checkpoint_args(args: TrainArgs, log: Callable) -> None:
    """--use-checkpoint-args: model settings (and the tokenizer, when none is given) from --load."""
    if not args.load and not args.pretrained_checkpoint:
        raise ConfigError("--use-checkpoint-args needs --load DIR (or --pretrained-checkpoint BASE)")
    source = _settings_source(args)
    if source is None:
        if args.load and _same_dir(args.load, args.save):
            if not args.preset and "num_layers" not in args.model_overrides:
                raise ConfigError(f"--use-checkpoint-args: {args.load} has no checkpoint yet, so "
                                  "the first launch needs the model flags (or --preset)")
            return
        where = args.load or args.pretrained_checkpoint
        raise CheckpointError(f"--use-checkpoint-args: {Path(where) / 'config.json'} is missing (it "
                              "reads our config.json; give the model flags for other formats)")
    args_load, args.load = args.load, str(source)  # read the settings (and tokenizer) from there
    try:
        _apply_settings(args, log)
    finally:
        args.load = args_load


def _settings_source(args: TrainArgs) -> Optional[Path]:
    """Whose config.json holds the model settings: --load's; for a LoRA run in --load, its base;
    when --load holds nothing yet, --pretrained-checkpoint."""
    from ..checkpoint.lora_files import read_meta
    if args.load and (Path(args.load) / "config.json").is_file():
        return Path(args.load)
    base = read_meta(Path(args.load)).get("base") if args.load else None
    for candidate in (base, args.pretrained_checkpoint):
        if candidate and (Path(candidate) / "config.json").is_file():
            return Path(candidate)
    return None


def _apply_settings(args: TrainArgs, log: Callable) -> None:
    config, meta = read_config(Path(args.load), trust=args.trust_checkpoint)
    taken = {k: v for k, v in config.to_dict().items() if k != "vocab_size"}  # vocab: tokenizer's
    args.preset = None
    args.model_overrides = {**taken, **{k: v for k, v in args.model_overrides.items()
                                        if k in RUNTIME_FIELDS}}
    if args.seq_length is not None and args.seq_length > config.max_position_embeddings:
        raise ConfigError(f"--seq-length {args.seq_length} exceeds the checkpoint's "
                          f"max_position_embeddings={config.max_position_embeddings}")
    recorded = meta.get("tokenizer") or {}
    if not (args.vocab_file or args.merge_file or args.tokenizer_model) and recorded:
        for key in ("vocab_file", "merge_file", "tokenizer_model"):
            if recorded.get(key):
                setattr(args, key, str(Path(args.load) / recorded[key]))
        args.tokenizer_type = recorded.get("type", args.tokenizer_type)
        args.eod_token = args.eod_token or recorded.get("eod_token")
    log(f"--use-checkpoint-args: model settings from {Path(args.load) / 'config.json'}")


class StopPolicy:
    """Decides, identically on every rank, whether to stop after the current iteration."""

    def __init__(self, args: TrainArgs, ps, started: float) -> None:
        self.args, self.ps, self.started = args, ps, started
        self.reason: Optional[str] = None
        self.last_save_s = 0.0

    def _local(self, iteration: int, step_s: float) -> tuple[int, int]:
        a = self.args
        signalled = 1 if runtime.stop_requested() else 0
        timed = 0
        if a.exit_duration_in_mins is not None:
            # stop early enough for one more step and a save to fit in the allowance
            projected = time.time() - self.started + step_s + self.last_save_s
            timed = int(projected > 60.0 * a.exit_duration_in_mins)
        return signalled, timed

    def should_stop(self, iteration: int, step_s: float) -> bool:
        a = self.args
        signalled, timed = self._local(iteration, step_s)
        if self.ps.world_size > 1 and dist.is_initialized():
            flags = torch.tensor([signalled, timed], dtype=torch.int32, device=self.ps.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            signalled, timed = (int(v) for v in flags.tolist())
        if signalled:
            self.reason = runtime.stop_requested() or "a signal (on another rank)"
        elif timed:
            self.reason = f"--exit-duration-in-mins {a.exit_duration_in_mins:g}"
        elif a.exit_interval and iteration % a.exit_interval == 0:
            self.reason = f"--exit-interval {a.exit_interval}"
        return self.reason is not None
