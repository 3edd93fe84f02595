"""Tensor-parallel sampling under gloo: TP=2 draws the same tokens as TP=1 with the same seed."""
import pytest

from tests.distributed import gen_workers
from tests.helpers import run_ranks

pytestmark = [pytest.mark.mpirun, pytest.mark.slow]


def test_tp2_sampling_equals_tp1():
    run_ranks(gen_workers.tp_sampling_equals_tp1, 2)
