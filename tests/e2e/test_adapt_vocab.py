"""tools/adapt_vocab.py end to end: adapted checkpoints open in every tool and in transformers; bad input; bits per byte."""
import json
import shutil

import pytest
import torch

from megatron_ru import GPTModel, ModelConfig, runtime
from megatron_ru.checkpoint.load import load_full_state_dict
from megatron_ru.checkpoint.model_io import save_model
from megatron_ru.data.vocab_checks import open_tokenizer
from tests.helpers import generate_main, load_tool
from tests.vocab_fixtures import CORPUS, ENGLISH, HELDOUT, corpus_lines, gpt2_base, llama3_base

pytestmark = pytest.mark.slow


def _base_checkpoint(root, family, make_tok, model=None, **extra):
    tok_dir = make_tok(root / "tok")
    eod = "<|end_of_text|>" if family == "llama" else "<|endoftext|>"
    vocab = open_tokenizer(tok_dir, eod).vocab_size
    if model is None:
        cfg = ModelConfig.from_preset(f"tiny-{family}", vocab_size=vocab, max_position_embeddings=64, **extra)
        model = GPTModel(cfg, seed=3)
    entry = ({"type": "HuggingFaceTokenizer", "tokenizer_model": "tokenizer/tokenizer.json"} if family == "llama"
             else {"type": "GPT2BPETokenizer", "vocab_file": "tokenizer/vocab.json",
                   "merge_file": "tokenizer/merges.txt"})
    save_model(root / "base", model, tokenizer={**entry, "eod_token": eod})
    shutil.copytree(tok_dir, root / "base" / "tokenizer")
    return root / "base"


def _adapt(*argv):
    return runtime.run(load_tool("adapt_vocab").main, "tools/adapt_vocab.py", [str(a) for a in argv])


def test_llama_adapted_checkpoint_opens_everywhere(tmp_path, capsys):
    base = _base_checkpoint(tmp_path, "llama", llama3_base)
    (tmp_path / "en.txt").write_text(ENGLISH, encoding="utf-8")
    out = tmp_path / "adapted"
    assert _adapt("--load", base, "--corpus", CORPUS, "--heldout", HELDOUT, "--heldout-en", tmp_path / "en.txt",
                  "--add", 120, "--save", out, "--seq-length", 32, "--tensor-model-parallel-size", 2) == 0
    report = json.loads((out / "vocab_report.json").read_text())
    assert report["after"]["ru"]["tokens_per_word"] < report["before"]["ru"]["tokens_per_word"]
    assert report["after"]["en"]["tokens"] == report["before"]["en"]["tokens"]
    assert report["padded_vocab_size"] % (128 * 2) == 0 and "bits_per_byte" in report["after"]["ru"]
    cfg0, old = load_full_state_dict(base)
    cfg1, new = load_full_state_dict(out)
    assert cfg1.vocab_size == cfg0.vocab_size + 120
    for name in ("embed.weight", "lm_head.weight"):  # old rows bit-identical, untied head spliced too
        assert torch.equal(new[name][:cfg0.vocab_size], old[name])
    assert all(torch.equal(new[k], old[k]) for k in old if k not in ("embed.weight", "lm_head.weight"))
    # generate.py with no tokenizer flags: the adapted tokenizer inside is used
    capsys.readouterr()
    assert generate_main(["--load", str(out), "--prompt", "Утро в городе", "--out-seq-length", "4",
                          "--greedy"]) == 0
    assert "Утро в городе" in capsys.readouterr().out
    # the HF export loads in transformers, its tokenizer gives our ids and its logits are ours
    from transformers import AutoModelForCausalLM, AutoTokenizer
    assert load_tool("convert_checkpoint").main(["--load", str(out), "--save", str(tmp_path / "hf"),
                                                 "--to", "hf"]) == 0
    ours = open_tokenizer(out / "tokenizer", "<|end_of_text|>")
    text = HELDOUT.read_text(encoding="utf-8")[:300] + " " + ENGLISH
    ids = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))(text, add_special_tokens=False)["input_ids"]
    assert ids == ours.tokenize(text) and max(ids) >= cfg0.vocab_size
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), torch_dtype=torch.float32).eval()
    from megatron_ru.checkpoint.load import load_model
    x = torch.tensor([ids[:24]])
    with torch.no_grad():
        ref = load_model(out).eval()(x)[..., :cfg1.vocab_size]
        assert torch.allclose(hf(x).logits, ref, atol=1e-4)


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    base = _base_checkpoint(tmp_path, "gpt3", gpt2_base)
    out = tmp_path / "out"
    assert _adapt("--load", base, "--corpus", HELDOUT, "--add", 5000, "--save", out) == 2
    assert "fewer than --add 5000" in capsys.readouterr().err and not out.exists()
    shutil.copytree(base, tmp_path / "wrong")
    shutil.rmtree(tmp_path / "wrong" / "tokenizer")
    shutil.copytree(gpt2_base(tmp_path / "big", merges_kept=300), tmp_path / "wrong" / "tokenizer")
    assert _adapt("--load", tmp_path / "wrong", "--corpus", CORPUS, "--add", 10, "--save", out) == 2
    err = capsys.readouterr().err
    assert "vocabulary rows but its tokenizer" in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_donor_and_replace_unused_through_the_tool(tmp_path, capsys):
    """--donor-tokenizer + --replace-unused on a gpt3 checkpoint: the size grows by add - K only, the
    freed rows hold the mean of the new tokens' pieces, every other row is bit-identical."""
    from tests.vocab_fixtures import DEMO_TOKENIZER
    base = _base_checkpoint(tmp_path, "gpt3", lambda d: gpt2_base(d, english=True))
    out = tmp_path / "adapted"
    assert _adapt("--load", base, "--corpus", CORPUS, "--heldout", HELDOUT, "--add", 50, "--replace-unused", 40,
                  "--donor-tokenizer", DEMO_TOKENIZER, "--save", out, "--no-eval") == 0
    assert "40 in the rows of removed unused tokens, 10 appended" in capsys.readouterr().out
    rec = json.loads((out / "config.json").read_text())["vocab_adaptation"]
    report = json.loads((out / "vocab_report.json").read_text())
    assert report["replaced"] == 40 and report["checks"]["removed_tokens"] == 40 and report["donor_tokens"] > 30
    cfg0, old = load_full_state_dict(base)
    cfg1, new = load_full_state_dict(out)
    assert cfg1.vocab_size == cfg0.vocab_size + 10 and len(rec["replaced_ids"]) == 40
    assert rec["first_new_id"] == cfg0.vocab_size and rec["donor"].endswith("tokenizer")
    old_tok, new_tok = open_tokenizer(base / "tokenizer"), open_tokenizer(out / "tokenizer")
    by_id = {i: t for t, i in new_tok.encoder.items()}
    kept = [i for i in range(cfg0.vocab_size) if i not in set(rec["replaced_ids"])]
    assert torch.equal(new["embed.weight"][kept], old["embed.weight"][kept])
    for i in rec["replaced_ids"][:5]:  # a freed row: the mean of the rows of its token's pieces
        pieces = [old_tok.encoder[t] for t in old_tok._bpe(by_id[i])]
        assert torch.allclose(new["embed.weight"][i], old["embed.weight"][pieces].mean(0), atol=1e-6)
    assert _adapt("--load", base, "--corpus", CORPUS, "--replace-unused", 5000, "--save", tmp_path / "x") == 2
    assert "--replace-unused 5000: only" in capsys.readouterr().err and not (tmp_path / "x").exists()


def _trained_gpt3(steps=500):
    """A tiny gpt3 trained on the demo corpus with the 40-merge base vocabulary (so its embeddings
    carry what the pieces mean: an untrained model has nothing for an initialisation to preserve)."""
    tok = open_tokenizer(gpt2_base(_trained_gpt3.tmp / "t"))
    ids = torch.tensor([i for line in corpus_lines() for i in tok.tokenize(line) + [tok.eod]])
    cfg = ModelConfig.from_preset("tiny-gpt3", vocab_size=tok.vocab_size, max_position_embeddings=64,
                                  num_layers=2, hidden_size=64, num_attention_heads=4)
    model = GPTModel(cfg, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen, threads = torch.Generator().manual_seed(0), torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model: one thread is the fastest
    try:
        for _ in range(steps):
            start = torch.randint(0, len(ids) - 33, (16,), generator=gen)
            x = torch.stack([ids[s:s + 32] for s in start])  # (16, 32)
            y = torch.stack([ids[s + 1:s + 33] for s in start])
            loss = torch.nn.functional.cross_entropy(model(x)[..., :cfg.vocab_size].flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def test_mean_init_keeps_bits_per_byte_and_random_does_not(tmp_path):
    _trained_gpt3.tmp = tmp_path
    base = _base_checkpoint(tmp_path, "gpt3", gpt2_base, model=_trained_gpt3())
    bpb = {}
    for init in ("mean", "random"):
        assert _adapt("--load", base, "--corpus", CORPUS, "--heldout", HELDOUT, "--add", 20, "--init", init,
                      "--save", tmp_path / init, "--seq-length", 64) == 0
        report = json.loads((tmp_path / init / "vocab_report.json").read_text())
        bpb[init] = report["before"]["ru"]["bits_per_byte"], report["after"]["ru"]["bits_per_byte"]
    before = bpb["mean"][0]
    assert bpb["mean"][1] <= 1.15 * before, bpb
    # measured: mean +7.3 %, random +11.8 % (a tiny model: random is worse, not far worse)
    assert bpb["random"][1] - before > 1.3 * (bpb["mean"][1] - before), bpb



def test_train_only_new_rows_keeps_old_rows_bit_identical_and_resumes(tmp_path):
    """pretrain_gpt.py --train-only new-rows (first new id and replaced ids recorded by adapt_vocab in the
    base's config.json), then resumed from its own checkpoint with no --train-only-from: the record
    travelled into the training checkpoint's config.json."""
    from tests.helpers import demo_bpe, pretrain
    cfg = ModelConfig.from_preset("tiny-gpt3", vocab_size=demo_bpe().vocab_size)
    rec = {"first_new_id": 1000, "replaced_ids": [5, 7]}
    save_model(tmp_path / "base", GPTModel(cfg, seed=5), vocab_adaptation=rec)
    proc, records = pretrain(tmp_path, "run", "--train-iters", "3", "--weight-decay", "0.1", "--finetune",
                             "--load", str(tmp_path / "base"), "--save", str(tmp_path / "out"),
                             "--train-only", "new-rows")
    assert "--train-only new-rows: training rows 1000..1814 and the 2 rows" in proc.stdout and len(records) == 3
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_adaptation"] == rec
    proc, records = pretrain(tmp_path, "run", "--train-iters", "5", "--weight-decay", "0.1",
                             "--load", str(tmp_path / "out"), "--save", str(tmp_path / "out"),
                             "--train-only", "new-rows")
    assert "training rows 1000..1814" in proc.stdout and [r["iteration"] for r in records if "loss" in r][-2:] == [4, 5]
    _, old = load_full_state_dict(tmp_path / "base")
    _, new = load_full_state_dict(tmp_path / "out")
    assert all(torch.equal(new[k], old[k]) for k in old if k != "embed.weight")
    changed = (new["embed.weight"] != old["embed.weight"]).any(dim=1)  # (V,)
    # old rows bit-identical although weight decay 0.1 was asked for; the new and replaced rows move
    assert changed[5] and changed[7] and changed[1000:].sum() > 50
    changed[[5, 7]] = False
    assert not changed[:1000].any()


@pytest.mark.parametrize("script", ["adapt_vocab_rugpt3.sh", "adapt_vocab_tlite.sh"])
def test_recipes_pass_only_flags_the_tools_accept(script, tmp_path):
    import os
    import shlex
    import subprocess

    from megatron_ru.training.adapt_vocab import build_parser
    from megatron_ru.training.arguments import parse_pretrain_args
    from tests.helpers import ROOT
    env = {**os.environ, "PYTHON": "echo", "MPIRUN": "echo", "OUT": str(tmp_path / "out"), "BASE": "ckpt",
           "CORPUS": "ru.txt", "HELDOUT": "held.txt", "HELDOUT_EN": "en.txt", "DONOR": "ru_tok", "REPLACE": "7"}
    proc = subprocess.run(["bash", str(ROOT / "examples" / script)], env=env, capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = [shlex.split(line) for line in proc.stdout.splitlines()]
    adapt = [build_parser().parse_args(w[1:]) for w in lines if w[0] == "tools/adapt_vocab.py"]
    stages = [parse_pretrain_args(w[w.index("pretrain_gpt.py") + 1:]) for w in lines if "pretrain_gpt.py" in w]
    assert [a.report for a in adapt] == [False, True] and adapt[0].init == "mean"
    assert adapt[0].donor_tokenizer == "ru_tok" and adapt[0].replace_unused == 7
    assert [s.train_only for s in stages] == ["new-rows", None] and all(s.finetune for s in stages)
