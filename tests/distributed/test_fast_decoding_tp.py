"""Fast decoding at TP=2 in one run_ranks launch (gloo, CPU): quantized TP=2 == quantized TP=1, a
quantized checkpoint loads at TP=2, greedy speculative TP=2 == plain greedy TP=1 (tests/distributed/fast_workers.py)."""
import pytest

from megatron_ru.checkpoint.model_io import save_model
from megatron_ru.inference.quantize import QuantSpec
from megatron_ru.inference.quantize_io import convert_quantized
from tests.distributed import fast_workers
from tests.fast_decoding import LOGIT_TOL, trained_model
from tests.helpers import run_ranks

pytestmark = [pytest.mark.mpirun, pytest.mark.slow]


def test_tp2_quantized_and_speculative(tmp_path):
    save_model(tmp_path / "fp", trained_model("gpt3"))
    convert_quantized(tmp_path / "fp", tmp_path / "q4", QuantSpec("int4", head=True), quiet=True)
    tol = {m: LOGIT_TOL[m, "fbgemm"] for m in ("int8", "int4")}
    run_ranks(fast_workers.fast_decoding_tp, 2, str(tmp_path / "fp"), str(tmp_path / "q4"), tol)
