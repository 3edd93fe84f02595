"""The logits-processor chain (inference/logits.py): each rule alone against its sampling.py
primitive, rules combined against Hugging Face's processors and warpers, and a batch of rows with
different settings bit-identical to each row processed and drawn alone."""
import pytest
import torch

from megatron_ru.inference import logits as chain
from megatron_ru.inference.logits import Rules
from megatron_ru.inference.sampling import (GREEDY, SamplingParams, apply_repetition_penalty,
                                            draw, logits_to_probs, race_key, sample, seen_mask)

V = 300
GEN = torch.Generator().manual_seed(0)
LOGITS = 3 * torch.randn(6, V, generator=GEN)  # (B, V)
PROMPTS = [torch.randint(0, V, (n,), generator=GEN).tolist() for n in (5, 30, 1, 12, 40, 7)]
SEEN = chain.seen_of(PROMPTS, V)
SAMPLED = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.3)
MIXED = [  # one row per kind: greedy, penalised, plain, warped, penalised greedy, min tokens
    Rules(GREEDY, 2, (5,)), Rules(SAMPLED, 3, (7, 9)), Rules(SamplingParams()),
    Rules(SamplingParams(temperature=1.4, top_p=0.5)),
    Rules(SamplingParams(temperature=0.0, repetition_penalty=0.7), 9, (5,)),
    Rules(SAMPLED, 1, (7, 9))]
PRODUCED = [0, 3, 4, 0, 2, 0]


def test_seen_of_is_the_prompt_ids():
    for i, p in enumerate(PROMPTS):
        assert SEEN[i].nonzero().flatten().tolist() == sorted(set(p))


def test_token_limit_alone():
    x = chain.process(LOGITS, Rules(), token_limit=250)
    assert torch.isinf(x[:, 250:]).all() and torch.equal(x[:, :250], LOGITS[:, :250])


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_alone_is_the_primitive(penalty):
    rules = Rules(SamplingParams(repetition_penalty=penalty))
    x = chain.process(LOGITS, rules, seen=SEEN)
    assert torch.equal(x, apply_repetition_penalty(LOGITS, SEEN, penalty))
    with pytest.raises(ValueError, match="needs the seen ids"):
        chain.process(LOGITS, rules)
    assert torch.equal(chain.process(LOGITS, Rules()), LOGITS)  # penalty 1: no seen ids needed


def test_min_new_tokens_blocks_the_ends_only_while_under_it():
    rules = Rules(GREEDY, 3, (4, 11))
    for produced, blocked in [(0, True), (2, True), (3, False), (10, False)]:
        x = chain.process(LOGITS, rules, produced=produced)
        assert torch.isinf(x[:, [4, 11]]).all() == blocked
        keep = torch.ones(V, dtype=torch.bool)
        keep[[4, 11]] = False
        assert torch.equal(x[:, keep], LOGITS[:, keep])
    x = chain.process(LOGITS, rules, produced=torch.tensor([0, 5, 2, 3, 1, 9]))  # per row
    assert torch.isinf(x[:, 4]).tolist() == [True, False, True, False, True, False]


def test_warpers_and_greedy_are_the_primitives():
    for params in (SamplingParams(temperature=0.5), SamplingParams(top_k=7),
                   SamplingParams(top_p=0.6), SamplingParams(temperature=1.2, top_k=50, top_p=0.9)):
        assert torch.equal(chain.distributions(LOGITS, Rules(params)),
                           logits_to_probs(LOGITS, params))
    one_hot = chain.distributions(LOGITS, Rules(GREEDY))
    assert torch.equal(one_hot.argmax(-1), LOGITS.argmax(-1)) and torch.equal(one_hot.sum(-1), torch.ones(6))
    assert torch.equal(chain.choose(LOGITS, Rules(GREEDY)), LOGITS.argmax(-1))


def test_process_leaves_its_input_alone():
    before = LOGITS.clone()
    x = chain.process(LOGITS, MIXED, produced=PRODUCED, seen=SEEN, token_limit=200)
    assert torch.equal(LOGITS, before) and x.data_ptr() != LOGITS.data_ptr()
    half = LOGITS.half()
    assert chain.process(half, Rules()).dtype == torch.float32


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_combined_rules_match_hf(penalty):
    """Repetition penalty, min new tokens, temperature, top-k, top-p: the chain's distribution
    equals the one Hugging Face's processors and warpers give."""
    transformers = pytest.importorskip("transformers")
    params = SamplingParams(temperature=0.7, top_k=30, top_p=0.85, repetition_penalty=penalty)
    ids = torch.randint(0, V, (6, 5), generator=torch.Generator().manual_seed(1))  # (B, 5) prompts
    for produced in (0, 2):
        seq = torch.cat([ids, torch.zeros(6, produced, dtype=torch.long) + 3], 1)
        hf = transformers.LogitsProcessorList([
            transformers.RepetitionPenaltyLogitsProcessor(penalty=penalty),
            transformers.MinNewTokensLengthLogitsProcessor(5, 2, [4, 11]),
            transformers.TemperatureLogitsWarper(0.7), transformers.TopKLogitsWarper(30),
            transformers.TopPLogitsWarper(0.85)])(seq, LOGITS.clone())
        x = chain.process(LOGITS, Rules(params, 2, (4, 11)), produced=produced,
                          seen=seen_mask(seq, V))
        assert torch.equal(chain.distributions(x, Rules(params, 2, (4, 11))), torch.softmax(hf, -1))


def test_batched_rows_with_different_settings_equal_each_row_alone():
    """Processed logits, distributions and keyed draws: bit-identical batched and alone; the
    seen ids as one (B, V) tensor or one (V,) tensor (None without a penalty) per row agree."""
    per_row = [SEEN[i] if MIXED[i].sampling.repetition_penalty != 1.0 else None for i in range(6)]
    x = chain.process(LOGITS, MIXED, produced=PRODUCED, seen=SEEN, token_limit=280)
    assert torch.equal(x, chain.process(LOGITS, MIXED, produced=PRODUCED, seen=per_row,
                                        token_limit=280))
    probs = chain.distributions(x, MIXED)
    keys = torch.tensor([race_key(40 + i, 3) for i in range(6)])
    ids = chain.choose(x, MIXED, keys=keys)
    for i in range(6):
        alone = chain.process(LOGITS[i:i + 1], [MIXED[i]], produced=[PRODUCED[i]],
                              seen=SEEN[i:i + 1], token_limit=280)
        assert torch.equal(alone, x[i:i + 1]), i
        assert torch.equal(chain.distributions(alone, MIXED[i]), probs[i:i + 1]), i
        assert torch.equal(chain.choose(alone, MIXED[i], keys=keys[i:i + 1]), ids[i:i + 1]), i
        if MIXED[i].sampling.is_greedy:
            assert int(ids[i]) == int(alone.argmax())
        else:
            want = draw(logits_to_probs(alone, MIXED[i].sampling), keys[i:i + 1])
            assert int(ids[i]) == int(want)


def test_one_setting_draws_like_sample_on_the_same_generator():
    x = chain.process(LOGITS, Rules(SAMPLED), seen=SEEN)
    got = chain.choose(x, Rules(SAMPLED), generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, sample(x, SAMPLED, torch.Generator().manual_seed(3)))


def test_a_failing_group_is_reported_and_the_others_still_draw():
    rules = [Rules(SAMPLED), Rules(SamplingParams(temperature=0.9)), Rules(GREEDY)]
    x = chain.process(LOGITS[:3], rules, seen=SEEN[:3])
    x[1] = float("-inf")  # nothing left to draw from
    keys = torch.tensor([race_key(1, 0), race_key(2, 0), race_key(3, 0)])
    with pytest.raises(RuntimeError, match="no probability mass"):
        chain.choose(x, rules, keys=keys)
    failures = []
    ids = chain.choose(x, rules, keys=keys, on_failure=lambda rows, exc: failures.append(rows))
    assert failures == [[1]] and int(ids[1]) == -1
    assert int(ids[2]) == int(LOGITS[2].argmax())
    assert int(ids[0]) == int(chain.choose(x[:1], rules[0], keys=keys[:1]))


def test_rules_count_must_match_the_rows():
    with pytest.raises(ValueError, match="2 rules for 6 rows"):
        chain.process(LOGITS, MIXED[:2])
