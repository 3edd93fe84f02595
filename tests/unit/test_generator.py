"""Generator: cached decoding equals full recompute (both families, dense and sparse layers),
batches equal prompts alone, per-row stops, budgets and context limits, seeds, compile path, and
the text helpers (stop strings, streaming detokenizer)."""
from pathlib import Path

import pytest
import torch

from megatron_ru.data.tokenizers import build_tokenizer
from megatron_ru.inference import Generator, PromptError, SamplingParams
from megatron_ru.inference.text import StopStrings, TextStream
from tests.helpers import SMALL_MODELS, assert_rel_close, make_model

ROOT = Path(__file__).resolve().parents[2]
# Different lengths: padding, per-row positions; long enough to cross several sparse blocks.
PROMPTS = [list(range(100, 119)), [5, 6, 7], list(range(300, 310))]


def recompute_logits(model, prompt, tokens):
    """Logits for each generated token from the full sequence, no cache: (N, V)."""
    seq = torch.tensor([prompt + tokens])
    with torch.no_grad():
        return model(seq)[0, len(prompt) - 1: len(prompt) - 1 + len(tokens)]


@pytest.mark.parametrize("name", list(SMALL_MODELS))
def test_cached_steps_equal_full_recompute(name):
    model = make_model(name)
    if "sparse" in name:
        assert any(b.attn.sparse is not None for b in model.blocks)
    gen = Generator(model)
    sampling = SamplingParams(temperature=1.0, top_k=20)
    out = gen.generate(PROMPTS, max_new_tokens=14, sampling=sampling, seed=3, keep_logits=True)
    for prompt, c in zip(PROMPTS, out):
        assert len(c.tokens) == 14 and c.finish_reason == "length"
        assert_rel_close(c.logits, recompute_logits(model, prompt, c.tokens), 1e-5, name)


@pytest.mark.parametrize("name", ["gpt3_sparse", "llama"])
def test_greedy_batch_equals_each_prompt_alone(name):
    gen = Generator(make_model(name))
    batch = gen.generate(PROMPTS, max_new_tokens=10, keep_logits=True)
    for prompt, c in zip(PROMPTS, batch):
        alone = gen.generate([prompt], max_new_tokens=10, keep_logits=True)[0]
        assert c.tokens == alone.tokens
        assert_rel_close(c.logits, alone.logits, 1e-5, f"{name} batch vs alone")
    assert len({tuple(c.tokens) for c in batch}) == 3


def test_rows_stop_at_eod_alone_and_min_new_tokens_delays_it():
    model = make_model("gpt3")
    free = Generator(model).generate(PROMPTS, max_new_tokens=8)
    eod = free[1].tokens[3]  # row 1 would produce this id at step 3
    gen = Generator(model, eod=eod)
    out = gen.generate(PROMPTS, max_new_tokens=8)
    first = free[1].tokens.index(eod)
    assert out[1].finish_reason == "eod" and out[1].tokens == free[1].tokens[:first]
    for i in (0, 2):  # the other rows go on unless they meet the same id
        stop = free[i].tokens.index(eod) if eod in free[i].tokens else 8
        assert out[i].tokens == free[i].tokens[:stop]
    late = gen.generate([PROMPTS[1]], max_new_tokens=8, min_new_tokens=first + 2)[0]
    assert eod not in late.tokens[: first + 2] and len(late.tokens) >= first + 2


def test_end_ids_end_rows_like_eod_plain_and_speculative():
    """end_ids (a chat template's end-of-turn token) end a row as the end of text does, beside
    it; min_new_tokens holds both back; speculative decoding follows the same rule."""
    from megatron_ru.inference.speculative import SpeculativeGenerator
    model = make_model("gpt3")
    free = Generator(model).generate(PROMPTS, max_new_tokens=8)
    eot, eod = free[1].tokens[2], free[0].tokens[4]
    gen = Generator(model, eod=eod, end_ids=(eot,))
    assert gen.ends == (eod, eot)
    for g in (gen, SpeculativeGenerator(gen, model, 2)):
        out = g.generate(PROMPTS, max_new_tokens=8)
        for row, ref in zip(out, free):
            cut = min([ref.tokens.index(t) for t in (eod, eot) if t in ref.tokens] + [8])
            assert row.tokens == ref.tokens[:cut]
            assert row.finish_reason == ("eod" if cut < 8 else "length")
        late = g.generate([PROMPTS[1]], max_new_tokens=8, min_new_tokens=4)[0]
        assert eot not in late.tokens[:4] and eod not in late.tokens[:4] and len(late.tokens) >= 4


def test_stop_criterion_and_context_end():
    model = make_model("llama")
    gen = Generator(model, max_length=24)  # PROMPTS[0] has 19 tokens: room for 5 new ones
    out = gen.generate(PROMPTS, max_new_tokens=9)
    assert [len(c.tokens) for c in out] == [5, 9, 9]
    assert all(c.finish_reason == "length" for c in out)
    target = out[2].tokens[4]
    stopped = gen.generate(PROMPTS, max_new_tokens=9, stop=lambda row, toks: toks[-1] == target)
    assert stopped[2].finish_reason == "stop" and stopped[2].tokens == out[2].tokens[:5]
    with pytest.raises(PromptError, match="prompt 1 is 24 tokens, 1 over the limit of 23"):
        gen.generate([[1, 2], list(range(24))], max_new_tokens=2)
    with pytest.raises(PromptError, match="prompt 0 is empty"):
        gen.generate([[]], max_new_tokens=2)


def test_seed_and_repetition_penalty():
    gen = Generator(make_model("gpt3"))
    params = SamplingParams(temperature=1.0, top_p=0.9)
    a = gen.generate(PROMPTS, max_new_tokens=12, sampling=params, seed=1)
    b = gen.generate(PROMPTS, max_new_tokens=12, sampling=params, seed=1)
    c = gen.generate(PROMPTS, max_new_tokens=12, sampling=params, seed=2)
    assert [x.tokens for x in a] == [x.tokens for x in b] != [x.tokens for x in c]
    greedy = gen.generate(PROMPTS, max_new_tokens=24)
    strict = gen.generate(PROMPTS, max_new_tokens=24,
                          sampling=SamplingParams(greedy=True, repetition_penalty=1e6))
    for prompt, g, s in zip(PROMPTS, greedy, strict):
        assert len(set(s.tokens)) == len(s.tokens) and not set(s.tokens) & set(prompt)
        assert len(set(g.tokens)) < len(g.tokens) or set(g.tokens) & set(prompt) or g.tokens != s.tokens


def test_compiled_static_decode_equals_eager():
    model = make_model("llama")
    ref = Generator(model).generate(PROMPTS, max_new_tokens=6, keep_logits=True)
    compiled = Generator(model, compile=True, compile_backend="eager")
    got = compiled.generate(PROMPTS, max_new_tokens=6, keep_logits=True)
    for r, g in zip(ref, got):
        assert r.tokens == g.tokens
        assert_rel_close(g.logits, r.logits, 1e-5, "static window")


@pytest.fixture(scope="module")
def tokenizer():
    d = ROOT / "examples" / "data" / "tokenizer"
    return build_tokenizer("GPT2BPETokenizer", vocab_file=str(d / "vocab.json"),
                           merge_file=str(d / "merges.txt"))


def test_stream_prints_whole_characters_and_holds_back_stop_strings(tokenizer):
    text = "Привет, мир! Как дела?\nХорошо."
    ids = tokenizer.tokenize(text)
    stream = TextStream(tokenizer.detokenize)
    pieces = [stream.push(t) for t in ids]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    assert stream.finish(text) == ""
    stops = StopStrings(["\nХор"], tokenizer.detokenize)
    stream = TextStream(tokenizer.detokenize, stops)
    printed = "".join(stream.push(t) for t in ids)
    assert printed == "Привет, мир! Как дела?"  # "\n" is held back: it may start the stop
    cut = stops.truncate(tokenizer.detokenize(ids))
    assert cut == "Привет, мир! Как дела?" and stream.finish(cut) == ""
    hits = [stops(0, ids[:n]) for n in range(1, len(ids) + 1)]
    first = hits.index(True)
    assert all(hits[first:]) and "\nХор" in tokenizer.detokenize(ids[: first + 1])
    assert "\nХор" not in tokenizer.detokenize(ids[:first])
    assert not StopStrings([""], tokenizer.detokenize)
