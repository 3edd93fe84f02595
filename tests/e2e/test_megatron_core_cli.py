"""Megatron-Core directories through the entry points: generate.py --load on a torch_dist directory
samples what our own copy of the model samples; convert_checkpoint.py torch_dist -> --to
megatron_core (TP 2) -> back is bit-identical; bad input exits 2 with nothing at --save; a checkpoint
written by Megatron-Core's own dist_checkpointing.save (tests/e2e/mcore_dist_writer.py) imports.
(pretrain_gpt.py --load --finetune reads foreign directories through the same load_full_state_dict
as generate.py; a subprocess run of it costs ~2 minutes on CI's 2 cores, so it is not repeated here.)"""
import json
import subprocess
import sys

import pytest
import torch

from megatron_ru import GPTModel, ModelConfig
from megatron_ru.checkpoint.load import detect_format, load_any, load_model
from megatron_ru.checkpoint.model_io import save_model
from tests import mcore_fixtures as fx
from tests.helpers import ROOT, TOKENIZER, VOCAB, clean_env, generate_main, load_tool

TOK = ["--vocab-file", str(TOKENIZER / "vocab.json"), "--merge-file", str(TOKENIZER / "merges.txt")]


def test_generate_and_export_from_megatron_core(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fx, "V", VOCAB)
    cfg = ModelConfig.from_preset("tiny-gpt3", vocab_size=VOCAB, num_layers=2, max_position_embeddings=256)
    model = GPTModel(cfg, seed=5)
    save_model(tmp_path / "ours", model)
    fx.write_dist(tmp_path / "dist", model, 2, te=True, common_in_dcp=True)
    outs = []
    for load in (tmp_path / "ours", tmp_path / "dist"):
        code = generate_main(["--load", str(load), *TOK, "--greedy", "--prompt", "Москва — столица",
                              "--out-seq-length", "8", "--sample-output-file", str(tmp_path / "o.jsonl")])
        assert code == 0, capsys.readouterr().err
        outs.append(json.loads((tmp_path / "o.jsonl").read_text())["text"])
    assert outs[0] == outs[1] and outs[0]

    ref = {k: v[:VOCAB] if k == "embed.weight" else v for k, v in model.state_dict().items()}
    convert = load_tool("convert_checkpoint")
    assert convert.main(["--load", str(tmp_path / "dist"), "--save", str(tmp_path / "back"),
                         "--to", "megatron_core", "--target-tensor-parallel-size", "2", "--quiet"]) == 0
    _, back, meta = load_any(tmp_path / "back")
    assert meta["format"] == "megatron_core" and all(torch.equal(back[k], ref[k]) for k in ref)


@pytest.mark.slow
def test_bad_megatron_input_exits_2(tmp_path):
    cfg = ModelConfig.from_preset("tiny-gpt3", vocab_size=1000, max_position_embeddings=64)
    fx.write_dist(tmp_path / "dist", GPTModel(cfg, seed=1), 1, te=False, common_in_dcp=False)
    (tmp_path / "dist" / "iter_0000020" / ".metadata").unlink()
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "--load", str(tmp_path / "dist"),
                           "--save", str(tmp_path / "out"), "--to", "megatron_ru"],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and ".metadata is missing" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_checkpoint_saved_by_megatron_core_itself(tmp_path):
    """The writer is megatron.core.dist_checkpointing.save (the installed megatron-core), run as a script."""
    pytest.importorskip("megatron.core.dist_checkpointing")
    from tests.e2e import mcore_dist_writer
    proc = subprocess.run([sys.executable, mcore_dist_writer.__file__, str(tmp_path / "mc"), "llama", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert detect_format(tmp_path / "mc") == "megatron_core_dist"
    model = mcore_dist_writer.model_for("llama")
    assert (fx.logits(load_model(tmp_path / "mc")) - fx.logits(model)).abs().max().item() <= 1e-5
