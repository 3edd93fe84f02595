"""Megatron sequence parallelism on gloo: TP=2 + SP equals TP=2 and TP=1 (model and DeepSpeed)."""
import pytest

from tests.distributed import sp_workers
from tests.helpers import run_ranks

pytestmark = [pytest.mark.mpirun, pytest.mark.slow]


def test_sp_gradients_match_tp_and_single_process():
    run_ranks(sp_workers.grads_match, 2)


def test_sp_deepspeed_zero_stages_match_and_norms_stay_identical():
    run_ranks(sp_workers.engines_match, 2, [(0, "gpt3"), (1, "llama"), (2, "gpt3"), (3, "llama")])
