"""tools/run_lm_eval.py: lm-eval's own command line with the `megatron_ru` backend registered and the
bundled tasks on the include path; under `mpirun --np N` rank 0 runs lm-eval and ranks 1..N-1
serve its tensor-parallel forward passes.

    python tools/run_lm_eval.py --model megatron_ru --model_args load=DIR --tasks ru_choice,ru_yesno
    mpirun --np 2 python tools/run_lm_eval.py --model megatron_ru --model_args load=DIR,batch_size=8 \
        --tasks ru_choice --output_path results/
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

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


def local_tasks(include: str) -> list[str]:
    """Task names defined by the YAML files of an --include_path (no built-in index: fast)."""
    from lm_eval.tasks import TaskManager
    return sorted(TaskManager(include_path=include, include_defaults=False).all_tasks)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
        from .loading import parallel_state
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
