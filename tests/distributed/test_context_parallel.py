"""Context parallelism (Ulysses) on gloo against one process: loss and every gradient of the model
(dense, alternating block-sparse gpt3, GQA llama dense and block-sparse, 32 tokens = 8 sparse
blocks), then 4 DeepSpeed steps (ZeRO 0 / 3, ParallelState as `mpu`, data-parallel group DP x CP):
losses and gradients to 1e-6. At CP2 with TP2 and with DP2; TP2xCP2 also with sequence
parallelism (model and ZeRO-3). CP2 also resumes a ZeRO-3 AdamW state through DeepSpeed's
universal checkpoint bit for bit."""
import pytest

from tests.distributed import cp_workers
from tests.helpers import run_ranks

pytestmark = [pytest.mark.mpirun, pytest.mark.slow]
ALL = tuple(cp_workers.CONFIGS)
SP = ("gpt3_sparse+sp", "llama_gqa+sp")  # --sequence-parallel: the CP slice split again over TP


@pytest.mark.parametrize("world, tp, cp, with_model, stages, names", [
    (2, 1, 2, True, (0, 3), ("gpt3_sparse", "llama_gqa")),
    (4, 2, 2, ALL + SP, (3,), ("llama_gqa", "gpt3_sparse+sp")),
    (4, 1, 2, False, (0,), ("llama_gqa_sparse",)),
], ids=["CP2", "TP2xCP2", "CP2xDP2"])
def test_context_parallel_equals_one_process(world, tp, cp, with_model, stages, names, tmp_path):
    universal_dir = str(tmp_path) if (world, tp) == (2, 1) else None  # CP2: ZeRO-3 universal resume
    run_ranks(cp_workers.checks, world, tp, cp, with_model, stages, names, universal_dir)
