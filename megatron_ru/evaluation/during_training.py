"""--eval-tasks: lm-eval tasks on the live model during pretraining, at any TP size, no checkpoint.

Rank 0 of every TP group drives lm-eval (each data-parallel replica scores the same items, so
the ranks of a replica stay in step) and the other TP ranks serve its forward passes. The RNG
states are saved and restored around the run, and the model goes back to training mode, so a
run with --eval-tasks trains exactly as one without. Global rank 0 logs "task/metric" values to
stdout, the metrics file and TensorBoard.
"""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .. import runtime
from .perplexity import EvalInputError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def task_manager(names: list[str], include_path: Optional[str]):
    """lm-eval's TaskManager over our bundled tasks (+ `include_path`); lm-eval's built-in index
    (thousands of YAML files) only when a name is not found locally. EvalInputError names what
    is missing and lists what was found."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise EvalInputError(f"--eval-tasks needs the lm-eval package ({exc}); "
                             "pip install 'megatron_ru[eval]'") from None
    paths = [str(TASKS_DIR)] + ([include_path] if include_path else [])
    if include_path and not Path(include_path).is_dir():
        raise EvalInputError(f"--eval-tasks-include-path {include_path} is not a directory")
    local = TaskManager(include_path=paths, include_defaults=False)
    if all(local.match_tasks([n]) for n in names):
        return local
    full = TaskManager(include_path=paths)
    missing = [n for n in names if not full.match_tasks([n])]
    if missing:
        raise EvalInputError(f"--eval-tasks: lm-eval finds no task {', '.join(missing)} (found "
                             f"{', '.join(sorted(local.all_tasks))} in {', '.join(paths)}, and "
                             f"{len(full.all_tasks)} tasks in all: `lm-eval ls tasks`)")
    return full


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda, np.random.get_state(), random.getstate()


def _set_rng_state(state: tuple) -> None:
    cpu, cuda, nump, py = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    np.random.set_state(nump)
    random.setstate(py)


def flat_metrics(results: dict) -> dict[str, float]:
    """{"task/metric": value} from lm-eval's results (filters other than "none" kept in the name;
    standard errors dropped)."""
    out = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            if "_stderr" in key or key in ("alias", "sample_len") or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            out[f"{task}/{metric}" + ("" if filt in ("", "none") else f"_{filt}")] = float(value)
    return out


class TaskEvaluator:
    """Built once per run (checks the task names on every rank); `run(model, iteration)`."""

    def __init__(self, names: str, *, ps, tokenizer, log: Callable, sink,
                 limit: Optional[int] = None, include_path: Optional[str] = None,
                 batch_size: int = 8) -> None:
        self.names = [n.strip() for n in names.split(",") if n.strip()]
        if not self.names:
            raise EvalInputError("--eval-tasks names no task")
        self.ps, self.tokenizer, self.log, self.sink = ps, tokenizer, log, sink
        self.limit, self.batch_size = limit, batch_size
        self.tm = runtime.checked(ps, task_manager, self.names, include_path)

    def run(self, model, iteration: int) -> dict[str, float]:
        from lm_eval import simple_evaluate
        from .harness import MegatronRuLM

        was_training, state, t0 = model.training, _rng_state(), time.perf_counter()
        metrics: dict[str, float] = {}
        try:
            lm = MegatronRuLM(model=model, tokenizer=self.tokenizer, batch_size=self.batch_size)
            if self.ps.tp_rank == 0:
                quiet = logging.getLogger("lm_eval")
                level = quiet.level
                quiet.setLevel(logging.WARNING)
                try:
                    results = simple_evaluate(model=lm, tasks=self.names, task_manager=self.tm,
                                              limit=self.limit, bootstrap_iters=0,
                                              log_samples=False, random_seed=None,
                                              numpy_random_seed=None, torch_random_seed=None)
                finally:
                    quiet.setLevel(level)
                    lm.close()
                metrics = flat_metrics(results)
            else:
                lm.serve()
        finally:
            _set_rng_state(state)
            model.train(was_training)
        runtime.heartbeat("eval tasks")
        if self.ps.rank == 0:
            self.log(f"tasks at iter {iteration} | " + " | ".join(
                f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
                + f" | {time.perf_counter() - t0:.1f} s")
            self.sink.write({"iteration": iteration, **{f"tasks/{k}": v for k, v in metrics.items()}})
        return metrics
