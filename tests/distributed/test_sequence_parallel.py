"""Megatron sequence parallelism on gloo: TP=2 + SP equals TP=2 and TP=1 (model and DeepSpeed
ZeRO 0-3, fp32 and bf16); replicated parameters stay bit-identical across TP ranks."""
import pytest

from tests.distributed import sp_workers
from tests.helpers import run_ranks

pytestmark = [pytest.mark.mpirun, pytest.mark.slow]


def test_sp_gradients_match_tp_and_single_process():
    run_ranks(sp_workers.grads_match, 2)


def test_sp_deepspeed_zero_stages_match_and_norms_stay_identical():
    run_ranks(sp_workers.engines_match, 2, [(0, "gpt3", "fp32"), (1, "llama", "fp32"),
                                            (2, "gpt3", "fp32"), (3, "llama", "fp32"),
                                            (3, "llama_sparse_ckpt", "bf16")])
