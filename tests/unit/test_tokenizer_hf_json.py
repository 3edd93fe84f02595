"""train_tokenizer.py --format hf: tokenizer.json + tokenizer_config.json that `tokenizers` and
transformers.AutoTokenizer load, with ids identical to ours (GPT2BPETokenizer on the same BPE) on
mixed Russian / English text."""
import importlib.util
import json
from pathlib import Path

import pytest

from megatron_ru.data.tokenizers import GPT2BPETokenizer, build_tokenizer

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
TEXT = ["Москва — столица России, а London is the capital of Britain.",
        "В 2024 году GPT-модели (ruGPT-3, T-lite) обучали на 1.5T токенов; it's 42% faster!",
        "  пробелы   и\tтабы\nи переводы строк  ", "emoji 🙂 and ё, Ё, й — «кавычки» 'quotes'"]


def tool():
    spec = importlib.util.spec_from_file_location("train_tokenizer", ROOT / "tools" / "train_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hf_format_ids_equal_ours(tmp_path):
    corpus = tmp_path / "c.txt"
    demo = (ROOT / "examples" / "data" / "ru_demo.txt").read_text(encoding="utf-8")[:20000]
    corpus.write_text(demo + "\n" + "\n".join(TEXT * 3), encoding="utf-8")
    train = tool()
    common = ["--input", str(corpus), "--vocab-size", "700"]
    assert train.main([*common, "--output-dir", str(tmp_path / "gpt2")]) == 0
    assert train.main([*common, "--format", "hf", "--output-dir", str(tmp_path / "hf")]) == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    ours = GPT2BPETokenizer(str(tmp_path / "gpt2" / "vocab.json"), str(tmp_path / "gpt2" / "merges.txt"))
    fast = tokenizers.Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    wrapped = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "hf" / "tokenizer.json"))
    for text in TEXT + [demo[:3000]]:
        ids = ours.tokenize(text)
        assert len(ids) > 5
        assert fast.encode(text, add_special_tokens=False).ids == ids
        assert auto(text, add_special_tokens=False)["input_ids"] == ids
        assert wrapped.tokenize(text) == ids and auto.decode(ids) == text
    assert auto.eos_token == "<|endoftext|>" and auto.eos_token_id == ours.eod == wrapped.eod
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"


def test_sentencepiece_hf_format_ids_equal_sentencepiece(tmp_path):
    """--type sentencepiece --format hf: tokenizer.model (our SentencePieceTokenizer) and the
    Llama-2-style tokenizer.json give the same ids through `tokenizers`, AutoTokenizer and our
    HuggingFaceTokenizer, byte fallback (emoji, rare letters) and whitespace runs included."""
    pytest.importorskip("sentencepiece")
    from megatron_ru.data.hf_tokenizer_json import SentencePieceExportError, sentencepiece_tokenizer_json
    corpus = tmp_path / "c.txt"
    demo = (ROOT / "examples" / "data" / "ru_demo.txt").read_text(encoding="utf-8")[:20000]
    corpus.write_text(demo + "\n" + "\n".join(TEXT * 3), encoding="utf-8")
    train = tool()
    out = tmp_path / "sp"
    assert train.main(["--type", "sentencepiece", "--format", "hf", "--input", str(corpus),
                       "--vocab-size", "700", "--output-dir", str(out)]) == 0
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    ours = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(out / "tokenizer.model"))
    fast = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    wrapped = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(out / "tokenizer.json"))
    extra = ["a", " a", "  ", "x\n\n y", "Ω≈ç√∫ 你好 ﬁ ①", "слово,слово.Слово!  ", "🙂🙂 🙂"]
    for text in TEXT + extra + [demo[:3000]]:
        ids = ours.tokenize(text)
        assert fast.encode(text, add_special_tokens=False).ids == ids, text
        assert auto(text, add_special_tokens=False)["input_ids"] == ids, text
        assert wrapped.tokenize(text) == ids, text
        assert auto.decode(ids) == ours.detokenize(ids) == text, text
    assert auto.eos_token == "</s>" and auto.eos_token_id == ours.eod == wrapped.eod
    # chat rendering splits control pieces out as their ids (SentencePiece alone would spell
    # "</s>" out), which is what tokenizer.json does with them: the same ids again
    from megatron_ru.data.chat_templates import load_template
    chat = [{"role": "user", "content": "Привет!"}, {"role": "assistant", "content": "Здравствуйте."},
            {"role": "user", "content": "Как дела?"}]
    template = load_template("rugpt3", ours)
    enc = template.encode(ours, chat)
    assert enc.text.count("</s>") == 1 and enc.ids.count(ours.eod) == 1
    # training tokenizes the rendering cut at the edges of each reply (no token spans a reply's edge, so
    # the generation prompt's ids are a prefix of the training ids): each piece as transformers does it
    _, spans = template.assistant_spans(chat)
    edges = sorted({0, len(enc.text), *(c for span in spans for c in span)})
    pieces = [enc.text[a:b] for a, b in zip(edges, edges[1:])]
    assert len(pieces) > 1
    assert enc.ids == [i for p in pieces for i in auto(p, add_special_tokens=False)["input_ids"]]
    assert enc.ids == [i for p in pieces for i in wrapped.tokenize(p)]
    assert template.eot_id(ours) == ours.eod
    # SentencePiece's default NFKC normalisation and whitespace collapsing: exact through the
    # model's precompiled character map (a form with no exact equivalent: tests/e2e/test_sentencepiece_export.py)
    assert train.main(["--type", "sentencepiece", "--input", str(corpus), "--vocab-size", "700",
                       "--output-dir", str(tmp_path / "nfkc")]) == 0
    nfkc = tokenizers.Tokenizer.from_str(json.dumps(sentencepiece_tokenizer_json(tmp_path / "nfkc" / "tokenizer.model")))
    ours = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "nfkc" / "tokenizer.model"))
    for text in TEXT + extra:
        assert nfkc.encode(text, add_special_tokens=False).ids == ours.tokenize(text), text
    assert issubclass(SentencePieceExportError, ValueError)
