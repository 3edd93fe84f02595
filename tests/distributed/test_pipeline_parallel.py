"""Pipeline parallelism on gloo against one process: every gradient after one step (plain and SFT
micro-batches weighted to the global token mean), the loss, the gradient norm, and the tied
embedding's two copies after 20 steps, for both families; TP2xPP2 also with sequence parallelism
(replicated weights then bit-identical over TP after 20 steps)."""
import pytest

from tests.distributed import pipeline_workers
from tests.helpers import run_ranks

pytestmark = [pytest.mark.mpirun, pytest.mark.slow]


@pytest.mark.parametrize("world, tp, pp, families", [
    (4, 2, 2, ("gpt3", "llama", "gpt3+sp", "llama+sp")), (4, 1, 4, ("llama", "gpt3")),
    (4, 1, 2, ("gpt3",))],
    ids=["TP2xPP2", "TP1xPP4", "TP1xPP2xDP2"])
def test_pipeline_gradients_equal_one_process(world, tp, pp, families):
    run_ranks(pipeline_workers.grads_and_tied_weights, world, tp, pp, families)
