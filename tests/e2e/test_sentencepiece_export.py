"""A SentencePiece model (BPE with Llama's settings, and Unigram with SentencePiece's default NFKC
normalisation) trained here, through pretrain_gpt.py -> convert_checkpoint.py --to hf ->
transformers.AutoTokenizer: ids identical to ours on held-out text (first word, whitespace runs,
emoji, Latin and Cyrillic), special tokens from the model, and no tokenizer_config.json that names
a file its folder does not hold (the training checkpoint's tokenizer/ included)."""
import json
import subprocess
import sys

import pytest

from megatron_ru.data.tokenizers import build_tokenizer
from tests.helpers import BASE, ROOT, clean_env, load_tool

pytestmark = pytest.mark.slow
sentencepiece = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")
HELD_OUT = ["Привет, мир! Hello, world.", "Москва — столица России", "  два  пробела   и\tтаб\n\nстроки ",
            "emoji 🙂🙂 и ё, Ё, й — «кавычки» 'quotes'", "x", " начало с пробела", "ﬁ ① Ⅻ 你好 ẞ",
            "Съешь же ещё этих мягких французских булок, да выпей чаю."]


def _train(tmp, name, **options):
    corpus = tmp / "corpus.txt"
    if not corpus.exists():
        text = (ROOT / "examples" / "data" / "ru_demo.txt").read_text(encoding="utf-8")[:30000]
        corpus.write_text(text, encoding="utf-8")
    out = tmp / name
    out.mkdir()
    sentencepiece.SentencePieceTrainer.Train(input=str(corpus), model_prefix=str(out / "tokenizer"),
                                             vocab_size=600, character_coverage=1.0, minloglevel=2,
                                             pad_id=3, **options)
    return out / "tokenizer.model"


def _names_only_held_files(folder):
    """tokenizer_config.json's class needs tokenizer.json (fast) or tokenizer.model (slow) there."""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    if config.get("tokenizer_class") == "PreTrainedTokenizerFast":
        assert (folder / "tokenizer.json").is_file(), folder
    return config


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_sentencepiece_pretrain_export_autotokenizer(tmp_path, kind):
    if kind == "bpe":  # tools/train_tokenizer.py --format hf writes tokenizer.json + config beside it
        from megatron_ru.data.hf_tokenizer_json import SENTENCEPIECE_HF_OPTIONS, write_sentencepiece_hf_tokenizer
        model = _train(tmp_path, kind, **SENTENCEPIECE_HF_OPTIONS)
        write_sentencepiece_hf_tokenizer(model.parent, model)
        (model.parent / "tokenizer.json").unlink()  # the defect's folder: a config naming a missing file
    else:
        model = _train(tmp_path, kind, model_type="unigram", byte_fallback=True)
    docs = tmp_path / "docs.jsonl"
    lines = (ROOT / "examples" / "data" / "ru_demo.txt").read_text(encoding="utf-8").split("\n\n")[:60]
    docs.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in lines if t.strip()))
    env, tok = clean_env(), ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(model)]
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=ROOT, env=env, capture_output=True,  # noqa: E731
                                    text=True, timeout=300)
    proc = run("tools/preprocess_data.py", "--input", str(docs), *tok, "--append-eod",
               "--output-prefix", str(tmp_path / "data"))
    assert proc.returncode == 0, proc.stderr
    save = tmp_path / "ckpt"
    proc = run("pretrain_gpt.py", *BASE, *tok, "--data-path", str(tmp_path / "data_text_document"),
               "--data-cache-path", str(tmp_path / "cache"), "--train-iters", "2", "--micro-batch-size", "2",
               "--save", str(save), "--save-interval", "1000")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (save / "tokenizer" / "tokenizer.model").is_file()
    if (save / "tokenizer" / "tokenizer_config.json").is_file():
        _names_only_held_files(save / "tokenizer")
    assert load_tool("convert_checkpoint").main(["--load", str(save), "--save", str(tmp_path / "hf"),
                                                 "--to", "hf", "--quiet"]) == 0
    hf_dir = tmp_path / "hf"
    config = _names_only_held_files(hf_dir)
    ours = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(model))
    sp = ours.sp
    assert config["bos_token"] == sp.IdToPiece(sp.bos_id()) and config["eos_token"] == sp.IdToPiece(sp.eos_id())
    assert config["unk_token"] == sp.IdToPiece(sp.unk_id()) and config["add_prefix_space"] is False
    auto = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    for text in HELD_OUT:
        ids = ours.tokenize(text)
        assert auto(text)["input_ids"] == ids, text  # no bos added, first word as ours
        assert auto.decode(ids) == ours.detokenize(ids), text
    assert auto.eos_token_id == ours.eod and auto.bos_token_id == sp.bos_id()


def test_no_exact_form_is_refused_in_one_line(tmp_path):
    from megatron_ru.data.hf_tokenizer_json import SentencePieceExportError, sentencepiece_tokenizer_json
    model = _train(tmp_path, "suffix", model_type="bpe", treat_whitespace_as_suffix=True)
    with pytest.raises(SentencePieceExportError, match="treat_whitespace_as_suffix") as info:
        sentencepiece_tokenizer_json(model)
    assert "\n" not in str(info.value)
