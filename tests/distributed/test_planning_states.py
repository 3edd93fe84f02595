"""The planner's model-state bytes equal what real DeepSpeed engines hold per rank (one 4-rank gloo spawn)."""
import json

import pytest

from tests.distributed import planning_workers
from tests.helpers import run_ranks

KINDS = ("weights", "grads", "master", "optimizer")
LAYOUTS = (
    [("gpt3", 1, 1, z, p) for z in range(4) for p in ("fp32", "bf16")]
    + [("gpt3", 2, 1, z, "bf16") for z in range(4)]
    + [("gpt3", 1, 2, z, p) for z in range(4) for p in ("fp32", "bf16")]
    + [("gpt3", 2, 2, z, p) for z in range(4) for p in ("fp32", "bf16", "fp16")]
    + [("llama", 2, 2, z, "bf16") for z in range(4)]  # GQA, untied head, no biases
)
PIPELINE = [("gpt3", 1, 2, 2, z, p) for z in (0, 1) for p in ("fp32", "bf16")]  # tied head on the last stage


@pytest.mark.slow
@pytest.mark.mpirun
def test_predicted_model_states_equal_deepspeed_bytes(tmp_path):
    out = tmp_path / "states.json"
    run_ranks(planning_workers.model_states, 4, LAYOUTS, PIPELINE, str(out))
    rows = json.loads(out.read_text())
    assert len(rows) == 4 * (len(LAYOUTS) + len(PIPELINE))
    wrong = []
    for rank, (layout, held, predicted) in rows:
        for kind in KINDS:
            if held[kind] != predicted[kind]:
                wrong.append(f"rank {rank} {layout} {kind}: DeepSpeed holds {held[kind]}, predicted "
                             f"{predicted[kind]}")
        assert held["other"] <= 16, (layout, held)  # scalars only (norm, overflow flag)
        assert held["weights"] > 0 and held["optimizer"] > 0
    assert not wrong, "\n".join(wrong)
