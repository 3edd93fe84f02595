"""Lying files end to end: tools/convert_checkpoint.py refuses a lying safetensors header, an HF config
claiming 10^6 / 10^7 layers (quickly, in little memory) and a broken torch_dist shard with exit status 2,
one line and nothing at --save; pretrain_gpt.py ends with one line when its .bin is cut under the run."""
import json
import os
import shutil
import struct
import subprocess
import sys
import time

import pytest

from megatron_ru import GPTModel, ModelConfig
from tests.helpers import BASE, ROOT, clean_env, tiny_hf_export

pytestmark = pytest.mark.slow
AS_LIMIT = 2 * 2**30  # address space of the converter: a million-layer key map would not fit


def run_limited(args, limit=AS_LIMIT, timeout=300):
    """(exit status, stderr lines, the child's peak RSS in MB) of a tool run under RLIMIT_AS=limit,
    measured by a wrapper process so only this child's peak counts."""
    wrapper = ("import resource, subprocess, sys\n"
               f"lim = {limit}\n"
               "p = subprocess.run(sys.argv[1:], stderr=subprocess.PIPE, text=True,\n"
               "                   preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (lim, lim)))\n"
               "sys.stderr.write(p.stderr)\n"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
               "sys.exit(p.returncode)\n")
    proc = subprocess.run([sys.executable, "-c", wrapper, sys.executable, *args], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return proc.returncode, lines, int(proc.stdout.split()[-1]) / 1024


def convert_cli(src, dst):
    return run_limited(["tools/convert_checkpoint.py", "--load", str(src), "--save", str(dst),
                        "--to", "megatron_ru", "--quiet"])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return tiny_hf_export(tmp_path_factory.mktemp("lying_cli"))


@pytest.mark.parametrize("layers", [10**6, 10**7, 50_000])
def test_hf_config_with_absurd_layer_count_refused_small_and_fast(hf_dir, tmp_path, layers):
    src = tmp_path / "hf"
    shutil.copytree(hf_dir, src)
    meta = json.loads((src / "config.json").read_text())
    meta.pop("megatron_ru")
    meta["num_hidden_layers"] = layers
    (src / "config.json").write_text(json.dumps(meta))
    start = time.monotonic()
    code, lines, peak_mb = convert_cli(src, tmp_path / "out")
    assert code == 2 and len(lines) == 1, lines
    assert f"config.json: num_hidden_layers={layers}" in lines[0]
    assert peak_mb < 1024 and time.monotonic() - start < 120, (peak_mb, time.monotonic() - start)
    assert not (tmp_path / "out").exists()


def test_safetensors_offsets_before_the_data_refused(hf_dir, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(hf_dir, src)
    raw = (src / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    begin, end = header["model.embed_tokens.weight"]["data_offsets"]
    header["model.embed_tokens.weight"]["data_offsets"] = [begin - n, end - n]  # into the header
    blob = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    (src / "model.safetensors").write_bytes(raw[:8] + blob + raw[8 + n:])
    code, lines, _ = convert_cli(src, tmp_path / "out")
    assert code == 2 and len(lines) == 1, lines
    assert "model.safetensors: tensor model.embed_tokens.weight" in lines[0]
    assert not (tmp_path / "out").exists()


def test_torch_dist_missing_shard_one_line(tmp_path):
    from tests.mcore_fixtures import write_dist
    cfg = ModelConfig.from_preset("tiny-gpt3", num_layers=2, vocab_size=1000, max_position_embeddings=64)
    write_dist(tmp_path / "dist", GPTModel(cfg, seed=3), 2, False, False)
    (tmp_path / "dist" / "iter_0000020" / "__0_0.distcp").unlink()
    code, lines, _ = convert_cli(tmp_path / "dist", tmp_path / "out")
    assert code == 2 and len(lines) == 1 and "__0_0.distcp is missing" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_bin_truncated_under_a_training_run(tmp_path):
    for ext in (".bin", ".idx"):
        shutil.copy(ROOT / "examples" / "data" / f"ru_demo_text_document{ext}", tmp_path / f"d{ext}")
    args = [sys.executable, "pretrain_gpt.py", *BASE, "--data-path", str(tmp_path / "d"),
            "--vocab-file", "examples/data/tokenizer/vocab.json", "--merge-file", "examples/data/tokenizer/merges.txt",
            "--data-cache-path", str(tmp_path / "cache"), "--micro-batch-size", "1",
            "--train-iters", "100000", "--lr-decay-iters", "100000"]
    with open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.Popen(args, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            steps = 0
            for line in proc.stdout:  # a few steps, then the data file is cut
                steps += line.startswith("iter ")
                if steps == 3:
                    os.truncate(tmp_path / "d.bin", 100)
                    break
            assert steps == 3, (tmp_path / "err.txt").read_text()[-2000:]
            proc.stdout.read()
            code = proc.wait(timeout=120)
        finally:
            proc.kill()
    lines = [line for line in (tmp_path / "err.txt").read_text().splitlines() if line.strip()]
    assert code == 2, lines[-20:]
    assert lines == [f"pretrain_gpt.py: error: {tmp_path / 'd.bin'} changed under the run (size 12796 → 100 "
                     "bytes): a memory-mapped data file must stay as it was when the run opened it; restore "
                     "it, or restart the run on the new data"], lines[-20:]
