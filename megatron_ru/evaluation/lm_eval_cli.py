"""tools/run_lm_eval.py: lm-eval's own command line with the `megatron_ru` backend registered and the
bundled tasks on the include path; under `mpirun --np N` rank 0 runs lm-eval and ranks 1..N-1
serve its tensor-parallel forward passes.

    python tools/run_lm_eval.py --model megatron_ru --model_args load=DIR --tasks ru_choice,ru_yesno
    mpirun --np 2 python tools/run_lm_eval.py --model megatron_ru --model_args load=DIR,batch_size=8 \
        --tasks ru_choice --output_path results/

generate.py's model flags work here too (inference/loading.py's groups): `--load BASE --lora DIR`,
`--quantize int8`, `--tokenizer-path DIR`, ... become `--model megatron_ru --model_args ...`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from ..inference.loading import add_inference_arguments
from ..parallel.state import discover_launch
from .perplexity import EvalInputError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def _flag(argv: list[str], name: str) -> Optional[str]:
    for i, word in enumerate(argv):
        if word == name and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def model_flags_to_args(argv: list[str]) -> list[str]:
    """generate.py's model / tokenizer / quantization flags in `argv` → lm-eval's `--model
    megatron_ru --model_args k=v,...` (merged with any --model_args given); other words untouched."""
    parser = argparse.ArgumentParser(prog="tools/run_lm_eval.py", add_help=False, allow_abbrev=False)
    add_inference_arguments(parser, load_required=False)
    ours, rest = parser.parse_known_args(argv)
    given = {k: v for k, v in vars(ours).items() if v is not None and v is not False}
    if not given:
        return argv
    from . import harness
    model = _flag(rest, "--model")
    if model not in (None, harness.NAME):
        raise EvalInputError(f"--load and the other model flags are for --model {harness.NAME}, "
                             f"not --model {model}")
    pairs = []
    for key, value in given.items():
        text = "true" if value is True else str(value)
        if "," in text or "=" in text:
            raise EvalInputError(f"--{key.replace('_', '-')} {text}: lm-eval's --model_args cannot "
                                 "carry ',' or '='; rename the path")
        pairs.append(f"{key}={text}")
    extra = _flag(rest, "--model_args")
    out, skip = [], False
    for i, word in enumerate(rest):  # drop --model / --model_args; they are rebuilt below
        if skip:
            skip = False
            continue
        if word in ("--model", "--model_args"):
            skip = True
            continue
        if word.startswith(("--model=", "--model_args=")):
            continue
        out.append(word)
    return out + ["--model", harness.NAME, "--model_args", ",".join(pairs + ([extra] if extra else []))]


def local_tasks(include: str) -> list[str]:
    """Task names defined by the YAML files of an --include_path (no built-in index: fast)."""
    from lm_eval.tasks import TaskManager
    return sorted(TaskManager(include_path=include, include_defaults=False).all_tasks)


def main(argv=None) -> int:
    argv = model_flags_to_args(list(sys.argv[1:] if argv is None else argv))
    from . import harness
    from lm_eval.utils import simple_parse_args_string

    include = _flag(argv, "--include_path")
    if include is None:
        include = str(TASKS_DIR)
        argv += ["--include_path", include]
    launch = discover_launch()
    if launch.world_size > 1:
        if _flag(argv, "--model") != harness.NAME:
            raise EvalInputError(f"under mpirun only --model {harness.NAME} runs tensor parallel")
        from ..inference.loading import parallel_state
        model_args = simple_parse_args_string(_flag(argv, "--model_args") or "")
        tp = model_args.get("tp")
        parallel_state(int(tp) if tp else None)  # every rank meets here before lm-eval starts
        if launch.rank != 0:  # serve rank 0's forwards; the task data stays with rank 0
            lm = harness.MegatronRuLM.create_from_arg_string(
                _flag(argv, "--model_args") or "", {"batch_size": _flag(argv, "--batch_size")})
            lm.serve()
            return 0
    saved = sys.argv
    sys.argv = ["lm-eval"] + argv
    try:
        from lm_eval.__main__ import cli_evaluate
        cli_evaluate()
    except ValueError as exc:
        if str(exc).startswith("Tasks not found"):
            found = ", ".join(local_tasks(include)) or "none"
            raise EvalInputError(f"{exc} (in --include_path {include}: {found}; lm-eval's "
                                 "built-in tasks: `lm-eval ls tasks`)") from None
        raise
    finally:
        sys.argv = saved
        harness.MegatronRuLM.close_all()
    return 0
