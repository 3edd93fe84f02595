"""Folders and files written by the tools get ordinary permissions (0777 / 0666 minus the umask):
convert_checkpoint.py --to hf / --to peft / --to megatron_ru, a training save and preprocessing."""
import os
import shutil
import stat
import subprocess
import sys

import pytest

from megatron_ru import GPTModel, ModelConfig
from megatron_ru.checkpoint.lora_files import save_adapters
from megatron_ru.checkpoint.model_io import save_model, write_config
from megatron_ru.model.lora import apply_lora
from tests.helpers import ROOT, TOKENIZER, VOCAB, clean_env, load_tool, pretrain

pytestmark = pytest.mark.slow


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def wrong_modes(root, mask):
    """Paths under `root` (itself included) whose mode is not what mkdir / open would give."""
    bad = []
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        want = (0o777 if stat.S_ISDIR(st.st_mode) else 0o666) & ~mask
        if stat.S_IMODE(st.st_mode) & 0o777 != want:
            bad.append(f"{path.relative_to(root.parent)} {stat.S_IMODE(st.st_mode):o} (want {want:o})")
    return bad


def test_converted_checkpoints(tmp_path, umask):
    cfg = ModelConfig.from_preset("tiny-gpt3", vocab_size=VOCAB, num_layers=2)
    ours = tmp_path / "ours"
    save_model(ours, GPTModel(cfg, seed=1))
    shutil.copytree(TOKENIZER, ours / "tokenizer")
    write_config(ours, cfg, 1, tokenizer={"type": "GPT2BPETokenizer", "vocab_file": "tokenizer/vocab.json",
                                          "merge_file": "tokenizer/merges.txt"})
    lora = GPTModel(cfg, seed=1)
    apply_lora(lora, rank=2, alpha=4.0, targets="qkv,fc2", seed=1)
    save_adapters(lora, tmp_path / "lora", base=str(ours))
    convert = load_tool("convert_checkpoint")
    for to, src in (("hf", ours), ("megatron_ru", ours), ("peft", tmp_path / "lora")):
        out = tmp_path / "out" / to  # the parent is created too
        assert convert.main(["--load", str(src), "--save", str(out), "--to", to, "--quiet"]) == 0
        assert wrong_modes(tmp_path / "out", umask) == [], to


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o022
    os.umask(old)


def test_training_save_and_preprocessed_data(tmp_path, umask_022):
    umask = umask_022
    data = tmp_path / "data" / "nested"
    (tmp_path / "in.jsonl").write_text('{"text": "Привет, мир."}\n{"text": "Ещё текст."}\n',
                                       encoding="utf-8")
    proc = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(tmp_path / "in.jsonl"),
                           "--output-prefix", str(data / "corpus"), "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file",
                           str(TOKENIZER / "vocab.json"), "--merge-file", str(TOKENIZER / "merges.txt"),
                           "--append-eod"], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert wrong_modes(tmp_path / "data", umask) == []
    pretrain(tmp_path, "run", "--train-iters", "1", "--micro-batch-size", "2",
             "--save", str(tmp_path / "ckpt" / "run"), "--save-interval", "1")
    assert (tmp_path / "ckpt" / "run" / "latest").is_file()
    assert wrong_modes(tmp_path / "ckpt", umask) == []
