"""Continuous batching (serving Scheduler + BatchEngine, no HTTP): each sequence, joining and
leaving a shared batch of fewer rows than sequences, gets exactly the tokens it gets alone
(seeded sampling with repetition penalty, min tokens, a stop string), and greedy ones exactly
what the reference Generator gives, on dense and block-sparse layers; logprobs and prompt
scores match a full recompute; a cancelled sequence frees its row; the queue limit holds;
sampling.draw follows its distribution."""
import threading

import pytest
import torch

from megatron_ru.inference import Generator, SamplingParams
from megatron_ru.inference.sampling import GREEDY, draw, exponentials, race_key
from megatron_ru.serving.engine import BatchEngine
from megatron_ru.serving.scheduler import QueueFull, Scheduler, Seq, SeqOptions
from tests.helpers import assert_rel_close, make_model

EOD = 7
PROMPTS = [list(range(100, 119)), [5, 6, 7, 8], list(range(300, 310)), [42], list(range(50, 75)),
           [9, 9, 9]]
SAMPLED = SamplingParams(temperature=0.9, top_k=30, top_p=0.95, repetition_penalty=1.2)


def run_all(sched: Scheduler, seqs: list[Seq], timeout_s: float = 60.0) -> dict:
    """Submit, wait for every `done` (bounded), return events per sequence."""
    events = {id(s): [] for s in seqs}
    done = threading.Semaphore(0)
    for s in seqs:
        def sink(ev, box=events[id(s)]):
            box.append(ev)
            if ev[0] == "done":
                done.release()
        s.sink = sink
    sched.submit(seqs)
    for _ in seqs:
        assert done.acquire(timeout=timeout_s), "a sequence never finished"
    return events


def tokens_of(events):
    return [e[1] for e in events if e[0] == "token"]


@pytest.fixture(scope="module", params=["gpt3_sparse", "llama"])
def setup(request):
    gen = Generator(make_model(request.param), eod=EOD)
    sched = Scheduler(BatchEngine(gen, 3, 64), eod=EOD, vocab_size=gen.config.vocab_size,
                      detokenize=lambda ids: " ".join(map(str, ids)), max_queue=16)
    sched.start()
    yield gen, sched
    sched.stop()
    assert not sched.thread.is_alive()


def test_batched_sequences_equal_each_alone(setup):
    gen, sched = setup
    cases = []  # (prompt, options, seed)
    for i, p in enumerate(PROMPTS):
        sampling = GREEDY if i % 2 == 0 else SAMPLED
        cases.append((p, SeqOptions(sampling, max_tokens=5 + 4 * i, min_tokens=2), 40 + i))
    alone = [tokens_of(run_all(sched, [s])[id(s)]) for s in [Seq(p, o, seed, None) for p, o, seed in cases]]
    stop = str(alone[5][5])  # text of a token: that sequence stops there at the latest
    cases.append((PROMPTS[5], SeqOptions(SAMPLED, max_tokens=25, min_tokens=2, stops=(stop,)), 45))
    seqs = [Seq(p, o, seed, None) for p, o, seed in cases]
    events = run_all(sched, seqs)  # 7 sequences through 3 rows: joins and leaves
    got = [tokens_of(events[id(s)]) for s in seqs]
    assert got[:-1] == alone
    cut = next(i for i in range(1, len(alone[5])) if stop in " ".join(map(str, alone[5][:i + 1])))
    assert got[-1] == alone[5][:cut + 1] and events[id(seqs[-1])][-1] == ("done", "stop")
    for (p, o, seed), s, toks in zip(cases, seqs, got):
        if o.sampling.is_greedy:  # greedy: exactly the reference Generator's tokens
            ref = gen.generate([p], max_new_tokens=o.max_tokens, min_new_tokens=o.min_tokens)[0]
            assert toks == ref.tokens and events[id(s)][-1] == ("done", ref.finish_reason), p
    assert len({tuple(t) for t in got}) == len(got)
    assert sched.running == 0 and sched.queued == 0


def test_logprobs_and_prompt_scores_match_recompute(setup):
    gen, sched = setup
    p = PROMPTS[2]
    seq = Seq(p, SeqOptions(GREEDY, max_tokens=6, logprobs=3, prompt_logprobs=True), 0, None)
    ev = run_all(sched, [seq])[id(seq)]
    toks = tokens_of(ev)
    with torch.no_grad():
        full = torch.log_softmax(gen.model(torch.tensor([p + toks]))[0].float(), -1)  # (T, V)
    scores = [e for e in ev if e[0] == "prompt_logprobs"][0][1]
    assert scores[0] is None and len(scores) == len(p)
    want = torch.stack([full[i - 1, p[i]] for i in range(1, len(p))])
    assert_rel_close(torch.tensor([s[0] for s in scores[1:]]), want, 1e-5, "prompt logprobs")
    chosen = torch.tensor([e[2][0] for e in ev if e[0] == "token"])
    want = torch.stack([full[len(p) - 1 + i, t] for i, t in enumerate(toks)])
    assert_rel_close(chosen, want, 1e-5, "token logprobs")
    first = [e for e in ev if e[0] == "token"][0][2]
    assert [i for i, _ in first[1]] == full[len(p) - 1].topk(3).indices.tolist()


def test_cancel_frees_the_row_and_queue_limit(setup):
    gen, sched = setup
    long = [Seq([1, 2, 3], SeqOptions(SAMPLED, max_tokens=60, min_tokens=60), i, None) for i in range(3)]
    got = []
    first_token = threading.Event()
    for s in long:
        s.sink = lambda ev: (got.append(ev), first_token.set() if ev[0] == "token" else None)
    sched.submit(long)
    assert first_token.wait(30)
    sched.cancel(long)
    deadline = threading.Event()
    for _ in range(600):  # bounded: rows free within a few steps
        if sched.running == 0:
            break
        deadline.wait(0.05)
    assert sched.running == 0
    assert sum(e == ("done", "cancelled") for e in got) == 3
    assert len([e for e in got if e[0] == "token"]) < 3 * 60
    too_many = [Seq([1], SeqOptions(GREEDY, max_tokens=1), 0, None) for _ in range(3 + 16 + 1)]
    with pytest.raises(QueueFull):  # rows (3) + queue (16) < 20: none of them is taken
        sched.submit(too_many)
    assert sched.queued == 0


def test_stop_ids_end_a_sequence_like_the_end_of_text(setup):
    """A chat template's end-of-turn token (SeqOptions.stop_ids) ends the reply without being
    emitted, and min_tokens holds it back like the end of text."""
    gen, sched = setup
    free = tokens_of(run_all(sched, [s := Seq(PROMPTS[0], SeqOptions(GREEDY, max_tokens=12), 1, None)])[id(s)])
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i])  # a token new at step k
    seq = Seq(PROMPTS[0], SeqOptions(GREEDY, max_tokens=12, stop_ids=(free[k],)), 1, None)
    events = run_all(sched, [seq])[id(seq)]
    assert tokens_of(events) == free[:k] and events[-1] == ("done", "eod")
    held = Seq(PROMPTS[0], SeqOptions(GREEDY, max_tokens=12, min_tokens=k + 1, stop_ids=(free[k],)), 1, None)
    got = tokens_of(run_all(sched, [held])[id(held)])
    assert got[:k] == free[:k] and got[k] != free[k] and len(got) > k


def test_draw_follows_the_distribution():
    """One key per row (as one sequence per step): frequencies follow p within and across the
    race's blocks, zero-probability ids are never drawn, scaling p changes nothing, and a row's
    draw depends on its key and probabilities only."""
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(20000, 1)
    keys = torch.tensor([race_key(7, step) for step in range(20000)])
    ids = draw(probs, keys)
    freq = torch.bincount(ids, minlength=6).float() / 20000
    assert freq[[0, 2, 5]].sum() == 0  # zero probability: never drawn
    assert (freq - probs[0]).abs().max() < 0.015, freq
    wide = torch.softmax(torch.randn(64, 3000, generator=torch.Generator().manual_seed(3)), -1)
    narrow = wide.clone()
    narrow[:, 700:] = 0  # ids out of play, whole blocks of them too
    got = draw(narrow, keys[:64])
    assert (got < 700).all() and torch.equal(draw(narrow[:, :700] * 4.0, keys[:64]), got)  # unnormalised
    assert torch.equal(draw(wide, keys[:64])[5:6], draw(wide[5:6], keys[5:6]))  # alone = batched
    big = torch.tensor([[0.2, 0.3] + [0.0] * 600 + [0.5]]).repeat(20000, 1)  # across blocks
    freq = torch.bincount(draw(big, keys), minlength=603).float() / 20000
    assert abs(freq[0] - 0.2) < 0.015 and abs(freq[1] - 0.3) < 0.015 and abs(freq[602] - 0.5) < 0.015
    e = exponentials(torch.tensor([race_key(1, 0)]), torch.arange(200000)).float()
    assert abs(e.mean() - 1) < 0.01 and abs(e.var() - 1) < 0.03  # Exp(1)
    for empty in (torch.zeros(1, 3), torch.full((1, 3), float("nan"))):  # nothing to draw from
        with pytest.raises(RuntimeError, match="no probability mass left"):
            draw(empty, keys[:1])


def test_draw_is_stable_under_rounding_differences():
    """A batched decode's logits differ from the same row's alone in the last bits; the draw of
    a seeded request must not change with them (an inverse-CDF draw with one uniform per row
    flips ~1 in 120 draws here; the race none)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4000, 2048, generator=g) * 2  # flat-ish, like a barely trained model
    nudged = logits + 1e-4 * torch.randn(logits.shape, generator=g)  # a generous rounding gap
    keys = torch.tensor([race_key(11, step) for step in range(4000)])
    a = draw(torch.softmax(logits, -1), keys)
    b = draw(torch.softmax(nudged, -1), keys)
    assert (a != b).sum() <= 1, int((a != b).sum())
    u = torch.rand(4000, generator=g)  # the inverse-CDF draw on the same pair, for contrast
    cdf, cdf2 = torch.softmax(logits, -1).cumsum(-1), torch.softmax(nudged, -1).cumsum(-1)
    flips = (torch.searchsorted(cdf, u[:, None]) != torch.searchsorted(cdf2, u[:, None])).sum()
    assert flips > 10, int(flips)
