"""Unit tests for engine.shaping.advantage: group advantages, polarity weights, token shaping, A3PO."""

import math

import pytest
import torch

from engine.shaping.advantage import (
    TokenRule,
    a3po_rules,
    decay_alpha,
    fork_token_mask,
    group_advantages,
    polarity_weighting,
    token_shaping,
    w_reinforce_advantages,
)

EPS = 1e-6


def close(got, expected, atol=1e-5):
    expected = torch.as_tensor(expected, dtype=got.dtype)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert torch.allclose(got, expected, atol=atol, rtol=0), (got, expected)


# --------------------------------------------------------------------------------------------
# group_advantages
# --------------------------------------------------------------------------------------------
def test_group_advantages_mixed_groups():
    # group a: [1, 0, 0] -> mean 1/3, unbiased var ((2/3)^2 + 2 (1/3)^2) / 2 = 1/3, std 0.5773503
    #   1 -> (2/3)/0.5773503 = 1.1547005 ; 0 -> (-1/3)/0.5773503 = -0.5773503
    # group b: [1, 1, 0, 0] -> mean 1/2, var 4 * 0.25 / 3 = 1/3, std 0.5773503 -> +-0.8660254
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    ids = ["a", "a", "a", "b", "b", "b", "b"]
    adv = group_advantages(scores, ids)
    close(adv, [1.1547005, -0.5773503, -0.5773503, 0.8660254, 0.8660254, -0.8660254, -0.8660254])
    assert adv.dtype == torch.float32


def test_group_advantages_interleaved_string_ids():
    # same groups as above, but interleaved: a b a b b a b
    scores = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    ids = ["a", "b", "a", "b", "b", "a", "b"]
    adv = group_advantages(scores, ids)
    close(adv, [1.1547005, 0.8660254, -0.5773503, -0.8660254, 0.8660254, -0.5773503, -0.8660254])


def test_group_advantages_interleaved_tensor_ids():
    # group 7: [3, 1] -> mean 2, std sqrt((1 + 1) / 1) = 1.4142136 -> +-0.7071068
    # group 3: [0, 4, 2] -> mean 2, std sqrt((4 + 4 + 0) / 2) = 2 -> [-1, 1, 0]
    scores = torch.tensor([3.0, 0.0, 1.0, 4.0, 2.0])
    ids = torch.tensor([7, 3, 7, 3, 3])
    adv = group_advantages(scores, ids)
    close(adv, [0.7071068, -1.0, -0.7071068, 1.0, 0.0])


def test_group_advantages_all_correct_all_wrong_exactly_zero():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    ids = ["right", "right", "right", "wrong", "wrong", "wrong"]
    adv = group_advantages(scores, ids)
    assert torch.equal(adv, torch.zeros(6))
    # non-binary equal scores whose mean is not exactly representable still give exact zeros
    adv = group_advantages(torch.tensor([0.1, 0.1, 0.1]), [0, 0, 0])
    assert torch.equal(adv, torch.zeros(3))
    adv = group_advantages(torch.tensor([0.1, 0.1, 0.1]), [0, 0, 0], std_normalize=False)
    assert torch.equal(adv, torch.zeros(3))


def test_group_advantages_size_one_group():
    # singleton group: mean 0, std 1 -> s / (1 + eps)
    scores = torch.tensor([0.7, 1.0, 0.0, 0.0])
    ids = ["solo", "g", "g", "zero"]
    adv = group_advantages(scores, ids)
    # g: [1, 0] -> mean 0.5, std sqrt(0.5) = 0.7071068 -> +-0.7071068 ; "zero" singleton 0 -> 0
    close(adv, [0.7 / (1 + EPS), 0.7071068, -0.7071068, 0.0])
    # without std normalisation a singleton keeps its raw score (s - 0)
    adv = group_advantages(scores, ids, std_normalize=False)
    close(adv, [0.7, 0.5, -0.5, 0.0])


def test_group_advantages_non_binary_scores():
    # [0.5, 2.0, 3.5]: mean 2, deviations -1.5, 0, 1.5, var (2.25 + 2.25) / 2 = 2.25, std 1.5
    adv = group_advantages(torch.tensor([0.5, 2.0, 3.5]), ["q", "q", "q"])
    close(adv, [-1.0, 0.0, 1.0])


def test_group_advantages_std_normalize_false():
    # Dr. GRPO: s - mean only. group x: [0.5, 2.0, 3.5] mean 2 ; group y: [1, 0] mean 0.5
    scores = torch.tensor([0.5, 1.0, 2.0, 0.0, 3.5])
    ids = ["x", "y", "x", "y", "x"]
    adv = group_advantages(scores, ids, std_normalize=False)
    close(adv, [-1.5, 0.5, 0.0, -0.5, 1.5])


def test_group_advantages_eps_in_denominator():
    # [1, 0]: std 0.7071068 ; with eps = 0.2929932 the denominator is 1.0 -> +-0.5
    adv = group_advantages(torch.tensor([1.0, 0.0]), [1, 1], eps=1.0 - math.sqrt(0.5))
    close(adv, [0.5, -0.5])


# --------------------------------------------------------------------------------------------
# polarity_weighting / W-REINFORCE
# --------------------------------------------------------------------------------------------
def test_polarity_weighting_1d_p2n1():
    adv = torch.tensor([0.5, -0.5, 1.0, -2.0])
    pol = torch.tensor([1, -1, 0, 1])
    before = adv.clone()
    out = polarity_weighting(adv, pol, w_pos=2.0, w_neg=1.0)
    # correct rows x2, incorrect x1, neutral unchanged
    close(out, [1.0, -0.5, 1.0, -4.0])
    assert torch.equal(adv, before)  # not modified in place


def test_polarity_weighting_2d_psr_and_nsr():
    adv = torch.tensor([[1.0, 1.0, 0.0], [-2.0, -2.0, -2.0], [3.0, 0.0, 0.0]])
    pol = torch.tensor([1, -1, 0])
    before = adv.clone()
    psr = polarity_weighting(adv, pol, w_pos=1.0, w_neg=0.0)
    close(psr, [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    nsr = polarity_weighting(adv, pol, w_pos=0.0, w_neg=1.0)
    close(nsr, [[0.0, 0.0, 0.0], [-2.0, -2.0, -2.0], [3.0, 0.0, 0.0]])
    mixed = polarity_weighting(adv, pol, w_pos=0.5, w_neg=3.0)
    close(mixed, [[0.5, 0.5, 0.0], [-6.0, -6.0, -6.0], [3.0, 0.0, 0.0]])
    assert torch.equal(adv, before)


def test_w_reinforce_advantages():
    pol = torch.tensor([1, -1, 0, 1, -1])
    close(w_reinforce_advantages(pol), [0.1, -1.0, 0.0, 0.1, -1.0])
    close(w_reinforce_advantages(pol, lam=0.5), [0.5, -1.0, 0.0, 0.5, -1.0])
    # no group normalisation: an all-correct batch still carries +lam everywhere
    close(w_reinforce_advantages(torch.tensor([1, 1, 1]), lam=0.25), [0.25, 0.25, 0.25])


# --------------------------------------------------------------------------------------------
# TokenRule
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(polarity="neutral", metric="prob", end="high"),
        dict(polarity="Positive", metric="prob", end="high"),
        dict(polarity="positive", metric="logprob", end="high"),
        dict(polarity="negative", metric="entropy", end="middle"),
        dict(polarity="negative", metric="entropy", end="low", ratio=-0.1),
        dict(polarity="negative", metric="entropy", end="low", ratio=1.5),
    ],
)
def test_token_rule_invalid_values_raise(kwargs):
    with pytest.raises(ValueError):
        TokenRule(**kwargs)


def test_token_rule_valid():
    r = TokenRule("negative", "entropy", "low", 0.3, 0.5)
    assert (r.polarity, r.metric, r.end, r.ratio, r.scale) == ("negative", "entropy", "low", 0.3, 0.5)


# --------------------------------------------------------------------------------------------
# token_shaping
# --------------------------------------------------------------------------------------------
def test_token_shaping_selects_per_response_not_per_batch():
    # top-1 entropy per response: row 0 -> index 1 (0.9) ; row 1 -> index 0 (0.05).
    # A batch-wide top-2 would have picked 0.9 and 0.4, both in row 0.
    ent = torch.tensor([[0.1, 0.9, 0.3, 0.2, 0.4], [0.05, 0.01, 0.02, 0.03, 0.04]])
    adv = torch.ones(2, 5)
    mask = torch.ones(2, 5)
    pol = torch.tensor([1, 1])
    before = adv.clone()
    shaped, key = token_shaping(adv, mask, pol, [TokenRule("positive", "entropy", "high", 0.2, 2.0)], entropy=ent)
    close(shaped, [[1, 2, 1, 1, 1], [2, 1, 1, 1, 1]])
    assert key.dtype == torch.bool
    assert key.tolist() == [[False, True, False, False, False], [True, False, False, False, False]]
    assert torch.equal(adv, before)


def _ramp_batch(lengths, T):
    """Rows with `lengths` valid tokens; entropy at position j is (j + 1) / 10, padding 0."""
    mask = torch.zeros(len(lengths), T)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ent = (torch.arange(T, dtype=torch.float32) + 1).div(10).expand(len(lengths), T) * mask
    return mask, ent


def test_token_shaping_k_rounding_ratio_0_2():
    # ratio 0.2: n=4 -> int(0.8)=0 -> max(1, 0)=1 ; n=5 -> 1 ; n=9 -> int(1.8)=1 ; n=10 -> 2
    mask, ent = _ramp_batch([4, 5, 9, 10], 10)
    pol = torch.ones(4, dtype=torch.long)
    shaped, key = token_shaping(
        mask.clone(), mask, pol, [TokenRule("positive", "entropy", "high", 0.2, 3.0)], entropy=ent
    )
    assert key.sum(-1).tolist() == [1, 1, 1, 2]
    # the highest entropies are the last valid tokens
    assert key.nonzero().tolist() == [[0, 3], [1, 4], [2, 8], [3, 8], [3, 9]]
    assert shaped.sum().item() == pytest.approx((4 + 5 + 9 + 10) + 5 * 2)  # each pick adds 3 - 1


@pytest.mark.parametrize(
    "ratio,n,k",
    [
        (0.3, 10, 3),  # 0.3 * 10 -> 3
        (0.29, 100, 28),  # 0.29 * 100 == 28.999999999999996 -> int -> 28
        (0.57, 100, 56),  # 0.57 * 100 == 56.99999999999999 -> 56
        (0.5, 3, 1),  # 1.5 -> 1
        (1.0, 7, 7),
    ],
)
def test_token_shaping_k_is_python_int_of_float_product(ratio, n, k):
    mask, ent = _ramp_batch([n], n)
    _, key = token_shaping(
        mask.clone(), mask, torch.tensor([1]), [TokenRule("positive", "entropy", "low", ratio, 2.0)], entropy=ent
    )
    assert int(key.sum()) == k
    # "low": the first k positions have the lowest entropies
    assert key[0, :k].all() and not key[0, k:].any()


def test_token_shaping_length_one_response():
    mask = torch.tensor([[1.0, 0.0, 0.0]])
    ent = torch.tensor([[0.4, 5.0, 6.0]])  # padding entropies are larger but must not be read
    adv = torch.tensor([[0.5, 0.0, 0.0]])
    shaped, key = token_shaping(
        adv, mask, torch.tensor([1]), [TokenRule("positive", "entropy", "high", 0.2, 4.0)], entropy=ent
    )
    # n = 1 -> k = max(1, int(0.2)) = 1 -> token 0: 0.5 * 4 = 2
    close(shaped, [[2.0, 0.0, 0.0]])
    assert key.tolist() == [[True, False, False]]


def test_token_shaping_zero_entropy_tokens_excluded():
    ent = torch.tensor([[0.0, 0.0, 0.5, 0.3, 0.0]])
    mask = torch.ones(1, 5)
    adv = torch.full((1, 5), -1.0)
    shaped, key = token_shaping(
        adv, mask, torch.tensor([-1]), [TokenRule("negative", "entropy", "low", 0.2, 2.0)], entropy=ent
    )
    # candidates {0.5, 0.3}: n=2 -> k=max(1, int(0.4))=1 -> lowest non-zero is 0.3 at index 3
    close(shaped, [[-1.0, -1.0, -1.0, -2.0, -1.0]])
    assert key.tolist() == [[False, False, False, True, False]]


def test_token_shaping_padding_never_picked_and_untouched():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0, 0.0]])
    # padding holds the most extreme metric values and a non-zero advantage
    ent = torch.tensor([[0.2, 0.3, 0.4, 99.0, 1e-4], [0.5, 0.6, 99.0, 1e-4, 99.0]])
    adv = torch.tensor([[1.0, 1.0, 1.0, 7.0, 7.0], [1.0, 1.0, 7.0, 7.0, 7.0]])
    pol = torch.tensor([1, 1])
    rules = [TokenRule("positive", "entropy", "high", 0.2, 2.0), TokenRule("positive", "entropy", "low", 0.2, 3.0)]
    shaped, key = token_shaping(adv, mask, pol, rules, entropy=ent)
    # row 0: high -> 0.4 (idx 2) x2, low -> 0.2 (idx 0) x3 ; row 1: high -> idx 1 x2, low -> idx 0 x3
    close(shaped, [[3.0, 1.0, 2.0, 7.0, 7.0], [3.0, 2.0, 7.0, 7.0, 7.0]])
    assert key.tolist() == [[True, False, True, False, False], [True, True, False, False, False]]
    assert not (key & ~mask.bool()).any()


def test_token_shaping_two_rules_stack_scales():
    ent = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    lp = torch.log(torch.tensor([[0.2, 0.6, 0.7, 0.8]]))
    mask = torch.ones(1, 4)
    adv = torch.ones(1, 4)
    rules = [
        TokenRule("positive", "entropy", "high", 0.25, 2.0),  # k=1 -> idx 0 (0.9)
        TokenRule("positive", "prob", "low", 0.25, 0.5),  # k=1 -> idx 0 (p=0.2)
        TokenRule("positive", "entropy", "high", 0.5, 3.0),  # k=2 -> idx 0, 2 (reads unscaled entropy)
    ]
    shaped, key = token_shaping(adv, mask, torch.tensor([1]), rules, logprobs=lp, entropy=ent)
    # idx 0: 2 * 0.5 * 3 = 3 ; idx 2: 3
    close(shaped, [[3.0, 1.0, 3.0, 1.0]])
    assert key.tolist() == [[True, False, True, False]]
    # 2 * 0.5 = 1: value unchanged but the token is still marked as key
    shaped, key = token_shaping(adv, mask, torch.tensor([1]), rules[:2], logprobs=lp, entropy=ent)
    close(shaped, [[1.0, 1.0, 1.0, 1.0]])
    assert key.tolist() == [[True, False, False, False]]


def test_token_shaping_only_matching_polarity_rows_change():
    ent = torch.tensor([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [0.1, 0.2, 0.3]])
    adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0], [0.5, 0.5, 0.5]])
    mask = torch.ones(3, 3)
    pol = torch.tensor([1, -1, 0])
    shaped, key = token_shaping(adv, mask, pol, [TokenRule("negative", "entropy", "high", 0.2, 2.0)], entropy=ent)
    close(shaped, [[1.0, 1.0, 1.0], [-1.0, -1.0, -2.0], [0.5, 0.5, 0.5]])
    assert key.tolist() == [[False] * 3, [False, False, True], [False] * 3]


def test_token_shaping_row_without_candidates():
    ent = torch.tensor([[0.0, 0.0, 0.0], [0.2, 0.0, 0.1]])
    adv = torch.ones(2, 3)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    shaped, key = token_shaping(
        adv, mask, torch.tensor([1, 1]), [TokenRule("positive", "entropy", "low", 0.2, 5.0)], entropy=ent
    )
    # row 0: no non-zero entropy -> nothing ; row 1: lowest non-zero is 0.1 at idx 2
    close(shaped, [[1.0, 1.0, 1.0], [1.0, 1.0, 5.0]])
    assert key.tolist() == [[False, False, False], [False, False, True]]
    # a fully padded row has no candidates either
    shaped, key = token_shaping(
        adv, torch.zeros(2, 3), torch.tensor([1, 1]), [TokenRule("positive", "entropy", "low", 0.2, 5.0)], entropy=ent
    )
    assert torch.equal(shaped, adv) and not key.any()


def test_token_shaping_ties_broken_by_position():
    ent = torch.full((1, 5), 0.5)
    mask = torch.ones(1, 5)
    for end in ("high", "low"):
        _, key = token_shaping(
            torch.ones(1, 5), mask, torch.tensor([1]), [TokenRule("positive", "entropy", end, 0.4, 2.0)], entropy=ent
        )
        # k = int(0.4 * 5) = 2 -> the first two positions
        assert key.tolist() == [[True, True, False, False, False]], end
    # partial tie at the top: 0.9 at idx 1 and 3, 0.2 elsewhere; k=1 -> idx 1
    ent = torch.tensor([[0.2, 0.9, 0.2, 0.9, 0.2]])
    _, key = token_shaping(
        torch.ones(1, 5), mask, torch.tensor([1]), [TokenRule("positive", "entropy", "high", 0.2, 2.0)], entropy=ent
    )
    assert key.tolist() == [[False, True, False, False, False]]


def test_token_shaping_missing_metric_raises():
    adv = torch.ones(1, 3)
    mask = torch.ones(1, 3)
    with pytest.raises(ValueError):
        token_shaping(adv, mask, torch.tensor([1]), [TokenRule("positive", "prob", "low")], entropy=torch.ones(1, 3))
    with pytest.raises(ValueError):
        token_shaping(
            adv, mask, torch.tensor([1]), [TokenRule("positive", "entropy", "low")], logprobs=torch.zeros(1, 3)
        )


def test_token_shaping_no_rules_is_identity():
    adv = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    shaped, key = token_shaping(adv, torch.ones(2, 2), torch.tensor([1, -1]), [])
    assert torch.equal(shaped, adv) and not key.any()


def test_token_shaping_prob_metric_reads_tiny_probabilities():
    # float64 log-probs: exp(-120) = 7.7e-53 is a non-zero probability, so it is a candidate and,
    # being the lowest, it is the one "low" picks. n = 5 -> k = max(1, int(1.0)) = 1 -> idx 0.
    lp = torch.tensor([[-120.0, -1.0, -2.0, -3.0, -4.0]], dtype=torch.float64)
    adv = torch.ones(1, 5, dtype=torch.float64)
    shaped, key = token_shaping(
        adv, torch.ones(1, 5), torch.tensor([1]), [TokenRule("positive", "prob", "low", 0.2, 2.0)], logprobs=lp
    )
    assert key.tolist() == [[True, False, False, False, False]]
    close(shaped, [[2.0, 1.0, 1.0, 1.0, 1.0]])


# --------------------------------------------------------------------------------------------
# fork_token_mask
# --------------------------------------------------------------------------------------------
def test_fork_token_mask_batch_quantile_ignores_padding():
    ent = torch.tensor([[0.1, 0.2, 0.3, 0.4, 100.0], [0.6, 0.7, 0.8, 0.9, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    # 9 valid values sorted .1 .2 .3 .4 .6 .7 .8 .9 1.0 ; q = 0.8 -> position 0.8 * 8 = 6.4
    # threshold 0.8 + 0.4 * (0.9 - 0.8) = 0.84 -> picks 0.9 and 1.0 (row 0 gets nothing: batch-wide)
    out = fork_token_mask(ent, mask, quantile=0.2)
    assert out.tolist() == [[False] * 5, [False, False, False, True, True]]


def test_fork_token_mask_threshold_is_inclusive():
    ent = torch.full((2, 3), 0.5)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # all equal -> threshold 0.5 -> every valid token passes (>=), padding never
    out = fork_token_mask(ent, mask, quantile=0.2)
    assert out.tolist() == [[True, True, False], [True, True, True]]
    # [1, 2, 3, 4], quantile 0.5 -> torch.quantile(., 0.5) = 2.5 -> 3 and 4
    out = fork_token_mask(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.ones(1, 4), quantile=0.5)
    assert out.tolist() == [[False, False, True, True]]


# --------------------------------------------------------------------------------------------
# decay_alpha / a3po_rules
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "decay,step,rate,expected",
    [
        ("constant", 50, 5.0, 3.0),
        ("constant", 100, 5.0, 3.0),
        ("linear", 0, 5.0, 3.0),
        ("linear", 25, 5.0, 2.5),  # 1 + 2 * (1 - 0.25)
        ("linear", 100, 5.0, 1.0),
        ("linear", 150, 5.0, 1.0),  # x clipped to 1
        ("linear", -10, 5.0, 3.0),  # x clipped to 0
        ("cosine", 50, 5.0, 2.0),  # (1 + cos(pi/2)) / 2 = 0.5 -> 1 + 2 * 0.5
        ("cosine", 25, 5.0, 2.7071068),  # (1 + 0.7071068) / 2 = 0.8535534 -> 1 + 1.7071068
        ("cosine", 100, 5.0, 1.0),
        ("exponential", 0, 5.0, 3.0),
        ("exponential", 100, 5.0, 1.0134759),  # exp(-5) = 0.0067379 -> 1 + 0.0134759
        ("exponential", 50, 2.0, 1.7357589),  # exp(-1) = 0.3678794 -> 1 + 0.7357589
        ("exponential", 200, 5.0, 1.0134759),  # clipped at x = 1
    ],
)
def test_decay_alpha_schedules(decay, step, rate, expected):
    assert decay_alpha(3.0, step, 100, decay, rate) == pytest.approx(expected, abs=1e-6)


def test_decay_alpha_below_one_and_unknown_decay():
    # alpha0 = 0.5 at half-way linear: 1 + (-0.5) * 0.5 = 0.75
    assert decay_alpha(0.5, 5, 10, "linear") == pytest.approx(0.75)
    with pytest.raises(ValueError):
        decay_alpha(2.0, 1, 10, "step")


def test_a3po_rules_values():
    rules = a3po_rules(5, 10, ratio=0.4, alpha_pos=2.0, alpha_neg=3.0, decay="linear")
    # half-way linear: alpha+ = 1 + 1 * 0.5 = 1.5 ; alpha- = 1 + 2 * 0.5 = 2.0
    assert rules == [TokenRule("positive", "prob", "low", 0.4, 1.5), TokenRule("negative", "prob", "high", 0.4, 2.0)]
    rules = a3po_rules(0, 10, ratio=0.2, alpha_pos=2.0, alpha_neg=2.5, decay="cosine")
    assert [r.scale for r in rules] == [pytest.approx(2.0), pytest.approx(2.5)]
    assert [r.ratio for r in rules] == [0.2, 0.2]


def test_a3po_end_to_end_token_shaping():
    rules = a3po_rules(5, 10, ratio=0.4, alpha_pos=2.0, alpha_neg=3.0, decay="linear")  # 1.5 and 2.0
    probs = torch.tensor(
        [
            [0.9, 0.2, 0.6, 0.05, 0.7],  # positive, 5 valid
            [0.3, 0.95, 0.4, 0.8, 0.99],  # negative, 4 valid (0.99 is padding)
            [0.1, 0.99, 0.5, 0.5, 0.5],  # polarity 0
        ]
    )
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    adv = torch.tensor([[1.0] * 5, [-1.0, -1.0, -1.0, -1.0, 0.0], [0.5] * 5])
    pol = torch.tensor([1, -1, 0])
    shaped, key = token_shaping(adv, mask, pol, rules, logprobs=probs.log())
    # positive row: n=5, k=int(0.4*5)=2 lowest probs -> idx 3 (0.05), idx 1 (0.2) -> 1 * 1.5
    # negative row: n=4, k=int(1.6)=1 highest prob -> idx 1 (0.95) -> -1 * 2.0 ; padding 0.99 ignored
    # neutral row untouched
    close(
        shaped,
        [[1.0, 1.5, 1.0, 1.5, 1.0], [-1.0, -2.0, -1.0, -1.0, 0.0], [0.5] * 5],
    )
    assert key.tolist() == [
        [False, True, False, True, False],
        [False, True, False, False, False],
        [False] * 5,
    ]
    # at the end of training (linear) both scales are 1: values unchanged, key tokens still marked
    shaped, key = token_shaping(
        adv, mask, pol, a3po_rules(10, 10, ratio=0.4, alpha_pos=2.0, alpha_neg=3.0), logprobs=probs.log()
    )
    assert torch.equal(shaped, adv)
    assert int(key.sum()) == 3


# ------------------------------------------------------------------------------------ gradient push
from engine.shaping.advantage import gradient_push  # noqa: E402


def test_gradient_push_hand_values():
    # two responses (one positive, one negative), T = 3, last token of row 1 is padding
    p = torch.tensor([[0.5, 0.9, 0.999], [0.2, 1.0, 0.7]], dtype=torch.float64)
    lp = p.log()
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    raw = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]])
    shaped = torch.tensor([[2.0, 1.0, 3.0], [-1.0, -4.0, -9.0]])
    pol = torch.tensor([1, -1])
    out = gradient_push(raw, shaped, lp, mask, pol)
    # positive: |1|*0.5 + 0 + |2|*0.001 = 0.502 ; negative: 0 + |3|*(1-1.0) = 0 (padding ignored)
    assert out["positive"] == pytest.approx(0.502)
    assert out["negative"] == pytest.approx(0.0, abs=1e-12)
    base = gradient_push(torch.zeros_like(raw), raw, lp, mask, pol)
    assert base["positive"] == pytest.approx(0.5 + 0.1 + 0.001)
    assert base["negative"] == pytest.approx(0.8)


def test_gradient_push_neutral_rows_and_empty_batch():
    mask = torch.ones(1, 2)
    out = gradient_push(
        torch.zeros(1, 2), torch.ones(1, 2), torch.log(torch.full((1, 2), 0.5)), mask, torch.tensor([0])
    )
    assert out == {"positive": 0.0, "negative": 0.0}
    e = torch.zeros(0, 3)
    assert gradient_push(e, e, e, e, torch.zeros(0, dtype=torch.long)) == {"positive": 0.0, "negative": 0.0}


def test_a3po_negative_rule_has_no_push_on_near_certain_tokens():
    # a negative response whose tokens are all near-certain: the top-20% prob tokens get x2, yet push ~ 0
    from engine.shaping.advantage import a3po_rules

    T = 10
    p = torch.full((1, T), 0.99999, dtype=torch.float64)
    adv = -torch.ones(1, T)
    shaped, key = token_shaping(adv, torch.ones(1, T), torch.tensor([-1]), a3po_rules(0, 100), logprobs=p.log())
    assert int(key.sum()) == 2 and float((shaped - adv).abs().sum()) == pytest.approx(2.0)
    push = gradient_push(adv, shaped, p.log(), torch.ones(1, T), torch.tensor([-1]))
    assert push["negative"] == pytest.approx(2e-5, rel=1e-3)
