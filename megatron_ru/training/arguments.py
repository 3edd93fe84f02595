"""The single CLI definition (Megatron flag names, ru-gpts aliases) → typed configs.

`parse_pretrain_args(argv)` returns a `TrainArgs` (plain dataclass, no globals); the model
shape is resolved later, once the tokenizer's vocabulary size is known (`model_config`).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Callable, Optional

from .. import runtime
from ..checkpoint.safe_pickle import add_trust_argument
from ..data.tokenizers import add_tokenizer_arguments
from ..config import PRESETS, SPARSE_MODES, ConfigError, ModelConfig

DEFAULT_SEQ_LENGTH = 1024  # without a preset, --max-position-embeddings or --seq-length
MFU_HELP = ("MFU = achieved model FLOP/s per device / peak. Model FLOPs per token = 6*N + "
            "12*L*h*s (N parameters incl. embeddings, L layers, h hidden, s sequence; the "
            "attention term of block-sparse layers scaled by the fraction of causal blocks kept). "
            "Peak = dense bf16/fp16 spec of the device (A100 312, H100/H200 989 TFLOP/s) or "
            "--peak-tflops.")


@dataclass
class TrainArgs:
    # model
    preset: Optional[str] = None
    model_overrides: dict = field(default_factory=dict)
    seq_length: Optional[int] = None  # None: the model's max_position_embeddings (model_config)
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    pipeline_split: str = "uniform"
    num_layers_per_virtual_pipeline_stage: Optional[int] = None  # refused (validate)
    # batch and schedule
    micro_batch_size: Optional[int] = None  # None: the JSON's value, else 4
    global_batch_size: Optional[int] = None
    train_iters: int = 100
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_warmup_iters: Optional[int] = None
    lr_warmup_fraction: Optional[float] = None
    lr_decay_iters: Optional[int] = None
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    fp16: bool = False
    bf16: bool = False
    seed: int = 1234
    # data and tokenizer
    data_path: list = field(default_factory=list)
    split: str = "969,30,1"
    data_cache_path: Optional[str] = None
    data_order: str = "ours"
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    num_workers: int = 0
    tokenizer_type: str = "GPT2BPETokenizer"
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    tokenizer_model: Optional[str] = None
    eod_token: Optional[str] = None
    # checkpoints
    save: Optional[str] = None
    save_interval: Optional[int] = None
    load: Optional[str] = None
    finetune: bool = False
    pretrained_checkpoint: Optional[str] = None
    no_load_optim: bool = False
    trust_checkpoint: bool = False
    # evaluation and logging
    eval_interval: int = 1000
    eval_iters: int = 10
    log_interval: int = 10
    tensorboard_dir: Optional[str] = None
    metrics_file: Optional[str] = None
    peak_tflops: Optional[float] = None
    eval_tasks: Optional[str] = None  # lm-eval tasks run on the live model (evaluation/during_training.py)
    eval_tasks_interval: Optional[int] = None
    eval_tasks_limit: Optional[int] = None
    eval_tasks_include_path: Optional[str] = None
    # run lifecycle (megatron_ru/runtime.py)
    exit_duration_in_mins: Optional[float] = None
    exit_interval: Optional[int] = None
    exit_signal_handler: bool = True
    keep_last_n: Optional[int] = None
    use_checkpoint_args: bool = False
    distributed_timeout_minutes: float = 10.0
    hang_timeout_minutes: Optional[float] = 30.0
    debug: bool = False
    # fine-tuning (megatron_ru/training/finetune.py)
    dataset_type: str = "text"
    sft_packing: str = "pad"
    sft_overlong: str = "truncate"
    lora_rank: int = 0
    lora_alpha: Optional[float] = None
    lora_dropout: float = 0.0
    lora_targets: str = "qkv,proj,fc1,fc2"
    train_only: Optional[str] = None  # training/train_only.py
    train_only_from: Optional[int] = None
    # DeepSpeed
    deepspeed_config: Optional[str] = None
    debug_inject_overflow_iters: list = field(default_factory=list)
    # guards (training/guards.py)
    max_skipped_steps: int = 50
    max_loss: Optional[float] = None
    spike_window: Optional[int] = None
    spike_threshold: float = 6.0
    rollback_on_nonfinite: bool = False
    max_rollbacks: int = 3
    override_data_args: bool = False
    iterations_to_skip: list = field(default_factory=list)
    debug_inject_spike_iters: list = field(default_factory=list)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_gpt.py",
        description="Pretrain ruGPT-3 / T-lite models with tensor parallelism on DeepSpeed. "
                    "Launch with mpirun --np N, torchrun or the deepspeed launcher.",
        epilog=MFU_HELP)
    m = p.add_argument_group("model")
    m.add_argument("--preset", choices=sorted(PRESETS), help="start from a named model shape")
    m.add_argument("--model-family", dest="family", choices=("gpt3", "llama"))
    m.add_argument("--num-layers", type=int)
    m.add_argument("--hidden-size", type=int)
    m.add_argument("--num-attention-heads", type=int)
    m.add_argument("--num-key-value-heads", "--num-query-groups", dest="num_key_value_heads", type=int)
    m.add_argument("--ffn-hidden-size", type=int)
    m.add_argument("--seq-length", type=int,
                   help="training sequence length (default: the model's max_position_embeddings, "
                        f"from the preset, --max-position-embeddings or the checkpoint; else {DEFAULT_SEQ_LENGTH})")
    m.add_argument("--max-position-embeddings", type=int)
    m.add_argument("--make-vocab-size-divisible-by", type=int)
    m.add_argument("--rope-theta", type=float)
    m.add_argument("--hidden-dropout", type=float)
    m.add_argument("--attention-dropout", type=float)
    m.add_argument("--checkpoint-activations", action="store_true", default=None)
    m.add_argument("--sparse-mode", choices=SPARSE_MODES,
                   help="which layers use the DeepSpeed config's sparse_attention layout "
                        "(dense: none, e.g. the 13B preset run dense)")
    m.add_argument("--sparse-impl", choices=("auto", "gather", "flex", "reference"))
    m.add_argument("--tensor-model-parallel-size", "--model-parallel-size", type=int, default=1)
    m.add_argument("--sequence-parallel", action="store_true", default=None,
                   help="Megatron sequence parallelism (TP > 1): norms, dropout and residuals "
                        "hold 1/TP of the sequence each; all-gather before, reduce-scatter after "
                        "the tensor-parallel layers instead of the all-reduce (--seq-length must "
                        "be divisible by TP; a no-op at TP = 1)")
    m.add_argument("--pipeline-model-parallel-size", type=int, default=1, metavar="P",
                   help="pipeline stages (ranks: TP innermost, then DP, then PP; world = TP x PP x DP)")
    m.add_argument("--pipeline-split", default="uniform", metavar="uniform|balanced|L0,L1,...",
                   help="transformer layers per pipeline stage: uniform, balanced (by estimated "
                        "FLOPs: embedding, head, dense vs block-sparse layers) or explicit counts")
    m.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, metavar="N",
                   help="not available (DeepSpeed's pipeline engine has no interleaved schedule); "
                        "given, the run stops with one line")
    m.add_argument("--context-parallel-size", type=int, default=1, metavar="C",
                   help="Ulysses context parallelism: each of C ranks holds 1/C of every sequence, "
                        "attention runs on the whole sequence for 1/C of the heads (ranks: TP "
                        "innermost, then CP, then DP, then PP; world = TP x CP x DP x PP)")

    t = p.add_argument_group("training")
    t.add_argument("--micro-batch-size", "--batch-size", type=int, help="default: the JSON's, else 4")
    t.add_argument("--global-batch-size", type=int,
                   help="default: micro batch x data-parallel size (x accumulation in the JSON)")
    t.add_argument("--train-iters", type=int, default=100)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--min-lr", type=float, default=0.0)
    t.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine"), default="cosine")
    t.add_argument("--lr-warmup-iters", type=int)
    t.add_argument("--lr-warmup-fraction", "--warmup", type=float)
    t.add_argument("--lr-decay-iters", type=int, help="default: --train-iters")
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--adam-beta1", type=float, default=0.9)
    t.add_argument("--adam-beta2", type=float, default=0.95)
    t.add_argument("--adam-eps", type=float, default=1e-8)
    t.add_argument("--clip-grad", type=float, default=1.0)
    t.add_argument("--fp16", action="store_true")
    t.add_argument("--bf16", action="store_true")
    t.add_argument("--seed", type=int, default=1234)

    d = p.add_argument_group("data and tokenizer")
    d.add_argument("--data-path", nargs="+", default=[], help="PREFIX or W1 PREFIX1 W2 PREFIX2 ...")
    d.add_argument("--split", default="969,30,1")
    d.add_argument("--data-cache-path")
    d.add_argument("--data-order", choices=["ours", "megatron"], default="ours",
                   help="sample order: ours (stable when a run is extended) or megatron (identical "
                        "to Megatron-Core's GPTDataset + BlendedDataset for the same data, seed, "
                        "split, seq length and sample counts)")
    d.add_argument("--eod-mask-loss", action="store_true")
    d.add_argument("--reset-position-ids", action="store_true")
    d.add_argument("--reset-attention-mask", action="store_true")
    d.add_argument("--num-workers", type=int, default=0)
    add_tokenizer_arguments(p, type_default="GPT2BPETokenizer",
                            eod_help="end-of-document token (ru-gpts used <pad>)")

    c = p.add_argument_group("checkpoints")
    c.add_argument("--save")
    c.add_argument("--save-interval", type=int)
    c.add_argument("--load")
    c.add_argument("--finetune", action="store_true", help="load weights only; restart the run")
    c.add_argument("--pretrained-checkpoint", metavar="BASE",
                   help="weights to start from when --load holds no checkpoint yet (Megatron's "
                        "flag): `--pretrained-checkpoint BASE --load RUN --save RUN` fine-tunes "
                        "BASE on the first launch and resumes RUN on every later one")
    c.add_argument("--no-load-optim", action="store_true")
    c.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the model settings from --load's config.json (no model flags needed)")
    c.add_argument("--keep-last-n", type=int, metavar="K",
                   help="keep only the K newest checkpoints in --save (never the one `latest` names)")
    add_trust_argument(c)

    x = p.add_argument_group("stopping (SIGTERM / first Ctrl-C: finish the step, save, exit 0)")
    x.add_argument("--exit-duration-in-mins", type=float, metavar="M",
                   help="stop and save before M minutes of wall time (e.g. a Slurm time limit)")
    x.add_argument("--exit-interval", type=int, metavar="N", help="stop and save at iteration N")
    x.add_argument("--exit-signal-handler", action="store_true", default=True,
                   help="accepted for Megatron scripts; signals are always handled")
    runtime.add_arguments(p, hang_default=30.0)

    e = p.add_argument_group("evaluation and logging")
    e.add_argument("--eval-interval", type=int, default=1000)
    e.add_argument("--eval-iters", type=int, default=10)
    e.add_argument("--log-interval", type=int, default=10)
    e.add_argument("--tensorboard-dir")
    e.add_argument("--metrics-file", help="JSON lines, one object per logged iteration / evaluation")
    e.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per device for MFU")
    e.add_argument("--eval-tasks", metavar="NAME[,NAME]",
                   help="lm-eval tasks (bundled: ru_choice, ru_yesno, ru_answer; or any task "
                        "lm-eval finds offline) run on the live model; accuracy is logged")
    e.add_argument("--eval-tasks-interval", type=int, metavar="N",
                   help="run --eval-tasks every N iterations and at the end (default --eval-interval)")
    e.add_argument("--eval-tasks-limit", type=int, metavar="K", help="at most K items per task")
    e.add_argument("--eval-tasks-include-path", metavar="DIR", help="more lm-eval task YAML files")

    g = p.add_argument_group("guards (non-finite steps, loss spikes, resumes)")
    g.add_argument("--max-skipped-steps", type=int, default=50, metavar="N",
                   help="stop (exit 3, nothing saved) after N consecutive steps skipped for a NaN/inf "
                        "loss or gradient norm, fp16 loss-scale skips included (default 50)")
    g.add_argument("--max-loss", type=float, metavar="L",
                   help="a finite loss above L counts like a non-finite step towards "
                        "--max-skipped-steps (the update is applied); default 4 ln(vocabulary "
                        "size), four times the loss of guessing uniformly; 0 = off")
    g.add_argument("--spike-window", type=int, metavar="W",
                   help="detect loss spikes against the last W iterations (off by default)")
    g.add_argument("--spike-threshold", type=float, default=6.0, metavar="Z",
                   help="a loss > mean + Z std of the window is a spike: roll back to the last "
                        "checkpoint of --save and skip the data since it (default 6)")
    g.add_argument("--rollback-on-nonfinite", action="store_true",
                   help="roll back instead of stopping when --max-skipped-steps is reached")
    g.add_argument("--max-rollbacks", type=int, default=3, help="at most this many rollbacks (default 3)")
    g.add_argument("--override-data-args", action="store_true",
                   help="resume even though --data-path / --split / --seq-length / global batch / "
                        "--seed differ from the checkpoint's")
    g.add_argument("--iterations-to-skip", type=int, nargs="*", default=[], metavar="I",
                   help="consume these iterations' batches without a forward pass or update")
    g.add_argument("--debug-inject-spike-iters", type=int, nargs="*", default=[], help=argparse.SUPPRESS)

    from . import finetune, train_only
    finetune.add_arguments(p)
    train_only.add_arguments(p.add_argument_group("vocabulary adaptation stages"))

    s = p.add_argument_group("DeepSpeed")
    s.add_argument("--deepspeed", action="store_true", help="accepted for ru-gpts scripts; always on")
    s.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config")
    s.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    s.add_argument("--debug-inject-overflow-iters", type=int, nargs="*", default=[],
                   help=argparse.SUPPRESS)
    return p


MODEL_FLAGS = ("family", "num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
               "ffn_hidden_size", "max_position_embeddings", "make_vocab_size_divisible_by",
               "rope_theta", "hidden_dropout", "attention_dropout", "checkpoint_activations",
               "sparse_mode", "sparse_impl", "sequence_parallel")


def parse_pretrain_args(argv=None) -> TrainArgs:
    ns = build_parser().parse_args(argv)
    overrides = {k: getattr(ns, k) for k in MODEL_FLAGS if getattr(ns, k) is not None}
    fields = {f for f in TrainArgs.__dataclass_fields__}
    args = TrainArgs(**{k: v for k, v in vars(ns).items() if k in fields and k != "model_overrides"})
    args.model_overrides = overrides
    validate(args)
    return args


def validate(args: TrainArgs) -> None:
    def positive(name, value):
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}={value} must be positive")
    for name in ("seq_length", "micro_batch_size", "global_batch_size", "train_iters",
                 "eval_interval", "log_interval", "save_interval", "tensor_model_parallel_size",
                 "pipeline_model_parallel_size", "context_parallel_size"):
        positive(name, getattr(args, name))
    if args.num_layers_per_virtual_pipeline_stage is not None:
        raise ConfigError("--num-layers-per-virtual-pipeline-stage: interleaved virtual pipeline "
                          "stages are not available (DeepSpeed's pipeline engine runs 1F1B only); "
                          "drop the flag")
    if args.context_parallel_size > 1:
        for flag, used in (("--pipeline-model-parallel-size > 1", args.pipeline_model_parallel_size > 1),
                           ("--dataset-type sft", args.dataset_type == "sft"),
                           ("--reset-attention-mask", args.reset_attention_mask),
                           ("--lora-rank", bool(args.lora_rank)),
                           ("--eval-tasks", bool(args.eval_tasks))):
            if used:
                raise ConfigError(f"--context-parallel-size {args.context_parallel_size} does not "
                                  f"combine with {flag} (context parallelism covers pretraining "
                                  "of whole sequences with TP, DP and ZeRO)")
    if args.fp16 and args.bf16:
        raise ConfigError("--fp16 and --bf16 are mutually exclusive: choose one precision")
    if args.lr < 0 or args.min_lr < 0 or args.min_lr > args.lr:
        raise ConfigError(f"need 0 <= --min-lr ({args.min_lr}) <= --lr ({args.lr})")
    if args.lr_warmup_iters is not None and args.lr_warmup_fraction is not None:
        raise ConfigError("give --lr-warmup-iters or --lr-warmup-fraction, not both")
    if args.lr_warmup_fraction is not None and not 0 <= args.lr_warmup_fraction <= 1:
        raise ConfigError(f"--lr-warmup-fraction={args.lr_warmup_fraction} must be in [0, 1]")
    if args.eval_iters < 0:
        raise ConfigError(f"--eval-iters={args.eval_iters} must be >= 0")
    if not args.data_path:
        raise ConfigError("--data-path is required (a preprocessed PREFIX, see tools/preprocess_data.py)")
    if args.finetune and not args.load:
        raise ConfigError("--finetune needs --load DIR to take the weights from")
    if args.finetune and args.pretrained_checkpoint:
        raise ConfigError("--finetune --load BASE and --pretrained-checkpoint BASE both name the "
                          "weights to start from: give one (--pretrained-checkpoint resumes --load "
                          "once it holds a checkpoint)")
    positive("max_skipped_steps", args.max_skipped_steps)
    positive("spike_window", args.spike_window)
    if args.spike_threshold <= 0 or args.max_rollbacks < 0:
        raise ConfigError("--spike-threshold must be positive and --max-rollbacks >= 0")
    if (args.spike_window or args.rollback_on_nonfinite) and not (args.save and args.save_interval):
        raise ConfigError("--spike-window / --rollback-on-nonfinite roll back to the last checkpoint: "
                          "give --save DIR and --save-interval N")
    for name in ("eval_tasks_interval", "eval_tasks_limit"):
        positive(name, getattr(args, name))
    if args.eval_tasks and args.eval_tasks_interval is None:
        args.eval_tasks_interval = args.eval_interval
    if args.save_interval and not args.save:
        raise ConfigError("--save-interval needs --save DIR")
    from . import finetune, train_only
    finetune.validate(args)
    train_only.validate(args)


def model_config(args: TrainArgs, vocab_size: int, sparse_attention: Optional[dict],
                 log: Optional[Callable] = None) -> ModelConfig:
    """The model for this run: preset (if any) + flags + tokenizer vocabulary + JSON sparsity.
    Without --seq-length, the sequence length becomes the model's max_position_embeddings
    (args.seq_length is set here, and `log` says so)."""
    overrides = dict(args.model_overrides)
    overrides["vocab_size"] = vocab_size
    if sparse_attention is not None:
        overrides["sparse_attention"] = sparse_attention
    if args.preset:
        cfg = ModelConfig.from_preset(args.preset, **overrides)
    else:
        overrides.setdefault("max_position_embeddings", args.seq_length or DEFAULT_SEQ_LENGTH)
        cfg = ModelConfig(**overrides)
    if args.seq_length is None:
        args.seq_length = cfg.max_position_embeddings
        if log is not None:
            log(f"--seq-length {args.seq_length} (the model's max_position_embeddings; "
                "give --seq-length to train on shorter sequences)")
    if args.seq_length > cfg.max_position_embeddings:
        raise ConfigError(f"--seq-length={args.seq_length} is longer than the model's "
                          f"max_position_embeddings={cfg.max_position_embeddings}")
    _check_sequence_parallel(cfg, args, log)
    return cfg


def _check_sequence_parallel(cfg: ModelConfig, args: TrainArgs, log: Optional[Callable]) -> None:
    """--sequence-parallel: one line when the sequence does not split (before compute), a note
    at TP = 1."""
    tp = args.tensor_model_parallel_size
    if not cfg.sequence_parallel:
        return
    if tp == 1:
        if log is not None:
            log("--sequence-parallel has no effect at --tensor-model-parallel-size 1 (nothing to "
                "split the sequence over)")
        return
    cp = args.context_parallel_size
    if cp > 1 and args.seq_length % (tp * cp):
        raise ConfigError(f"--sequence-parallel: --seq-length {args.seq_length} is not divisible by "
                          f"--tensor-model-parallel-size x --context-parallel-size = {tp} x {cp} "
                          f"(each TP rank holds an equal part of its CP rank's slice)")
    if args.seq_length % tp:
        raise ConfigError(f"--sequence-parallel: --seq-length {args.seq_length} is not divisible by "
                          f"--tensor-model-parallel-size {tp} (each TP rank holds an equal part of "
                          "the sequence)")
