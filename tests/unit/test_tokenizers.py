"""GPT2BPETokenizer matches Hugging Face's GPT-2 tokenizer id for id; other tokenizers; bad files."""
import json
import os
import random

import pytest

from megatron_ru.data.tokenizers import (GPT2BPETokenizer, HFTokenizer, SentencePieceTokenizer, TokenizerError,
                                         build_tokenizer)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(ROOT, "examples", "data", "ru_demo.txt")

ENGLISH = [
    "The quick brown fox jumps over the lazy dog. It's 2024, isn't it? We'll see, they'd say.",
    "Tokenizers split text into pieces; frequent words become one token, rare ones several.",
    "Data-parallel ranks read disjoint shards: rank 0 takes samples 0..3, rank 1 takes 4..7.",
]
SAMPLES = [
    "Привет, мир!", "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "ЁЛКИ-палки, ёжик в тумане…", "Москва — столица России; население ~13 млн.",
    "  two leading spaces", "trailing spaces   ", "tabs\tand\t\tmore\ttabs", "line\nbreaks\n\n\nmany",
    "windows\r\nline\r\nendings\r\n", "emoji 😀🎉👍🏽 and family 👨‍👩‍👧", "mixed русский English 中文 العربية",
    "digits 1234567890 and 3.14159 and 1e-9", "don't can't won't I'm you're we've they'll he'd",
    "Don'T CAN'T 'S", "\u00a0nbsp\u2003em space\u3000ideographic", "combining е\u0301 ударение",
    "", " ", "\n", "$$$ %%% ^^^ &&& ***", "https://example.com/path?q=русский&x=1",
    "a" * 300, "ы" * 257, "\x00\x01\x1f control", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters",
]


def _train_hf_bpe(out_dir, texts, vocab_size=1200):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.model.save(str(out_dir))
    tok.save(os.path.join(str(out_dir), "tokenizer.json"))
    return str(out_dir)


@pytest.fixture(scope="module")
def corpus_texts():
    with open(CORPUS, encoding="utf-8") as f:
        return [block for block in f.read().split("\n\n") if block.strip()] + ENGLISH * 5


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, corpus_texts):
    return _train_hf_bpe(tmp_path_factory.mktemp("hf_bpe"), corpus_texts)


def _fuzz_texts(n=150, seed=0):
    pool = list("абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВЯЁ abcxyzXYZ0123456789 .,;:!?'\"-—()[]\n\t\r") + [
        "😀", "🏽", "\u200d", "\u00a0", "中", "ß", "’", "  ", "'s", "'ll"]
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 80))) for _ in range(n)]


def _assert_parity(ours, hf, texts):
    nonempty = 0
    for text in texts:
        expected = hf(text, add_special_tokens=False)["input_ids"]
        got = ours.tokenize(text)
        assert got == expected, f"ids differ on {text!r}"
        assert ours.detokenize(got) == text
        nonempty += bool(expected)
    assert nonempty >= len([t for t in texts if t]) , "HF returned no ids: parity would be vacuous"


def test_gpt2_bpe_matches_hf_on_hf_trained_vocab(hf_dir, corpus_texts):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2TokenizerFast.from_pretrained(hf_dir)
    ours = GPT2BPETokenizer(os.path.join(hf_dir, "vocab.json"), os.path.join(hf_dir, "merges.txt"))
    _assert_parity(ours, hf, SAMPLES + corpus_texts + _fuzz_texts())
    whole = "\n\n".join(corpus_texts)
    ids = ours.tokenize(whole)
    assert len(ids) < len(whole.encode("utf-8")) / 2  # the merges are really used
    assert ids == hf(whole)["input_ids"]


@pytest.mark.parametrize("vocab_size", [300, 4000])
def test_gpt2_bpe_matches_hf_small_and_large_vocab(tmp_path, corpus_texts, vocab_size):
    """Few merges (mostly byte pieces) and many merges (whole words, merges of rare pairs)."""
    transformers = pytest.importorskip("transformers")
    d = _train_hf_bpe(tmp_path, corpus_texts, vocab_size)
    hf = transformers.GPT2TokenizerFast.from_pretrained(d)
    ours = GPT2BPETokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"))
    assert ours.vocab_size == len(hf)
    _assert_parity(ours, hf, SAMPLES + corpus_texts[::4] + _fuzz_texts(60, seed=vocab_size))


def test_gpt2_bpe_matches_hf_on_our_trained_vocab(tmp_path, corpus_texts):
    """Files from our own trainer load in HF and give the same ids."""
    transformers = pytest.importorskip("transformers")
    from megatron_ru.data.bpe_trainer import train_bpe_from_texts

    vocab, merges = train_bpe_from_texts(corpus_texts, 900, str(tmp_path), stream=open(os.devnull, "w"))
    with open(vocab, encoding="utf-8") as f:
        assert len(json.load(f)) == 900
    hf = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path))
    ours = GPT2BPETokenizer(vocab, merges)
    _assert_parity(ours, hf, SAMPLES + corpus_texts[:10] + _fuzz_texts(60, seed=1))
    assert ours.eod == 899 and ours.vocab_size == 900


def test_shipped_demo_tokenizer_round_trips_and_compresses():
    d = os.path.join(ROOT, "examples", "data", "tokenizer")
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=os.path.join(d, "vocab.json"),
                          merge_file=os.path.join(d, "merges.txt"))
    with open(CORPUS, encoding="utf-8") as f:
        text = f.read()
    ids = tok.tokenize(text)
    assert tok.detokenize(ids) == text
    assert len(text.encode("utf-8")) / len(ids) > 4.0  # bytes per token on the text it was trained on
    assert tok.eod == tok.encoder["<|endoftext|>"] and tok.pad == tok.eod


def test_eod_token_configurable(hf_dir):
    vocab, merges = os.path.join(hf_dir, "vocab.json"), os.path.join(hf_dir, "merges.txt")
    tok = GPT2BPETokenizer(vocab, merges, eod_token="<pad>")  # ru-gpts: <pad> ends a document
    assert tok.eod == tok.encoder["<pad>"] and tok.eod != tok.encoder["<|endoftext|>"]
    ids = tok.tokenize("конец") + [tok.eod]
    assert tok.detokenize(ids) == "конец<pad>"
    with pytest.raises(TokenizerError, match="<eos>.*not in vocab"):
        GPT2BPETokenizer(vocab, merges, eod_token="<eos>")


def test_cache_gives_same_ids(hf_dir):
    tok = GPT2BPETokenizer(os.path.join(hf_dir, "vocab.json"), os.path.join(hf_dir, "merges.txt"), cache_size=3)
    text = " ".join(SAMPLES[:8])
    first = tok.tokenize(text)
    assert len(tok.cache) <= 3
    assert tok.tokenize(text) == first


def test_bad_tokenizer_files(tmp_path, hf_dir):
    vocab, merges = os.path.join(hf_dir, "vocab.json"), os.path.join(hf_dir, "merges.txt")
    with pytest.raises(TokenizerError, match="vocab file.*not found: .*nope.json"):
        GPT2BPETokenizer(str(tmp_path / "nope.json"), merges)
    with pytest.raises(TokenizerError, match="merges file.*not found"):
        GPT2BPETokenizer(vocab, str(tmp_path / "nope.txt"))
    with pytest.raises(TokenizerError, match="required"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=vocab)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="bad.json is not valid JSON"):
        GPT2BPETokenizer(str(bad_json), merges)
    # merges from another vocabulary: a merge result missing from this vocab
    other = tmp_path / "other_merges.txt"
    other.write_text("#version: 0.2\nÐ ¿\nzz qq\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="does not match vocab.*#2 'zz' \\+ 'qq'"):
        GPT2BPETokenizer(vocab, str(other))
    malformed = tmp_path / "malformed.txt"
    malformed.write_text("#version: 0.2\na b c\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="malformed.txt:2"):
        GPT2BPETokenizer(vocab, str(malformed))
    small = tmp_path / "small.json"
    small.write_text(json.dumps({"a": 0, "<|endoftext|>": 1}), encoding="utf-8")
    with pytest.raises(TokenizerError, match="lacks 255 of the 256 byte symbols"):
        GPT2BPETokenizer(str(small), merges)
    if os.geteuid() != 0:  # root reads anything; the check only means something for users
        locked = tmp_path / "locked.json"
        locked.write_text("{}", encoding="utf-8")
        os.chmod(locked, 0)
        with pytest.raises(TokenizerError, match="not readable"):
            GPT2BPETokenizer(str(locked), merges)
    with pytest.raises(TokenizerError, match="--tokenizer-type 'BertWordPiece'"):
        build_tokenizer("BertWordPiece")


def test_sentencepiece_tokenizer(tmp_path, corpus_texts):
    import sentencepiece

    text_file = tmp_path / "train.txt"
    text_file.write_text("\n".join(t.replace("\n", " ") for t in corpus_texts), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.Train(input=str(text_file), model_prefix=str(tmp_path / "sp"),
                                             vocab_size=500, model_type="bpe", minloglevel=2)
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "sp.model"))
    text = "Утро в маленьком городе начинается с запаха хлеба."
    ids = tok.tokenize(text)
    assert ids and tok.detokenize(ids) == text
    assert tok.vocab_size == 500 and tok.eod == tok.sp.eos_id()
    assert SentencePieceTokenizer(str(tmp_path / "sp.model"), eod_token="<s>").eod == tok.sp.bos_id()
    with pytest.raises(TokenizerError, match="not found: .*missing.model"):
        SentencePieceTokenizer(str(tmp_path / "missing.model"))
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="garbage.model cannot be loaded"):
        SentencePieceTokenizer(str(garbage))


def test_hf_tokenizer_json(hf_dir):
    transformers = pytest.importorskip("transformers")
    tok = HFTokenizer(os.path.join(hf_dir, "tokenizer.json"))
    hf = transformers.GPT2TokenizerFast.from_pretrained(hf_dir)
    for text in SAMPLES[:12]:
        assert tok.tokenize(text) == hf(text)["input_ids"]
        assert tok.detokenize(tok.tokenize(text)) == text
    assert tok.eod == hf.convert_tokens_to_ids("<|endoftext|>")
    assert tok.pad == hf.convert_tokens_to_ids("<pad>")
    assert HFTokenizer(hf_dir).vocab_size == tok.vocab_size  # a directory works too
