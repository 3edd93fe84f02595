"""generate.py end to end: a TP=2 checkpoint sampled at TP=1 and under real `mpirun --np 2`,
file and interactive input, stop strings, streaming, and clear errors for bad input."""
import io
import re
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ru.data.tokenizers import build_tokenizer
from megatron_ru.inference.cli import build_parser
from megatron_ru import runtime
from megatron_ru.inference import runner
from tests.distributed import gen_workers
from tests.helpers import clean_env, mpirun, run_ranks

pytestmark = [pytest.mark.mpirun, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "examples" / "data" / "tokenizer"
TOK_FLAGS = ["--vocab-file", str(TOKENIZER / "vocab.json"), "--merge-file", str(TOKENIZER / "merges.txt")]
PROMPTS = ["Москва — столица", "В начале было слово, и слово было", "Привет"]


def main(argv):
    return runtime.run(runner.main, "generate.py", argv)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("GPT2BPETokenizer", vocab_file=str(TOKENIZER / "vocab.json"),
                           merge_file=str(TOKENIZER / "merges.txt"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    """A tiny ruGPT-3 written by save_model at TP=2 (two mp_rank files)."""
    path = tmp_path_factory.mktemp("ckpt")
    run_ranks(gen_workers.save_demo_checkpoint, 2, str(path), tokenizer.vocab_size)
    assert (path / "iter_0000010" / "mp_rank_01_model_states.pt").is_file()
    return path


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def test_tp1_and_mpirun_tp2_sample_the_same(checkpoint, tokenizer, tmp_path):
    inp = tmp_path / "prompts.txt"
    inp.write_text("\n".join(PROMPTS[:2]) + "\n\n" + PROMPTS[2] + "\n", encoding="utf-8")
    common = ["generate.py", "--load", str(checkpoint), *TOK_FLAGS, "--sample-input-file", str(inp),
              "--temperature", "0.9", "--top_k", "0", "--top_p", "0.95", "--seed", "7",
              "--out-seq-length", "12", "--batch-size", "2", "--num-samples", "2"]
    one = subprocess.run([sys.executable, *common, "--sample-output-file", str(tmp_path / "tp1.jsonl")],
                         cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([mpirun(), "--np", "2", sys.executable, *common, "--model-parallel-size", "2",
                          "--sample-output-file", str(tmp_path / "tp2.jsonl")],
                         cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr
    assert "tp=0/2" in two.stderr and "Traceback" not in two.stderr
    rows1, rows2 = read_jsonl(tmp_path / "tp1.jsonl"), read_jsonl(tmp_path / "tp2.jsonl")
    assert rows1 == rows2
    assert [r["prompt"] for r in rows1] == [p for p in PROMPTS for _ in range(2)]  # input order
    for r in rows1:
        assert set(r) == {"prompt", "text", "tokens", "finish_reason"}
        assert r["finish_reason"] in ("eod", "length") and 0 < len(r["tokens"]) <= 12
        assert r["text"] == tokenizer.detokenize(r["tokens"])
        assert two.stdout.count(r["prompt"] + r["text"]) >= 1  # printed by rank 0 only ...
    assert two.stdout.count(PROMPTS[1]) == 2  # ... once per sample, not once per rank
    assert rows1[0]["tokens"] != rows1[1]["tokens"]  # two samples of a prompt differ


def run_main(argv, capsys, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_few_shot_file_stop_strings_and_streaming(checkpoint, tmp_path, capsys):
    inp = tmp_path / "fewshot.txt"
    shots = ["Вопрос: 2+2?\nОтвет: 4\nВопрос: 3+3?\nОтвет:", "Вопрос: столица?\nОтвет:"]
    inp.write_text("\n===\n".join(shots) + "\n", encoding="utf-8")
    base = ["--load", str(checkpoint), *TOK_FLAGS, "--sample-input-file", str(inp),
            "--prompt-separator", "\\n===\\n", "--greedy", "--out-seq-length", "16"]
    code, out, _ = run_main(base + ["--sample-output-file", str(tmp_path / "a.jsonl")], capsys)
    assert code == 0
    free = read_jsonl(tmp_path / "a.jsonl")
    assert [r["prompt"] for r in free] == shots
    text = free[0]["text"]
    stop = text[4:6]
    assert stop.strip() and stop in text
    code, out, _ = run_main(base + ["--stop", stop, "--sample-output-file", str(tmp_path / "b.jsonl")],
                            capsys)
    assert code == 0
    cut = read_jsonl(tmp_path / "b.jsonl")[0]
    assert cut["finish_reason"] == "stop" and cut["text"] == text[: text.find(stop)]
    assert shots[0] + cut["text"] + "\n" in out  # streamed (batch 1) and cut before the stop
    assert stop not in out.split(shots[0])[1].split(shots[1])[0]


def test_interactive_session_survives_bad_lines(checkpoint, capsys, monkeypatch):
    long_line = "слово " * 200
    code, out, err = run_main(["--load", str(checkpoint), *TOK_FLAGS, "--greedy",
                               "--out-seq-length", "5"], capsys,
                              stdin=f"Привет\n{long_line}\n\nмир\nstop\nникогда\n",
                              monkeypatch=monkeypatch)
    assert code == 0
    assert err.count("error: ") == 1
    assert re.search(r"error: the prompt is \d+ tokens, \d+ over the limit of 63", err), err
    assert len([line for line in out.split("\n") if line.strip()]) == 2  # two answers, not three


@pytest.mark.parametrize("flags, message", [
    (["--top_p", "1.5"], r"--top_p 1.5 must be in (0, 1]"),
    (["--top-p", "0"], r"--top_p 0.0 must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature -1.0 must be >= 0"),
    (["--top_k", "-2"], "--top_k -2 must be an integer >= 0"),
    (["--tensor-model-parallel-size", "3"],
     "num_attention_heads=4 is not divisible by tensor_model_parallel_size=3"),
    (["--prompt", "слово " * 100], "prompt 1 (--prompt) is 203 tokens, 140 over the limit of 63"),
    (["--seq-length", "100"], "--seq-length 100 exceeds the model's max_position_embeddings=64"),
    (["--vocab-file", "/nope/vocab.json"], "/nope/vocab.json"),
    (["--sample-input-file", "/nope/in.txt"], "--sample-input-file /nope/in.txt does not exist"),
    (["--hidden-size", "128"], "--hidden-size 128 disagrees with"),
])
def test_bad_input_fails_with_one_clear_line(checkpoint, capsys, flags, message):
    code, out, err = run_main(["--load", str(checkpoint), *TOK_FLAGS, *flags], capsys)
    assert code == 2 and out == ""
    assert err.startswith("generate.py: error: ") and err.count("\n") == 1 and message in err, err


def test_missing_checkpoint_and_tokenizer(tmp_path, checkpoint, capsys):
    code, _, err = run_main(["--load", str(tmp_path / "none"), *TOK_FLAGS, "--prompt", "x"], capsys)
    assert code == 2 and f"checkpoint directory {tmp_path / 'none'} does not exist" in err
    code, _, err = run_main(["--load", str(checkpoint), "--prompt", "x"], capsys)
    assert code == 2 and "no tokenizer given: pass --vocab-file and --merge-file" in err


def test_13b_recipe_passes_only_accepted_flags():
    env = {**clean_env(), "MPIRUN": "echo", "CHECKPOINT": "ck", "TP": "8"}
    proc = subprocess.run(["bash", str(ROOT / "examples" / "generate_13b.sh"), "--prompt", "x"],
                          env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    assert words[:2] == ["--np", "8"]
    args = build_parser().parse_args(words[words.index("generate.py") + 1:])
    assert args.fp16 and args.tp == 8 and args.sparse_mode == "alternating" and args.load == "ck"
    assert (args.temperature, args.top_k, args.top_p) == (0.9, 0, 0.95)
