"""Progress on long work: shown on a terminal or with --progress, never under --quiet, and nothing
extra in logs (stderr not a terminal): tools/evaluate.py, the adapter merge and the universal
conversion of tools/convert_checkpoint.py."""
import io

import pytest

from megatron_ru import runtime
from megatron_ru.checkpoint.lora_files import save_adapters
from megatron_ru.checkpoint.model_io import save_model
from megatron_ru.config import ModelConfig
from megatron_ru.data.progress import Progress, progress_wanted
from megatron_ru.evaluation import cli
from megatron_ru.model.gpt import GPTModel
from megatron_ru.model.lora import apply_lora
from tests import evalkit
from tests.helpers import load_tool, pretrain


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_line_rates_eta_and_switches():
    bar = Progress("evaluating", total=10, unit="windows", extra_unit="tokens", stream=io.StringIO())
    bar.start -= 20.0  # 20 s for 4 of 10 windows: 30 s to go
    bar.update(4, extra=400)
    line = bar.line()
    assert "40.0% evaluating: 4/10 windows" in line and "tokens/s" in line and line.endswith("ETA 0m30s")
    quiet = io.StringIO()
    off = Progress("x", total=2, stream=quiet, interval=0, enabled=False)
    off.update()
    off.close()
    assert quiet.getvalue() == ""
    assert progress_wanted(stream=Terminal()) and not progress_wanted(stream=io.StringIO())
    assert progress_wanted(force=True, stream=io.StringIO())
    assert not progress_wanted(force=True, quiet=True, stream=Terminal())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return evalkit.make_checkpoint(tmp_path_factory.mktemp("prog") / "ours", max_positions=64)


def test_evaluate_progress_only_when_asked_or_on_a_terminal(ckpt, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(evalkit.TEXT, encoding="utf-8")
    common = ["--load", str(ckpt), "--input", str(text), "--seq-length", "16", "--stride", "8",
              "--batch-size", "2"]
    assert runtime.run(cli.main, "tools/evaluate.py", common) == 0
    plain = capsys.readouterr()
    assert "evaluating" not in plain.err  # a log: nothing extra
    assert runtime.run(cli.main, "tools/evaluate.py", common + ["--progress"]) == 0
    shown = capsys.readouterr()
    assert "100.0% evaluating:" in shown.err and "windows" in shown.err and "tokens/s" in shown.err
    assert shown.out == plain.out  # the table is unchanged
    assert runtime.run(cli.main, "tools/evaluate.py", common + ["--progress", "--quiet"]) == 0
    assert "evaluating" not in capsys.readouterr().err


def test_adapter_merge_progress(tmp_path, capsys):
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=97,
                      max_position_embeddings=64)
    save_model(tmp_path / "base", GPTModel(cfg, seed=1))
    lora = GPTModel(cfg, seed=1)
    apply_lora(lora, rank=2, alpha=4.0, targets="qkv,fc2", seed=1)
    save_adapters(lora, tmp_path / "lora", base=str(tmp_path / "base"))
    convert = load_tool("convert_checkpoint")
    common = ["--load", str(tmp_path / "lora"), "--to", "megatron_ru"]
    assert convert.main(common + ["--save", str(tmp_path / "m1")]) == 0
    assert "merging adapters" not in capsys.readouterr().err
    assert convert.main(common + ["--save", str(tmp_path / "m2"), "--progress"]) == 0
    err = capsys.readouterr().err
    assert "100.0% merging adapters" in err and "4/4 tensors" in err


@pytest.mark.slow
def test_universal_conversion_progress(tmp_path, capsys):
    pretrain(tmp_path, "run", "--train-iters", "1", "--micro-batch-size", "2", "--deepspeed_config",
             "configs/ds_zero2.json", "--save", str(tmp_path / "ckpt"), "--save-interval", "1")
    convert = load_tool("convert_checkpoint")
    assert convert.main(["--load", str(tmp_path / "ckpt"), "--save", str(tmp_path / "u1"),
                         "--to", "universal"]) == 0
    err = capsys.readouterr().err
    assert "universal checkpoint" not in err and "it/s" not in err  # DeepSpeed's tqdm bars are gone too
    assert convert.main(["--load", str(tmp_path / "ckpt"), "--save", str(tmp_path / "u2"),
                         "--to", "universal", "--progress"]) == 0
    err = capsys.readouterr().err
    assert "universal checkpoint: 1. Extracting ZeRO fragments" in err
    assert "universal checkpoint: 2. Merging slices" in err and "100.0%" in err
