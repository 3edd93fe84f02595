"""tools/preprocess_data.py end to end: outputs, worker parity, input formats, atomicity, bad input."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron_ru.data.indexed_dataset import IndexedDataset
from megatron_ru.data.tokenizers import GPT2BPETokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tools", "preprocess_data.py")
TOK_DIR = os.path.join(ROOT, "examples", "data", "tokenizer")
VOCAB, MERGES = os.path.join(TOK_DIR, "vocab.json"), os.path.join(TOK_DIR, "merges.txt")
CORPUS = os.path.join(ROOT, "examples", "data", "ru_demo.txt")
TOKENIZER_FLAGS = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", VOCAB, "--merge-file", MERGES]


def _load_tool():
    spec = importlib.util.spec_from_file_location("preprocess_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pool workers pickle its functions by module name
    spec.loader.exec_module(module)
    return module


TOOL = _load_tool()


def _cli(*args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, **kw)


@pytest.fixture(scope="module")
def documents():
    with open(CORPUS, encoding="utf-8") as f:
        return [b for b in f.read().split("\n\n") if b.strip()]


@pytest.fixture(scope="module")
def tokenizer():
    return GPT2BPETokenizer(VOCAB, MERGES)


def _write_jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc, "id": len(doc)}, ensure_ascii=False) + "\n")
    return str(path)


@pytest.mark.mpirun
def test_jsonl_one_and_two_workers_identical(tmp_path, documents, tokenizer, capsys):
    src = _write_jsonl(tmp_path / "in.jsonl", documents * 3)
    assert TOOL.main(["--input", src, *TOKENIZER_FLAGS, "--append-eod", "--output-prefix", str(tmp_path / "w1")]) == 0
    assert "docs/s" in capsys.readouterr().err
    result = _cli("--input", src, *TOKENIZER_FLAGS, "--append-eod", "--output-prefix", str(tmp_path / "w2"),
                  "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "MB/s" in result.stderr and "132 documents" in result.stderr
    for ext in (".bin", ".idx"):
        one = open(tmp_path / f"w1_text_document{ext}", "rb").read()
        assert one == open(tmp_path / f"w2_text_document{ext}", "rb").read()
    ds = IndexedDataset(str(tmp_path / "w1_text_document"))
    assert len(ds) == 3 * len(documents) and ds.dtype == np.uint16
    for i, doc in enumerate(documents * 3):
        assert ds[i].tolist() == tokenizer.tokenize(doc) + [tokenizer.eod]


def test_text_lines_blocks_and_auto(tmp_path, tokenizer):
    lines = tmp_path / "lines.txt"
    lines.write_text("первый документ\nвторой документ\n\n", encoding="utf-8")  # trailing blank: blocks
    blocks = tmp_path / "blocks.txt"
    blocks.write_text("первая строка\nвторая строка\n\n\nновый документ\r\n", encoding="utf-8")
    assert TOOL.main(["--input", str(lines), "--input-format", "lines", *TOKENIZER_FLAGS,
                      "--output-prefix", str(tmp_path / "l")]) == 0
    assert TOOL.main(["--input", str(blocks), *TOKENIZER_FLAGS, "--output-prefix", str(tmp_path / "b")]) == 0
    got_lines = IndexedDataset(str(tmp_path / "l_text_document"))
    assert [got_lines[i].tolist() for i in range(2)] == [tokenizer.tokenize("первый документ"),
                                                          tokenizer.tokenize("второй документ")]
    got_blocks = IndexedDataset(str(tmp_path / "b_text_document"))
    assert len(got_blocks) == 2
    assert tokenizer.detokenize(got_blocks[0]) == "первая строка\nвторая строка"
    assert tokenizer.detokenize(got_blocks[1]) == "новый документ"


@pytest.mark.mpirun
def test_bad_json_line_names_file_and_line_and_writes_nothing(tmp_path, documents):
    src = tmp_path / "broken.jsonl"
    _write_jsonl(src, documents[:300])
    with open(src, "a", encoding="utf-8") as f:
        f.write('{"text": "ok"}\n{"text": "unterminated\n')
    out = tmp_path / "out"
    result = _cli("--input", str(src), *TOKENIZER_FLAGS, "--output-prefix", str(out / "x"), "--workers", "2")
    assert result.returncode == 1
    assert f"broken.jsonl:{len(documents) + 2}: invalid JSON" in result.stderr
    assert result.stderr.count("error") == 1 and "Traceback" not in result.stderr
    assert os.listdir(out) == []


def test_missing_key_and_bad_utf8(tmp_path, capsys):
    src = tmp_path / "keys.jsonl"
    src.write_text('{"text": "a"}\n{"body": "b"}\n', encoding="utf-8")
    assert TOOL.main(["--input", str(src), *TOKENIZER_FLAGS, "--output-prefix", str(tmp_path / "k")]) == 1
    assert "keys.jsonl:2: key 'text' (--json-keys) is missing" in capsys.readouterr().err
    raw = tmp_path / "raw.txt"
    raw.write_bytes(b"fine\n\xff\xfe broken\n")
    assert TOOL.main(["--input", str(raw), *TOKENIZER_FLAGS, "--output-prefix", str(tmp_path / "r")]) == 1
    assert "raw.txt:2: not valid UTF-8" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["keys.jsonl", "raw.txt"]


def test_missing_tokenizer_and_input_files(tmp_path, capsys):
    src = _write_jsonl(tmp_path / "in.jsonl", ["текст"])
    assert TOOL.main(["--input", src, "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(tmp_path / "v.json"),
                      "--merge-file", MERGES, "--output-prefix", str(tmp_path / "o")]) == 1
    assert "vocab file (--vocab-file) not found: " + str(tmp_path / "v.json") in capsys.readouterr().err
    assert TOOL.main(["--input", str(tmp_path / "none*.jsonl"), *TOKENIZER_FLAGS,
                      "--output-prefix", str(tmp_path / "o")]) == 1
    assert "--input" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.mpirun)])
def test_ctrl_c_leaves_no_files(tmp_path, workers):
    """Input from a pipe that stays open: interrupt while running, nothing may be left behind."""
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, SCRIPT, "--input", str(fifo), "--input-format", "jsonl",
                             *TOKENIZER_FLAGS, "--output-prefix", str(out / "x"), "--workers", str(workers)],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        with open(fifo, "w", encoding="utf-8") as writer:
            for i in range(200):
                writer.write(json.dumps({"text": f"документ номер {i}"}, ensure_ascii=False) + "\n")
            writer.flush()
            deadline = time.time() + 20
            while time.time() < deadline and not (out.exists() and any(".tmp-" in f for f in os.listdir(out))):
                time.sleep(0.05)
            assert any(".tmp-" in f for f in os.listdir(out)), "the tool never started writing"
            time.sleep(1.0)  # let the pool start and the first batch go through
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "interrupted; no output written" in err
    assert "Traceback" not in err
    assert os.listdir(out) == []


def test_shipped_demo_dataset_is_up_to_date(tmp_path):
    assert TOOL.main(["--input", CORPUS, "--input-format", "blocks", *TOKENIZER_FLAGS, "--append-eod",
                      "--output-prefix", str(tmp_path / "demo")]) == 0
    for ext in (".bin", ".idx"):
        shipped = os.path.join(ROOT, "examples", "data", "ru_demo_text_document" + ext)
        assert open(shipped, "rb").read() == open(tmp_path / ("demo_text_document" + ext), "rb").read()


def test_several_json_keys_write_one_dataset_each(tmp_path, tokenizer, capsys):
    src = tmp_path / "two.jsonl"
    records = [{"title": "Заголовок", "text": "Текст документа."}, {"title": "Второй", "text": "Ещё текст."}]
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records), encoding="utf-8")
    assert TOOL.main(["--input", str(src), "--json-keys", "text", "title", *TOKENIZER_FLAGS,
                      "--output-prefix", str(tmp_path / "k")]) == 0
    for key in ("text", "title"):
        ds = IndexedDataset(str(tmp_path / f"k_{key}_document"))
        assert [tokenizer.detokenize(ds[i]) for i in range(len(ds))] == [r[key] for r in records]
    txt = tmp_path / "plain.txt"
    txt.write_text("строка\n", encoding="utf-8")
    assert TOOL.main(["--input", str(txt), "--json-keys", "text", "title", *TOKENIZER_FLAGS,
                      "--output-prefix", str(tmp_path / "p")]) == 1
    assert "several --json-keys need jsonl inputs" in capsys.readouterr().err
