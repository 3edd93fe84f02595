"""Vocabulary extension (continued BPE, donor tokens, replaced unused rows: data/vocab_*.py), its guarantees and the row splice."""
import json

import pytest
import torch

from megatron_ru.data import vocab_adapt as va
from megatron_ru.data.tokenizers import TokenizerError
from megatron_ru.data import vocab_donor, vocab_replace
from megatron_ru.data.vocab_checks import check_extension, fertility, open_tokenizer, piece_tokens
from megatron_ru.data.vocab_plan import adapt
from megatron_ru.training.vocab_splice import new_rows, splice
from tests.vocab_fixtures import (DEMO_TOKENIZER, ENGLISH, HELDOUT, corpus_lines, english_words, gpt2_base,
                                  llama3_base)


def _extend(tmp_path, make, add=150):
    base_dir = make(tmp_path / "base")
    base = va.read_base(base_dir)
    ext, merges = va.extend_vocab(base, corpus_lines(), add)
    new_dir = tmp_path / "new"
    va.write_vocab(new_dir, ext)
    if (base_dir / "tokenizer_config.json").is_file():
        (new_dir / "tokenizer_config.json").write_bytes((base_dir / "tokenizer_config.json").read_bytes())
    return base, ext, merges, base_dir, new_dir


@pytest.mark.parametrize("make", [gpt2_base, llama3_base], ids=["gpt2", "tokenizer.json"])
def test_extension_appends_and_keeps_every_guarantee(tmp_path, make):
    base, ext, merges, base_dir, new_dir = _extend(tmp_path, make)
    assert len(merges) == 150 and ext.merges[:len(base.merges)] == base.merges  # appended after the old ones
    new_tokens = [a + b for a, b in merges]
    assert len(set(new_tokens)) == 150 and not set(new_tokens) & set(base.vocab)
    eod = "<|end_of_text|>" if base.kind == "hf" else None
    old, new = open_tokenizer(base_dir, eod), open_tokenizer(new_dir, eod)
    assert new.vocab_size == old.vocab_size + 150
    vocab = json.loads((new_dir / ("vocab.json" if base.kind == "gpt2" else "tokenizer.json")).read_text())
    vocab = vocab if base.kind == "gpt2" else vocab["model"]["vocab"]
    assert sorted(vocab[t] for t in new_tokens) == list(range(base.next_id, base.next_id + 150))  # after specials
    for t in new_tokens:  # reachable through the merges, not matched anywhere like an added token
        assert piece_tokens(new, t) == [t]
    checks = check_extension(base_dir, new_dir, new_tokens, corpus_lines(), ENGLISH.splitlines(), eod_token=eod)
    assert checks["new_tokens_encode_to_themselves"] == 150 and checks["non_cyrillic_lines_unchanged"] > 40
    assert old.tokenize(ENGLISH) == new.tokenize(ENGLISH)
    held = HELDOUT.read_text(encoding="utf-8")
    assert new.detokenize(new.tokenize(held)) == held
    before, after = fertility(old, held).as_dict(), fertility(new, held).as_dict()
    assert after["tokens_per_word"] < 0.75 * before["tokens_per_word"], (before, after)
    assert after["words_in_2_tokens"] > before["words_in_2_tokens"]


@pytest.mark.slow
def test_tokenizer_json_extension_loads_in_transformers_with_our_ids(tmp_path):
    from transformers import AutoTokenizer
    base, ext, merges, base_dir, new_dir = _extend(tmp_path, llama3_base, add=60)
    assert base.ignore_merges and base.special["<|eot_id|>"] < base.next_id
    ours = open_tokenizer(new_dir, "<|end_of_text|>")
    hf = AutoTokenizer.from_pretrained(str(new_dir))
    text = HELDOUT.read_text(encoding="utf-8")[:800] + "<|eot_id|>" + ENGLISH
    assert hf(text, add_special_tokens=False)["input_ids"] == ours.tokenize(text)
    rendered = hf.apply_chat_template([{"role": "user", "content": "Привет, мир"}], tokenize=False)
    chat = hf(rendered, add_special_tokens=False)["input_ids"]
    assert chat == ours.tokenize(rendered)
    assert chat[0] == base.special["<|start_header_id|>"] and base.special["<|eot_id|>"] in chat
    assert any(i >= base.next_id for i in chat)  # the Russian content uses new tokens


def test_ignore_merges_simulation_matches_the_encoder(tmp_path):
    """A new token that is also a whole piece: the encoder looks it up; the training followed it."""
    base, ext, merges, base_dir, new_dir = _extend(tmp_path, llama3_base, add=200)
    splitter, new = va.Splitter(ext), open_tokenizer(new_dir, "<|end_of_text|>")
    for line in corpus_lines()[:5]:
        for piece in splitter.pieces(line):
            assert piece_tokens(new, piece) == splitter.segment(piece)


def test_bad_inputs_say_what_is_wrong(tmp_path):
    base = va.read_base(gpt2_base(tmp_path / "b"))
    with pytest.raises(va.VocabAdaptError, match=r"--corpus yields only \d+ new tokens.*fewer than --add 5000"):
        va.extend_vocab(base, corpus_lines()[:3], 5000)
    with pytest.raises(va.VocabAdaptError, match="2\\^31-1"):
        va.extend_vocab(base, corpus_lines(), 2**31)
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "tokenizer.model").write_bytes(b"x")
    with pytest.raises(TokenizerError, match="SentencePiece"):
        va.read_base(tmp_path / "sp")
    (tmp_path / "wp").mkdir()
    (tmp_path / "wp" / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece"}}))
    with pytest.raises(TokenizerError, match="only byte-level BPE"):
        va.read_base(tmp_path / "wp")


def test_english_merges_are_never_learned(tmp_path):
    base = va.read_base(gpt2_base(tmp_path / "b"))
    _, merges = va.extend_vocab(base, corpus_lines() + [ENGLISH] * 50, 100)
    assert all(va.has_cyrillic(a + b) for a, b in merges)


@pytest.mark.parametrize("tied", [True, False])
def test_splice_keeps_old_rows_and_means_new_ones(tied):
    g = torch.Generator().manual_seed(0)
    full = {"embed.weight": torch.randn(10, 8, generator=g), "blocks.0.w": torch.randn(3)}
    if not tied:
        full["lm_head.weight"] = torch.randn(10, 8, generator=g)
    pieces = [[1, 2], [3, 3, 4], [7]]
    out = splice(full, 9, 12, pieces, "mean")  # row 9 was an unused row: it is taken
    for name in ("embed.weight",) + (() if tied else ("lm_head.weight",)):
        assert out[name].shape == (12, 8) and torch.equal(out[name][:9], full[name][:9])
        for i, ids in enumerate(pieces):
            assert torch.allclose(out[name][9 + i], full[name][ids].mean(0), atol=1e-6)
    assert ("lm_head.weight" in out) == (not tied) and out["blocks.0.w"] is full["blocks.0.w"]
    w = full["embed.weight"]
    scaled = new_rows(w, [[1, 2]], "mean-rescaled")[0]
    assert abs(float(scaled.norm()) - float(w[[1, 2]].norm(dim=1).mean())) < 1e-5
    freq = new_rows(w, [[1, 2]], "freq", counts={1: 3, 2: 0})[0]
    assert torch.allclose(freq, (4 * w[1] + w[2]) / 5, atol=1e-6)
    rnd = splice(full, 10, 13, pieces, "random", std=0.02)["embed.weight"][10:]
    assert 0.005 < float(rnd.std()) < 0.05


def _donor_json(tmp_path):
    """The full demo BPE (a Russian-trained vocabulary) as a Llama-3 style tokenizer.json file."""
    return llama3_base(tmp_path / "donor", merges_kept=10**6) / "tokenizer.json"


@pytest.mark.parametrize("make", [gpt2_base, llama3_base], ids=["gpt2", "tokenizer.json"])
def test_donor_tokens_become_reachable_and_keep_every_guarantee(tmp_path, make):
    base_dir = make(tmp_path / "base")
    donor = DEMO_TOKENIZER if make is gpt2_base else _donor_json(tmp_path)  # vocab.json+merges.txt / file
    base = va.read_base(base_dir)
    a = adapt(base, corpus_lines(), 150, donor=donor)
    new_tokens = a.new_tokens
    assert len(new_tokens) == 150 and a.ids == list(range(base.next_id, base.next_id + 150))
    donor_vocab = va.read_base(DEMO_TOKENIZER).vocab
    assert len(a.donor_tokens) > 100 and set(a.donor_tokens) <= set(new_tokens) & set(donor_vocab)
    counts = vocab_donor.donor_counts(donor, corpus_lines())
    assert counts[a.donor_tokens[0]] >= counts[a.donor_tokens[-1]]  # most used first
    ranks = {p: r for r, p in enumerate(a.vocab.merges)}
    assert all(va.merge_word(list(t), ranks) == [t] for t in new_tokens)  # reachable through merges
    va.write_vocab(tmp_path / "new", a.vocab)
    eod = "<|end_of_text|>" if base.kind == "hf" else None
    checks = check_extension(base_dir, tmp_path / "new", new_tokens, corpus_lines(), ENGLISH.splitlines(), eod)
    assert checks["new_tokens_encode_to_themselves"] == 150
    held = HELDOUT.read_text(encoding="utf-8")
    before = fertility(open_tokenizer(base_dir, eod), held).tokens
    assert fertility(open_tokenizer(tmp_path / "new", eod), held).tokens < 0.75 * before
    with pytest.raises(TokenizerError, match="--donor-tokenizer"):
        adapt(base, corpus_lines(), 10, donor=tmp_path / "base" / "nothing.json")


@pytest.mark.parametrize("make", [gpt2_base, llama3_base], ids=["gpt2", "tokenizer.json"])
def test_replace_unused_keeps_the_size_and_every_kept_id(tmp_path, make):
    base_dir = make(tmp_path / "base", english=True)
    base = va.read_base(base_dir)
    eod = "<|end_of_text|>" if base.kind == "hf" else None
    a = adapt(base, corpus_lines(), 60, replace_unused=60, other_texts=ENGLISH.splitlines(), pinned=["<|eot_id|>"])
    assert sorted(a.removed.values()) == a.ids and len(a.vocab.vocab) == len(base.vocab)  # the size is kept
    assert all(a.vocab.vocab[t] == i for t, i in base.vocab.items() if t not in a.removed)
    assert all(a.vocab.vocab[t] == i for t, i in zip(a.new_tokens, a.ids))
    used = set(vocab_replace.used_tokens(va.Splitter(base), corpus_lines() + ENGLISH.splitlines()))
    parts = {p for m in a.vocab.merges for p in m}
    for t in a.removed:  # rare, non-Cyrillic, not a byte, unused, no part of anything kept
        assert len(t) > 1 and not va.has_cyrillic(t) and t not in used and t not in parts
    va.write_vocab(tmp_path / "new", a.vocab)
    if base.kind == "hf":
        (tmp_path / "new" / "tokenizer_config.json").write_bytes((base_dir / "tokenizer_config.json").read_bytes())
    lines = ENGLISH.splitlines() + [f"the {w}." for w in english_words()]  # lines using removed tokens too
    checks = check_extension(base_dir, tmp_path / "new", a.new_tokens, corpus_lines(), lines, eod, removed=a.removed)
    assert checks["removed_tokens"] == 60 and checks["non_cyrillic_lines_using_removed_tokens"] >= 10
    assert checks["non_cyrillic_lines_unchanged"] > 70
    old, new = open_tokenizer(base_dir, eod), open_tokenizer(tmp_path / "new", eod)
    word = next(t for t in a.removed if t.startswith("\u0120")).replace("\u0120", " ")  # " kettle"
    assert old.tokenize(word) == [a.removed[word.replace(" ", "\u0120")]]
    assert len(new.tokenize(word)) > 1 and new.detokenize(new.tokenize(word)) == word  # other tokens now
    assert old.tokenize(ENGLISH) == new.tokenize(ENGLISH)
    if base.kind == "hf":  # ids reused in tokenizer.json: transformers agrees with us
        from transformers import PreTrainedTokenizerFast
        hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "new" / "tokenizer.json"))
        text = HELDOUT.read_text(encoding="utf-8")[:400] + word + ENGLISH
        assert hf(text, add_special_tokens=False)["input_ids"] == new.tokenize(text)
    with pytest.raises(va.VocabAdaptError, match="removed token .* is still in the vocabulary"):
        check_extension(base_dir, base_dir, [], [], [], eod, removed=a.removed)  # the checker sees it
    with pytest.raises(va.VocabAdaptError, match=r"--replace-unused 5000: only \d+ tokens can be replaced"):
        adapt(base, corpus_lines(), 5000, replace_unused=5000)
    with pytest.raises(va.VocabAdaptError, match="between 0 and --add 10"):
        adapt(base, corpus_lines(), 10, replace_unused=20)


def test_splice_into_replaced_rows():
    g = torch.Generator().manual_seed(0)
    full = {"embed.weight": torch.randn(10, 8, generator=g)}
    out = splice(full, 10, 11, [[1, 2], [0], [4, 5]], "mean", ids=[3, 6, 10])["embed.weight"]
    assert out.shape == (11, 8)
    assert torch.equal(out[[0, 1, 2, 4, 5, 7, 8, 9]], full["embed.weight"][[0, 1, 2, 4, 5, 7, 8, 9]])
    assert torch.allclose(out[3], full["embed.weight"][[1, 2]].mean(0)) and torch.equal(out[6], full["embed.weight"][0])


def test_sentencepiece_style_donor(tmp_path):
    """A Unigram tokenizer.json with the "▁" word marker (not byte-level) donates its pieces as text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    t = Tokenizer(models.Unigram())
    t.pre_tokenizer, t.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    t.train_from_iterator(corpus_lines(), trainers.UnigramTrainer(vocab_size=800, special_tokens=["<unk>"],
                                                                  unk_token="<unk>"))
    t.save(str(tmp_path / "sp.json"))
    a = adapt(va.read_base(gpt2_base(tmp_path / "b")), corpus_lines(), 100, donor=tmp_path / "sp.json")
    words = [va.token_bytes(x).decode("utf-8") for x in a.donor_tokens]
    assert len(words) > 50 and " на" in words[:5] and not any("\u2581" in w for w in words)
