"""One way to open a model for inference: generate.py, tools/serve.py, tools/evaluate.py, the lm-eval backend, the draft model.

Flags come from the argument groups below, which every one of those command lines composes
(`add_inference_arguments`); `ModelOptions.from_args` checks them; `open_model` does the rest in
one order: checkpoint format (any that checkpoint/ reads; a LoRA adapter directory opens on the
base it names), tokenizer (flags, else the one saved with the checkpoint), vocabulary check,
ParallelState (one process, or TP over the launcher's ranks), dtype, --quantize, --lora.
Checks that read only files run before the process group exists, so every rank fails alike.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint.load import read_config
from ..checkpoint.safe_pickle import add_trust_argument
from ..config import SPARSE_MODES
from ..data.tokenizers import add_tokenizer_arguments as add_tokenizer_flags, build_tokenizer
from ..errors import UsageError
from ..parallel.state import ParallelState, discover_launch
from .quantize import QuantSpec, add_arguments as _add_quantize_flags, quantize, spec_from_args
from .quantize_io import load_for_inference

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
SPARSE_IMPLS = ("auto", "gather", "flex", "reference")
TOKENIZER_FLAGS = ("tokenizer_type", "vocab_file", "merge_file", "tokenizer_model", "tokenizer_path",
                   "eod_token")
TP_FLAG = "--tensor-model-parallel-size"


class InputError(UsageError):
    """A flag or an input file breaks a rule; the message names the flag or file and the rule."""


# ---- the flags, defined once -------------------------------------------------------------------
def add_model_arguments(parser, *, load_required: bool = True) -> None:
    """--load --tag --lora --dtype/--fp16/--bf16 --tensor-model-parallel-size --sparse-mode/-impl."""
    g = parser.add_argument_group("model (megatron_ru/inference/loading.py)")
    g.add_argument("--load", required=load_required, metavar="DIR",
                   help="checkpoint directory in any supported format (ours at any TP size, Hugging "
                        "Face, ru-gpts, Megatron-LM), or a LoRA adapter directory (opened on the "
                        "base it records)")
    g.add_argument("--tag", help="checkpoint tag to load (default: the one named in DIR/latest)")
    g.add_argument("--lora", metavar="DIR", help="LoRA adapter directory applied on top of --load "
                   "(not merged)")
    g.add_argument("--dtype", choices=sorted(DTYPES), help="weights and activations (default float32)")
    g.add_argument("--fp16", action="store_true", help="run in float16 (= --dtype float16)")
    g.add_argument("--bf16", action="store_true", help="run in bfloat16 (= --dtype bfloat16)")
    g.add_argument(TP_FLAG, "--model-parallel-size", dest="tp", type=int,
                   help="TP size (default: the number of processes); may differ from the "
                        "checkpoint's, weights are resharded on load")
    g.add_argument("--sparse-mode", choices=SPARSE_MODES,
                   help="override which layers are block-sparse (default: from config.json)")
    g.add_argument("--sparse-impl", choices=SPARSE_IMPLS,
                   help="override the block-sparse execution path (same numbers, other speed)")
    add_trust_argument(g)


def add_tokenizer_arguments(parser) -> None:
    """The tokenizer flags (Megatron's names); none given: the tokenizer saved with the checkpoint."""
    add_tokenizer_flags(parser, title="tokenizer (default: the one saved with the checkpoint)", with_path=True)


def add_quantize_arguments(parser) -> None:
    """--quantize / --group-size / --quantize-head (inference/quantize.py)."""
    _add_quantize_flags(parser.add_argument_group("quantization (megatron_ru/inference/quantize.py)"))


def add_inference_arguments(parser, *, load_required: bool = True) -> None:
    """Every flag open_model reads: model, tokenizer and quantization groups."""
    add_model_arguments(parser, load_required=load_required)
    add_tokenizer_arguments(parser)
    add_quantize_arguments(parser)


class _Parser(argparse.ArgumentParser):
    """A parser whose mistakes are InputError (one line), not a usage print and exit."""

    def error(self, message):
        raise InputError(f"{self.prog}: {message}")


def _option_parser(prog: str) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, add_help=False, allow_abbrev=False)
    add_inference_arguments(p, load_required=False)
    return p


def option_names() -> set[str]:
    """The keys `options_from_mapping` takes: the flags' dest names (tp for the TP size)."""
    return set(vars(_option_parser("").parse_args([])))


def options_from_mapping(values: dict, *, where: str = "--model_args") -> "ModelOptions":
    """ModelOptions from {dest: value} (lm-eval's --model_args load=DIR,lora=DIR,quantize=int8):
    the same flags, parsed and checked by the same parser."""
    argv = []
    for key, value in values.items():
        flag = TP_FLAG if key == "tp" else "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv.append(f"{flag}={value}")
    args = _option_parser(where).parse_args(argv)
    if not args.load:
        raise InputError(f"{where}: load=DIR is required")
    return ModelOptions.from_args(args)


# ---- checked options ----------------------------------------------------------------------------
@dataclass
class ModelOptions:
    """What to open and how; `from_args` checks the flags' combinations before any work."""

    load: str
    tag: Optional[str] = None
    lora: Optional[str] = None
    dtype: torch.dtype = torch.float32
    tp: Optional[int] = None
    quant: Optional[QuantSpec] = None
    sparse_mode: Optional[str] = None
    sparse_impl: Optional[str] = None
    tokenizer: dict = field(default_factory=dict)  # TOKENIZER_FLAGS → value
    expect: dict = field(default_factory=dict)  # config.json model fields a caller's flags state
    trust: bool = False  # --trust-checkpoint: pickles may name any global

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ModelOptions":
        if args.fp16 and args.bf16:
            raise InputError("--fp16 and --bf16 exclude each other")
        dtype = DTYPES[args.dtype or "float32"]
        for flag, on, want in (("--fp16", args.fp16, torch.float16), ("--bf16", args.bf16, torch.bfloat16)):
            if on and args.dtype and DTYPES[args.dtype] != want:
                raise InputError(f"{flag} and --dtype {args.dtype} disagree")
            dtype = want if on else dtype
        if args.tp is not None and args.tp < 1:
            raise InputError(f"{TP_FLAG} {args.tp} must be >= 1")
        quant = spec_from_args(args)  # QuantizeError on a bad combination
        if args.lora and quant is not None:
            raise InputError("--lora with --quantize: merge the adapters first (convert_checkpoint.py "
                             "--load ADAPTERS --to megatron_ru), then quantize the merged model")
        return cls(load=args.load, tag=args.tag, lora=args.lora, dtype=dtype, tp=args.tp, quant=quant,
                   sparse_mode=args.sparse_mode, sparse_impl=args.sparse_impl,
                   tokenizer={k: getattr(args, k) for k in TOKENIZER_FLAGS},
                   trust=bool(getattr(args, "trust_checkpoint", False)))

    def overrides(self) -> dict:
        return {k: v for k, v in (("sparse_mode", self.sparse_mode), ("sparse_impl", self.sparse_impl))
                if v is not None}


# ---- tokenizer ----------------------------------------------------------------------------------
@dataclass
class TokenizerChoice:
    """build_tokenizer's arguments, the directory the tokenizer files came from (if one), and
    where its chat template files would sit."""

    kwargs: dict
    path: Optional[str]
    template_dir: Optional[str]


def resolve_tokenizer(flags: dict, load, meta: dict) -> TokenizerChoice:
    """The tokenizer given by flags, else the one saved with the checkpoint (its tokenizer/ folder
    and the type / end-of-text token training recorded), else a Hugging Face directory's own."""
    flags = {k: flags.get(k) for k in TOKENIZER_FLAGS}
    if not (flags["vocab_file"] or flags["merge_file"] or flags["tokenizer_model"] or flags["tokenizer_path"]):
        saved = Path(meta.get("tokenizer_dir") or Path(load) / "tokenizer")
        if saved.is_dir():
            flags["tokenizer_path"] = str(saved)
            recorded = meta.get("tokenizer") or {}  # what training used, e.g. --eod-token <pad>
            flags["tokenizer_type"] = flags["tokenizer_type"] or recorded.get("type")
            if flags["eod_token"] is None:
                flags["eod_token"] = recorded.get("eod_token")
        elif (Path(load) / "vocab.json").is_file() or (Path(load) / "tokenizer.json").is_file():
            flags["tokenizer_path"] = str(load)  # a Hugging Face directory holds its tokenizer
    return TokenizerChoice(tokenizer_kwargs(flags), flags["tokenizer_path"], _template_dir(flags))


def tokenizer_kwargs(flags: dict) -> dict:
    """build_tokenizer arguments from the tokenizer flags (InputError when none is given)."""
    kind, vocab, merges, model = (flags.get(k) for k in ("tokenizer_type", "vocab_file", "merge_file",
                                                          "tokenizer_model"))
    if flags.get("tokenizer_path"):
        d = Path(flags["tokenizer_path"])
        if not d.is_dir():
            raise InputError(f"--tokenizer-path {d} is not a directory")
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            kind, vocab, merges = kind or "GPT2BPETokenizer", str(d / "vocab.json"), str(d / "merges.txt")
        elif (d / "tokenizer.json").is_file():
            kind, model = kind or "HuggingFaceTokenizer", str(d / "tokenizer.json")
        elif (d / "tokenizer.model").is_file():
            kind, model = kind or "SentencePieceTokenizer", str(d / "tokenizer.model")
        else:
            raise InputError(f"--tokenizer-path {d} holds none of vocab.json + merges.txt, "
                             "tokenizer.json, tokenizer.model")
    if kind is None:
        if vocab or merges:
            kind = "GPT2BPETokenizer"
        elif model:
            kind = "HuggingFaceTokenizer" if model.endswith(".json") else "SentencePieceTokenizer"
        else:
            raise InputError("no tokenizer given: pass --vocab-file and --merge-file (GPT-2 BPE), "
                             "--tokenizer-model, or --tokenizer-path")
    if kind == "GPT2BPETokenizer" and not (vocab and merges):
        raise InputError("GPT2BPETokenizer needs both --vocab-file and --merge-file")
    if kind != "GPT2BPETokenizer" and not model:
        raise InputError(f"{kind} needs --tokenizer-model")
    return dict(vocab_file=vocab, merge_file=merges, tokenizer_model=model,
                eod_token=flags.get("eod_token"), tokenizer_type=kind)


def _template_dir(flags: dict) -> Optional[str]:
    """The directory whose chat template files (tokenizer_config.json, chat_template.jinja) go
    with the tokenizer: --tokenizer-path, else the folder of --tokenizer-model or --vocab-file."""
    if flags.get("tokenizer_path"):
        return flags["tokenizer_path"]
    for path in (flags.get("tokenizer_model"), flags.get("vocab_file")):
        if path:
            return path if Path(path).is_dir() else str(Path(path).resolve().parent)
    return None


# ---- opening ------------------------------------------------------------------------------------
@dataclass
class OpenedModel:
    """A model in eval mode with its tokenizer and process layout, and where they came from."""

    model: torch.nn.Module
    tokenizer: object
    ps: ParallelState
    options: ModelOptions  # load / lora as opened (a LoRA --load resolved to its base)
    meta: dict
    tokenizer_path: Optional[str] = None  # the directory the tokenizer was read from, if one
    template_dir: Optional[str] = None


def parallel_state(tp: Optional[int] = None, timeout_s: float = 600.0) -> ParallelState:
    """One process: no process group; under a launcher: TP = `tp` or the number of processes."""
    launch = discover_launch()
    tp = tp or launch.world_size
    if launch.world_size == 1 and tp == 1:
        return ParallelState.single("cuda" if torch.cuda.is_available() else "cpu")
    return ParallelState.from_environment(tensor_model_parallel_size=tp, timeout_s=timeout_s)


def base_and_adapters(options: ModelOptions) -> ModelOptions:
    """A LoRA adapter directory given as --load opens on the base it records, with its adapters."""
    from ..checkpoint.lora_files import base_of, is_adapter_dir, read_adapters
    if not is_adapter_dir(options.load):
        return options
    if options.lora:
        raise InputError(f"--load {options.load} holds LoRA adapters; give their base with --load "
                         f"and the adapters with --lora")
    if options.quant is not None:
        raise InputError(f"--load {options.load} holds LoRA adapters; --quantize needs a merged model "
                         "(convert_checkpoint.py --load ADAPTERS --to megatron_ru)")
    meta, _ = read_adapters(options.load)
    return replace(options, load=base_of(meta, options.load), lora=options.load)


def open_model(options: ModelOptions, ps: Optional[ParallelState] = None, *, tokenizer=None,
               max_length: Optional[int] = None, seed: Optional[int] = None,
               untrained_seed: Optional[int] = None, timeout_s: float = 600.0) -> OpenedModel:
    """Open `options.load` for inference. `ps`: the process layout to use (else built here after
    the file checks); `tokenizer`: use this one (the draft model shares the target's);
    `max_length`: the positions the caller will use (--seq-length), checked against the model;
    `seed`: seeds the process's RNGs; `untrained_seed`: the checkpoint's model at initialisation,
    drawn from that seed as pretrain_gpt.py draws it (the same at every TP size)."""
    options = base_and_adapters(options)
    load = options.load
    config, meta = read_config(Path(load), trust=options.trust)
    choice = None
    if tokenizer is None:
        choice = resolve_tokenizer(options.tokenizer, load, meta)
        tokenizer = build_tokenizer(**choice.kwargs)
    for name, given in options.expect.items():  # e.g. ru-gpts' shape flags: must agree
        if given is not None and given != meta["model"].get(name):
            raise InputError(f"--{name.replace('_', '-')} {given} disagrees with {load}/config.json "
                             f"({name}={meta['model'].get(name)}); drop the flag, the checkpoint "
                             "describes its own shapes")
    tp = ps.tp_size if ps is not None else options.tp or discover_launch().world_size
    config.validate_parallel(tp)
    if tokenizer.vocab_size > config.vocab_size:
        raise InputError(f"the tokenizer has {tokenizer.vocab_size} ids but the model in {load} only "
                         f"{config.vocab_size}: wrong tokenizer for it (the checkpoint and tokenizer "
                         "disagree on the vocabulary)")
    limit = config.max_position_embeddings
    if max_length is not None and max_length > limit:
        raise InputError(f"--seq-length {max_length} exceeds the model's max_position_embeddings={limit}")
    if ps is None:
        ps = parallel_state(tp, timeout_s)
    if seed is not None:
        ps.seed(seed)
    overrides = options.overrides()
    if untrained_seed is not None:
        from ..config import ModelConfig
        from ..model.gpt import GPTModel
        config = ModelConfig.from_dict({**config.to_dict(), **overrides})
        ps.seed(untrained_seed)
        model = GPTModel(config, ps, seed=untrained_seed, device=ps.device).to(options.dtype)
        if options.quant is not None:
            model = quantize(model, spec=options.quant)
    else:
        model = load_for_inference(load, ps, tag=options.tag, dtype=options.dtype, device=ps.device,
                                   spec=options.quant, trust=options.trust, **overrides)
    if options.lora:  # adapters on top of the base, not merged (model/lora.py)
        from ..checkpoint.lora_files import attach_adapters
        attach_adapters(model, options.lora)
    template_dir = choice.template_dir if choice else None
    if options.lora and (Path(options.lora) / "chat_template.jinja").is_file():
        template_dir = options.lora  # adapters fine-tuned on chat data carry the template they learnt
    return OpenedModel(model.eval(), tokenizer, ps, options, meta,
                       choice.path if choice else None, template_dir)


def open_draft(path: str, target: OpenedModel, *, quantize: Optional[str] = None):
    """generate.py's --draft-load: a model that drafts for `target` (same TP, dtype and tokenizer;
    optionally quantized at load); SpeculativeError when it cannot."""
    from .speculative import SpeculativeError
    config, meta = read_config(Path(path), trust=target.options.trust)
    vocab = target.model.config.vocab_size
    if config.vocab_size != vocab:
        raise SpeculativeError(f"--draft-load {path}: vocabulary of {config.vocab_size} ids, the "
                               f"target has {vocab}; the draft must use the target's tokenizer")
    own = Path(meta.get("tokenizer_dir") or Path(path) / "tokenizer")
    if own.is_dir() and target.tokenizer_path:
        mine = {f.name: f.read_bytes() for f in Path(target.tokenizer_path).iterdir() if f.is_file()}
        theirs = {f.name: f.read_bytes() for f in own.iterdir() if f.is_file()}
        differ = [n for n in set(mine) & set(theirs) if mine[n] != theirs[n]]
        if differ:
            raise SpeculativeError(f"--draft-load {path}: its tokenizer differs from the target's "
                                   f"({', '.join(sorted(differ))})")
    try:
        config.validate_parallel(target.ps.tp_size)
    except Exception as exc:  # ConfigError: heads / vocabulary not divisible by TP
        raise SpeculativeError(f"--draft-load {path}: {exc}") from None
    options = ModelOptions(load=str(path), dtype=target.options.dtype,
                           quant=QuantSpec(quantize) if quantize else None, trust=target.options.trust)
    return open_model(options, target.ps, tokenizer=target.tokenizer).model
