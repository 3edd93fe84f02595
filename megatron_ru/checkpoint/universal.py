"""Resume on another number of GPUs: DeepSpeed universal checkpoints around our training checkpoints.

ZeRO 1-3 partition the optimizer state by data-parallel rank, so a checkpoint saved at DP=1 cannot
be loaded at DP=2 as it is (DeepSpeed raises ZeRORuntimeException). DeepSpeed's universal format
stores every parameter's fp32 weight and Adam moments whole (`<tag>/zero/<param>/...`); its loader
re-partitions them for any DP size. We:

- save `universal_checkpoint_info` with every checkpoint: which parameters are replicated across
  the tensor-parallel group and which are row-parallel (split along dim 1), taken from each
  parameter's `shard_spec`, so DeepSpeed's converter merges TP slices correctly;
- on resume, compare the checkpoint's DP size with the run's; when they differ (ZeRO >= 1),
  rank 0 converts `<tag>` to `<tag>_universal` next to it (once; written under a temporary name
  and renamed) and DeepSpeed loads that with `checkpoint.load_universal`;
- `tools/convert_checkpoint.py --to universal` does the conversion by hand.

A tensor-parallel size change is not covered: our fused QKV / gate-up weights would need
DeepSpeed's sub-parameter shapes and the TP=2 -> 4 parity was not tested; use --finetune there.
Neither is a pipeline-parallel checkpoint (any PP, DP or TP change): its optimizer state is keyed by
DeepSpeed's layer-list names (`tied_modules.embed.embed.weight`, `1.block.attn.qkv.weight`), not
the GPTModel names the universal info describes; convert() refuses it with one line.
"""
from __future__ import annotations

import contextlib
import io
import re
import shutil
import types
from pathlib import Path
from typing import Optional

from ..data.progress import Progress, progress_wanted
from ..files import atomic_directory, atomic_write_text
from . import pipeline_files, safe_pickle
from .model_io import CheckpointError

SUFFIX = "_universal"
_OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def checkpoint_info(model) -> dict:
    """DeepSpeed's UNIVERSAL_CHECKPOINT_INFO for a GPTModel (exact-name regex patterns)."""
    from deepspeed.checkpoint import constants as c

    replicated, row = [], []
    for name, p in model.named_parameters():
        spec = getattr(p, "shard_spec", None)
        if spec is None:
            replicated.append(re.escape(name) + "$")
        elif spec.dim == 1:
            row.append(re.escape(name) + "$")
    return {c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
            c.TP_REPLICATED_PARAMETER_PATTERNS: replicated,
            c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: row}


def saved_dp_size(tag_dir: Path) -> Optional[int]:
    """Data-parallel size a ZeRO checkpoint was saved with (None: no partitioned optimizer)."""
    ranks = [int(m.group(1)) for p in tag_dir.glob("*optim_states.pt")
             if (m := _OPTIM_RE.match(p.name))]
    return max(ranks) + 1 if ranks else None


def is_universal(tag_dir: Path) -> bool:
    return (tag_dir / "zero").is_dir()


class _Steps(io.TextIOBase):
    """DeepSpeed's converter's stdout: its "*** N. step" lines name the progress bars that
    replace its tqdm bars; everything else is dropped."""

    def __init__(self) -> None:
        self.step = "converting"
        self._line = ""

    def write(self, text: str) -> int:
        self._line += text
        *lines, self._line = self._line.split("\n")
        for line in lines:
            if line.startswith("***"):
                self.step = line.strip("* .").strip()
        return len(text)


def _bars(steps: _Steps, enabled: bool):
    """A stand-in for the `tqdm` module inside ds_to_universal: our Progress (or nothing)."""
    def bar(iterable, *args, **kwargs):
        items = list(iterable)
        progress = Progress(f"universal checkpoint: {steps.step}", total=len(items), unit="items",
                            enabled=enabled)
        for item in items:
            yield item
            progress.update()
        progress.close()
    return types.SimpleNamespace(tqdm=bar)


def convert(tag_dir: Path, out_dir: Path, *, trust: bool = False,
            progress: Optional[bool] = None) -> Path:
    """Write the universal form of the DeepSpeed checkpoint `tag_dir` to `out_dir` (atomic).
    DeepSpeed's converter unpickles the files: they are scanned first (`trust`: not).
    `progress`: bars per step on stderr (None: when stderr is a terminal)."""
    from deepspeed.checkpoint import ds_to_universal

    if not tag_dir.is_dir():
        raise CheckpointError(f"{tag_dir} does not exist")
    if pipeline_files.is_pipeline(tag_dir):  # DeepSpeed's layer-indexed names, not GPTModel's
        raise CheckpointError(f"{tag_dir} was saved with pipeline parallelism: its training state "
                              "has no universal form here; resume it at the TP, PP and data-parallel "
                              "sizes it was saved at, or start a new run from its weights with "
                              "--finetune --load")
    if saved_dp_size(tag_dir) is None:
        raise CheckpointError(f"{tag_dir} has no ZeRO optimizer partitions (zero_pp_rank_*); a "
                              "ZeRO-0 checkpoint loads at any data-parallel size as it is")
    safe_pickle.check_tree(tag_dir, trust=trust)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args = types.SimpleNamespace(input_folder=str(tag_dir), output_folder=str(tmp),
                                 num_extract_workers=1, num_merge_workers=1,
                                 keep_temp_folder=False, strict=True, inject_missing_state=True)
    steps = _Steps()
    real_tqdm = ds_to_universal.tqdm
    ds_to_universal.tqdm = _bars(steps, progress_wanted() if progress is None else progress)
    try:
        with contextlib.redirect_stdout(steps):  # its chatter names the steps; errors still raise
            ds_to_universal.main(args)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        ds_to_universal.tqdm = real_tqdm
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def plan_resume(load_dir: str, tag: str, dp_size: int) -> tuple[str, bool]:
    """(tag to load, whether it is universal). Rank 0 converts when the DP size changed."""
    tag_dir = Path(load_dir) / tag
    if is_universal(tag_dir):
        return tag, True
    saved = saved_dp_size(tag_dir)
    if saved is None or saved == dp_size:  # ZeRO-0 state is not partitioned by DP rank
        return tag, False
    return tag + SUFFIX, True


def convert_directory(src: str, dst: str, *, tag: Optional[str] = None, overwrite: bool = False,
                      trust: bool = False, progress: Optional[bool] = None) -> Path:
    """`convert_checkpoint.py --to universal`: DST = SRC's config.json + tokenizer + the universal
    form of SRC/<tag> (default: latest) under the same tag, and a `latest` naming it."""
    from .model_io import is_own_checkpoint, latest_tag

    source, target = Path(src), Path(dst)
    if not is_own_checkpoint(source):
        raise CheckpointError(f"--to universal needs a megatron_ru training checkpoint; {source} "
                              "is not one (no config.json with format megatron_ru)")
    tag = tag or latest_tag(source)
    if target.exists() and not overwrite:
        raise CheckpointError(f"--save {target} exists (add --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(target) as tmp:
        shutil.copy2(source / "config.json", tmp / "config.json")
        if (source / "tokenizer").is_dir():
            shutil.copytree(source / "tokenizer", tmp / "tokenizer")
        convert(source / tag, tmp / tag, trust=trust, progress=progress)
        atomic_write_text(tmp / "latest", tag + "\n")
    return target
