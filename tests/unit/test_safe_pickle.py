"""Untrusted checkpoints never execute code: crafted files for each pickle-based loader, opened through the real entry points."""
import argparse
import collections
import fractions
import os
import pickle
import random
import re

import numpy as np
import pytest
import torch

from megatron_ru import GPTModel, ModelConfig, runtime
from megatron_ru.checkpoint import safe_pickle
from megatron_ru.checkpoint.convert import convert
from megatron_ru.checkpoint.hf import read_safetensors
from megatron_ru.checkpoint.load import load_any
from megatron_ru.checkpoint.model_io import save_model
from megatron_ru.parallel.state import ParallelState
from tests.helpers import REFUSED, Payload, generate_main, load_tool
from tests.mcore_fixtures import write_dist, write_torch
from tests.foreign_fixtures import write_rugpts


def poison(path, marker, key="payload", value=None):
    blob = torch.load(path, map_location="cpu", weights_only=False)
    target = blob[0] if isinstance(blob, list) else blob
    target[key] = Payload(marker) if value is None else value
    torch.save(blob, path)


@pytest.fixture(scope="module")
def model():
    return GPTModel(ModelConfig.from_preset("tiny-gpt3", max_position_embeddings=64), ParallelState.single(),
                    seed=3)


@pytest.fixture(scope="module")
def wide():  # the bundled tokenizer's vocabulary fits
    return GPTModel(ModelConfig.from_preset("tiny-gpt3", vocab_size=2048, max_position_embeddings=64),
                    ParallelState.single(), seed=3)


def ours(d, model):
    save_model(d, model)
    return d / "release" / "mp_rank_00_model_states.pt"


def hf_bin(d, model, tmp):
    ours(tmp / "ours", model)
    convert(tmp / "ours", d, "hf", quiet=True)
    torch.save(dict(read_safetensors(d / "model.safetensors")), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    return d / "pytorch_model.bin"


def legacy(d, model):
    it = d / "iter_0000050" / "mp_rank_00"
    it.mkdir(parents=True)
    torch.save({"model": {"language_model": {}}, "checkpoint_version": 3.0, "iteration": 50,
                "args": argparse.Namespace(num_layers=2)}, it / "model_optim_rng.pt")
    (d / "latest_checkpointed_iteration.txt").write_text("50")
    return it / "model_optim_rng.pt"


def core_torch(d, model):
    write_torch(d, model, 1, 1, False)
    return d / "iter_0000020" / "mp_rank_00" / "model_optim_rng.pt"


def dist_common(d, model):
    write_dist(d, model, 1, False, common_in_dcp=False)
    return d / "iter_0000020" / "common.pt"


def rugpts(d, model):
    write_rugpts(d, model, layouts=None)
    return d / "1000" / "mp_rank_00_model_states.pt"


BUILDERS = {"ours": ours, "megatron_legacy": legacy, "megatron_core": core_torch,
            "torch_dist common.pt": dist_common, "ru_gpts": rugpts}


def one_line_refusal(capsys, path):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert str(path) in err[0] and REFUSED in err[0], err[0]


@pytest.mark.parametrize("fmt", [*BUILDERS, "hf pytorch_model.bin"])
def test_convert_refuses_a_payload_in_every_format(tmp_path, capsys, model, fmt):
    marker = tmp_path / "PWNED"
    src = tmp_path / "src" if fmt != "hf pytorch_model.bin" else tmp_path / "hf"
    path = BUILDERS[fmt](src, model) if fmt in BUILDERS else hf_bin(src, model, tmp_path)
    poison(path, marker)
    capsys.readouterr()
    conv = load_tool("convert_checkpoint")
    code = runtime.run(conv.main, "convert_checkpoint.py",
                       ["--load", str(src), "--save", str(tmp_path / "out"), "--to", "megatron_ru", "--quiet",
                        "--vocab-size", "1000"])
    assert code == 2 and not marker.exists() and not (tmp_path / "out").exists()
    one_line_refusal(capsys, path)


@pytest.mark.parametrize("fmt", ["ours", "megatron_core"])
def test_generate_and_evaluate_refuse_a_payload(tmp_path, capsys, model, wide, fmt):
    marker = tmp_path / "PWNED"
    src = tmp_path / "src"
    path = BUILDERS[fmt](src, wide if fmt == "ours" else model)
    poison(path, marker)
    tok = ["--vocab-file", "examples/data/tokenizer/vocab.json", "--merge-file", "examples/data/tokenizer/merges.txt"]
    capsys.readouterr()
    assert generate_main(["--load", str(src), *tok, "--prompt", "x", "--max-new-tokens", "2"]) == 2
    one_line_refusal(capsys, path)
    from megatron_ru.evaluation import cli as evaluate
    text = tmp_path / "t.txt"
    text.write_text("привет мир\n")
    assert runtime.run(evaluate.main, "evaluate.py", ["--load", str(src), *tok, "--input", str(text)]) == 2
    one_line_refusal(capsys, path)
    assert not marker.exists()


def test_trust_flag_loads_a_genuine_but_unusual_file(tmp_path, capsys, model):
    src = tmp_path / "core"
    path = core_torch(src, model)
    poison(path, None, key="note", value=fractions.Fraction(1, 3))  # harmless, but not a checkpoint type
    conv = load_tool("convert_checkpoint")
    argv = ["--load", str(src), "--save", str(tmp_path / "out"), "--to", "megatron_ru", "--quiet"]
    assert runtime.run(conv.main, "convert_checkpoint.py", argv) == 2
    assert "refusing to unpickle fractions.Fraction" in capsys.readouterr().err
    assert runtime.run(conv.main, "convert_checkpoint.py", argv + ["--trust-checkpoint"]) == 0
    full = load_any(tmp_path / "out")[1]
    assert torch.equal(full["blocks.0.attn.qkv.weight"], model.state_dict()["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_scan_names_the_global_without_running_it(tmp_path, protocol):
    marker, path = tmp_path / "PWNED", tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": Payload(marker)}}, path, pickle_protocol=protocol)
    with pytest.raises(safe_pickle.UnsafeCheckpointError, match=re.escape(f"{path}: {REFUSED}")):
        safe_pickle.check_tree(tmp_path)
    safe_pickle.check_tree(tmp_path, trust=True)  # --trust-checkpoint: no scan
    assert not marker.exists()


def test_stack_global_names_come_from_memoized_strings():
    data = pickle.dumps([os.system, os.getcwd, collections.OrderedDict()], protocol=4)
    assert safe_pickle.pickle_globals(data) == ["posix.system", "posix.getcwd", "collections.OrderedDict"]


def test_genuine_checkpoint_types_pass_and_rebuild(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    blob = {"module": collections.OrderedDict(w=torch.nn.Parameter(torch.randn(3, 2))),
            "args": argparse.Namespace(params_dtype=torch.bfloat16, shape=torch.Size([2, 3])),
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
            "scalar": np.float32(1.5), "ids": {1, 2}, "raw": b"\x00\x01", "loss_scaler": DynamicLossScaler(2.0**12, 1000, 1, False, False)}
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save(blob, path)
    safe_pickle.check_file(path)
    back = safe_pickle.load(path)
    assert torch.equal(back["module"]["w"], blob["module"]["w"]) and back["args"] == blob["args"]
    assert back["rng"]["python"] == blob["rng"]["python"] and back["scalar"] == blob["scalar"]
    assert np.array_equal(back["rng"]["numpy"][1], blob["rng"]["numpy"][1])
    assert isinstance(back["loss_scaler"], safe_pickle.StandIn)  # inert: nothing of DeepSpeed runs


def test_a_file_that_is_not_a_zip_cannot_be_scanned(tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(safe_pickle.UnsafeCheckpointError, match="not a torch zip archive"):
        safe_pickle.check_file(path)
