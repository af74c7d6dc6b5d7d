"""Paired-seed statistics for the study: t intervals, a four-way verdict rule and a power calculation.

Why: the study compares settings run with the same seeds. With n = 3 pairs the two-sided 95% t
cutoff is 4.30 standard errors, not 2, and without a minimum effect a 6e-8-nat entropy change is
"real". Pure Python (``math``, ``statistics``) so the verdicts do not depend on SciPy being installed.

Intervals. For paired differences d_1..d_n (setting minus reference, one per seed; NaNs dropped):
mean m, sample sd s (n - 1 in the denominator), se = s / sqrt(n), and the two-sided interval
m +- t_{1-a/2, n-1} se (95% by default). n = 0: nothing measured; n = 1: no interval (NaN).
Zero spread (identical differences) gives the degenerate interval [m, m].

Verdict rule, with minimum effect delta >= 0 (the smallest change that matters for the metric) and
the interval [lo, hi] oriented so that the claimed direction is positive ("lower" claims use -d):

* directional claims ("higher", "lower"): the claim is an effect of practical size in that direction.
    - no practical effect: -delta < lo and hi < delta (the interval rules out any effect of practical
      size, in either direction). Checked first: it is the most informative statement.
    - holds: lo > 0 (the whole interval is on the claimed side of 0) and m >= delta (the estimate is of
      practical size).
    - does not hold: hi < 0 (the whole interval is on the opposite side of 0).
    - inconclusive: anything else, including n = 1 (no interval).
  The three conditions are mutually exclusive, so every interval gets exactly one verdict.
* "at_least" (non-inferiority, margin delta): holds when lo > -delta (any shortfall is smaller than
  the minimum effect), does not hold when hi < -delta, inconclusive otherwise. "No practical effect"
  satisfies this claim, so it is reported as "holds".
* "equivalent" (margin delta): holds when -delta < lo and hi < delta; does not hold when the
  directional rule would say "holds" in either direction (0 outside the interval and |m| >= delta);
  inconclusive otherwise. Using the 95% interval makes this a TOST at level 2.5% per side.

Power. ``seeds_for_power`` is the textbook paired-t sample size n = ((t_{1-a/2,n-1} + t_{power,n-1})
sd / delta)^2, solved for the smallest n that satisfies it; ``power_paired_t`` integrates the exact
probability (over the sampling distribution of the sd) that the interval excludes 0 on the claimed
side, or with ``min_effect`` > 0 that the directional verdict is "holds". For a true effect equal to
the minimum effect "holds" has probability at most 1/2 (its estimate must reach delta); the sample
sizes are for detecting the effect, which is what a power calculation states.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from statistics import NormalDist
from typing import NamedTuple

HOLDS, FAILS, NULL, UNSURE, UNMEASURED = "holds", "does not hold", "no practical effect", "inconclusive", "not measured"
VERDICTS = (HOLDS, FAILS, NULL, UNSURE)
KINDS = ("higher", "lower", "at_least", "equivalent")
_N = NormalDist()


# ------------------------------------------------------------------ Student's t
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz, Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """Upper tail P(T > t) of Student's t with ``df`` degrees of freedom (df = inf: the normal)."""
    if math.isinf(df):
        return 1.0 - _N.cdf(t) if t < 0 else _N.cdf(-t)
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def t_cdf(t: float, df: float) -> float:
    return 1.0 - t_sf(t, df)


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t; ``p = 1 - alpha/2`` gives the two-sided critical value.

    t_quantile(0.975, 2) = 4.303; df = inf (or > 1e7) gives the normal quantile (1.960 at 0.975).
    Solved by bisection on the upper tail, to ~1e-12 relative.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df}")
    if math.isinf(df) or df > 1e7:
        return _N.inv_cdf(p)
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    q = 1.0 - p
    lo, hi = 0.0, max(1.0, 2.0 * _N.inv_cdf(p))
    while t_sf(hi, df) > q:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_sf(mid, df) > q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


# ------------------------------------------------------------------ intervals and verdicts
class Interval(NamedTuple):
    n: int
    mean: float
    se: float
    ci_low: float
    ci_high: float


class Judged(NamedTuple):
    n: int
    mean: float
    se: float
    ci_low: float
    ci_high: float
    verdict: str


def paired_interval(diffs: Iterable[float], level: float = 0.95) -> Interval:
    """(n, mean, se, ci_low, ci_high) of paired differences; NaN/None dropped; t interval with df = n - 1."""
    d = [float(x) for x in diffs if x is not None and not math.isnan(x)]
    n = len(d)
    if n == 0:
        return Interval(0, math.nan, math.nan, math.nan, math.nan)
    m = statistics.fmean(d)
    if n == 1:
        return Interval(1, m, math.nan, math.nan, math.nan)
    se = statistics.stdev(d) / math.sqrt(n)
    half = t_quantile(1.0 - (1.0 - level) / 2.0, n - 1) * se
    return Interval(n, m, se, m - half, m + half)


def _directional(lo: float, hi: float, m: float, delta: float) -> str:
    if -delta < lo and hi < delta:
        return NULL
    if lo > 0 and m >= delta:
        return HOLDS
    if hi < 0:
        return FAILS
    return UNSURE


def verdict(ci_low: float, ci_high: float, min_effect: float, direction: str, mean: float | None = None) -> str:
    """The module's rule for one interval. ``mean`` defaults to the interval's midpoint (exact for t intervals).

    direction: "higher" | "lower" (setting vs reference) | "at_least" (non-inferiority) | "equivalent".
    A NaN interval (one pair) is "inconclusive".
    """
    if direction not in KINDS:
        raise ValueError(f"unknown claim kind {direction!r}; choose one of {KINDS}")
    if min_effect < 0:
        raise ValueError(f"min_effect must be >= 0, got {min_effect}")
    if any(math.isnan(x) for x in (ci_low, ci_high)) or (mean is not None and math.isnan(mean)):
        return UNSURE
    m = 0.5 * (ci_low + ci_high) if mean is None else mean
    delta = float(min_effect)
    if direction == "higher":
        return _directional(ci_low, ci_high, m, delta)
    if direction == "lower":
        return _directional(-ci_high, -ci_low, -m, delta)
    if direction == "at_least":
        return HOLDS if ci_low > -delta else FAILS if ci_high < -delta else UNSURE
    if -delta < ci_low and ci_high < delta:
        return HOLDS
    if HOLDS in (_directional(ci_low, ci_high, m, delta), _directional(-ci_high, -ci_low, -m, delta)):
        return FAILS
    return UNSURE


def judge(diffs: Iterable[float], kind: str, min_effect: float = 0.0, level: float = 0.95) -> Judged:
    """Interval and verdict of paired differences: "not measured" with no pairs, else ``verdict``."""
    iv = paired_interval(diffs, level)
    v = UNMEASURED if iv.n == 0 else verdict(iv.ci_low, iv.ci_high, min_effect, kind, iv.mean)
    return Judged(*iv, v)


# ------------------------------------------------------------------ power
def seeds_for_power(
    sd_diff: float, min_effect: float, power: float = 0.8, alpha: float = 0.05, exact: bool = False
) -> int | None:
    """Paired seeds needed to detect a true effect of ``min_effect`` (two-sided level ``alpha``).

    Smallest n >= 2 with n >= ((t_{1-alpha/2, n-1} + t_{power, n-1}) sd / delta)^2. The right side
    falls with n, so the first such n is the fixed point of the usual iteration. sd 1.2, delta 1 -> 14
    (exact power at 14: 0.82, at 13: 0.79); sd 1.2, delta 2 -> 5 (exact power 0.79: the formula runs
    about one point of power short at very small n). ``exact=True``: the smallest n whose exact power
    (``power_paired_t``) reaches ``power`` (6 for sd 1.2, delta 2). None when sd is NaN.
    """
    if min_effect <= 0:
        raise ValueError(f"min_effect must be > 0, got {min_effect}")
    if not 0 < power < 1 or not 0 < alpha < 1:
        raise ValueError("power and alpha must be in (0, 1)")
    if sd_diff is None or math.isnan(sd_diff):
        return None
    if sd_diff < 0:
        raise ValueError(f"sd_diff must be >= 0, got {sd_diff}")
    r = (sd_diff / min_effect) ** 2
    z = _N.inv_cdf(1 - alpha / 2) + _N.inv_cdf(power)
    n = max(2, math.ceil(z * z * r))  # the normal bound is below the t requirement for every n
    while n < (t_quantile(1 - alpha / 2, n - 1) + t_quantile(power, n - 1)) ** 2 * r:
        n += 1
    if exact:
        n = max(2, n - 2)  # the formula is never more than a seed or two short; step up from below it
        while power_paired_t(n, sd_diff, min_effect, alpha) < power:
            n += 1
    return n


def power_paired_t(
    n: int, sd_diff: float, effect: float, alpha: float = 0.05, min_effect: float = 0.0, grid: int = 2000
) -> float:
    """P(lower bound of the two-sided interval > 0 and mean >= min_effect) for a true ``effect`` > 0.

    min_effect = 0: the power of the paired t test on the claimed side (the other tail is ignored).
    min_effect > 0: the probability that a "higher" claim gets the verdict "holds". Integrates the
    normal mean against the chi distribution of the sample sd (Simpson's rule on ``grid`` intervals).
    """
    if n < 2:
        return 0.0
    if sd_diff == 0:
        return float(effect > 0 and effect >= min_effect)
    k = n - 1
    tc = t_quantile(1 - alpha / 2, k)
    sm = sd_diff / math.sqrt(n)
    logc = (k / 2 - 1) * math.log(2) + math.lgamma(k / 2)
    top = math.sqrt(k) + 10.0
    h = top / grid
    total = 0.0
    for i in range(grid + 1):
        w = i * h
        if w == 0.0:
            dens = math.exp(-logc) if k == 1 else 0.0
        else:
            dens = math.exp((k - 1) * math.log(w) - w * w / 2 - logc)
        thr = max(tc * sd_diff * w / math.sqrt(k) / math.sqrt(n), min_effect)
        weight = 1 if i in (0, grid) else (4 if i % 2 else 2)
        total += weight * dens * _N.cdf((effect - thr) / sm)
    return total * h / 3
