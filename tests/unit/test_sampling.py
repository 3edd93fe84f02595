"""Sampling functions against hand-computed distributions and Hugging Face's logits processors."""
import math

import pytest
import torch

from megatron_ru.inference.sampling import (SamplingError, SamplingParams, apply_repetition_penalty,
                                            apply_temperature, logits_to_probs, sample, seen_mask,
                                            top_k_filter, top_p_filter)
from tests.helpers import assert_rel_close

# Probabilities that are exact in binary, so boundaries are where we say they are.
PROBS = torch.tensor([[0.125, 0.5, 0.0625, 0.25, 0.0625]])
LOGITS = PROBS.log()


def probs_of(logits):
    return torch.softmax(logits, dim=-1)


def test_temperature_scales_and_zero_is_rejected_outside_greedy():
    x = torch.tensor([[1.0, -2.0, 4.0]])
    assert torch.equal(apply_temperature(x, 0.5), x * 2)
    assert apply_temperature(x, 1.0) is x
    with pytest.raises(SamplingError, match="must be > 0"):
        apply_temperature(x, 0.0)


def test_temperature_to_zero_equals_greedy():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    cold = sample(logits, SamplingParams(temperature=1e-4), gen)
    assert torch.equal(cold, logits.argmax(-1))
    assert torch.equal(sample(logits, SamplingParams(temperature=0.0)), logits.argmax(-1))
    assert torch.equal(sample(logits, SamplingParams(temperature=2.0, greedy=True)), logits.argmax(-1))
    hot = sample(logits, SamplingParams(temperature=1.0), torch.Generator().manual_seed(1))
    assert not torch.equal(hot, logits.argmax(-1))  # sampling does sample


def test_top_k_keeps_k_best_and_zero_means_off():
    assert top_k_filter(LOGITS, 0) is LOGITS
    assert torch.equal(top_k_filter(LOGITS, 5), LOGITS)  # k >= V: off too
    got = probs_of(top_k_filter(LOGITS, 2))
    assert_rel_close(got, torch.tensor([[0.0, 2 / 3, 0.0, 1 / 3, 0.0]]), 1e-6, "top-2")
    top3 = probs_of(top_k_filter(LOGITS, 3))
    assert_rel_close(top3, torch.tensor([[1 / 7, 4 / 7, 0.0, 2 / 7, 0.0]]), 1e-6, "top-3")
    tied = probs_of(top_k_filter(LOGITS, 4))  # the 4th and 5th are tied at 0.0625: both stay
    assert_rel_close(tied, PROBS, 1e-6, "ties")


@pytest.mark.parametrize("p, kept", [
    (1.0, [0, 1, 2, 3, 4]),
    (0.5 - 1e-4, [1]), (0.5 + 1e-4, [1, 3]),            # 0.5 alone reaches 0.4999, not 0.5001
    (0.75 - 1e-4, [1, 3]), (0.75 + 1e-4, [0, 1, 3]),    # 0.5 + 0.25 = 0.75 is the boundary
    (0.9375 + 1e-4, [0, 1, 2, 3, 4]),
    (1e-6, [1]),                                        # the most likely token is always kept
])
def test_top_p_boundary(p, kept):
    got = probs_of(top_p_filter(LOGITS, p))[0]
    expected = torch.zeros(5)
    expected[kept] = PROBS[0, kept] / PROBS[0, kept].sum()
    assert_rel_close(got, expected, 1e-6, f"top-p {p}")


def test_top_p_between_tied_tokens_keeps_one_of_them():
    # sorted: 0.5, 0.25, 0.125, 0.0625, 0.0625; mass before the last two: 0.875 and 0.9375
    got = probs_of(top_p_filter(LOGITS, 0.9))[0]
    assert got[[0, 1, 3]].gt(0).all() and int(got[[2, 4]].gt(0).sum()) == 1
    assert_rel_close(got.sum(), torch.tensor(1.0), 1e-6, "normalised")


def test_top_p_matches_hf_on_random_batches():
    transformers = pytest.importorskip("transformers")
    logits = 3 * torch.randn(8, 300, generator=torch.Generator().manual_seed(4))
    for p in (0.3, 0.9, 0.95):
        hf = transformers.TopPLogitsWarper(top_p=p)(None, logits.clone())
        ours = top_p_filter(logits, p)
        assert torch.equal(torch.isinf(ours), torch.isinf(hf)), p
        assert torch.equal(ours[~torch.isinf(ours)], logits[~torch.isinf(ours)])
    assert len({int((~torch.isinf(top_p_filter(logits, 0.9))[i]).sum()) for i in range(8)}) > 1


def test_top_k_matches_hf():
    transformers = pytest.importorskip("transformers")
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(5))
    hf = transformers.TopKLogitsWarper(top_k=7)(None, logits.clone())
    assert torch.equal(top_k_filter(logits, 7), hf)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_hf(penalty):
    transformers = pytest.importorskip("transformers")
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 200, generator=gen)
    ids = torch.randint(0, 200, (4, 30), generator=gen)
    ids[0, :10] = 17  # repeats count once
    hf = transformers.RepetitionPenaltyLogitsProcessor(penalty=penalty)(ids, logits.clone())
    ours = apply_repetition_penalty(logits, seen_mask(ids, 200), penalty)
    assert torch.equal(ours, hf)
    assert apply_repetition_penalty(logits, seen_mask(ids, 200), 1.0) is logits


def test_seen_mask_ignores_invalid_entries():
    ids = torch.tensor([[3, 1, 3, 0], [2, 2, 4, 4]])
    valid = torch.tensor([[True, True, True, False], [True, False, False, False]])
    mask = seen_mask(ids, 5, valid)
    assert mask.tolist() == [[False, True, False, True, False], [False, False, True, False, False]]


def test_combined_distribution_and_draw_frequencies():
    params = SamplingParams(temperature=0.5, top_k=3, top_p=0.8)
    # temperature 0.5 squares the probabilities: 1/64, 1/4, 1/256, 1/16, 1/256 (unnormalised);
    # top-3 keeps 1/4, 1/16, 1/64; top-p 0.8 keeps 1/4 (0.7619 < 0.8) and 1/16.
    probs = logits_to_probs(LOGITS, params)[0]
    expected = torch.tensor([0.0, 0.25, 0.0, 0.0625, 0.0]) / 0.3125
    assert_rel_close(probs, expected, 1e-6, "combined")
    draws = sample(LOGITS.expand(20000, 5), params, torch.Generator().manual_seed(7))
    freq = torch.bincount(draws, minlength=5).float() / 20000
    assert freq[0] == freq[2] == freq[4] == 0
    assert abs(freq[1].item() - 0.8) < 0.015 and abs(freq[3].item() - 0.2) < 0.015


def test_draws_are_deterministic_with_a_seed():
    logits = torch.randn(16, 100, generator=torch.Generator().manual_seed(8))
    params = SamplingParams(temperature=0.9, top_p=0.95)
    a = sample(logits, params, torch.Generator().manual_seed(3))
    b = sample(logits, params, torch.Generator().manual_seed(3))
    c = sample(logits, params, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "--temperature -0.1 must be >= 0"),
    (dict(top_k=-1), "--top_k -1 must be an integer >= 0"),
    (dict(top_p=0.0), r"--top_p 0.0 must be in \(0, 1\]"),
    (dict(top_p=1.5), r"--top_p 1.5 must be in \(0, 1\]"),
    (dict(top_p=math.nan), r"--top_p nan must be in \(0, 1\]"),
    (dict(repetition_penalty=0.0), "--repetition-penalty 0.0 must be > 0"),
])
def test_bad_parameters_are_named(kwargs, message):
    with pytest.raises(SamplingError, match=message):
        SamplingParams(**kwargs)
