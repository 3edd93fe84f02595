"""TP=2 and TP=4 on gloo against TP=1: parallel layers, cross entropy, both model families."""
import pytest

from tests.distributed import workers
from tests.helpers import run_ranks

pytestmark = [pytest.mark.mpirun, pytest.mark.slow]


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_layers_match_dense(world):
    run_ranks(workers.layers, world)


@pytest.mark.parametrize("world", [2, 4])
def test_model_tp_matches_tp1(world):
    run_ranks(workers.model_parity, world)
