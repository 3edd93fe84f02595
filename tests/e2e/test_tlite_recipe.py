"""examples/pretrain_tlite.sh end to end on CPU at tiny size, from scratch (BASE empty): sizes and
paths from the environment, extra flags through "$@", a tokenizer.json written by our trainer's
HF writer, the bundled corpus as both blend members; loss is finite and a checkpoint is written."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ru.checkpoint.load import read_config
from megatron_ru.data.hf_tokenizer_json import write_hf_tokenizer
from tests.helpers import clean_env, mpirun

pytestmark = [pytest.mark.mpirun, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TOK = ROOT / "examples" / "data" / "tokenizer"


def test_tlite_recipe_runs_tiny_from_scratch(tmp_path):
    write_hf_tokenizer(tmp_path / "tok", TOK / "vocab.json", TOK / "merges.txt")
    ds = json.loads((ROOT / "configs" / "tlite_8b_bf16.json").read_text())
    ds["gradient_accumulation_steps"] = 2  # the recipe's JSON, scaled down
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    data = str(ROOT / "examples" / "data" / "ru_demo_text_document")
    env = {**clean_env(), "PRESET": "tiny-llama", "SEQ": "32", "ITERS": "2", "NP": "1", "TP": "1", "DS_CONFIG": str(tmp_path / "ds.json"),
           "BASE": "", "RU": data, "EN": data, "SPLIT": "90,10,0", "TOKENIZER": str(tmp_path / "tok" / "tokenizer.json"),
           "SAVE": str(tmp_path / "ckpt"), "SAVE_INTERVAL": "2", "EVAL_ITERS": "1", "LOG_INTERVAL": "1",
           "CHECKPOINT_ACTIVATIONS": "0", "MPIRUN": mpirun(), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "examples/pretrain_tlite.sh", "--global-batch-size", "2",
                           "--data-cache-path", str(tmp_path / "cache"), "--num-layers", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    config, meta = read_config(tmp_path / "ckpt")
    assert config.family == "llama" and config.num_layers == 1 and meta["tokenizer"]["type"] == "HuggingFaceTokenizer"
