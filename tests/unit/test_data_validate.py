"""Data validation before compute: corrupt indexes, dtype flips, out-of-vocabulary ids, tokenizer records;
and DeepSpeed JSON type checks. Each case used to train silently or crash mid-run."""
import json
import os
import shutil
import struct
from types import SimpleNamespace

import numpy as np
import pytest

from megatron_ru.config import ConfigError
from megatron_ru.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_ru.data.tokenizers import build_tokenizer
from megatron_ru.data.validate import (DataValidationError, read_tokenizer_record, tokenizer_files,
                                       tokenizer_fingerprint, validate_dataset, write_tokenizer_record)
from megatron_ru.training import ds_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOK = os.path.join(ROOT, "examples", "data", "tokenizer")


def make(prefix, docs, dtype=np.uint16):
    with IndexedDatasetBuilder(str(prefix), dtype) as b:
        for d in docs:
            b.add_document(np.asarray(d))
    return IndexedDataset(str(prefix))


DOCS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10], [11, 12]]


def test_clean_dataset_passes_and_is_cached(tmp_path):
    ds = make(tmp_path / "ok", DOCS)
    stats = validate_dataset(ds, vocab_size=13, cache_path=str(tmp_path / "c"))
    assert (stats["min_id"], stats["max_id"]) == (1, 12)
    cached = [f for f in os.listdir(tmp_path / "c") if "-validated-" in f]
    assert len(cached) == 1
    with pytest.raises(DataValidationError, match="token id 12 in document 4"):
        validate_dataset(ds, vocab_size=12, cache_path=str(tmp_path / "c"))  # from the cache


def test_out_of_vocabulary_id_names_prefix_and_document(tmp_path):
    ds = make(tmp_path / "oov", DOCS[:3] + [[1, 60000, 2]] + DOCS[3:])
    with pytest.raises(DataValidationError) as e:
        validate_dataset(ds, vocab_size=1815, cache_path=str(tmp_path / "c"))
    msg = str(e.value)
    assert str(tmp_path / "oov") in msg and "token id 60000 in document 3 (token 1)" in msg
    assert "vocabulary of 1815" in msg and "\n" not in msg


def test_dtype_flip_is_reported(tmp_path):
    make(tmp_path / "flip", DOCS)
    idx = tmp_path / "flip.idx"
    raw = bytearray(idx.read_bytes())
    raw[17] = 1  # dtype code: uint8 for uint16 data
    idx.write_bytes(bytes(raw))
    with pytest.raises(DataValidationError, match=r"2 bytes per token but the dtype code says uint8.*dtype "
                                                  r"byte of the \.idx is wrong"):
        validate_dataset(IndexedDataset(str(tmp_path / "flip")), vocab_size=100, cache_path=str(tmp_path / "c"))


def test_corrupt_pointer_and_document_index(tmp_path):
    make(tmp_path / "ptr", DOCS)
    idx = tmp_path / "ptr.idx"
    raw = bytearray(idx.read_bytes())
    n = len(DOCS)
    ptr_off = 34 + 4 * n
    raw[ptr_off + 8 * 2:ptr_off + 8 * 3] = struct.pack("<q", 999)  # pointer of sequence 2
    idx.write_bytes(bytes(raw))
    with pytest.raises(DataValidationError, match=r"pointer of sequence 2 \(document 2\) is 999, the sizes "
                                                  r"before it put it at byte 10"):
        validate_dataset(IndexedDataset(str(tmp_path / "ptr")), cache_path=str(tmp_path / "c"))
    make(tmp_path / "doc", DOCS)
    idx = tmp_path / "doc.idx"
    raw = bytearray(idx.read_bytes())
    doc_off = 34 + 12 * n
    raw[doc_off + 8 * 3:doc_off + 8 * 4] = struct.pack("<q", 1)  # document index 0 1 2 1 4 5
    idx.write_bytes(bytes(raw))
    with pytest.raises(DataValidationError, match="document index decreases at document 2"):
        validate_dataset(IndexedDataset(str(tmp_path / "doc")), cache_path=str(tmp_path / "c"))


def test_dtype_too_small_for_vocabulary(tmp_path):
    ds = make(tmp_path / "small", DOCS, dtype=np.uint16)
    with pytest.raises(DataValidationError, match="uint16 cannot hold the ids of a 100000-token vocabulary"):
        validate_dataset(ds, vocab_size=100000, cache_path=str(tmp_path / "c"))


def test_tokenizer_record_warns_or_stops(tmp_path):
    ds = make(tmp_path / "rec", DOCS + [[8000]])
    write_tokenizer_record(str(tmp_path / "rec"), tokenizer_type="GPT2BPETokenizer", vocab_size=8192,
                           files={"vocab_file": str(tmp_path / "rec.idx")})
    theirs = read_tokenizer_record(str(tmp_path / "rec"))["fingerprint"]
    with pytest.raises(DataValidationError, match=r"token id 8000 in document 5 .*tokenized with another "
                                                  r"tokenizer \(GPT2BPETokenizer, vocabulary 8192"):
        validate_dataset(ds, vocab_size=1815, fingerprint="ours", cache_path=str(tmp_path / "c"))
    warnings = []
    validate_dataset(ds, vocab_size=9000, fingerprint="ours", cache_path=str(tmp_path / "c"),
                     warn=warnings.append)
    assert len(warnings) == 1 and "another tokenizer" in warnings[0] and "training goes on" in warnings[0]
    warnings.clear()
    validate_dataset(ds, vocab_size=9000, fingerprint=theirs, cache_path=str(tmp_path / "c"),
                     warn=warnings.append)
    assert not warnings


def test_preprocess_records_the_tokenizer(tmp_path):
    from tools import preprocess_data as tool
    src = tmp_path / "in.txt"
    src.write_text("Москва — столица России.\n\nВторой документ.\n", encoding="utf-8")
    files = {"vocab_file": os.path.join(TOK, "vocab.json"), "merge_file": os.path.join(TOK, "merges.txt")}
    args = tool.parse_args(["--input", str(src), "--tokenizer-type", "GPT2BPETokenizer",
                            "--vocab-file", files["vocab_file"], "--merge-file", files["merge_file"],
                            "--append-eod", "--output-prefix", str(tmp_path / "out")])
    (prefix,) = tool.run(args, open(os.devnull, "w"))
    record = read_tokenizer_record(prefix)
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=files["vocab_file"], merge_file=files["merge_file"])
    assert record["vocab_size"] == tok.vocab_size and record["tokenizer_type"] == "GPT2BPETokenizer"
    assert record["fingerprint"] == tokenizer_fingerprint(tokenizer_files(**files))
    other = tmp_path / "vocab2.json"
    shutil.copyfile(files["vocab_file"], other)
    other.write_text(other.read_text() + " ")
    assert tokenizer_fingerprint(dict(files, vocab_file=str(other))) != record["fingerprint"]
    validate_dataset(IndexedDataset(prefix), vocab_size=tok.vocab_size, fingerprint=record["fingerprint"],
                     cache_path=str(tmp_path / "c"), warn=pytest.fail)


def _ds_args(path):
    return SimpleNamespace(deepspeed_config=str(path), micro_batch_size=None, global_batch_size=None,
                           fp16=False, bf16=False, clip_grad=1.0)


@pytest.mark.parametrize("config,message", [
    ({"train_micro_batch_size_per_gpu": "eight"}, 'train_micro_batch_size_per_gpu must be an integer, got "eight"'),
    ({"train_batch_size": 8.5}, "train_batch_size must be an integer, got 8.5"),
    ({"fp16": {"enabled": "true"}}, 'fp16.enabled must be true or false, got "true"'),
    ({"zero_optimization": {"stage": "2"}}, 'zero_optimization.stage must be an integer, got "2"'),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage must be 0, 1, 2 or 3, got 4"),
    ({"gradient_clipping": [1]}, "gradient_clipping must be a number, got [1]"),
    ({"optimizer": {"type": "Adam", "params": 3}}, "optimizer.params must be a JSON object, got 3"),
    ({"train_micro_batch_size_per_gpu": 0}, "train_micro_batch_size_per_gpu must be positive, got 0"),
])
def test_deepspeed_json_types_are_checked(tmp_path, config, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError) as e:
        ds_config.build(_ds_args(path), 1, lambda m: None)
    assert message in str(e.value) and str(path) in str(e.value)


def test_bf16_skips_non_finite_steps_by_default(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"bf16": {"enabled": True}}))
    ds, _, precision = ds_config.build(_ds_args(path), 1, lambda m: None)
    assert precision == "bf16" and ds["bf16"]["check_grad_overflow"] is True
