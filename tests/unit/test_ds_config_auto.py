"""Shipped DeepSpeed configs leave the batch keys to the flags ("auto"); pinned values that disagree are refused."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_ru.config import ConfigError
from megatron_ru.training import ds_config

ROOT = Path(__file__).resolve().parents[2]


def _args(path, micro=None, global_batch=None):
    return SimpleNamespace(deepspeed_config=str(path), micro_batch_size=micro,
                           global_batch_size=global_batch, fp16=False, bf16=False, clip_grad=1.0)


@pytest.mark.parametrize("name", ["ds_zero1", "ds_zero2", "ds_zero2_offload", "ds_zero3"])
def test_flags_fill_the_auto_batch_keys(name):
    path = ROOT / "configs" / f"{name}.json"
    assert json.loads(path.read_text())["train_micro_batch_size_per_gpu"] == "auto"
    ds, _, _ = ds_config.build(_args(path, micro=8), 2, lambda m: None)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
            ds["train_batch_size"]) == (8, 1, 16)
    ds, _, _ = ds_config.build(_args(path, micro=2, global_batch=8), 2, lambda m: None)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (2, 2)
    ds, _, _ = ds_config.build(_args(path), 1, lambda m: None)  # no flags: the flags' defaults
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
            ds["train_batch_size"]) == (4, 1, 4)


def test_a_pinned_value_that_disagrees_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "train_batch_size": "auto"}))
    with pytest.raises(ConfigError) as e:
        ds_config.build(_args(path, micro=8), 1, lambda m: None)
    assert str(e.value) == (f"--micro-batch-size=8 disagrees with train_micro_batch_size_per_gpu=4 "
                            f"in {path}")
    path.write_text(json.dumps({"train_batch_size": 32, "train_micro_batch_size_per_gpu": "auto"}))
    with pytest.raises(ConfigError, match="--global-batch-size=16 disagrees with train_batch_size=32"):
        ds_config.build(_args(path, global_batch=16), 1, lambda m: None)


def test_auto_only_for_the_batch_keys(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"gradient_clipping": "auto"}))
    with pytest.raises(ConfigError, match='gradient_clipping must be a number, got "auto"'):
        ds_config.build(_args(path), 1, lambda m: None)
