"""Files that lie are refused before allocation: crafted safetensors headers, HF / Megatron / our configs
whose sizes disagree with the weights, broken torch_dist shards, .idx/.bin pairs that disagree or change
under a reader. Each refusal is one line naming the file (and the tensor), a UsageError (exit status 2)."""
import json
import os
import pickle
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_ru import GPTModel, ModelConfig
from megatron_ru.checkpoint.convert import convert
from megatron_ru.checkpoint.load import load_any, read_any_config
from megatron_ru.checkpoint.safetensors_io import SafetensorsError, read_safetensors
from megatron_ru.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError
from megatron_ru.errors import EXIT_USAGE, UsageError, exit_code_of
from tests.helpers import tiny_hf_export

A = torch.arange(6, dtype=torch.float32).reshape(2, 3)
B = torch.arange(4, dtype=torch.float32)
GOOD = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]}}
DATA = A.numpy().tobytes() + B.numpy().tobytes()


def write_st(path, header, data, n=None):
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob) if n is None else n) + blob + data)
    return path


def lie(**fields):
    """GOOD with fields replaced: lie(a__shape=[3, 3])."""
    header = json.loads(json.dumps(GOOD))
    for key, value in fields.items():
        name, field = key.split("__")
        header[name][field] = value
    return header


# (header, data, header length, what our message says, the tensor it names)
CASES = {
    "before_data": (lie(a__data_offsets=[-16, 8]), DATA, None, r"data_offsets \[-16, 8\] are not", "a"),
    "past_end": (lie(b__data_offsets=[24, 48], b__shape=[6]), DATA, None, "ends at byte 48 of a 40-byte", "b"),
    "size_mismatch": (lie(a__shape=[3, 3]), DATA, None, r"hold 24 bytes, shape \[3, 3\] of F32 needs 36", "a"),
    "unknown_dtype": (lie(a__dtype="Q7"), DATA, None, "unsupported dtype 'Q7'", "a"),
    "negative_dim": (lie(a__shape=[-2, -3]), DATA, None, "not a list of non-negative integers", "a"),
    "float_dim": (lie(a__shape=[2.0, 3]), DATA, None, "not a list of non-negative integers", "a"),
    "overlap": (lie(b__data_offsets=[8, 24]), DATA[:24], None, "overlaps tensor a", "b"),
    "gap": (lie(b__data_offsets=[32, 48]), DATA + bytes(8), None, r"leaving bytes \[24, 32\)", "b"),
    "trailing": (GOOD, DATA + bytes(8), None, "trailing bytes", None),
    "truncated": (GOOD, DATA[:30], None, "ends at byte 40 of a 30-byte data section", "b"),
    "metadata": ({**GOOD, "__metadata__": {"x": 1}}, DATA, None, "__metadata__ must map strings", None),
    "repeated": (b'{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"a":{"dtype":"F32","shape":[4],'
                 b'"data_offsets":[24,40]}}', DATA, None, "'a' appears twice", None),
    "header_length": (GOOD, DATA, 2**40, "header length 1099511627776 runs past the file end", None),
    "not_json": (b"{nope", DATA, None, "not UTF-8 JSON", None),
    "not_object": ([1, 2], DATA, None, "JSON list, not an object", None),
    "no_offsets": (lie(a__data_offsets=None), DATA, None, "data_offsets None are not", "a"),
}


def test_genuine_safetensors_reads_back(tmp_path):
    got = read_safetensors(write_st(tmp_path / "ok.safetensors", GOOD, DATA))
    assert torch.equal(got["a"], A) and torch.equal(got["b"], B)


@pytest.mark.parametrize("case", sorted(CASES))
def test_lying_safetensors_header_refused_before_any_tensor(tmp_path, case):
    header, data, n, message, tensor = CASES[case]
    path = write_st(tmp_path / f"{case}.safetensors", header, data, n)
    with pytest.raises(SafetensorsError, match=message) as err:
        read_safetensors(path)
    text = str(err.value)
    assert str(path) in text and "\n" not in text and exit_code_of(err.value) == EXIT_USAGE
    if tensor is not None:
        assert f"tensor {tensor}" in text
    safetensors = pytest.importorskip("safetensors.torch")
    with pytest.raises(Exception):  # the library refuses every one of them too (measured)
        safetensors.load_file(str(path))


# ---- configs against weights --------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lying")
    tiny_hf_export(root)
    return root


def edited(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    meta = json.loads((dst / "config.json").read_text())
    meta.pop("megatron_ru", None)  # HF's own fields only, as a hub download
    meta.update(changes)
    (dst / "config.json").write_text(json.dumps(meta))
    return dst


@pytest.mark.parametrize("changes, message", [
    ({"num_hidden_layers": 10**6}, r"num_hidden_layers=1000000 is beyond any model"),
    ({"num_hidden_layers": 10**7}, r"num_hidden_layers=10000000 is beyond any model"),
    ({"num_hidden_layers": 50_000}, r"num_hidden_layers=50000, but the weights hold layers 0\.\.1 \(2 layers\)"),
    ({"num_hidden_layers": 3}, r"num_hidden_layers=3, but the weights hold layers 0\.\.1"),
    ({"hidden_size": 128, "head_dim": 32}, r"tensor model\.embed_tokens\.weight has shape \(100, 64\).*\(100, 128\)"),
    ({"vocab_size": 5000}, r"tensor model\.embed_tokens\.weight has shape \(100, 64\).*\(5000, 64\)"),
    ({"num_key_value_heads": 4}, r"tensor model\.layers\.0\.self_attn\.k_proj\.weight has shape"),
    ({"intermediate_size": 10**8}, r"intermediate_size=100000000 is beyond any model"),
])
def test_hf_config_checked_against_weights_first(hf_dir, tmp_path, changes, message):
    src = edited(hf_dir / "hf", tmp_path / "hf", **changes)
    for read in (read_any_config, load_any):
        start = time.monotonic()
        with pytest.raises(UsageError, match=message) as err:
            read(src)
        assert "config.json" in str(err.value) and "\n" not in str(err.value)
        assert time.monotonic() - start < 10  # no per-layer work for a million layers


def test_hf_index_that_lies(hf_dir, tmp_path):
    src = edited(hf_dir / "hf", tmp_path / "hf")
    names = list(read_safetensors(src / "model.safetensors"))
    index = src / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {n: "../../etc/passwd" for n in names}}))
    with pytest.raises(UsageError, match=r"names shard '\.\./\.\./etc/passwd' outside its directory"):
        read_any_config(src)
    shutil.copy(src / "model.safetensors", src / "part2.safetensors")
    index.write_text(json.dumps({"weight_map": {**{n: "model.safetensors" for n in names},
                                                names[0]: "part2.safetensors"}}))
    with pytest.raises(UsageError, match=f"tensor {names[0]} appears in both"):
        read_any_config(src)


def test_lying_safetensors_in_hf_dir_names_file_and_tensor(hf_dir, tmp_path):
    src = edited(hf_dir / "hf", tmp_path / "hf")
    raw = bytearray((src / "model.safetensors").read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    name = "model.embed_tokens.weight"
    a, b = header[name]["data_offsets"]
    header[name]["data_offsets"] = [a - 64, b - 64]  # points before its place (into the header at 0)
    blob = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    (src / "model.safetensors").write_bytes(bytes(raw[:8]) + blob + bytes(raw[8 + n:]))
    with pytest.raises(SafetensorsError, match=f"model.safetensors: tensor {name}"):
        load_any(src)


def test_our_config_json_checked_against_weights(hf_dir, tmp_path):
    for layers, message in ((10**6, "num_layers=1000000 is beyond any model"),
                            (3, r"num_layers=3, but the weights hold layers 0\.\.1")):
        dst = tmp_path / f"ours{layers}"
        shutil.copytree(hf_dir / "ours", dst)
        meta = json.loads((dst / "config.json").read_text())
        meta["model"]["num_layers"] = layers
        (dst / "config.json").write_text(json.dumps(meta))
        with pytest.raises(UsageError, match=message):
            load_any(dst)


# ---- torch_dist ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dist_dir(tmp_path_factory):
    from tests.mcore_fixtures import write_dist
    root = tmp_path_factory.mktemp("dist") / "dist"
    cfg = ModelConfig.from_preset("tiny-gpt3", num_layers=2, vocab_size=1000, max_position_embeddings=64)
    write_dist(root, GPTModel(cfg, seed=3), 2, False, True)  # common state inside the DCP files
    return root


def _metadata_edit(it: Path, change) -> None:
    from megatron_ru.checkpoint.megatron_core_dist import _metadata
    metadata = _metadata(it)
    change(metadata)
    with open(it / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


def _truncate(it):
    with open(it / "__0_0.distcp", "r+b") as f:
        f.truncate(1000)


def _scribble(it):
    from megatron_ru.checkpoint.megatron_core_dist import _metadata
    info = next(v for k, v in _metadata(it).storage_data.items() if k.fqn == "embedding.word_embeddings.weight")
    with open(it / info.relative_path, "r+b") as f:  # the tensor's serialized header
        f.seek(info.offset)
        f.write(b"\xff" * 64)


def _offset_past_end(it):
    def change(metadata):
        index = next(k for k in metadata.storage_data if k.fqn == "embedding.word_embeddings.weight")
        metadata.storage_data[index].offset = 10**9
    _metadata_edit(it, change)


def _huge_tensor(it):
    def change(metadata):
        metadata.state_dict_metadata["embedding.word_embeddings.weight"].size = torch.Size([10**9, 64])
    _metadata_edit(it, change)


@pytest.mark.parametrize("damage, message", [
    (lambda it: (it / "__0_0.distcp").unlink(), r"__0_0\.distcp is missing: the torch_dist checkpoint is incomplete"),
    (_truncate, r"__0_0\.distcp is truncated or its metadata lies: \S+ needs bytes"),
    (_offset_past_end, r"__0_0\.distcp is truncated or its metadata lies: embedding\.word_embeddings\.weight"),
    (_huge_tensor, r"the chunks of embedding\.word_embeddings\.weight do not cover its size"),
    (lambda it: (it / ".metadata").unlink(), r"\.metadata is missing"),
    (_scribble, r"cannot read the torch_dist checkpoint \S+iter_0000020: a stored item is corrupt"),
])
def test_broken_torch_dist_is_one_line(dist_dir, tmp_path, damage, message):
    src = tmp_path / "d"
    shutil.copytree(dist_dir, src)
    damage(src / "iter_0000020")
    with pytest.raises(UsageError, match=message) as err:
        convert(src, tmp_path / "out", "megatron_ru", quiet=True)
    assert "\n" not in str(err.value) and len(str(err.value)) < 600
    assert not (tmp_path / "out").exists()


def test_megatron_args_bounded(dist_dir, tmp_path):
    from megatron_ru.checkpoint.megatron_legacy import config_from_args
    from tests.mcore_fixtures import core_args
    args = core_args(ModelConfig.from_preset("tiny-gpt3", vocab_size=1000), 1, 1, False)
    args.num_layers = 10**7
    with pytest.raises(UsageError, match="num_layers=10000000 is beyond any model"):
        config_from_args(args, None, "iter/common.pt")


# ---- indexed datasets ---------------------------------------------------------------------------
def _dataset(prefix, dtype=np.uint16):
    with IndexedDatasetBuilder(str(prefix), dtype) as builder:
        for i in range(8):
            builder.add_document(np.arange(10 + i) % 1000)
    return str(prefix)


def test_wider_dtype_code_is_named(tmp_path):
    prefix = _dataset(tmp_path / "d")
    raw = bytearray(open(prefix + ".idx", "rb").read())
    raw[17] = 4  # int32 for uint16 data: the .bin holds half the bytes the index expects
    open(prefix + ".idx", "wb").write(bytes(raw))
    with pytest.raises(IndexedDatasetError, match=r"d\.idx: dtype code 4 \(int32, 4 bytes per token\) disagrees "
                                                  r"with the size of .*d\.bin.*2 bytes per token \(dtype code "
                                                  r"3 \(int16\) or 8 \(uint16\)\)"):
        IndexedDataset(prefix)


@pytest.mark.parametrize("change, message", [
    (lambda p: os.truncate(p, 10), r"size \d+ → 10 bytes"),
    (lambda p: (open(p, "r+b").write(b"\x01\x02"), os.utime(p, ns=(1, 1))), "rewritten in place, same size"),
])
def test_data_file_changed_under_a_reader(tmp_path, change, message):
    prefix = _dataset(tmp_path / "d")
    ds = IndexedDataset(prefix)
    assert list(ds[1]) == list(range(11))
    change(prefix + ".bin")
    with pytest.raises(IndexedDatasetError, match=r"d\.bin changed under the run \(" + message):
        ds[2]
    with pytest.raises(IndexedDatasetError, match="changed under the run"):
        ds.document(0)
    ds = pickle.loads(pickle.dumps(ds))  # a copy in a data-loader worker checks against the first open
    with pytest.raises(IndexedDatasetError, match="changed under the run"):
        ds[0]
