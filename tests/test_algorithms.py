"""Unit tests for engine.shaping.algorithms: every named algorithm's shaping on one hand-checked batch.

The batch: 2 prompts x 2 responses (B = 4), padded response length T = 5.

    row  group  score  polarity  valid tokens
     0     0      1       +1        4
     1     0      0       -1        3
     2     1      0       -1        5
     3     1      0       -1        2

Group 0 is mixed, group 1 is all wrong. Padding positions carry extreme metric values (very low
log-prob, very high entropy) so that a rule or the fork-token threshold that looked at padding
would pick them.
"""

import math

import pytest
import torch

from engine.config import load_config, resolved_from_dict
from engine.shaping.algorithms import (
    ALGORITHMS,
    ESTIMATORS,
    Algorithm,
    alpha_schedule,
    register_algorithm,
    resolve,
    shape_advantages,
)

# GRPO on group 0 = [1, 0]: mean 0.5, unbiased std sqrt((0.25 + 0.25) / 1) = 0.70710678
#   -> +-0.5 / (0.70710678 + 1e-6) = +-0.70710578
G = 0.5 / (math.sqrt(0.5) + 1e-6)

SCORES = torch.tensor([1.0, 0.0, 0.0, 0.0])
GROUPS = [0, 0, 1, 1]
POLARITY = torch.tensor([1, -1, -1, -1], dtype=torch.int8)
MASK = torch.tensor(
    [
        [1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
    ]
)
LOGPROBS = torch.tensor(
    [
        [-0.1, -2.0, -0.5, -1.0, -9.0],  # lowest prob among valid: pos 1; the pad (-9) is lower still
        [-1.5, -0.3, -0.8, 0.0, 0.0],  # highest prob among valid: pos 1; pads have prob 1
        [-0.7, -0.4, -2.5, -0.05, -1.2],  # highest prob: pos 3
        [-0.9, -0.6, 0.0, 0.0, 0.0],  # highest prob among valid: pos 1
    ]
)
ENTROPY = torch.tensor(
    [
        [0.5, 1.5, 0.2, 0.9, 9.0],
        [0.3, 2.0, 1.0, 8.0, 8.0],
        [0.4, 0.0, 1.2, 0.6, 1.1],  # pos 1 has zero entropy: never a rule candidate
        [0.7, 0.1, 7.0, 7.0, 7.0],
    ]
)
M = MASK.float()


def cfg_for(name, *overrides):
    return load_config(None, [f"algorithm.name={name}", *overrides])


def shape(name, *overrides, step=0, total=10, entropy=ENTROPY, logprobs=LOGPROBS):
    cfg = cfg_for(name, f"train.steps={total}", *overrides)
    return shape_advantages(
        resolve(cfg),
        scores=SCORES,
        group_ids=GROUPS,
        polarity=POLARITY,
        response_mask=MASK,
        logprobs=logprobs,
        entropy=entropy,
        step=step,
    )


def close(got, expected, atol=1e-5):
    expected = torch.as_tensor(expected, dtype=torch.float32)
    got = got.float()
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert torch.allclose(got, expected, atol=atol, rtol=0), (got, expected)


def keys(rows_pos):
    k = torch.zeros(4, 5, dtype=torch.bool)
    for r, p in rows_pos:
        k[r, p] = True
    return k


def per_row(values):
    """(B,) row values broadcast over the valid tokens."""
    return torch.tensor(values).unsqueeze(-1) * M


NO_KEYS = torch.zeros(4, 5, dtype=torch.bool)


# ------------------------------------------------------------------ estimators and sample weights
def test_grpo_by_hand():
    s = shape("grpo")
    close(s.adv_raw, [G, -G, 0.0, 0.0])  # all-wrong group 1 -> exactly 0
    assert s.adv_raw[2] == 0 and s.adv_raw[3] == 0
    close(s.adv_tokens_raw, per_row([G, -G, 0.0, 0.0]))
    close(s.adv, per_row([G, -G, 0.0, 0.0]))
    assert torch.equal(s.key_mask, NO_KEYS) and s.rules == []


def test_grpo_with_std_normalize_off_is_mean_centred():
    # std_normalize=false: 1 - 0.5 = 0.5, 0 - 0.5 = -0.5
    s = shape("grpo", "algorithm.std_normalize=false")
    close(s.adv_raw, [0.5, -0.5, 0.0, 0.0])


def test_dapo_shapes_like_grpo():
    # dapo differs from grpo in sampling/loss/overlong reward, not in shaping
    s = shape("dapo")
    close(s.adv, per_row([G, -G, 0.0, 0.0]))
    assert not s.key_mask.any()


def test_dr_grpo_no_std():
    # 1 - 0.5 = +0.5 ; 0 - 0.5 = -0.5 ; group 1 all 0
    s = shape("dr_grpo")
    close(s.adv_raw, [0.5, -0.5, 0.0, 0.0])
    close(s.adv, per_row([0.5, -0.5, 0.0, 0.0]))


def test_dr_grpo_std_normalize_override_restores_grpo():
    s = shape("dr_grpo", "algorithm.std_normalize=true")
    close(s.adv_raw, [G, -G, 0.0, 0.0])


def test_psr_zeroes_negatives():
    # weights (1, 0): row 0 keeps +G, row 1 (-G) -> 0
    s = shape("psr")
    close(s.adv_raw, [G, -G, 0.0, 0.0])  # raw is before the weights
    close(s.adv, per_row([G, 0.0, 0.0, 0.0]))


def test_nsr_zeroes_positives():
    s = shape("nsr")
    close(s.adv_raw, [G, -G, 0.0, 0.0])
    close(s.adv, per_row([0.0, -G, 0.0, 0.0]))


def test_psr_honours_configured_weight_scale():
    # psr weights (1, 0) x configured (w_pos=3, w_neg=5) -> (3, 0): row 0 = 3G
    s = shape("psr", "algorithm.w_pos=3", "algorithm.w_neg=5")
    close(s.adv, per_row([3 * G, 0.0, 0.0, 0.0]))


def test_w_reinforce_every_response_even_all_wrong_group():
    # +lam = +0.1 for the correct row, -1 for every incorrect row, no normalisation
    s = shape("w_reinforce")
    close(s.adv_raw, [0.1, -1.0, -1.0, -1.0])
    close(s.adv, per_row([0.1, -1.0, -1.0, -1.0]))
    assert s.adv[2, :5].tolist() == [-1.0] * 5 and s.adv[3, :2].tolist() == [-1.0, -1.0]


def test_w_reinforce_lam_from_config():
    s = shape("w_reinforce", "algorithm.lam=0.3")
    close(s.adv_raw, [0.3, -1.0, -1.0, -1.0])


def test_polarity_weighted_p2n1():
    # w_pos=2: 2G = 1.41421156 ; w_neg=1: -G ; adv_raw stays the unweighted estimator output
    s = shape("polarity_weighted", "algorithm.w_pos=2", "algorithm.w_neg=1")
    close(s.adv_raw, [G, -G, 0.0, 0.0])
    close(s.adv_tokens_raw, per_row([G, -G, 0.0, 0.0]))
    close(s.adv, per_row([2 * G, -G, 0.0, 0.0]))
    assert abs(2 * G - 1.4142116) < 1e-6


# ------------------------------------------------------------------ token rules
def test_token_weighted_rule_from_config():
    # rule: negative rows, top entropy, ratio 0.5, scale 3; candidates = valid tokens with entropy != 0
    #   row 1: 3 candidates, k = max(1, int(1.5)) = 1 -> pos 1 (2.0)
    #   row 2: pos 1 has entropy 0 -> 4 candidates, k = int(2.0) = 2 -> pos 2 (1.2), pos 4 (1.1)
    #   row 3: 2 candidates, k = 1 -> pos 0 (0.7)
    #   row 0 is positive: untouched
    s = shape(
        "token_weighted",
        "algorithm.token_rules=[{polarity: negative, metric: entropy, end: high, ratio: 0.5, scale: 3}]",
    )
    expected = torch.zeros(4, 5)
    expected[0, :4] = G
    expected[1, :3] = torch.tensor([-G, -3 * G, -G])  # -3G = -2.1213173
    close(s.adv, expected)
    close(s.adv_raw, [G, -G, 0.0, 0.0])
    # rows 2 and 3 have advantage 0 but their picked tokens are still keys
    assert torch.equal(s.key_mask, keys([(1, 1), (2, 2), (2, 4), (3, 0)]))
    assert len(s.rules) == 1 and s.rules[0].scale == 3 and s.rules[0].metric == "entropy"


def test_token_weighted_without_rules_is_grpo():
    s = shape("token_weighted")
    close(s.adv, per_row([G, -G, 0.0, 0.0]))
    assert not s.key_mask.any()


def test_fork_tokens_top_20_percent_entropy_of_batch():
    # 14 valid entropies sorted: 0.0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.9 1.0 1.1 1.2 1.5 2.0
    # 0.8-quantile (linear): index 0.8 * 13 = 10.4 -> 1.1 + 0.4 * (1.2 - 1.1) = 1.14
    # tokens >= 1.14: (0,1)=1.5, (1,1)=2.0, (2,2)=1.2 ; pads (9.0, 8.0, 7.0) never count
    s = shape("fork_tokens")
    expected = torch.zeros(4, 5)
    expected[0, 1] = G
    expected[1, 1] = -G
    close(s.adv, expected)  # (2,2) is a fork token of an all-wrong group: advantage 0
    assert torch.equal(s.key_mask, keys([(0, 1), (1, 1), (2, 2)]))
    close(s.adv_raw, [G, -G, 0.0, 0.0])
    close(s.adv_tokens_raw, per_row([G, -G, 0.0, 0.0]))


def test_fork_tokens_needs_entropy():
    with pytest.raises(ValueError, match="entropies"):
        shape("fork_tokens", entropy=None)


# ------------------------------------------------------------------ A3PO
# a3po rules (ratio 0.2): positive rows -> lowest prob, negative rows -> highest prob, k = max(1, int(0.2 n))
#   row 0 (n=4, k=1): lowest prob pos 1 (lp -2.0)  | row 1 (n=3, k=1): highest pos 1 (lp -0.3)
#   row 2 (n=5, k=1): highest pos 3 (lp -0.05)     | row 3 (n=2, k=1): highest pos 1 (lp -0.6)
A3PO_KEYS = [(0, 1), (1, 1), (2, 3), (3, 1)]


def a3po_expected(alpha):
    e = per_row([G, -G, 0.0, 0.0])
    e[0, 1] *= alpha
    e[1, 1] *= alpha
    return e


def test_a3po_step0_full_alpha():
    # linear: alpha(0) = 1 + (2 - 1) * (1 - 0) = 2
    s = shape("a3po", step=0, total=10)
    close(s.adv, a3po_expected(2.0))  # (0,1) = 2G = 1.4142116, (1,1) = -2G
    close(s.adv_raw, [G, -G, 0.0, 0.0])
    close(s.adv_tokens_raw, per_row([G, -G, 0.0, 0.0]))
    assert torch.equal(s.key_mask, keys(A3PO_KEYS))
    assert [(r.polarity, r.metric, r.end, r.scale) for r in s.rules] == [
        ("positive", "prob", "low", 2.0),
        ("negative", "prob", "high", 2.0),
    ]


def test_a3po_midway_linear():
    # alpha(5 of 10) = 1 + 1 * (1 - 0.5) = 1.5
    s = shape("a3po", step=5, total=10)
    close(s.adv, a3po_expected(1.5))


def test_a3po_end_equals_grpo_but_keys_marked():
    # alpha(10 of 10) = 1 + 1 * 0 = 1: the advantage is GRPO's, the picked tokens are still keys
    s = shape("a3po", step=10, total=10)
    g = shape("grpo", step=10, total=10)
    close(s.adv, per_row([G, -G, 0.0, 0.0]))
    assert torch.allclose(s.adv, g.adv, atol=1e-7, rtol=0)
    assert torch.equal(s.key_mask, keys(A3PO_KEYS))
    assert [r.scale for r in s.rules] == [1.0, 1.0]


def test_a3po_constant_decay_keeps_alpha():
    # constant: d = 1 at every step -> alpha stays alpha0 = 2 at the end
    s = shape("a3po", "algorithm.decay=constant", step=10, total=10)
    close(s.adv, a3po_expected(2.0))
    assert torch.equal(s.key_mask, keys(A3PO_KEYS))


def test_a3po_asymmetric_alphas_and_decay_steps():
    # alpha_pos = 3, alpha_neg = 5 at step 0 -> (0,1) = 3G, (1,1) = -5G
    s = shape("a3po", "algorithm.alpha_pos=3", "algorithm.alpha_neg=5", step=0, total=10)
    e = per_row([G, -G, 0.0, 0.0])
    e[0, 1] *= 3.0
    e[1, 1] *= 5.0
    close(s.adv, e)
    # decay_steps = 4 overrides the run length: at step 4 of 10 the scale is already 1
    s = shape("a3po", "algorithm.decay_steps=4", step=4, total=10)
    close(s.adv, per_row([G, -G, 0.0, 0.0]))


# ------------------------------------------------------------------ shape_tokens: the one seam
def test_shape_tokens_takes_per_row_or_per_token_raw_advantages():
    # verl hands the loss (B, T) advantages already broadcast; TRL and the trainer hand (B,): same result
    r = resolve(cfg_for("a3po", "train.steps=10"))
    from engine.shaping.algorithms import shape_tokens

    a = shape_tokens(r, torch.tensor([G, -G, 0.0, 0.0]), POLARITY, MASK, LOGPROBS, ENTROPY, step=0)
    b = shape_tokens(r, per_row([G, -G, 0.0, 0.0]) + 5.0 * (1 - M), POLARITY, MASK, LOGPROBS, ENTROPY, step=0)
    close(a.adv, a3po_expected(2.0))
    assert torch.equal(a.adv, b.adv) and torch.equal(a.key_mask, b.key_mask)
    close(b.adv_raw, [G, -G, 0.0, 0.0])  # (B, T) input: the per-row mean over valid tokens
    close(b.adv_tokens_raw, per_row([G, -G, 0.0, 0.0]))  # padding zeroed
    with pytest.raises(ValueError, match=r"\(B,\) or \(B, T\)"):
        shape_tokens(r, torch.zeros(4, 5, 1), POLARITY, MASK, LOGPROBS, ENTROPY)


def test_alphas_come_from_the_algorithms_own_rules_not_extra_rules():
    # A3PO at step 5 of 10 (linear, alpha0 = 3 / 2): alpha+ = 2, alpha- = 1.5; an extra positive rule
    # with scale 4 is applied but must not be reported as alpha+ (it used to overwrite it)
    rule = "algorithm.token_rules=[{polarity: positive, metric: entropy, end: high, ratio: 0.2, scale: 4}]"
    s = shape("a3po", "algorithm.alpha_pos=3", "algorithm.alpha_neg=2", rule, step=5, total=10)
    assert (s.alpha_pos, s.alpha_neg) == (2.0, 1.5)
    assert [r.scale for r in s.rules] == [2.0, 1.5, 4.0]
    g = shape("token_weighted", rule, step=5, total=10)
    assert (g.alpha_pos, g.alpha_neg) == (1.0, 1.0)  # no own rules: no alpha


def test_resolved_algorithm_round_trips_through_a_dict():
    import json

    rule = "algorithm.token_rules=[{polarity: negative, metric: prob, end: high, ratio: 0.5, scale: 3}]"
    r = resolve(cfg_for("a3po", "train.steps=7", rule))
    back = resolved_from_dict(json.loads(json.dumps(r.to_dict())))
    assert back == r and back.decay_steps == 7 and back.token_rules[0].scale == 3


@pytest.mark.parametrize(
    "change, match",
    [
        ({"alpha_pos": -1.0}, r"resolved algorithm: alpha_pos"),
        ({"ratio": 1.5}, r"resolved algorithm: ratio"),
        ({"decay": "sideways"}, r"resolved algorithm: decay"),
        ({"decay_steps": 0}, r"decay_steps"),
        ({"decay_steps": 2.5}, r"decay_steps must be a whole number"),
        ({"alpha_neg": "2"}, r"alpha_neg must be a number"),
        ({"fork_tokens": "yes"}, r"fork_tokens must be true or false"),
        ({"name": "ppo"}, r"unknown algorithm 'ppo'"),
        ({"estimator": "gae"}, r"unknown estimator 'gae'"),
        ({"alpha": 2.0}, r"unknown key 'alpha'"),
        ({"token_rules": [{"polarity": "up"}]}, r"bad token rule"),
        ({"token_rules": "none"}, r"token_rules must be a list"),
    ],
)
def test_resolved_algorithm_from_dict_refuses_bad_values_in_one_line(change, match):
    from engine.config import ConfigError

    d = {**resolve(cfg_for("a3po")).to_dict(), **change}
    with pytest.raises(ConfigError, match=match) as e:
        resolved_from_dict(d)
    assert "\n" not in str(e.value) and " — " in str(e.value)
    missing = resolve(cfg_for("a3po")).to_dict()
    del missing["ratio"]
    with pytest.raises(ConfigError, match="missing key 'ratio'"):
        resolved_from_dict(missing)


# ------------------------------------------------------------------ invariants over every algorithm
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_padding_is_zero_and_never_key(name):
    s = shape(name, step=0, total=10)
    pad = MASK == 0
    assert s.adv.shape == (4, 5) and s.key_mask.shape == (4, 5) and s.key_mask.dtype == torch.bool
    assert (s.adv[pad] == 0).all(), s.adv
    assert (s.adv_tokens_raw[pad] == 0).all()
    assert not s.key_mask[pad].any()
    assert s.adv_raw.shape == (4,)
    assert torch.isfinite(s.adv).all()


# ------------------------------------------------------------------ registry and schedule
def test_register_algorithm_new_spec():
    algo = Algorithm(
        "unit_half_pos", "w_reinforce with correct rows halved", estimator="w_reinforce", polarity_weights=(0.5, 1.0)
    )
    try:
        assert register_algorithm(algo) is algo
        assert ALGORITHMS["unit_half_pos"] is algo
        cfg = load_config(None, ["algorithm.name=unit_half_pos"])  # the config validator knows it now
        s = shape_advantages(
            resolve(cfg),
            scores=SCORES,
            group_ids=GROUPS,
            polarity=POLARITY,
            response_mask=MASK,
            logprobs=LOGPROBS,
            entropy=ENTROPY,
            step=0,
        )
        # raw [0.1, -1, -1, -1]; weights (0.5 * 1, 1 * 1) -> [0.05, -1, -1, -1]
        close(s.adv_raw, [0.1, -1.0, -1.0, -1.0])
        close(s.adv, per_row([0.05, -1.0, -1.0, -1.0]))
    finally:
        ALGORITHMS.pop("unit_half_pos", None)


def test_register_algorithm_unknown_estimator():
    with pytest.raises(ValueError, match="unknown estimator"):
        register_algorithm(Algorithm("unit_bad", "bad", estimator="ppo_gae"))
    assert "unit_bad" not in ALGORITHMS
    assert "ppo_gae" not in ESTIMATORS


def test_alpha_schedule_linear():
    r = resolve(cfg_for("a3po", "algorithm.alpha_pos=3", "algorithm.alpha_neg=2", "train.steps=10"))
    sched = alpha_schedule(r, total_steps=10, points=11)
    assert len(sched) == 11
    assert sched[0] == (0, 3.0, 2.0)
    # step 5: 1 + 2 * 0.5 = 2.0 ; 1 + 1 * 0.5 = 1.5
    s, ap, an = sched[5]
    assert s == 5 and ap == pytest.approx(2.0) and an == pytest.approx(1.5)
    assert sched[-1] == (10, 1.0, 1.0)
    pos = [p for _, p, _ in sched]
    assert all(a >= b for a, b in zip(pos, pos[1:]))


def test_alpha_schedule_constant_and_decay_steps():
    r = resolve(cfg_for("a3po", "algorithm.decay=constant", "train.steps=8"))
    assert {(a, b) for _, a, b in alpha_schedule(r, 8, points=5)} == {(2.0, 2.0)}
    # decay_steps = 4 with a 8-step run: steps 0, 2, 4, 6, 8 -> alpha 2, 1.5, 1, 1, 1
    r = resolve(cfg_for("a3po", "algorithm.decay_steps=4", "train.steps=8"))
    sched = alpha_schedule(r, 8, points=5)
    assert [s for s, _, _ in sched] == [0, 2, 4, 6, 8]
    assert [a for _, a, _ in sched] == pytest.approx([2.0, 1.5, 1.0, 1.0, 1.0])


# ------------------------------------------------------------------ resolve: every default filled in once
def _cfg(*overrides):
    from engine.config import load_config

    return load_config(None, list(overrides))


@pytest.mark.parametrize(
    "overrides, expect",
    [
        (
            ["algorithm.name=grpo"],
            dict(
                clip_ratio_low=0.2,
                clip_ratio_high=0.2,
                loss_agg_mode="token-mean",
                std_normalize=True,
                dynamic_sampling=False,
                overlong_buffer=0,
                w_pos=1.0,
                w_neg=1.0,
            ),
        ),
        (
            ["algorithm.name=dr_grpo"],
            dict(std_normalize=False, loss_agg_mode="seq-mean-token-sum-norm", clip_ratio_high=0.2),
        ),
        (
            ["algorithm.name=dapo", "rollout.max_new_tokens=64"],
            dict(clip_ratio_high=0.28, dynamic_sampling=True, overlong_buffer=16),
        ),
        (
            ["algorithm.name=dapo", "algorithm.overlong_buffer=0", "algorithm.dynamic_sampling=false"],
            dict(dynamic_sampling=False, overlong_buffer=0),
        ),
        (["algorithm.name=psr", "algorithm.w_pos=2"], dict(w_pos=2.0, w_neg=0.0)),
        (["algorithm.name=nsr"], dict(w_pos=0.0, w_neg=1.0)),
        (
            ["algorithm.name=a3po", "train.steps=30"],
            dict(clip_ratio_high=0.28, decay_steps=30, ratio=0.2, alpha_pos=2.0),
        ),
        (
            [
                "algorithm.name=a3po",
                "train.steps=30",
                "algorithm.decay_steps=10",
                "actor.clip_ratio_high=0.3",
                "actor.loss_agg_mode=seq-mean-token-mean",
            ],
            dict(decay_steps=10, clip_ratio_high=0.3, loss_agg_mode="seq-mean-token-mean"),
        ),
        (["algorithm.name=fork_tokens"], dict(fork_tokens=True, dynamic_sampling=True, fork_quantile=0.2)),
    ],
)
def test_resolve_fills_every_algorithm_default(overrides, expect):
    from engine.shaping.algorithms import resolve

    r = resolve(_cfg(*overrides))
    assert {k: getattr(r, k) for k in expect} == expect


def test_resolved_algorithm_is_stored_whole_in_run_json(tmp_path):
    import json

    from engine.config import load_config
    from engine.store.store import Store
    from engine.train.trainer import Trainer

    cfg = load_config(
        None,
        [
            "algorithm.name=dapo",
            "train.steps=1",
            "train.prompts_per_step=2",
            "rollout.n=2",
            "eval.n_prompts=2",
            "eval.k=[1]",
            "eval.at_start=false",
            "train.save_final_model=false",
            "train.threads=1",
        ],
    )
    tr = Trainer(cfg, Store(tmp_path), log=lambda s: None)
    tr.fit(progress=False)
    meta = json.loads((tmp_path / tr.run_id / "run.json").read_text())
    assert meta["config"]["actor"]["clip_ratio_high"] is None  # the config as written...
    res = meta["resolved"]  # ...and the values that trained the run
    assert res["clip_ratio_high"] == 0.28 and res["dynamic_sampling"] is True and res["overlong_buffer"] == 16
    assert res["token_rules"] == [] and res["name"] == "dapo"
