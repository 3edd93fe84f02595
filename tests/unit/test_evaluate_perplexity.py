"""tools/evaluate.py: sliding-window perplexity = a hand loop = Hugging Face on the exported model,
bits per byte on a text of known size, .bin/.idx inputs, bad input. TP=2 under real mpirun:
tests/e2e/test_evaluate_mpirun.py."""
import json
import math

import pytest
import torch

from megatron_ru import runtime
from megatron_ru.checkpoint.load import load_model
from megatron_ru.evaluation import cli
from megatron_ru.evaluation.perplexity import build_stream, sliding_windows
from tests import evalkit

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    base = tmp_path_factory.mktemp("ppl")
    ours = evalkit.make_checkpoint(base / "ours", max_positions=64)
    return ours, evalkit.export_hf(ours, base / "hf")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "held_out.txt"
    path.write_text(evalkit.TEXT, encoding="utf-8")
    return path


def evaluate(argv):
    return runtime.run(cli.main, "tools/evaluate.py", argv)


@pytest.mark.parametrize("n,seq,stride", [(100, 16, 16), (100, 16, 5), (17, 16, 8), (5, 16, 1),
                                          (64, 16, 12)])
def test_windows_score_every_token_once_with_enough_context(n, seq, stride):
    seen = []
    for w in sliding_windows(n, seq, stride):
        targets = range(w.start + 1 + w.length - w.scored, w.start + w.length + 1)
        for t in targets:  # context of target t: stream[w.start:t]
            assert t - w.start >= min(seq - stride + 1, t)
        seen += list(targets)
        assert 1 <= w.length <= seq
    assert seen == list(range(1, n))


def hand_loop_nll(model_fn, stream, seq, stride):
    """The context the window rule promises each target t (stream[start:t], start the first
    multiple of stride with start + seq >= t), derived independently; targets sharing a start
    share one causal forward."""
    ids, by_start = torch.tensor(stream), {}
    for t in range(1, len(stream)):
        by_start.setdefault(max(0, math.ceil((t - seq) / stride)) * stride, []).append(t)
    total = 0.0
    for start, targets in by_start.items():
        logp = torch.log_softmax(model_fn(ids[start:max(targets)].unsqueeze(0))[0].double(), -1)
        total -= sum(logp[t - 1 - start, ids[t]].item() for t in targets)
    return total


def test_perplexity_equals_hand_loop_and_hf(ckpt, text_file, tmp_path):
    ours, hf_dir = ckpt
    out = tmp_path / "r.json"
    assert evaluate(["--load", str(ours), "--input", str(text_file), "--seq-length", "32",
                     "--stride", "12", "--batch-size", "3", "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    got = res["inputs"][str(text_file)]
    tok = evalkit.tokenizer()
    docs = cli.read_text_documents(text_file, "text")
    assert len(docs) == 3
    stream = build_stream([tok.tokenize(d) for d in docs], tok.eod)
    assert got["tokens"] == len(stream) - 1
    model = load_model(ours).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        hand = hand_loop_nll(model, stream, 32, 12)
        via_hf = hand_loop_nll(lambda x: hf(input_ids=x).logits, stream, 32, 12)
    assert abs(got["nll_nats"] - hand) / hand < 1e-5
    assert abs(got["nll_nats"] - via_hf) / via_hf < 1e-5
    assert abs(got["loss"] - hand / got["tokens"]) < 1e-5 * got["loss"]
    assert math.isclose(got["perplexity"], math.exp(got["loss"]), rel_tol=1e-9)
    # bits per byte over the known UTF-8 size of the three documents
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    # the file's bytes less two blank-line separators ("\n\n") and the final newline
    assert got["bytes"] == nbytes == len(evalkit.TEXT.encode("utf-8")) - 5
    assert math.isclose(got["bits_per_byte"], hand / math.log(2) / nbytes, rel_tol=1e-5)


def test_bin_idx_and_jsonl_equal_text(ckpt, text_file, tmp_path, capsys):
    ours, _ = ckpt
    inputs = evalkit.write_inputs(tmp_path, text_file)
    common = ["--load", str(ours), "--input", *inputs, "--seq-length", "24", "--stride", "8", "--batch-size", "4"]
    assert evaluate(common + ["--output", str(tmp_path / "tp1.json")]) == 0
    table = capsys.readouterr().out
    assert "overall" in table and "bits/byte" in table
    one = json.loads((tmp_path / "tp1.json").read_text())
    a, b, c = (one["inputs"][k] for k in inputs)
    assert a == b == c  # three spellings of one corpus


@pytest.mark.parametrize("extra,message", [
    (["--seq-length", "65"], "--seq-length 65 exceeds the model's max_position_embeddings=64"),
    (["--seq-length", "16", "--stride", "17"], "--stride 17 must be in [1, --seq-length 16]"),
    (["--stride", "0"], "--stride 0 must be in [1"),
    (["--input", "EMPTY"], "holds no text to evaluate"),
    (["--input", "MISSING"], "is neither a file nor a .bin/.idx prefix"),
    (["--vocab-file", "BIGVOCAB", "--merge-file", "MERGES"], "disagree on the vocabulary"),
])
def test_bad_input_one_line_exit_2(ckpt, text_file, tmp_path, capsys, extra, message):
    ours, _ = ckpt
    (tmp_path / "empty.txt").write_text("\n\n  \n", encoding="utf-8")
    vocab = json.loads((evalkit.TOKENIZER / "vocab.json").read_text(encoding="utf-8"))
    vocab.update({f"extra{i}": len(vocab) + i for i in range(300)})
    (tmp_path / "big.json").write_text(json.dumps(vocab), encoding="utf-8")
    subst = {"EMPTY": str(tmp_path / "empty.txt"), "MISSING": str(tmp_path / "nope"),
             "BIGVOCAB": str(tmp_path / "big.json"), "MERGES": str(evalkit.TOKENIZER / "merges.txt")}
    extra = [subst.get(x, x) for x in extra]
    argv = ["--load", str(ours), "--input", str(text_file)] + extra
    assert evaluate(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_untrained_baseline_is_the_seeded_initialisation(ckpt, text_file, tmp_path):
    """--untrained scores the checkpoint's model as pretrain_gpt.py initialises it (seed)."""
    from megatron_ru import GPTModel
    from megatron_ru.checkpoint.load import read_config
    from megatron_ru.checkpoint.model_io import save_model
    ours, _ = ckpt
    cfg, _ = read_config(ours)
    save_model(tmp_path / "init", GPTModel(cfg, seed=77))
    common = ["--input", str(text_file), "--seq-length", "32", "--stride", "16",
              "--tokenizer-path", str(evalkit.TOKENIZER)]
    assert evaluate(["--load", str(ours), "--untrained", "--seed", "77", *common,
                     "--output", str(tmp_path / "a.json")]) == 0
    assert evaluate(["--load", str(tmp_path / "init"), *common, "--output", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text())["overall"] for f in ("a.json", "b.json"))
    assert a == b and a["loss"] > 0
