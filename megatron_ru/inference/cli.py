"""Command line of generate.py: ru-gpts / Megatron flag names → checked settings (no model work).

Model, tokenizer and quantization flags are loading.py's groups, shared with serve.py,
evaluate.py and run_lm_eval.py; the groups here are generate.py's own, and serve.py composes the
few it needs (context length, ru-gpts compatibility, chat template).
"""
from __future__ import annotations

import argparse
import codecs
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .loading import InputError, ModelOptions, add_inference_arguments
from .speculative import add_arguments as add_speculative_arguments, check_args
from .sampling import SamplingParams, SamplingError
from .. import runtime

MODEL_SHAPE_FLAGS = ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings")
__all__ = ["InputError", "Settings", "build_parser", "parse", "is_generate_flag"]


# ---- argument groups ----------------------------------------------------------------------------
def add_rugpts_arguments(parser) -> None:
    """ru-gpts scripts pass shapes (checked against config.json) and DeepSpeed flags (ignored)."""
    for flag in MODEL_SHAPE_FLAGS:
        parser.add_argument("--" + flag.replace("_", "-"), dest=flag, type=int, help=argparse.SUPPRESS)
    for flag in ("--deepspeed", "--load-openai"):
        parser.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    for flag in ("--deepspeed_config", "--deepspeed-config", "--cache-dir"):
        parser.add_argument(flag, help=argparse.SUPPRESS)


def model_options(args: argparse.Namespace) -> ModelOptions:
    """loading.ModelOptions from the parsed flags, with ru-gpts' shape flags as expectations."""
    options = ModelOptions.from_args(args)  # --fp16/--bf16, TP size, --quantize, --lora
    options.expect = {name: getattr(args, name) for name in MODEL_SHAPE_FLAGS
                      if getattr(args, name, None) is not None}
    return options


def add_context_arguments(group) -> None:
    """--seq-length (generate.py, serve.py) and --seed."""
    group.add_argument("--seq-length", type=int,
                       help="context: prompt + continuation positions (default: the model's maximum)")
    group.add_argument("--seed", type=int, default=1234, help="random seed (default 1234)")


def add_chat_template_argument(group) -> None:
    group.add_argument("--chat-template", help="llama3, rugpt3, a Jinja file or a tokenizer_config.json "
                       "(default: the tokenizer's own: chat_template.jinja or tokenizer_config.json)")


def add_decoding_arguments(group) -> None:
    group.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    add_speculative_arguments(group)


def add_sampling_arguments(s) -> None:
    s.add_argument("--temperature", type=float, default=1.0, help="0 or --greedy: argmax")
    s.add_argument("--top_k", "--top-k", dest="top_k", type=int, default=0, help="0: off")
    s.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=1.0,
                   help="nucleus mass in (0, 1]; 1: off")
    s.add_argument("--repetition-penalty", "--repetition_penalty", dest="repetition_penalty",
                   type=float, default=1.0, help="HF's rule; 1: off")
    s.add_argument("--greedy", action="store_true", help="always take the most likely token")
    s.add_argument("--out-seq-length", "--max-new-tokens", dest="max_new_tokens", type=int,
                   default=256, help="maximum new tokens per sample")
    s.add_argument("--min-new-tokens", type=int, default=0,
                   help="no end-of-text or stop string before this many new tokens")
    s.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop a sample when its text contains STR (repeatable; \\n escapes work); "
                        "the text is cut before it")
    s.add_argument("--num-samples", type=int,
                   help="samples per prompt (default 1); without any prompt input: that many "
                        "unconditional samples")
    s.add_argument("--batch-size", type=int, default=1, help="samples decoded together")


def add_io_arguments(io) -> None:
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


def add_chat_arguments(c) -> None:
    """generate.py's --chat and --system (a server takes conversations with each request)."""
    c.add_argument("--chat", action="store_true",
                   help="chat form: the template applied, the end-of-turn token stops a reply; "
                        "interactive multi-turn, or --sample-input-file of {\"messages\": [...]} lines")
    c.add_argument("--system", help="system message of an interactive --chat session")


GENERATE_ONLY = (add_sampling_arguments, add_io_arguments, add_chat_arguments, add_decoding_arguments)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate.py",
        description="Sample text from a megatron_ru checkpoint (any TP size), on one process or "
                    "under `mpirun --np N` for tensor-parallel sampling.")
    add_inference_arguments(p)
    add_rugpts_arguments(p)
    add_decoding_arguments(p.add_argument_group("fast decoding (inference/speculative.py)"))
    s = p.add_argument_group("sampling")
    add_sampling_arguments(s)
    add_context_arguments(s)
    add_io_arguments(p.add_argument_group("input and output"))
    c = p.add_argument_group("chat (megatron_ru/inference/chat_session.py)")
    add_chat_arguments(c)
    add_chat_template_argument(c)
    runtime.add_arguments(p)
    return p


class _Probe(argparse.ArgumentParser):
    def error(self, message):
        raise InputError(message)


def is_generate_flag(word: str) -> bool:
    """Whether a command-line word is one of generate.py's own flags (sampling, prompts, chat,
    fast decoding): serve.py names them in its refusal."""
    if not word.startswith("--"):
        return False
    probe = _Probe(add_help=False, allow_abbrev=False)
    for add in GENERATE_ONLY:
        add(probe)
    try:
        _, rest = probe.parse_known_args([word])
    except InputError:  # known, and wants a value
        return True
    return not rest


@dataclass
class Settings:
    """Everything generate.py needs, checked."""

    args: argparse.Namespace
    sampling: SamplingParams
    stops: list[str]
    prompts: Optional[list[str]]  # None: interactive
    num_samples: int
    model: ModelOptions  # what to open (loading.py)


def unescape(text: str) -> str:
    """Turn `\\n`, `\\t` and friends typed on a command line into the characters."""
    try:
        return codecs.decode(text.encode("utf-8"), "unicode_escape").encode("latin-1").decode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError):
        return text


def parse(argv=None) -> Settings:
    """Parse and check flags and read the prompt input; raises InputError or SamplingError."""
    args = build_parser().parse_args(argv)
    model = model_options(args)
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
    rules += [(f, v, 1) for f, v in (("--seq-length", args.seq_length),
                                     ("--num-samples", args.num_samples)) if v is not None]
    for flag, value, low in rules:
        if value < low:
            raise InputError(f"{flag} {value} must be >= {low}")
    check_args(args)  # speculative decoding flags
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
    elif args.sample_input_file and not args.chat:  # chat files are read by inference/chat_session.py
        prompts = read_prompts(Path(args.sample_input_file), args.prompt_separator)
    elif args.num_samples:
        prompts = [""]  # unconditional: the continuation of a lone end-of-text token
    return Settings(args, sampling, [unescape(s) for s in args.stop], prompts,
                    args.num_samples or 1, model)


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


def record(prompt: str, text: str, tokens: list[int], finish_reason: str) -> str:
    return json.dumps({"prompt": prompt, "text": text, "tokens": tokens,
                       "finish_reason": finish_reason}, ensure_ascii=False)


