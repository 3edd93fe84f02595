"""Command line of generate.py: ru-gpts / Megatron flag names → checked settings (no model work)."""
from __future__ import annotations

import argparse
import codecs
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import SPARSE_MODES
from .quantize import add_arguments as add_quantize_arguments, spec_from_args
from .speculative import add_arguments as add_speculative_arguments, check_args
from .sampling import SamplingParams, SamplingError
from .. import runtime
from ..errors import UsageError

MODEL_SHAPE_FLAGS = ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings")


class InputError(UsageError):
    """A flag or an input file breaks a rule; the message names the flag or file and the rule."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate.py",
        description="Sample text from a megatron_ru checkpoint (any TP size), on one process or "
                    "under `mpirun --np N` for tensor-parallel sampling.")
    g = p.add_argument_group("model")
    g.add_argument("--load", required=True, metavar="DIR",
                   help="checkpoint directory (config.json, latest, <tag>/mp_rank_XX_model_states.pt)")
    g.add_argument("--tag", help="checkpoint tag to load (default: the one named in DIR/latest)")
    g.add_argument("--fp16", action="store_true", help="run in float16")
    g.add_argument("--bf16", action="store_true", help="run in bfloat16")
    g.add_argument("--tensor-model-parallel-size", "--model-parallel-size", dest="tp", type=int,
                   help="TP size to sample at (default: the number of processes); may differ from "
                        "the checkpoint's, weights are resharded on load")
    g.add_argument("--sparse-mode", choices=SPARSE_MODES,
                   help="override which layers are block-sparse (default: from config.json)")
    g.add_argument("--sparse-impl", choices=("auto", "gather", "flex", "reference"),
                   help="override the block-sparse execution path (same numbers, other speed)")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    fast = p.add_argument_group("fast decoding (inference/quantize.py, speculative.py)")
    add_quantize_arguments(fast)
    add_speculative_arguments(fast)
    for flag in MODEL_SHAPE_FLAGS:  # ru-gpts passes shapes; we check them against config.json
        g.add_argument("--" + flag.replace("_", "-"), dest=flag, type=int,
                       help=argparse.SUPPRESS)
    for flag in ("--deepspeed", "--load-openai"):  # accepted for ru-gpts scripts, ignored
        g.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    for flag in ("--deepspeed_config", "--deepspeed-config", "--cache-dir"):
        g.add_argument(flag, help=argparse.SUPPRESS)

    t = p.add_argument_group("tokenizer")
    t.add_argument("--tokenizer-type", default=None,
                   help="GPT2BPETokenizer (default with --vocab-file), SentencePieceTokenizer, "
                        "HuggingFaceTokenizer")
    t.add_argument("--vocab-file", help="GPT-2 BPE vocab.json")
    t.add_argument("--merge-file", help="GPT-2 BPE merges.txt")
    t.add_argument("--tokenizer-model", help="SentencePiece .model or HF tokenizer.json")
    t.add_argument("--tokenizer-path", metavar="DIR",
                   help="a directory holding vocab.json + merges.txt, tokenizer.json or tokenizer.model")
    t.add_argument("--eod-token", help="end-of-text token (default: the tokenizer's own)")

    s = p.add_argument_group("sampling")
    s.add_argument("--temperature", type=float, default=1.0, help="0 or --greedy: argmax")
    s.add_argument("--top_k", "--top-k", dest="top_k", type=int, default=0, help="0: off")
    s.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=1.0,
                   help="nucleus mass in (0, 1]; 1: off")
    s.add_argument("--repetition-penalty", "--repetition_penalty", dest="repetition_penalty",
                   type=float, default=1.0, help="HF's rule; 1: off")
    s.add_argument("--greedy", action="store_true", help="always take the most likely token")
    s.add_argument("--seq-length", type=int,
                   help="context: prompt + continuation positions (default: the model's maximum)")
    s.add_argument("--out-seq-length", "--max-new-tokens", dest="max_new_tokens", type=int,
                   default=256, help="maximum new tokens per sample")
    s.add_argument("--min-new-tokens", type=int, default=0,
                   help="no end-of-text or stop string before this many new tokens")
    s.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop a sample when its text contains STR (repeatable; \\n escapes work); "
                        "the text is cut before it")
    s.add_argument("--seed", type=int, default=1234)
    s.add_argument("--num-samples", type=int,
                   help="samples per prompt (default 1); without any prompt input: that many "
                        "unconditional samples")
    s.add_argument("--batch-size", type=int, default=1, help="samples decoded together")

    io = p.add_argument_group("input and output")
    io.add_argument("--prompt", help="one prompt (\\n escapes work)")
    io.add_argument("--sample-input-file", metavar="FILE",
                    help="prompts, one per line (blank lines skipped), or split by --prompt-separator")
    io.add_argument("--prompt-separator", metavar="SEP",
                    help="split the input file at SEP instead of newlines (few-shot prompts "
                         "spanning lines; \\n escapes work)")
    io.add_argument("--sample-output-file", metavar="FILE",
                    help="JSON lines {prompt, text, tokens, finish_reason} in input order "
                         "(written atomically at the end)")
    io.add_argument("--quiet", action="store_true", help="do not print samples to stdout")
    c = p.add_argument_group("chat and adapters (megatron_ru/inference/chat.py)")
    c.add_argument("--chat", action="store_true",
                   help="chat form: the template applied, the end-of-turn token stops a reply; "
                        "interactive multi-turn, or --sample-input-file of {\"messages\": [...]} lines")
    c.add_argument("--chat-template", help="llama3, rugpt3, a Jinja file or a tokenizer_config.json "
                   "(default: the tokenizer's own: chat_template.jinja or tokenizer_config.json)")
    c.add_argument("--system", help="system message of an interactive --chat session")
    c.add_argument("--lora", metavar="DIR", help="LoRA adapter directory applied on top of --load "
                   "(not merged)")
    runtime.add_arguments(p)
    return p


@dataclass
class Settings:
    """Everything generate.py needs, checked."""

    args: argparse.Namespace
    sampling: SamplingParams
    stops: list[str]
    prompts: Optional[list[str]]  # None: interactive
    num_samples: int


def unescape(text: str) -> str:
    """Turn `\\n`, `\\t` and friends typed on a command line into the characters."""
    try:
        return codecs.decode(text.encode("utf-8"), "unicode_escape").encode("latin-1").decode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError):
        return text


def parse(argv=None) -> Settings:
    """Parse and check flags and read the prompt input; raises InputError or SamplingError."""
    args = build_parser().parse_args(argv)
    if args.fp16 and args.bf16:
        raise InputError("--fp16 and --bf16 exclude each other")
    if args.sample_output_file and not Path(args.sample_output_file).parent.is_dir():
        out = Path(args.sample_output_file)  # say it now, not after hours of sampling
        raise InputError(f"--sample-output-file {out}: directory {out.parent} does not exist")
    try:
        sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                                  greedy=args.greedy)
    except SamplingError as exc:
        raise InputError(str(exc)) from None
    rules = [("--out-seq-length", args.max_new_tokens, 1), ("--batch-size", args.batch_size, 1),
             ("--min-new-tokens", args.min_new_tokens, 0)]
    rules += [(f, v, 1) for f, v in (("--seq-length", args.seq_length), ("--num-samples",
              args.num_samples), ("--tensor-model-parallel-size", args.tp)) if v is not None]
    for flag, value, low in rules:
        if value < low:
            raise InputError(f"{flag} {value} must be >= {low}")
    args.quant_spec = spec_from_args(args)  # fast decoding flags (QuantizeError / InputError)
    check_args(args)
    if args.min_new_tokens > args.max_new_tokens:
        raise InputError(f"--min-new-tokens {args.min_new_tokens} exceeds --out-seq-length "
                         f"{args.max_new_tokens}")
    if args.chat and (args.prompt is not None or args.prompt_separator is not None):
        raise InputError("--chat takes conversations interactively or from --sample-input-file, "
                         "not --prompt / --prompt-separator")
    if (args.chat_template or args.system) and not args.chat:
        raise InputError("--chat-template and --system need --chat")
    if args.prompt is not None and args.sample_input_file:
        raise InputError("give --prompt or --sample-input-file, not both")
    if args.prompt_separator is not None and not args.sample_input_file:
        raise InputError("--prompt-separator needs --sample-input-file")
    prompts = None
    if args.prompt is not None:
        prompts = [unescape(args.prompt)]
    elif args.sample_input_file and not args.chat:  # chat files are read by inference/chat.py
        prompts = read_prompts(Path(args.sample_input_file), args.prompt_separator)
    elif args.num_samples:
        prompts = [""]  # unconditional: the continuation of a lone end-of-text token
    return Settings(args, sampling, [unescape(s) for s in args.stop], prompts,
                    args.num_samples or 1)


def read_prompts(path: Path, separator: Optional[str]) -> list[str]:
    if not path.is_file():
        raise InputError(f"--sample-input-file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--sample-input-file {path} cannot be read as UTF-8: {exc}") from None
    if separator is not None:
        sep = unescape(separator)
        if not sep:
            raise InputError("--prompt-separator must not be empty")
        prompts = [c.strip("\r\n") for c in text.split(sep)]
    else:
        prompts = [line.rstrip("\r") for line in text.split("\n")]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise InputError(f"--sample-input-file {path} holds no prompt")
    return prompts


def check_model_flags(args: argparse.Namespace, model_config: dict, directory: str) -> dict:
    """ru-gpts shape flags must agree with config.json; returns config overrides to apply."""
    for name in MODEL_SHAPE_FLAGS:
        given = getattr(args, name)
        if given is not None and given != model_config.get(name):
            raise InputError(f"--{name.replace('_', '-')} {given} disagrees with {directory}/"
                             f"config.json ({name}={model_config.get(name)}); drop the flag, the "
                             "checkpoint describes its own shapes")
    overrides = {}
    if args.sparse_mode is not None:
        overrides["sparse_mode"] = args.sparse_mode
    if args.sparse_impl is not None:
        overrides["sparse_impl"] = args.sparse_impl
    return overrides


def tokenizer_kwargs(args: argparse.Namespace) -> dict:
    """build_tokenizer arguments from the tokenizer flags (InputError when none is given)."""
    kind, vocab, merges, model = args.tokenizer_type, args.vocab_file, args.merge_file, args.tokenizer_model
    if args.tokenizer_path:
        d = Path(args.tokenizer_path)
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
                eod_token=args.eod_token, tokenizer_type=kind)


def record(prompt: str, text: str, tokens: list[int], finish_reason: str) -> str:
    return json.dumps({"prompt": prompt, "text": text, "tokens": tokens,
                       "finish_reason": finish_reason}, ensure_ascii=False)


def tokenizer_dir(args) -> Optional[str]:
    """The directory whose chat template files (tokenizer_config.json, chat_template.jinja) go
    with the run's tokenizer: --tokenizer-path, else the folder of --tokenizer-model or
    --vocab-file."""
    import os
    if args.tokenizer_path:
        return args.tokenizer_path
    for path in (args.tokenizer_model, args.vocab_file):
        if path:
            return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    return None
