"""The study's statistics and report on hand-built data: t quantiles, intervals, verdicts, power, claims.json.

No training here: ``fake_study`` builds the runs/steps/evals frames a study would load from the store,
with per-run values chosen so every interval can be checked by hand.
"""

import json
import math
import random
import statistics

import pandas as pd
import pytest

from engine.study import stats
from engine.study.design import SETTINGS
from engine.study.report import (
    CLIP_INACTIVE,
    METRICS,
    StudyData,
    claims,
    claims_json,
    combine,
    power_table,
    push_table,
    render_report,
)
from engine.study.stats import (
    FAILS,
    HOLDS,
    NULL,
    UNMEASURED,
    UNSURE,
    betainc,
    judge,
    paired_interval,
    power_paired_t,
    seeds_for_power,
    t_quantile,
    verdict,
)

PART_KEYS = {
    "text",
    "setting",
    "reference",
    "metric",
    "kind",
    "n",
    "mean",
    "se",
    "ci_low",
    "ci_high",
    "min_effect",
    "verdict",
}


# ------------------------------------------------------------------ t distribution
@pytest.mark.parametrize(
    "p, df, value",
    [
        (0.975, 1, 12.706),
        (0.975, 2, 4.303),
        (0.975, 9, 2.262),
        (0.975, 29, 2.045),
        (0.975, 10**9, 1.960),
        (0.975, math.inf, 1.960),
        (0.95, 4, 2.132),
        (0.995, 5, 4.032),
        (0.8, 12, 0.873),
        (0.9, 30, 1.310),
    ],
)
def test_t_quantile_table(p, df, value):
    assert t_quantile(p, df) == pytest.approx(value, abs=5e-4)


def test_t_quantile_closed_forms_and_symmetry():
    for p in (0.6, 0.9, 0.975, 0.999):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)  # Cauchy
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
        assert t_quantile(1 - p, 7) == pytest.approx(-t_quantile(p, 7), rel=1e-12)
    assert t_quantile(0.5, 3) == 0.0
    assert t_quantile(0.975, 200) == pytest.approx(1.972, abs=5e-4)
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            t_quantile(bad, 3)
    with pytest.raises(ValueError):
        t_quantile(0.9, 0)


def test_betainc_identities():
    for x in (0.0, 0.1, 0.5, 0.93, 1.0):
        assert betainc(1, 1, x) == pytest.approx(x)
        assert betainc(2.5, 0.5, x) == pytest.approx(1 - betainc(0.5, 2.5, 1 - x), abs=1e-12)
    assert betainc(2, 3, 0.4) == pytest.approx(0.5248)  # 1 - sum_{j<2} C(4,j) .4^j .6^(4-j)


# ------------------------------------------------------------------ intervals
def test_paired_interval_by_hand():
    n, m, se, lo, hi = paired_interval([1, 2, 3])  # sd 1, se 1/sqrt(3), t(0.975, 2) = 4.3027
    assert (n, m) == (3, 2.0)
    assert se == pytest.approx(0.57735, abs=1e-5)
    assert (lo, hi) == (pytest.approx(-0.4841, abs=1e-4), pytest.approx(4.4841, abs=1e-4))
    assert judge([1, 2, 3], "higher", 1.0).verdict == UNSURE
    assert paired_interval([1, 2, 3], level=0.90).ci_low == pytest.approx(2 - 2.9200 * 0.57735, abs=1e-3)


def test_paired_interval_edge_cases():
    assert paired_interval([]).n == 0 and math.isnan(paired_interval([]).mean)
    one = paired_interval([0.4])
    assert one.n == 1 and one.mean == 0.4 and all(math.isnan(x) for x in one[2:])
    assert paired_interval([math.nan, 1.0, None, 3.0])[:2] == (2, 2.0)  # NaN/None pairs are dropped
    flat = paired_interval([0.5, 0.5, 0.5])  # zero variance: degenerate interval
    assert flat.se == 0 and flat.ci_low == flat.ci_high == 0.5
    none = judge([], "higher", 0.01)
    assert none.n == 0 and none.verdict == UNMEASURED and math.isnan(none.mean) and math.isnan(none.ci_low)
    assert judge([0.5], "higher", 0.01).verdict == UNSURE
    assert judge([0.0, 0.0, 0.0], "equivalent", 0.01).verdict == HOLDS  # identical runs
    assert judge([0.02, 0.02, 0.02], "higher", 0.01).verdict == HOLDS


# ------------------------------------------------------------------ verdicts
@pytest.mark.parametrize(
    "diffs, kind, delta, expected",
    [
        ([2.0, 2.1, 1.9], "higher", 1.0, HOLDS),  # CI [1.75, 2.25]
        ([-2.0, -2.1, -1.9], "lower", 1.0, HOLDS),
        ([-2.0, -2.1, -1.9], "higher", 1.0, FAILS),  # whole interval below 0
        ([0.5, 0.6, 0.4], "higher", 1.0, NULL),  # CI [0.25, 0.75]: real but below the minimum effect
        ([-0.5, -0.6, -0.4], "higher", 1.0, NULL),  # opposite sign, but negligible
        ([0.8, 0.9, 0.7], "higher", 1.0, UNSURE),  # CI [0.55, 1.05]: above 0, estimate 0.8 < 1
        ([1, 2, 3], "higher", 1.0, UNSURE),  # CI [-0.48, 4.48]
        ([6e-8, 5e-8, 7e-8], "lower", 0.003, NULL),  # the old rule's "holds" for 6e-8 nats
        ([-0.004, 0.0, 0.004, 0.002], "at_least", 0.01, HOLDS),  # lo > -delta
        ([-0.05, -0.04, -0.06], "at_least", 0.01, FAILS),  # hi < -delta
        ([-0.05, 0.04, -0.02], "at_least", 0.01, UNSURE),
        ([0.001, -0.001, 0.0], "equivalent", 0.01, HOLDS),
        ([0.05, 0.04, 0.06], "equivalent", 0.01, FAILS),
        ([0.05, -0.04, 0.01], "equivalent", 0.01, UNSURE),
    ],
)
def test_verdict_by_hand(diffs, kind, delta, expected):
    assert judge(diffs, kind, delta).verdict == expected


def test_verdict_boundaries():
    assert verdict(0.0, 2.0, 1.0, "higher") == UNSURE  # lo must be > 0
    assert verdict(1e-9, 2.0, 1.0, "higher", mean=1.0) == HOLDS  # mean >= delta is enough
    assert verdict(-2.0, 0.0, 1.0, "higher") == UNSURE  # hi must be < 0
    assert verdict(-1.0, 1.0, 1.0, "higher") == UNSURE  # the ±delta band is open
    assert verdict(-0.99, 0.99, 1.0, "higher") == NULL
    assert verdict(0.1, 0.3, 0.0, "higher") == HOLDS  # no minimum effect: significance alone
    assert verdict(-0.3, -0.1, 0.0, "higher") == FAILS
    assert verdict(math.nan, math.nan, 1.0, "lower") == UNSURE
    assert verdict(-0.0099, 0.5, 0.01, "at_least") == HOLDS
    assert verdict(-0.01, 0.5, 0.01, "at_least") == UNSURE  # strict inequalities
    assert verdict(-0.5, -0.01, 0.01, "at_least") == UNSURE
    assert verdict(-0.5, -0.0101, 0.01, "at_least") == FAILS
    with pytest.raises(ValueError):
        verdict(0, 1, 0.1, "bigger")
    with pytest.raises(ValueError):
        verdict(0, 1, -0.1, "higher")


def _agrees(v: str, lo: float, hi: float, m: float, delta: float, kind: str) -> bool:
    """What each verdict says about its own interval, written independently of ``stats.verdict``."""
    if kind == "lower":
        lo, hi, m, kind = -hi, -lo, -m, "higher"
    inside = -delta < lo and hi < delta
    if kind == "higher":
        return {
            HOLDS: lo > 0 and m >= delta and not inside,
            FAILS: hi < 0 and not inside,
            NULL: inside,
            UNSURE: not inside and not (lo > 0 and m >= delta) and not hi < 0,
        }[v]
    if kind == "at_least":
        return {HOLDS: lo > -delta, FAILS: hi < -delta, UNSURE: lo <= -delta <= hi}[v]
    practical = (lo > 0 or hi < 0) and abs(m) >= delta
    return {HOLDS: inside, FAILS: practical and not inside, UNSURE: not inside and not practical}[v]


def test_every_verdict_agrees_with_its_interval():
    rng = random.Random(8)
    seen = set()
    for _ in range(3000):
        n = rng.choice([1, 2, 3, 5, 10])
        scale = 10 ** rng.uniform(-3, 0)
        diffs = [rng.gauss(rng.uniform(-2, 2) * scale, scale * rng.choice([0.0, 0.1, 1.0])) for _ in range(n)]
        delta = rng.choice([0.0, 0.003, 0.01, 0.5, 1.0]) * rng.choice([0.1, 1.0])
        kind = rng.choice(stats.KINDS)
        j = judge(diffs, kind, delta)
        assert j.verdict in stats.VERDICTS
        seen.add((kind, j.verdict))
        if n == 1:
            assert j.verdict == UNSURE
            continue
        assert _agrees(j.verdict, j.ci_low, j.ci_high, j.mean, delta, kind), (diffs, kind, delta, j)
        assert j.ci_low <= j.mean <= j.ci_high
        if kind in ("higher", "lower"):
            flipped = judge([-x for x in diffs], "lower" if kind == "higher" else "higher", delta)
            assert flipped.verdict == j.verdict  # "A lower than B" on d is "A higher than B" on -d
            if j.ci_low <= 0 <= j.ci_high:
                assert j.verdict in (NULL, UNSURE)  # an interval containing 0 never decides a direction
    # every verdict occurs for every kind it can occur for
    assert {(k, v) for k in ("higher", "lower") for v in stats.VERDICTS} <= seen
    assert {(k, v) for k in ("at_least", "equivalent") for v in (HOLDS, FAILS, UNSURE)} <= seen


# ------------------------------------------------------------------ power
def test_seeds_for_power_by_hand():
    # sd 1.2, delta 1: n = 13 -> (t(.975,12) + t(.8,12))^2 * 1.44 = (2.1788 + 0.8726)^2 * 1.44 = 13.41 > 13;
    #                  n = 14 -> (2.1604 + 0.8702)^2 * 1.44 = 13.23 <= 14.  (The "about 13" used sd ~1.15.)
    assert (t_quantile(0.975, 12) + t_quantile(0.8, 12)) ** 2 * 1.44 == pytest.approx(13.41, abs=0.01)
    assert (t_quantile(0.975, 13) + t_quantile(0.8, 13)) ** 2 * 1.44 == pytest.approx(13.23, abs=0.01)
    assert seeds_for_power(1.2, 1.0) == 14
    # delta 2: n = 5 -> (2.7764 + 0.9410)^2 * 0.36 = 4.97 <= 5; n = 4 -> (3.1824 + 0.9785)^2 * 0.36 = 6.23 > 4
    assert seeds_for_power(1.2, 2.0) == 5
    assert seeds_for_power(1.15, 1.0) == 13
    assert seeds_for_power(0.012, 0.01) == 14  # scale-free: only sd / delta matters
    assert seeds_for_power(1.0, 1.0, power=0.9) > seeds_for_power(1.0, 1.0)
    assert seeds_for_power(0.0, 1.0) == 2  # no spread: the smallest n with an interval
    assert seeds_for_power(math.nan, 1.0) is None
    for bad in ((1.0, 0.0), (1.0, -1.0), (-1.0, 1.0)):
        with pytest.raises(ValueError):
            seeds_for_power(*bad)
    sizes = [seeds_for_power(sd, 1.0) for sd in (0.5, 1.0, 1.5, 2.0, 3.0)]
    assert sizes == sorted(sizes)


def test_power_paired_t_agrees_with_the_sample_size():
    assert power_paired_t(13, 1.2, 1.0) < 0.8 <= power_paired_t(14, 1.2, 1.0)
    assert power_paired_t(5, 1.2, 2.0) == pytest.approx(0.79, abs=0.005)  # the formula's 5 is a point short
    assert power_paired_t(5, 1.2, 2.0) < 0.8 <= power_paired_t(6, 1.2, 2.0)
    assert seeds_for_power(1.2, 2.0, exact=True) == 6 and seeds_for_power(1.2, 1.0, exact=True) == 14
    assert seeds_for_power(0.0, 1.0, exact=True) == 2
    assert power_paired_t(200, 1.0, 0.2) == pytest.approx(0.80, abs=0.01)  # normal approximation at large n
    # "holds" also needs the estimate to reach the minimum effect: ~1/2 when the true effect equals it
    assert power_paired_t(40, 1.2, 1.0, min_effect=1.0) == pytest.approx(0.5, abs=0.01)
    assert power_paired_t(1, 1.0, 1.0) == 0.0 and power_paired_t(5, 0.0, 1.0) == 1.0


def test_power_paired_t_matches_simulation():
    rng, n, sd, effect, N = random.Random(3), 6, 1.2, 1.5, 4000
    tc = t_quantile(0.975, n - 1)
    hits = 0
    for _ in range(N):
        d = [rng.gauss(effect, sd) for _ in range(n)]
        hits += statistics.fmean(d) - tc * statistics.stdev(d) / math.sqrt(n) > 0
    assert hits / N == pytest.approx(power_paired_t(n, sd, effect), abs=0.025)


# ------------------------------------------------------------------ fake study
STEPS = 10


class S:  # a minimal stand-in for engine.study.design.Setting
    def __init__(self, name, section="methods"):
        self.name, self.section, self.label = name, section, name


def fake_study(values: dict[str, list[dict]], push: bool = True) -> StudyData:
    """values: setting -> one dict per seed with acc, entropy, length, reward, clipfrac (constant over steps)."""
    runs, steps, evals = [], [], []
    for setting, seeds in values.items():
        for seed, v in enumerate(seeds):
            rid = f"t.{setting}.s{seed}"
            runs.append(
                {
                    "run_id": rid,
                    "status": "finished",
                    "setting": setting,
                    "seed": seed,
                    "created": 1000.0 + seed,
                    "updated": 1000.0 + seed + 600,
                }
            )
            for st in range(1, STEPS + 1):
                row = {
                    "run_id": rid,
                    "step": st,
                    "reward": v.get("reward", 0.3),
                    "entropy": v.get("entropy", 0.2),
                    "length": v.get("length", 30.0),
                    "clipfrac": v.get("clipfrac", 0.01),
                }
                if push:
                    row.update(
                        push_rule_pos=v.get("rule_pos", 4.0),
                        push_rule_neg=v.get("rule_neg", 0.001),
                        push_raw_pos=10.0,
                        push_raw_neg=8.0,
                    )
                steps.append(row)
            for st, acc in ((0, 0.2), (STEPS, v.get("acc", 0.3))):
                evals.append({"run_id": rid, "step": st, "metric": "sampled_acc", "k": None, "value": acc, "n": 500})
                for k in (1, 16, 64):
                    evals.append(
                        {
                            "run_id": rid,
                            "step": st,
                            "metric": "pass@k",
                            "k": k,
                            "value": min(1.0, acc * (1 + k / 8)),
                            "n": 500,
                        }
                    )
    return StudyData(pd.DataFrame(runs), pd.DataFrame(steps), pd.DataFrame(evals))


def _grid() -> dict[str, list[dict]]:
    base = [0.30, 0.32, 0.28, 0.31, 0.29]
    return {
        "grpo": [{"acc": a} for a in base],
        "a3po": [{"acc": a + g} for a, g in zip(base, (0.030, 0.025, 0.035, 0.028, 0.032))],  # +3 pts, sd 0.4
        "dapo": [{"acc": a + g} for a, g in zip(base, (0.03, -0.03, 0.04, 0.0, -0.02))],
        "psr": [{"acc": a - 0.05, "entropy": 0.2 - 1e-7 * (i + 1)} for i, a in enumerate(base)],  # 1e-7-nat effect
        "nsr": [{"acc": a - 0.04, "entropy": 0.25 + 0.001 * i} for i, a in enumerate(base)],
        "p2n1": [{"acc": a} for a in base],
        "p1n0.5": [{"acc": a} for a in base],  # identical runs: Adam cancels the scale
        "dapo-clip-sym": [{"acc": a, "clipfrac": 0.0} for a in base],
    }


@pytest.fixture
def grid_claims():
    return {c["id"]: c for c in claims(fake_study(_grid()))}


def test_claims_on_hand_built_data(grid_claims):
    a3 = grid_claims["a3po-vs-grpo"]
    p = a3["parts"][0]
    assert (p.n, p.kind, p.min_effect) == (5, "higher", 0.01)
    assert p.mean == pytest.approx(0.03)
    assert p.se == pytest.approx(statistics.stdev([0.030, 0.025, 0.035, 0.028, 0.032]) / math.sqrt(5))
    assert p.ci_low == pytest.approx(0.03 - 2.7764 * p.se, abs=1e-5) and p.verdict == a3["verdict"] == HOLDS
    assert grid_claims["a3po-vs-dapo"]["verdict"] == UNSURE  # +2.6 pts, CI [-0.9, +6.1]
    psr = {q.text: q for q in grid_claims["psr-sharpens"]["parts"]}
    assert psr["entropy lower"].verdict == NULL  # a 1e-7-nat effect is no effect
    assert psr["length shorter"].verdict == NULL and grid_claims["psr-sharpens"]["verdict"] == NULL
    assert grid_claims["single-polarity-worse"]["verdict"] == HOLDS
    nsr = {q.text: q for q in grid_claims["nsr-explores"]["parts"]}
    assert nsr["entropy higher"].verdict == HOLDS and nsr["pass@4 at least GRPO's"].verdict == FAILS
    assert grid_claims["ratio-only"]["verdict"] == HOLDS  # zero-variance differences of exactly 0
    assert grid_claims["raise-negative"]["verdict"] == UNMEASURED  # no P1N2 runs
    # clip-higher: the symmetric arm never clipped -> not judged
    assert all(q.verdict == CLIP_INACTIVE for q in grid_claims["clip-higher"]["parts"])
    assert grid_claims["clip-higher"]["verdict"] == CLIP_INACTIVE


def test_clip_higher_judged_when_the_clip_acts():
    g = _grid()
    g["dapo-clip-sym"] = [{"acc": r["acc"] - 0.03, "clipfrac": 0.02} for r in g["dapo"]]
    cl = {c["id"]: c for c in claims(fake_study(g))}
    acc = [q for q in cl["clip-higher"]["parts"] if q.metric == "final test accuracy"][0]
    assert acc.verdict == HOLDS and acc.n == 5


def test_claims_json_fields_and_consistency(grid_claims):
    js = json.loads(json.dumps(claims_json(list(grid_claims.values()))))  # strict JSON: NaN became null
    assert len(js) == 11 and len({c["id"] for c in js}) == 11
    for c in js:
        assert set(c) == {"id", "claim", "verdict", "parts"} and c["parts"]
        for p in c["parts"]:
            assert set(p) == PART_KEYS
            assert p["min_effect"] == METRICS[p["metric"]].min_effect
            if p["ci_low"] is not None and not p["verdict"].startswith("not measured"):
                assert _agrees(p["verdict"], p["ci_low"], p["ci_high"], p["mean"], p["min_effect"], p["kind"])
        assert c["verdict"] == combine([p["verdict"] for p in c["parts"]])
    by = {c["id"]: c for c in js}
    assert "+4.5 to +6.2 points" in by["a3po-vs-grpo"]["claim"] and "+3.3 to +4.6 points" in by["a3po-vs-dapo"]["claim"]
    ratio = by["ratio-only"]["parts"][0]
    assert (ratio["setting"], ratio["reference"]) == ("p1n0.5", "p2n1")  # the same learning rate, not 2x
    assert by["raise-negative"]["parts"][0]["mean"] is None


def test_combine():
    assert combine([HOLDS, HOLDS]) == HOLDS
    assert combine([HOLDS, UNSURE]) == UNSURE
    assert combine([HOLDS, FAILS, UNSURE]) == FAILS
    assert combine([HOLDS, NULL]) == NULL and combine([NULL, FAILS]) == FAILS
    assert combine([UNMEASURED, UNMEASURED]) == UNMEASURED and combine([]) == UNMEASURED
    assert combine([HOLDS, UNMEASURED]) == UNSURE
    assert combine([CLIP_INACTIVE, CLIP_INACTIVE]) == CLIP_INACTIVE
    assert combine([CLIP_INACTIVE, UNMEASURED]) == UNMEASURED


def test_power_table_from_pilot():
    t = power_table(fake_study(_grid())).set_index("comparison")
    assert list(t.index) == ["A3PO - GRPO", "A3PO - DAPO", "P2N1 - GRPO", "PSR - GRPO", "NSR - GRPO"]  # no a3po-dapo
    row = t.loc["A3PO - DAPO"]
    diffs = [0.0, 0.055, -0.005, 0.028, 0.052]
    assert row.n == 5 and row["sd"] == pytest.approx(statistics.stdev(diffs))
    assert row["seeds@0.01"] == seeds_for_power(statistics.stdev(diffs), 0.01)
    assert row["seeds@0.02"] == seeds_for_power(statistics.stdev(diffs), 0.02) < row["seeds@0.01"]
    assert t.loc["P2N1 - GRPO", "seeds@0.01"] == 2  # identical runs: no spread
    one = power_table(fake_study({"a3po": [{"acc": 0.3}], "grpo": [{"acc": 0.2}]}))
    assert one.n.tolist() == [1] and pd.isna(one["seeds@0.01"][0])


def test_push_table_and_older_runs():
    g = {"a3po": [{"rule_pos": 4.0, "rule_neg": 0.002}, {"rule_pos": 2.0, "rule_neg": 0.002}], "grpo": [{}, {}]}
    d = fake_study(g)
    d.steps.loc[d.steps.run_id.str.contains("grpo"), ["push_rule_pos", "push_rule_neg"]] = 0.0
    t = push_table(d, [S("grpo", "polarity"), S("a3po")])
    assert t.setting.tolist() == ["a3po"]  # GRPO has no token rules
    assert t["neg/pos (rule)"][0] == pytest.approx((0.0005 + 0.001) / 2)
    assert t["rule/raw pos"][0] == pytest.approx((0.4 + 0.2) / 2)
    assert push_table(fake_study(g, push=False), [S("a3po")]) is None


def test_report_files(tmp_path):
    settings = [SETTINGS[n] for n in _grid()]
    res = render_report(fake_study(_grid()), "t", tmp_path, settings, notes=["Preset 'full': 5 paired seeds."])
    md = (tmp_path / "report.md").read_text()
    for text in (
        "## Verdict rule",
        "no practical effect",
        "## Power",
        "seeds for 80% power at 1 pt",
        "95% CI",
        "min effect",
        "±1.00",
        "±0.0030",
        "Adam",
        "clip inactive",
        "+5.4",
        "+3.3",
        "Preset 'full'",
        "Final evaluations on 500 test prompts",
        "neg/pos (rule)",
        "Wall time",
    ):
        assert text in md, text
    assert "+3.00" in md  # A3PO's gain over GRPO in points
    html = (tmp_path / "report.html").read_text()
    assert "<table" in html and "plotly" in html.lower() and "Verdict rule" in html and "seeds for 80% power" in html
    assert json.loads((tmp_path / "claims.json").read_text()) == res["claims"]
    older = render_report(fake_study(_grid(), push=False), "t", tmp_path / "old", settings)
    assert "predate the push columns" in (tmp_path / "old" / "report.md").read_text() and older["claims"]
