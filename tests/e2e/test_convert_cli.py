"""tools/convert_checkpoint.py end to end: reshard and export to HF with a progress bar, generate.py
--load on the HF dir (its own tokenizer, no conversion back), and bad input (exit status 2, one
message, nothing at DST). pretrain_gpt.py --finetune from HF: tests/distributed/test_convert_zero3.py."""
import json
import shutil
import subprocess
import sys

import pytest

from megatron_ru import GPTModel, ModelConfig
from megatron_ru.checkpoint.model_io import save_model, write_config
from megatron_ru import runtime
from tests.helpers import ROOT, TOKENIZER, VOCAB, clean_env, generate_main, load_tool

pytestmark = pytest.mark.slow

transformers = pytest.importorskip("transformers")


def tool():
    return load_tool("convert_checkpoint")


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """A tiny ruGPT-3 checkpoint with its tokenizer, as training writes it (TP=2 files)."""
    path = tmp_path_factory.mktemp("conv") / "ours"
    cfg = ModelConfig.from_preset("tiny-gpt3", vocab_size=VOCAB)
    save_model(path, GPTModel(cfg, seed=11))
    shutil.copytree(TOKENIZER, path / "tokenizer")
    write_config(path, cfg, 1, tokenizer={"type": "GPT2BPETokenizer", "vocab_file": "tokenizer/vocab.json",
                                          "merge_file": "tokenizer/merges.txt"})
    return path


def test_cli_export_then_generate_from_hf_dir(ours, tmp_path, capsys):
    convert = tool()
    assert convert.main(["--load", str(ours), "--save", str(tmp_path / "tp2"), "--to", "megatron_ru",
                         "--target-tensor-parallel-size", "2", "--quiet"]) == 0
    assert convert.main(["--load", str(tmp_path / "tp2"), "--save", str(tmp_path / "hf"), "--to", "hf",
                         "--dtype", "fp32"]) == 0
    err = capsys.readouterr().err
    assert "converting megatron_ru → hf" in err and "100.0%" in err  # the progress bar
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json"} <= \
        {p.name for p in (tmp_path / "hf").iterdir()}
    outs = []
    for load in (ours, tmp_path / "hf"):  # the HF dir brings its tokenizer; no flags needed
        code = generate_main(["--load", str(load), "--greedy", "--prompt", "Москва — столица",
                              "--out-seq-length", "8", "--sample-output-file", str(tmp_path / "o.jsonl")])
        assert code == 0, capsys.readouterr().err
        outs.append(json.loads((tmp_path / "o.jsonl").read_text())["text"])
    capsys.readouterr()
    assert outs[0] == outs[1] and outs[0]


def test_cli_bad_input_exits_2_and_writes_nothing(ours, tmp_path, capsys):
    cfg = json.loads((ours / "config.json").read_text())
    bad = tmp_path / "bert"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    (bad / "model.safetensors").write_bytes(b"")
    cases = [([str(bad), "hf"], "architecture 'BertForMaskedLM' is not supported"),
             ([str(ours), "megatron_ru", "--target-tensor-parallel-size", "3"],
              f"num_attention_heads={cfg['model']['num_attention_heads']} is not divisible"),
             ([str(tmp_path / "missing"), "hf"], "does not exist")]
    for i, ((src, to, *extra), message) in enumerate(cases):
        argv = ["--load", src, "--save", str(tmp_path / "dst"), "--to", to, *extra]
        if i == 0:  # one real process for the exit status; the rest in-process (fast)
            proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", *argv], cwd=ROOT,
                                  env=clean_env(), capture_output=True, text=True, timeout=120)
            code, err = proc.returncode, proc.stderr
        else:
            code = runtime.run(tool().main, "convert_checkpoint.py", argv)
            err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, err
        assert err.count("error: ") == 1
        assert not (tmp_path / "dst").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dst")]
