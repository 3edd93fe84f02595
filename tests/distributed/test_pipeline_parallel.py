"""Pipeline parallelism on gloo against one process: every gradient after one step, the loss, the
gradient norm, and the tied embedding's two copies after 20 steps, for both families."""
import pytest

from tests.distributed import pipeline_workers
from tests.helpers import run_ranks

pytestmark = [pytest.mark.mpirun, pytest.mark.slow]


@pytest.mark.parametrize("world, tp, pp", [(2, 1, 2), (4, 2, 2), (4, 1, 4), (4, 1, 2)],
                         ids=["TP1xPP2", "TP2xPP2", "TP1xPP4", "TP1xPP2xDP2"])
def test_pipeline_gradients_equal_one_process(world, tp, pp):
    run_ranks(pipeline_workers.grads_and_tied_weights, world, tp, pp)
