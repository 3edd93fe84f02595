"""The DeepSpeed JSON as users write it, reconciled with the command-line flags.

Rules: the JSON is read with errors that show the position; keys that look like misspellings
of keys we rely on are rejected; batch sizes must satisfy train_batch_size = micro ×
accumulation × data-parallel size; flags fill what the JSON leaves out or sets to "auto"
(DeepSpeed's and transformers' convention for the batch keys); where both give a
value they must agree, except `optimizer` / `scheduler` / `gradient_clipping`, where the JSON
wins and the log says so. The `sparse_attention` section (ru-gpts style) is taken out for the
model and not passed to DeepSpeed.
"""
from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Optional

from ..config import ConfigError

TOP_LEVEL = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "optimizer", "scheduler", "fp16", "bf16", "bfloat16", "amp", "gradient_clipping",
    "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "steps_per_print", "wall_clock_breakdown", "dump_state", "activation_checkpointing",
    "sparse_attention", "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comet",
    "comms_logger", "prescale_gradients", "gradient_predivide_factor", "sparse_gradients",
    "communication_data_type", "seq_parallel_communication_data_type", "data_types",
    "checkpoint", "elasticity", "aio", "autotuning", "compression_training", "data_efficiency",
    "curriculum_learning", "memory_breakdown", "pipeline", "fp32_allreduce", "disable_allgather",
    "torch_autocast", "timers", "nebula", "dataloader_drop_last", "load_universal_checkpoint",
    "use_node_local_storage", "graph_harvesting", "compile", "hybrid_engine",
    "weight_quantization", "eigenvalue", "progressive_layer_drop", "quantize_training",
    "zero_optimization_stage", "gradient_accumulation_dtype",
}
SECTIONS = {
    "fp16": {"enabled", "auto_cast", "loss_scale", "initial_scale_power", "loss_scale_window",
             "hysteresis", "consecutive_hysteresis", "min_loss_scale", "fp16_master_weights_and_grads"},
    "bf16": {"enabled", "immediate_grad_update", "check_grad_overflow", "bf16_master_weights_and_grads",
             "bf16_optimizer_states"},
    "zero_optimization": {
        "stage", "contiguous_gradients", "overlap_comm", "reduce_scatter", "reduce_bucket_size",
        "allgather_partitions", "allgather_bucket_size", "offload_optimizer", "offload_param",
        "round_robin_gradients", "sub_group_size", "elastic_checkpoint", "load_from_fp32_weights",
        "cpu_offload", "cpu_offload_params", "cpu_offload_use_pin_memory", "ignore_unused_parameters",
        "legacy_stage1", "zero_hpz_partition_size", "zero_quantized_weights",
        "zero_quantized_gradients", "zero_quantized_nontrainable_weights", "mics_shard_size", "mics_hierarchical_params_gather",
        "memory_efficient_linear", "pipeline_loading_checkpoint", "override_module_apply",
        "use_multi_rank_bucket_allreduce", "log_trace_cache_warnings",
        "stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_prefetch_bucket_size",
        "stage3_param_persistence_threshold", "stage3_model_persistence_threshold",
        "stage3_gather_16bit_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save",
        "stage3_use_all_reduce_for_fetch_params", "stage3_module_granularity_threshold"},
}
# Expected JSON types of the values we (or DeepSpeed) read as numbers, flags or sections.
INT, NUM, BOOL, OBJ, STR = "an integer", "a number", "true or false", "a JSON object", "a string"
TYPES = {
    "": {"train_batch_size": INT, "train_micro_batch_size_per_gpu": INT,
         "gradient_accumulation_steps": INT, "gradient_clipping": NUM, "steps_per_print": INT,
         "fp16": OBJ, "bf16": OBJ, "bfloat16": OBJ, "zero_optimization": OBJ, "optimizer": OBJ,
         "scheduler": OBJ, "sparse_attention": OBJ, "activation_checkpointing": OBJ,
         "wall_clock_breakdown": BOOL, "zero_allow_untested_optimizer": BOOL,
         "zero_force_ds_cpu_optimizer": BOOL, "prescale_gradients": BOOL},
    "fp16": {"enabled": BOOL, "auto_cast": BOOL, "loss_scale": NUM, "initial_scale_power": INT,
             "loss_scale_window": INT, "hysteresis": INT, "consecutive_hysteresis": BOOL,
             "min_loss_scale": NUM},
    "bf16": {"enabled": BOOL, "check_grad_overflow": BOOL, "immediate_grad_update": BOOL},
    "zero_optimization": {"stage": INT, "contiguous_gradients": BOOL, "overlap_comm": BOOL,
                          "reduce_scatter": BOOL, "reduce_bucket_size": NUM,
                          "allgather_partitions": BOOL, "allgather_bucket_size": NUM,
                          "offload_optimizer": OBJ, "offload_param": OBJ, "sub_group_size": NUM,
                          "stage3_max_live_parameters": NUM, "stage3_max_reuse_distance": NUM,
                          "stage3_prefetch_bucket_size": NUM, "stage3_param_persistence_threshold": NUM,
                          "zero_hpz_partition_size": INT, "zero_quantized_weights": BOOL,
                          "zero_quantized_nontrainable_weights": BOOL,
                          "zero_quantized_gradients": BOOL},
    "optimizer": {"type": STR, "params": OBJ},
    "scheduler": {"type": STR, "params": OBJ},
}
_CHECKS = {INT: lambda v: isinstance(v, int) and not isinstance(v, bool),
           NUM: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
           BOOL: lambda v: isinstance(v, bool), OBJ: lambda v: isinstance(v, dict),
           STR: lambda v: isinstance(v, str)}
POSITIVE = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def drop_auto(data: dict) -> dict:
    """The JSON without the batch keys set to "auto": the flags (or their defaults) fill those."""
    return {k: v for k, v in data.items() if not (k in POSITIVE and v == "auto")}


def check_types(data: dict, path: str) -> None:
    """Refuse a value of the wrong JSON type, naming the key (instead of a TypeError later).
    The batch keys may also be "auto" (read `drop_auto(data)` to get the values to check)."""
    data = drop_auto(data)
    for section, types in TYPES.items():
        values = data if not section else data.get(section)
        if not isinstance(values, dict):
            continue
        for key, kind in types.items():
            if key in values and not _CHECKS[kind](values[key]):
                name = f"{section}.{key}" if section else key
                raise ConfigError(f"--deepspeed_config {path}: {name} must be {kind}, got "
                                  f"{json.dumps(values[key])}")
    for key in POSITIVE:
        if key in data and data[key] <= 0:
            raise ConfigError(f"--deepspeed_config {path}: {key} must be positive, got {data[key]}")
    zero = data.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"--deepspeed_config {path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage}")
    check_zero_plus_plus(zero, path)


ZERO_PP = ("zero_quantized_weights", "zero_quantized_nontrainable_weights", "zero_quantized_gradients")


def check_zero_plus_plus(zero: dict, path: str) -> None:
    """MiCS keys (removed from DeepSpeed 0.19) and ZeRO++ keys below stage 3, refused by name;
    the hpZ layout itself is checked against the ranks in training/hpz.py."""
    for key in ("mics_shard_size", "mics_hierarchical_params_gather"):
        if key in zero:
            raise ConfigError(f"--deepspeed_config {path}: zero_optimization.{key}: MiCS was removed "
                              "in DeepSpeed 0.19; use zero_hpz_partition_size (ZeRO++ hierarchical "
                              "partitioning, configs/ds_zero3_hpz.json) instead")
    h = zero.get("zero_hpz_partition_size", 1)
    if h < 0:
        raise ConfigError(f"--deepspeed_config {path}: zero_optimization.zero_hpz_partition_size "
                          f"must be 0 or more, got {h}")
    used = [k for k in ZERO_PP if zero.get(k)] + (["zero_hpz_partition_size"] if h > 1 else [])
    if used and zero.get("stage", 0) != 3:
        raise ConfigError(f"--deepspeed_config {path}: zero_optimization.{used[0]} is ZeRO++, which "
                          f"needs zero_optimization.stage 3 (got stage {zero.get('stage', 0)})")


FP16_DEFAULTS = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}


def load_json(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--deepspeed_config {path}: file not found")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--deepspeed_config {path}: invalid JSON at line {exc.lineno}, column "
                          f"{exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--deepspeed_config {path}: the top level must be a JSON object")
    return data


def _check_keys(data: dict, known: set, where: str, path: str) -> None:
    for key in data:
        if key in known:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
        if close:
            raise ConfigError(f"--deepspeed_config {path}: unknown key {where}{key!r}; did you mean "
                              f"{close[0]!r}?")


def build(args, dp_size: int, log) -> tuple[dict, Optional[dict], str]:
    """(DeepSpeed config dict, sparse_attention section or None, precision 'fp32'|'fp16'|'bf16')."""
    path = args.deepspeed_config or "<flags>"
    data = load_json(args.deepspeed_config) if args.deepspeed_config else {}
    _check_keys(data, TOP_LEVEL, "", path)
    for section, known in SECTIONS.items():
        if isinstance(data.get(section), dict):
            _check_keys(data[section], known, f"{section}.", path)
    check_types(data, path)
    ds = copy.deepcopy(drop_auto(data))
    sparse = ds.pop("sparse_attention", None)

    # batch sizes: train_batch_size = micro x accumulation x data-parallel size
    micro = ds.get("train_micro_batch_size_per_gpu", args.micro_batch_size or 4)
    if args.micro_batch_size is not None and micro != args.micro_batch_size:
        raise ConfigError(f"--micro-batch-size={args.micro_batch_size} disagrees with "
                          f"train_micro_batch_size_per_gpu={micro} in {path}")
    accum = ds.get("gradient_accumulation_steps")
    global_batch = ds.get("train_batch_size", args.global_batch_size)
    if args.global_batch_size is not None and "train_batch_size" in ds and \
            args.global_batch_size != ds["train_batch_size"]:
        raise ConfigError(f"--global-batch-size={args.global_batch_size} disagrees with "
                          f"train_batch_size={ds['train_batch_size']} in {path}")
    if global_batch is None:
        accum = accum or 1
        global_batch = micro * accum * dp_size
    elif accum is None:
        accum = max(1, global_batch // (micro * dp_size))
    if global_batch != micro * accum * dp_size:
        raise ConfigError(
            f"batch sizes do not agree: train_batch_size (global batch) {global_batch} != "
            f"micro batch {micro} x gradient accumulation {accum} x data-parallel size {dp_size} "
            f"= {micro * accum * dp_size} ({path})")
    ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum,
              train_batch_size=global_batch)

    # precision
    json_fp16 = bool(ds.get("fp16", {}).get("enabled", False))
    json_bf16 = bool(ds.get("bf16", ds.get("bfloat16", {})).get("enabled", False))
    if json_fp16 and json_bf16:
        raise ConfigError(f"{path} enables both fp16 and bf16")
    if (args.bf16 and json_fp16) or (args.fp16 and json_bf16):
        raise ConfigError(f"--{'bf16' if args.bf16 else 'fp16'} contradicts {path}, which enables "
                          f"{'fp16' if json_fp16 else 'bf16'}")
    if args.fp16 and not json_fp16:
        ds["fp16"] = {**FP16_DEFAULTS, **ds.get("fp16", {}), "enabled": True}
    if args.bf16 and not json_bf16:
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": True}
    precision = "fp16" if (args.fp16 or json_fp16) else "bf16" if (args.bf16 or json_bf16) else "fp32"
    if precision == "bf16":  # DeepSpeed then skips NaN/inf steps (training/guards.py counts them)
        ds.setdefault("bf16" if "bf16" in ds else "bfloat16", {}).setdefault("check_grad_overflow", True)
    if precision != "fp32" and not (args.fp16 or args.bf16):
        log(f"precision {precision} enabled by {path}")

    if "gradient_clipping" in ds:
        if ds["gradient_clipping"] != args.clip_grad:
            log(f"gradient_clipping={ds['gradient_clipping']} from {path} wins over --clip-grad")
    else:
        ds["gradient_clipping"] = args.clip_grad
    for section in ("optimizer", "scheduler"):
        if section in ds:
            log(f"{section} {ds[section].get('type', '?')} from {path} wins over the flags")
    if "activation_checkpointing" in ds:
        log(f"the activation_checkpointing section of {path} is passed to DeepSpeed, but our model "
            "checkpoints activations only with --checkpoint-activations")
    ds.setdefault("steps_per_print", 10**9)  # we log ourselves
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds, sparse, precision
