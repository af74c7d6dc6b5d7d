"""Study report: curves per setting, claims worded as the paper states them, verdicts from ``engine.study.stats``.

Why: a claim about training dynamics is only as good as the rule that judges it. Runs are paired by
seed; each part of a claim is a paired difference (setting minus reference) with a two-sided 95%
t interval and a minimum effect, and gets one of four verdicts (holds, does not hold, no practical
effect, inconclusive) by the rule in ``engine.study.stats``. The report prints that rule, the minimum
effects, n and the interval of every part, a power section (``power_table``) that says how many
seeds each core comparison needs, and what A3PO's token rules really push (``push_table``).

Minimum effects (``METRICS``), the smallest change that matters for each metric:
- test accuracy, pass@k, reward: 1 point (0.01). Smaller than every gap the paper reports between two
  of its methods (DAPO over GRPO: 1.2-1.6 points; A3PO over DAPO: 3.3-4.6), and above the evaluation
  noise measured for the study (about 0.3 points, against 1.2 points of seed-to-seed spread).
- token entropy: 0.003 nats, 1.5-2% of the countdown model's mean token entropy (0.15-0.2 nats) and
  5% of the arith model's (0.06). The old rule called 6e-8-nat changes real.
- response length: 0.5 tokens, half a token per response on average (responses are 25-40 tokens).
A claim's parts are combined: "does not hold" if any part does not hold; otherwise "no practical
effect" if any part shows none; "holds" if every part holds; "inconclusive" otherwise; "not measured"
when none of its runs are in the study. Clip-higher parts are judged only when the clip acts (mean
``clipfrac`` > 0 in both arms), else "not measured (clip inactive)".
"""

from __future__ import annotations

import html
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from engine.study import stats

PAPER = [
    ("GRPO", 35.0, 42.5, 58.9),
    ("DAPO", 36.3, 44.1, 60.1),
    ("DAPO + fork tokens", 37.7, 45.1, 60.6),
    ("W-REINFORCE", 37.4, 45.3, 60.9),
    ("A3PO", 40.4, 48.7, 63.4),
]
PAPER_MODELS = ("Qwen2.5-Math-7B", "Qwen3-8B-Base", "R1-Distill-Qwen-7B")
PAPER_KEYS = {
    "GRPO": "grpo",
    "DAPO": "dapo",
    "DAPO + fork tokens": "fork_tokens",
    "W-REINFORCE": "w_reinforce",
    "A3PO": "a3po",
}
CLIP_INACTIVE = "not measured (clip inactive)"

RATIO_NOTE = (
    "Why P1N0.5 and P2N1 are compared at the same learning rate: Adam and AdamW divide each gradient coordinate "
    "by the root of its running second moment, so (with no KL term) multiplying every advantage by a constant c "
    "multiplies numerator and denominator by c and leaves the update unchanged. P1N0.5 is P2N1 scaled by 1/2, "
    "so at the same learning rate the two runs differ only through grad-norm clipping (actor.grad_clip clips "
    "P2N1's twice-as-large gradient earlier) and Adam's epsilon (exact invariance needs sqrt(v) >> 1e-8). The "
    "old test, P1N0.5 at twice the learning rate, measured the effect of doubling the learning rate. Under Adam "
    "this claim is nearly true by construction; the study checks that the engine honours it."
)
CLIP_NOTE = (
    "Clip-higher (DAPO: epsilon_low 0.2, epsilon_high 0.28) can only act when the policy ratio moves, i.e. "
    "with more than one optimizer step per batch (actor.mini_batches or actor.ppo_epochs >= 2). Its parts "
    "are judged only where both arms' mean clipfrac is > 0. A3PO, like DAPO, uses epsilon_high 0.28 and "
    "GRPO 0.2, so where the clip acts, A3PO vs GRPO includes clip-higher as well as the token rules."
)


# ------------------------------------------------------------------ data
@dataclass
class StudyData:
    runs: pd.DataFrame  # run_id, setting, seed, status (optional: created, updated)
    steps: pd.DataFrame
    evals: pd.DataFrame

    def seeds(self, setting: str) -> dict[int, str]:
        r = self.runs[(self.runs.setting == setting) & (self.runs.status == "finished")]
        return dict(zip(r.seed, r.run_id))


def load_study(store, study_id: str) -> StudyData:
    runs = store.query("select run_id, status, created, updated from runs where study = ? order by run_id", [study_id])
    parts = runs.run_id.str.split(".")
    runs["setting"] = parts.map(lambda p: ".".join(p[1:-1]))
    runs["seed"] = parts.map(lambda p: int(p[-1][1:]) if p[-1].startswith("s") and p[-1][1:].isdigit() else 0)
    ids = list(runs.run_id)
    steps = store.query("select * from steps order by run_id, step", run_ids=ids) if ids else pd.DataFrame()
    evals = (
        store.query("select run_id, step, metric, k, value, n from evals order by run_id, step", run_ids=ids)
        if ids
        else pd.DataFrame()
    )
    return StudyData(runs, steps, evals)


# ------------------------------------------------------------------ per-run scalars
def final_acc(d: StudyData, rid: str) -> float:
    e = d.evals[(d.evals.run_id == rid) & (d.evals.metric == "sampled_acc")]
    return float(e.sort_values("step").value.iloc[-1]) if len(e) else math.nan


LARGE_K = 4  # "large k" for the exploration claim: the study draws 4 samples per prompt on all 500 test prompts


def _final_pass_at(d: StudyData, rid: str, k_max: int | None = None) -> float:
    """pass@k at the final evaluation for the largest evaluated k (at most ``k_max``)."""
    e = d.evals[(d.evals.run_id == rid) & (d.evals.metric == "pass@k")]
    last = e[(e.step == e.step.max()) & ((e.k <= k_max) if k_max is not None else True)] if len(e) else e
    return float(last.sort_values("k").value.iloc[-1]) if len(last) else math.nan


def pass_at_max_k(d: StudyData, rid: str) -> float:
    return _final_pass_at(d, rid)


def pass_at_large_k(d: StudyData, rid: str) -> float:
    """pass@LARGE_K at the final evaluation (or the largest k below it that was evaluated)."""
    return _final_pass_at(d, rid, LARGE_K)


def _run_steps(d: StudyData, rid: str) -> pd.DataFrame:
    return d.steps[d.steps.run_id == rid] if len(d.steps) else d.steps


def _window(d: StudyData, rid: str, col: str, lo: float, hi: float) -> float:
    s = _run_steps(d, rid)
    if not len(s) or col not in s:
        return math.nan
    S = s.step.max()
    w = s[(s.step > lo * S) & (s.step <= hi * S)]
    return float(w[col].mean()) if len(w) else math.nan


def ent_late(d, rid):
    return _window(d, rid, "entropy", 0.8, 1.0)


def len_late(d, rid):
    return _window(d, rid, "length", 0.8, 1.0)


def ent_early(d, rid):
    return _window(d, rid, "entropy", 0.0, 0.3)


def reward_early(d, rid):
    return _window(d, rid, "reward", 0.0, 0.5)


def mean_clipfrac(d: StudyData, rid: str) -> float:
    return _window(d, rid, "clipfrac", 0.0, 1.0)


@dataclass(frozen=True)
class Metric:
    fn: Callable[[StudyData, str], float]
    min_effect: float
    unit: str
    scale: float = 1.0  # display only: fractions are printed in points
    digits: int = 4


ACC = dict(min_effect=0.01, unit="pts", scale=100.0, digits=2)
METRICS: dict[str, Metric] = {
    "final test accuracy": Metric(final_acc, **ACC),
    "pass@4": Metric(pass_at_large_k, **ACC),
    "pass@max k": Metric(pass_at_max_k, **ACC),
    "early reward": Metric(reward_early, **ACC),
    "late entropy": Metric(ent_late, 0.003, "nats"),
    "early entropy": Metric(ent_early, 0.003, "nats"),
    "late length": Metric(len_late, 0.5, "tokens", digits=2),
}


# ------------------------------------------------------------------ claims
@dataclass
class Part:
    text: str
    setting: str
    reference: str
    metric: str
    kind: str  # "lower" | "higher" | "at_least" | "equivalent"
    min_effect: float | None = None  # None: the metric's
    needs_clip: bool = False
    n: int = 0
    mean: float = math.nan
    se: float = math.nan
    ci_low: float = math.nan
    ci_high: float = math.nan
    verdict: str = stats.UNMEASURED

    def __post_init__(self):
        if self.min_effect is None:
            self.min_effect = METRICS[self.metric].min_effect

    def as_dict(self) -> dict:
        keys = (
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
        )
        return {k: _clean(getattr(self, k)) for k in keys}


def _clean(x):
    return None if isinstance(x, float) and math.isnan(x) else x


def paired_diffs(d: StudyData, setting: str, reference: str, fn) -> tuple[list[int], list[float]]:
    a, b = d.seeds(setting), d.seeds(reference)
    common = sorted(set(a) & set(b))
    return common, [fn(d, a[s]) - fn(d, b[s]) for s in common]


def clip_active(d: StudyData, setting: str, reference: str) -> bool:
    """Both arms' mean clipfrac over their paired runs is > 0 (False when the column is missing)."""
    seeds, _ = paired_diffs(d, setting, reference, lambda *_: 0.0)
    for name in (setting, reference):
        runs = d.seeds(name)
        v = [mean_clipfrac(d, runs[s]) for s in seeds]
        v = [x for x in v if not math.isnan(x)]
        if not v or statistics.fmean(v) <= 0:
            return False
    return True


def evaluate_part(d: StudyData, p: Part) -> Part:
    _, diffs = paired_diffs(d, p.setting, p.reference, METRICS[p.metric].fn)
    p.n, p.mean, p.se, p.ci_low, p.ci_high, p.verdict = stats.judge(diffs, p.kind, p.min_effect)
    if p.needs_clip and p.n and not clip_active(d, p.setting, p.reference):
        p.verdict = CLIP_INACTIVE
    return p


def combine(verdicts: list[str]) -> str:
    """A claim from its parts (see the module docstring)."""
    measured = [v for v in verdicts if not v.startswith(stats.UNMEASURED)]
    if not measured:
        return CLIP_INACTIVE if verdicts and all(v == CLIP_INACTIVE for v in verdicts) else stats.UNMEASURED
    if stats.FAILS in measured:
        return stats.FAILS
    if stats.NULL in measured:
        return stats.NULL
    if all(v == stats.HOLDS for v in verdicts):
        return stats.HOLDS
    return stats.UNSURE


def _paper_gain(a: str, b: str) -> tuple[float, ...]:
    rows = {name: vals for name, *vals in PAPER}
    return tuple(round(x - y, 1) for x, y in zip(rows[a], rows[b]))


PAPER_GAINS = {
    "a3po-vs-grpo": _paper_gain("A3PO", "GRPO"),
    "a3po-vs-dapo": _paper_gain("A3PO", "DAPO"),
    "a3po-dapo-vs-dapo": _paper_gain("A3PO", "DAPO"),
}


def _gain_text(g: tuple[float, ...]) -> str:
    return f"+{min(g):g} to +{max(g):g} points"


def claim_spec() -> list[tuple[str, str, list[Part]]]:
    """(id, claim as the paper states it, parts). Token parts use the entropy minimum effect."""
    L, H, AL, EQ = "lower", "higher", "at_least", "equivalent"
    acc = "final test accuracy"
    tok = [
        ("positive/prob/low x2 raises", "tok-pos-prob-low-x2", H),
        ("negative/prob/high x2 raises", "tok-neg-prob-high-x2", H),
        ("positive/prob/high x2 lowers", "tok-pos-prob-high-x2", L),
        ("negative/prob/low x2 lowers", "tok-neg-prob-low-x2", L),
    ]
    return [
        (
            "psr-sharpens",
            "Positive samples sharpen: PSR (positive samples only) ends with lower entropy and shorter "
            "responses than GRPO",
            [
                Part("entropy lower", "psr", "grpo", "late entropy", L),
                Part("length shorter", "psr", "grpo", "late length", L),
            ],
        ),
        (
            "nsr-explores",
            "Negative samples explore: NSR (negative samples only) keeps higher entropy than GRPO, and "
            "its pass@k at large k is at least GRPO's",
            [
                Part("entropy higher", "nsr", "grpo", "late entropy", H),
                Part("pass@4 at least GRPO's", "nsr", "grpo", "pass@4", AL),
            ],
        ),
        (
            "single-polarity-worse",
            "A single polarity is worse than both: PSR and NSR each end with lower test accuracy than GRPO",
            [Part("PSR below GRPO", "psr", "grpo", acc, L), Part("NSR below GRPO", "nsr", "grpo", acc, L)],
        ),
        (
            "raise-positive",
            "Raising positive advantages speeds reward growth and narrows exploration: P2N1 has faster "
            "early reward and lower entropy than GRPO",
            [
                Part("P2N1 faster reward", "p2n1", "grpo", "early reward", H),
                Part("P2N1 lower entropy", "p2n1", "grpo", "late entropy", L),
            ],
        ),
        (
            "raise-negative",
            "Raising negative advantages does the reverse: P1N2 has slower early reward and higher entropy than GRPO",
            [
                Part("P1N2 slower reward", "p1n2", "grpo", "early reward", L),
                Part("P1N2 higher entropy", "p1n2", "grpo", "late entropy", H),
            ],
        ),
        (
            "ratio-only",
            "Only the ratio of the polarity weights matters: P1N0.5 and P2N1 (ratio 2:1, same learning "
            "rate) train alike",
            [
                Part("same final accuracy", "p1n0.5", "p2n1", acc, EQ),
                Part("same early reward", "p1n0.5", "p2n1", "early reward", EQ),
                Part("same late entropy", "p1n0.5", "p2n1", "late entropy", EQ),
            ],
        ),
        (
            "token-level",
            "Token level: low-probability tokens in positive samples and high-probability tokens in "
            "negative samples raise early entropy; the opposite choices lower it",
            [Part(t, s, "grpo", "early entropy", k) for t, s, k in tok],
        ),
        (
            "a3po-vs-grpo",
            f"A3PO gains test accuracy over GRPO (paper: {_gain_text(PAPER_GAINS['a3po-vs-grpo'])})",
            [Part("A3PO - GRPO > 0", "a3po", "grpo", acc, H)],
        ),
        (
            "a3po-vs-dapo",
            f"A3PO gains test accuracy over DAPO (paper: {_gain_text(PAPER_GAINS['a3po-vs-dapo'])})",
            [Part("A3PO - DAPO > 0", "a3po", "dapo", acc, H)],
        ),
        (
            "a3po-dapo-vs-dapo",
            "A3PO built on DAPO (dynamic sampling, overlong penalty) gains test accuracy over DAPO "
            f"(paper, A3PO vs DAPO: {_gain_text(PAPER_GAINS['a3po-dapo-vs-dapo'])})",
            [Part("A3PO+DAPO - DAPO > 0", "a3po-dapo", "dapo", acc, H)],
        ),
        (
            "clip-higher",
            "Clip-higher keeps exploration (DAPO, Yu et al. 2025): DAPO with epsilon_high 0.28 keeps "
            "higher entropy and reaches higher test accuracy than DAPO with a symmetric clip of 0.2",
            [
                Part("entropy higher", "dapo", "dapo-clip-sym", "late entropy", H, needs_clip=True),
                Part("accuracy higher", "dapo", "dapo-clip-sym", acc, H, needs_clip=True),
            ],
        ),
    ]


def claims(d: StudyData) -> list[dict]:
    out = []
    for cid, text, parts in claim_spec():
        parts = [evaluate_part(d, p) for p in parts]
        out.append({"id": cid, "claim": text, "verdict": combine([p.verdict for p in parts]), "parts": parts})
    return out


def claims_json(cl: list[dict]) -> list[dict]:
    """The claims as written to claims.json: one object per claim (id, claim, verdict, parts)."""
    return [
        {"id": c["id"], "claim": c["claim"], "verdict": c["verdict"], "parts": [p.as_dict() for p in c["parts"]]}
        for c in cl
    ]


# ------------------------------------------------------------------ power and push
POWER_COMPARISONS = [
    ("A3PO - GRPO", "a3po", "grpo"),
    ("A3PO - DAPO", "a3po", "dapo"),
    ("A3PO+DAPO - DAPO", "a3po-dapo", "dapo"),
    ("P2N1 - GRPO", "p2n1", "grpo"),
    ("PSR - GRPO", "psr", "grpo"),
    ("NSR - GRPO", "nsr", "grpo"),
]


def power_table(
    d: StudyData,
    comparisons=POWER_COMPARISONS,
    metric: str = "final test accuracy",
    effects: tuple[float, ...] = (0.01, 0.02),
    power: float = 0.8,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Seeds each comparison needs, from the spread of its paired differences in the runs present.

    One row per comparison with at least one pair: ``n`` pairs, ``mean`` and ``sd`` of the paired
    differences (metric units; sd NaN below 2 pairs) and ``seeds@<effect>``: ``stats.seeds_for_power``
    for that true effect at the given power (<NA> when sd is unknown). Call it after a pilot.
    """
    rows = []
    for label, a, b in comparisons:
        _, diffs = paired_diffs(d, a, b, METRICS[metric].fn)
        diffs = [x for x in diffs if not math.isnan(x)]
        if not diffs:
            continue
        sd = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
        row = {
            "comparison": label,
            "setting": a,
            "reference": b,
            "n": len(diffs),
            "mean": statistics.fmean(diffs),
            "sd": sd,
        }
        for e in effects:
            row[f"seeds@{e:g}"] = stats.seeds_for_power(sd, e, power, alpha)
        rows.append(row)
    seed_cols = [f"seeds@{e:g}" for e in effects]
    out = pd.DataFrame(rows, columns=["comparison", "setting", "reference", "n", "mean", "sd", *seed_cols])
    return out.astype({c: "Int64" for c in seed_cols})


PUSH_COLS = ("push_rule_pos", "push_rule_neg", "push_raw_pos", "push_raw_neg")


def _ratio(num: pd.Series, den: pd.Series) -> float:
    """Mean over runs of num / den, skipping runs where den is 0."""
    return float((num / den.where(den > 0)).mean())


def push_table(d: StudyData, settings) -> pd.DataFrame | None:
    """Per setting with token rules: the rules' effective push by polarity, summed over each run's steps.

    push_rule = sum |adv_shaped - adv_raw| (1 - p), push_raw = sum |adv_raw| (1 - p) over the tokens of
    positive / negative rollouts. ``neg/pos`` is the mean over runs of sum(push_rule_neg) / sum(push_rule_pos).
    None when the steps table predates these columns.
    """
    if not len(d.steps) or not all(c in d.steps for c in PUSH_COLS):
        return None
    rows = []
    for s in settings:
        per_run = []
        for rid in d.seeds(s.name).values():
            t = _run_steps(d, rid)[list(PUSH_COLS)].sum()
            per_run.append(t)
        if not per_run:
            continue
        tot = pd.DataFrame(per_run)
        if not (s.name.startswith("a3po") or (tot.push_rule_pos + tot.push_rule_neg).sum() > 0):
            continue
        rows.append(
            {
                "setting": s.label,
                "runs": len(tot),
                **{c: tot[c].mean() for c in PUSH_COLS},
                "neg/pos (rule)": _ratio(tot.push_rule_neg, tot.push_rule_pos),
                "rule/raw pos": _ratio(tot.push_rule_pos, tot.push_raw_pos),
                "rule/raw neg": _ratio(tot.push_rule_neg, tot.push_raw_neg),
            }
        )
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ figures
def _mean_curves(d: StudyData, settings, col: str, source: str = "steps") -> pd.DataFrame:
    rows = []
    for s in settings:
        for seed, rid in d.seeds(s.name).items():
            if source == "steps":
                if col not in d.steps:
                    continue
                x = d.steps[d.steps.run_id == rid][["step", col]].dropna()
                x = x.rename(columns={col: "value"})
            else:
                x = d.evals[(d.evals.run_id == rid) & (d.evals.metric == col)][["step", "value"]]
            x = x.assign(setting=s.label, seed=seed)
            rows.append(x)
    if not rows:
        return pd.DataFrame(columns=["step", "value", "setting", "seed"])
    return pd.concat(rows).groupby(["setting", "step"], as_index=False)["value"].mean()


def figures(d: StudyData, settings) -> list:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    figs = []
    sections = []
    for s in settings:
        if s.section not in sections:
            sections.append(s.section)
    for sec in sections:
        ss = [s for s in settings if s.section == sec or (sec != "polarity" and s.name == "grpo")]
        fig = make_subplots(
            rows=3,
            cols=3,
            subplot_titles=(
                "test accuracy (sampled)",
                "reward",
                "pass@k at the end",
                "entropy: all",
                "entropy: positive",
                "entropy: negative",
                "length: all",
                "length: positive",
                "length: negative",
            ),
        )
        panels = [
            (1, 1, "sampled_acc", "evals"),
            (1, 2, "reward", "steps"),
            (2, 1, "entropy", "steps"),
            (2, 2, "entropy_pos", "steps"),
            (2, 3, "entropy_neg", "steps"),
            (3, 1, "length", "steps"),
            (3, 2, "length_pos", "steps"),
            (3, 3, "length_neg", "steps"),
        ]
        palette = [
            "#1f77b4",
            "#d62728",
            "#2ca02c",
            "#9467bd",
            "#ff7f0e",
            "#8c564b",
            "#e377c2",
            "#7f7f7f",
            "#bcbd22",
            "#17becf",
            "#393b79",
        ]
        colors = {s.label: palette[i % len(palette)] for i, s in enumerate(ss)}
        for r, c, col, src in panels:
            df = _mean_curves(d, ss, col, src)
            for lab, g in df.groupby("setting", sort=False):
                fig.add_trace(
                    go.Scatter(
                        x=g.step,
                        y=g.value,
                        name=lab,
                        legendgroup=lab,
                        showlegend=(r, c) == (1, 1),
                        line=dict(color=colors.get(lab)),
                    ),
                    row=r,
                    col=c,
                )
        for s in ss:  # pass@k curve, mean over seeds at the last eval step
            pts = []
            for rid in d.seeds(s.name).values():
                e = d.evals[(d.evals.run_id == rid) & (d.evals.metric == "pass@k")]
                if len(e):
                    pts.append(e[e.step == e.step.max()][["k", "value"]])
            if pts:
                g = pd.concat(pts).groupby("k", as_index=False)["value"].mean()
                fig.add_trace(
                    go.Scatter(
                        x=g.k,
                        y=g.value,
                        name=s.label,
                        legendgroup=s.label,
                        showlegend=False,
                        mode="lines+markers",
                        line=dict(color=colors.get(s.label)),
                    ),
                    row=1,
                    col=3,
                )
        fig.update_xaxes(type="log", row=1, col=3)
        fig.update_layout(title=f"{sec} settings (mean over seeds)", height=900)
        figs.append((sec, fig))
    return figs


# ------------------------------------------------------------------ tables for the report
def _num(x: float, m: Metric, sign: bool = True) -> str:
    if x is None or math.isnan(x):
        return "–"
    return f"{x * m.scale:{'+' if sign else ''}.{m.digits}f}"


def parts_frame(cl: list[dict]) -> pd.DataFrame:
    rows = []
    for c in cl:
        for p in c["parts"]:
            m = METRICS[p.metric]
            ci = "–" if math.isnan(p.ci_low) else f"[{_num(p.ci_low, m)}, {_num(p.ci_high, m)}]"
            rows.append(
                {
                    "claim": c["id"],
                    "part": p.text,
                    "setting − reference": f"{p.setting} − {p.reference}",
                    "metric": f"{p.metric} ({m.unit})",
                    "kind": p.kind,
                    "n": p.n,
                    "effect": _num(p.mean, m),
                    "se": _num(p.se, m, sign=False),
                    "95% CI": ci,
                    "min effect": f"±{_num(p.min_effect, m, sign=False)}",
                    "verdict": p.verdict,
                }
            )
    return pd.DataFrame(rows)


def gains_frame(cl: list[dict]) -> pd.DataFrame:
    rows = []
    for c in cl:
        if c["id"] not in PAPER_GAINS:
            continue
        p = c["parts"][0]
        m = METRICS[p.metric]
        ci = "–" if math.isnan(p.ci_low) else f"[{_num(p.ci_low, m)}, {_num(p.ci_high, m)}]"
        rows.append(
            {
                "comparison": f"{p.setting} − {p.reference}",
                "n": p.n,
                "gain here (pts)": _num(p.mean, m),
                "95% CI (pts)": ci,
                "verdict": p.verdict,
                **{f"paper: {mod}": f"+{g:g}" for mod, g in zip(PAPER_MODELS, PAPER_GAINS[c["id"]])},
            }
        )
    return pd.DataFrame(rows)


def summary_table(d: StudyData, settings) -> pd.DataFrame:
    rows = []
    for s in settings:
        seeds = d.seeds(s.name)
        if not seeds:
            continue

        def agg(fn, scale=1.0, digits=3, seeds=seeds):
            v = [fn(d, r) * scale for r in seeds.values()]
            v = [x for x in v if not math.isnan(x)]
            if not v:
                return "–"
            return f"{statistics.fmean(v):.{digits}f}" + (f" ± {statistics.stdev(v):.{digits}f}" if len(v) > 1 else "")

        rows.append(
            {
                "setting": s.label,
                "seeds": len(seeds),
                "final test acc (pts)": agg(final_acc, 100, 1),
                "pass@4 (pts)": agg(pass_at_large_k, 100, 1),
                "pass@max k (pts)": agg(pass_at_max_k, 100, 1),
                "late entropy": agg(ent_late, 1, 4),
                "late length": agg(len_late, 1, 2),
                "early entropy": agg(ent_early, 1, 4),
                "early reward (pts)": agg(reward_early, 100, 1),
                "clipfrac": agg(mean_clipfrac, 1, 4),
            }
        )
    return pd.DataFrame(rows)


def _power_frame(d: StudyData) -> pd.DataFrame:
    t = power_table(d)

    def txt(v, fmt):
        return "–" if v is None or pd.isna(v) else format(float(v), fmt)

    out = pd.DataFrame(
        {
            "comparison": t.comparison,
            "pairs": t.n,
            "mean (pts)": [txt(100 * v, "+.2f") for v in t["mean"]],
            "sd of paired diffs (pts)": [txt(100 * v, ".2f") for v in t.sd],
        }
    )
    for col, lab in (("seeds@0.01", "seeds for 80% power at 1 pt"), ("seeds@0.02", "seeds for 80% power at 2 pts")):
        out[lab] = [txt(v, ".0f") for v in t[col]]
    return out


def _facts(d: StudyData) -> list[str]:
    fin = d.runs[d.runs.status == "finished"]
    out = [f"{len(fin)} finished runs of {len(d.runs)}."]
    if len(d.evals) and "n" in d.evals:
        last = d.evals[d.evals.step == d.evals.groupby("run_id").step.transform("max")]
        ns = sorted({int(x) for x in last.n.dropna()})
        if ns:
            out.append(f"Final evaluations on {', '.join(map(str, ns))} test prompts.")
    if len(d.steps):
        S = sorted({int(x) for x in d.steps.groupby("run_id").step.max()})
        out.append(f"Training steps per run: {', '.join(map(str, S))}.")
    if {"created", "updated"} <= set(fin.columns) and len(fin):
        span = (fin.updated.max() - fin.created.min()) / 3600
        total = (fin.updated - fin.created).sum() / 3600
        out.append(
            f"Wall time: {span:.1f} h from the first run's start to the last run's end; "
            f"{total:.1f} run-hours in all (runs in parallel overlap)."
        )
    return out


def _rule_text() -> str:
    doc = stats.__doc__ or ""
    return doc[doc.index("Intervals.") : doc.index("Power.")].strip()


def _min_effects_text() -> str:
    doc = __doc__ or ""
    return doc[doc.index("Minimum effects") :].strip()


# ------------------------------------------------------------------ writing
def _sections(d: StudyData, study_id: str, settings, cl: list[dict], notes: list[str]) -> list[tuple[str, object]]:
    """The report as (kind, content) blocks: h1/h2 titles, p paragraphs, pre text, table DataFrames."""
    summary = pd.DataFrame([{"claim": c["claim"], "verdict": c["verdict"]} for c in cl])
    push = push_table(d, settings)
    power = _power_frame(d)
    out = [
        ("h1", f"Sample-polarity study `{study_id}`"),
        ("p", " ".join(_facts(d) + [f"Settings: {', '.join(s.name for s in settings)}."])),
        *[("p", n) for n in notes],
        ("h2", "Claims"),
        ("table", summary),
        ("h2", "Every part: paired effect (setting − reference), 95% t interval, minimum effect"),
        ("table", parts_frame(cl)),
        ("h2", "A3PO's gain in final test accuracy, here and in the paper"),
        (
            "p",
            "Paper: average over AIME24, AIME25, MATH500, GPQA, LiveCodeBench for three 7-8B models (Tang et al. "
            "2025). Here: a ~1M-parameter model on a synthetic task; the comparison is of direction and rough "
            "size, not of scale.",
        ),
        ("table", gains_frame(cl)),
        ("h2", "Verdict rule"),
        ("pre", _rule_text()),
        ("pre", _min_effects_text()),
        ("h2", "Only the ratio matters: the same learning rate"),
        ("p", RATIO_NOTE),
        ("h2", "Clip-higher"),
        ("p", CLIP_NOTE),
        ("h2", "Power"),
        (
            "p",
            "Sd of the paired differences in final test accuracy between the runs present, and the paired seeds a "
            "two-sided 95% paired t test needs to detect a true difference of 1 or 2 points with 80% power "
            "(engine.study.stats.seeds_for_power). A 'holds' verdict also needs the estimate to reach the minimum "
            "effect, which for a true effect of exactly 1 point happens about half the time.",
        ),
        ("table", power) if len(power) else ("p", "(no paired runs)"),
        ("h2", "What the token rules push"),
        (
            "p",
            "Descriptive, not a claim: push_rule = Σ|adv_shaped − adv_raw|·(1 − p) over the tokens of "
            "positive / negative rollouts, summed over each run's steps (mean over runs); "
            "push_raw = Σ|adv_raw|·(1 − p). "
            "neg/pos is the negative rule's push relative to the positive rule's. Where most tokens are "
            "near-certain, the highest-probability tokens that A3PO's negative rule picks have 1 − p ≈ 0 and "
            "it moves almost nothing.",
        ),
    ]
    if push is None:
        out.append(("p", "(these runs predate the push columns of the steps table)"))
    else:
        out.append(("table", push.round(6)) if len(push) else ("p", "(no runs with token rules)"))
    summ = summary_table(d, settings)
    out += [
        ("h2", "Settings (mean ± sd over seeds)"),
        ("table", summ) if len(summ) else ("p", "(no finished runs)"),
        ("h2", "The paper's numbers, for context"),
        (
            "table",
            pd.DataFrame(
                [
                    {"method": name, **dict(zip(PAPER_MODELS, vals)), "ours: final test acc": _ours(d, name)}
                    for name, *vals in PAPER
                ]
            ),
        ),
    ]
    return out


def _ours(d: StudyData, name: str) -> str:
    v = [final_acc(d, r) for r in d.seeds(PAPER_KEYS[name]).values()]
    v = [x for x in v if not math.isnan(x)]
    return f"{100 * statistics.fmean(v):.1f}" if v else "–"


def _md(blocks) -> str:
    out = []
    for kind, c in blocks:
        if kind == "h1":
            out.append(f"# {c}")
        elif kind == "h2":
            out.append(f"## {c}")
        elif kind == "p":
            out.append(str(c))
        elif kind == "pre":
            out.append("\n".join(f"> {line}" if line else ">" for line in str(c).splitlines()))
        elif kind == "table":
            out.append(c.to_markdown(index=False, disable_numparse=True) if len(c) else "(none)")
        out.append("")
    return "\n".join(out)


def _html(blocks, figs) -> str:
    body = []
    for kind, c in blocks:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(str(c))}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{html.escape(str(c))}</p>")
        elif kind == "pre":
            body.append(f"<pre style='white-space:pre-wrap'>{html.escape(str(c))}</pre>")
        elif kind == "table":
            body.append(c.to_html(index=False, border=1) if len(c) else "<p>(none)</p>")
    for i, (sec, fig) in enumerate(figs):
        body.append(f"<h2>{html.escape(sec)}</h2>" + fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>A3PO Lab study</title>"
        "<style>table{border-collapse:collapse}td,th{padding:3px 6px}</style></head><body>"
        + "\n".join(body)
        + "</body></html>"
    )


def render_report(d: StudyData, study_id: str, out: Path, settings, notes: list[str] | None = None) -> dict:
    """Write ``report.md``, ``report.html`` (self-contained, Plotly inline) and ``claims.json`` for loaded data."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cl = claims(d)
    blocks = _sections(d, study_id, settings, cl, list(notes or []))
    (out / "report.md").write_text(_md(blocks))
    (out / "report.html").write_text(_html(blocks, figures(d, settings)))
    js = claims_json(cl)
    (out / "claims.json").write_text(json.dumps(js, indent=1))
    return {"html": str(out / "report.html"), "markdown": str(out / "report.md"), "claims": js}


def study_settings(d: StudyData) -> list:
    """The ``engine.study`` settings present in a study's runs, in the study's order."""
    from engine.study.design import SETTINGS

    present = set(d.runs.setting)
    return [s for name, s in SETTINGS.items() if name in present]


def write_report(store, study_id: str, out: Path, settings=None, notes: list[str] | None = None) -> dict:
    """Load a study from the store and write its report to ``out`` (settings default: those in its runs)."""
    d = load_study(store, study_id)
    return render_report(d, study_id, Path(out), settings if settings is not None else study_settings(d), notes)
