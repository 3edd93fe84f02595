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

A pipeline-parallel run (ZeRO-1) resumes the same way at another DP size or another PP size > 1:
its optimizer state is keyed by DeepSpeed's layer-list names (`tied_modules.embed.embed.weight`,
`1.block.attn.qkv.weight`), the same at every PP size, so the info is taken from the
PipelineModule (the tied embedding marked pipeline-replicated: saved by the first and the last
stage, converted once). Between PP = 1 and PP > 1 the names differ: not covered (--finetune).

A tensor-parallel size change is not covered: our fused QKV / gate-up weights would need
DeepSpeed's sub-parameter shapes and the TP=2 -> 4 parity was not tested; use --finetune there.
"""
from __future__ import annotations

import contextlib
import io
import json
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
    """DeepSpeed's UNIVERSAL_CHECKPOINT_INFO for a GPTModel or this stage's PipelineModule
    (exact-name regex patterns; the names the optimizer state is saved under)."""
    from deepspeed.checkpoint import constants as c

    replicated, row, tied = [], [], []
    for name, p in model.named_parameters():
        spec = getattr(p, "shard_spec", None)
        if spec is None:
            replicated.append(re.escape(name) + "$")
        elif spec.dim == 1:
            row.append(re.escape(name) + "$")
        if name.startswith("tied_modules."):  # held by the first and the last pipeline stage
            tied.append(re.escape(name) + "$")
    info = {c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
            c.TP_REPLICATED_PARAMETER_PATTERNS: replicated,
            c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: row}
    if tied:
        info[c.PIPELINE_REPLICATED_PARAMETER_PATTERNS] = tied
    return info


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
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, AssertionError) and "Unused patterns" in str(exc):
            # info naming other parameters than the optimizer state's (a pipeline checkpoint of
            # a version that recorded the GPTModel's names)
            raise CheckpointError(
                f"{tag_dir}: its universal_checkpoint_info does not name the parameters its "
                "optimizer state is saved under, so it has no universal form; resume it at the "
                "sizes it was saved at, or start from its weights with --finetune --load") from None
        raise
    finally:
        ds_to_universal.tqdm = real_tqdm
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def saved_pp_size(load_dir) -> int:
    """The pipeline size `load_dir/config.json` records (1: none recorded)."""
    try:
        meta = json.loads((Path(load_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 1
    return int(meta.get("pipeline_model_parallel_size", 1) or 1)


def plan_resume(load_dir: str, tag: str, dp_size: int, pp_size: int = 1) -> tuple[str, bool]:
    """(tag to load, whether it is universal). Rank 0 converts when the DP size changed, or the
    PP size (between sizes > 1; training.check_compatible refuses the rest)."""
    tag_dir = Path(load_dir) / tag
    if is_universal(tag_dir):
        return tag, True
    saved = saved_dp_size(tag_dir)
    if saved is None:  # ZeRO-0 state is not partitioned by DP rank
        return tag, False
    if saved == dp_size and saved_pp_size(load_dir) == pp_size:
        return tag, False
    return tag + SUFFIX, True


def repair_zero3_load(engine, tag_dir: Path, *, trust: bool = False) -> None:
    """After DeepSpeed 0.19 loaded the universal checkpoint `tag_dir` with its optimizer state at
    ZeRO-3, undo two slips of its stage-3 loader (`load_hp_checkpoint_state_from_checkpoint_dir_stage3`),
    which ZeRO 1/2's loader does not make:
    - it stores ONE `step` tensor in the state of every parameter group; torch's Adam adds 1 to
      it in place per group, so the second group's bias correction ran a step ahead, the third's
      two... (measured: losses after the first resumed step drift from the straight run, 3e-4 by
      the second). Each group gets its own copy;
    - it copies the FIRST group's settings into every group, so the no-decay group (biases,
      norms) would resume with weight decay. Each group gets its saved settings back."""
    if not is_universal(tag_dir) or engine.zero_optimization_stage() != 3:
        return
    zero3 = engine.optimizer
    torch_opt = zero3.optimizer  # one torch param group per our group, holding flat fp32 partitions
    for flat in zero3.fp32_partitioned_groups_flat:
        state = torch_opt.state.get(flat, {})
        if "step" in state and hasattr(state["step"], "clone"):
            state["step"] = state["step"].clone()
    saved = safe_pickle.load(tag_dir / "zero" / "optimizer_state.pt", trust=trust, mmap=False)
    saved = saved["optimizer_state_dict"]["param_groups"]
    if len(saved) != len(torch_opt.param_groups):
        raise CheckpointError(f"{tag_dir}: {len(saved)} optimizer parameter groups saved but this "
                              f"run has {len(torch_opt.param_groups)}; resume with the same "
                              "parameter grouping (or start from the weights with --finetune --load)")
    for group, old in zip(torch_opt.param_groups, saved):
        group.update({k: v for k, v in old.items() if k != "params"})


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
    if pipeline_files.is_pipeline(source / tag):  # its weights live in the layer files only
        raise CheckpointError(f"--to universal: {source / tag} was saved with pipeline parallelism; "
                              "its universal form is made on resume (--load it at the new PP or "
                              "data-parallel size), not as a checkpoint of its own")
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
