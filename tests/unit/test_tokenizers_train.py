"""tools/train_tokenizer.py: BPE and SentencePiece training from text/jsonl, determinism, bad input."""
import importlib.util
import json
import os
import sys

from megatron_ru.data.tokenizers import GPT2BPETokenizer, SentencePieceTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(ROOT, "examples", "data", "ru_demo.txt")


def _load_tool():
    spec = importlib.util.spec_from_file_location("train_tokenizer", os.path.join(ROOT, "tools", "train_tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pool workers pickle its functions by module name
    spec.loader.exec_module(module)
    return module


TOOL = _load_tool()


def test_bpe_from_text_and_jsonl_is_deterministic(tmp_path, capsys):
    jsonl = tmp_path / "extra.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"Строка номер {i}. Line {i}."}, ensure_ascii=False)
                               for i in range(50)), encoding="utf-8")
    for out in ("a", "b"):
        assert TOOL.main(["--input", CORPUS, str(jsonl), "--vocab-size", "700",
                          "--output-dir", str(tmp_path / out)]) == 0
    err = capsys.readouterr().err
    assert "merges" in err and "wrote" in err
    for name in ("vocab.json", "merges.txt"):
        assert open(tmp_path / "a" / name, "rb").read() == open(tmp_path / "b" / name, "rb").read()
    tok = GPT2BPETokenizer(str(tmp_path / "a" / "vocab.json"), str(tmp_path / "a" / "merges.txt"))
    assert tok.vocab_size == 700 and tok.eod == 699
    text = "Строка номер 7. Пекарня на углу."
    ids = tok.tokenize(text)
    assert tok.detokenize(ids) == text and len(ids) < len(text) / 2


def test_bpe_ids_stay_contiguous_when_text_spells_special_tokens(tmp_path):
    from megatron_ru.data.bpe_trainer import count_pieces, train_bpe

    texts = ["<|endoftext|> abc abc abcabc ab c a bc <|endoftext|>"] * 20
    vocab, merges = train_bpe(count_pieces(texts), 400, min_frequency=2)
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert "<|endoftext|>" in vocab and len(merges) >= len(vocab) - 256 - 1


def test_sentencepiece(tmp_path):
    assert TOOL.main(["--type", "sentencepiece", "--input", CORPUS, "--vocab-size", "600",
                      "--output-dir", str(tmp_path)]) == 0
    tok = SentencePieceTokenizer(str(tmp_path / "tokenizer.model"))
    text = "Весной в парке снова слышны птицы."
    assert tok.vocab_size == 600 and tok.detokenize(tok.tokenize(text)) == text


def test_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no key"}\n', encoding="utf-8")
    assert TOOL.main(["--input", str(bad), "--vocab-size", "300", "--output-dir", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:2: bad jsonl record" in capsys.readouterr().err
    assert TOOL.main(["--input", str(tmp_path / "nope.txt"), "--vocab-size", "300",
                      "--output-dir", str(tmp_path / "o")]) == 2
    assert "not found: " in capsys.readouterr().err
    assert TOOL.main(["--type", "sentencepiece", "--input", CORPUS, "--vocab-size", "900000",
                      "--output-dir", str(tmp_path / "sp")]) == 2
    assert "SentencePiece refused --vocab-size 900000" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o" / "vocab.json")
