"""Study report: curves per setting, and a claims table whose verdicts come from a fixed rule.

The verdict rule (printed in every report):
- Runs are paired by seed; for each pair the effect is ``d = x(setting) - x(reference)``.
  ``m`` is the mean of d over the n pairs, ``se`` its standard error (sd / sqrt(n)).
- A directional part ("A lower than B") *holds* when ``m`` has the claimed sign and ``|m| > 2 se``,
  *does not hold* when ``m`` has the opposite sign and ``|m| > 2 se``, and is *inconclusive*
  otherwise; with fewer than 2 seeds every part is inconclusive.
- "At least" parts (non-inferiority, margin delta): hold when ``m - 2 se > -delta``, do not hold
  when ``m + 2 se < -delta``. "Only the ratio matters" (equivalence, margin delta): holds when
  ``|m| + 2 se <= delta``, does not hold when ``|m| - 2 se > delta``.
- A claim holds when all its parts hold, does not hold when any part does not hold, and is
  inconclusive otherwise (or "not measured" when its runs are not in the study).
"""

from __future__ import annotations

import html
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

PAPER = [("GRPO", 35.0, 42.5, 58.9), ("DAPO", 36.3, 44.1, 60.1), ("DAPO + fork tokens", 37.7, 45.1, 60.6),
         ("W-REINFORCE", 37.4, 45.3, 60.9), ("A3PO", 40.4, 48.7, 63.4)]
PAPER_KEYS = {"GRPO": "grpo", "DAPO": "dapo", "DAPO + fork tokens": "fork_tokens", "W-REINFORCE": "w_reinforce", "A3PO": "a3po"}
ACC_DELTA = 0.02


# ------------------------------------------------------------------ data
@dataclass
class StudyData:
    runs: pd.DataFrame  # run_id, setting, seed, status
    steps: pd.DataFrame
    evals: pd.DataFrame

    def seeds(self, setting: str) -> dict[int, str]:
        r = self.runs[(self.runs.setting == setting) & (self.runs.status == "finished")]
        return dict(zip(r.seed, r.run_id))


def load_study(store, study_id: str) -> StudyData:
    runs = store.query("select run_id, status from runs where study = ? order by run_id", [study_id])
    parts = runs.run_id.str.split(".")
    runs["setting"] = parts.map(lambda p: ".".join(p[1:-1]))
    runs["seed"] = parts.map(lambda p: int(p[-1][1:]) if p[-1].startswith("s") and p[-1][1:].isdigit() else 0)
    ids = list(runs.run_id)
    steps = store.query("select * from steps order by run_id, step", run_ids=ids) if ids else pd.DataFrame()
    evals = store.query("select run_id, step, metric, k, value from evals order by run_id, step", run_ids=ids) if ids else pd.DataFrame()
    return StudyData(runs, steps, evals)


# ------------------------------------------------------------------ per-run scalars
def final_acc(d: StudyData, rid: str) -> float:
    e = d.evals[(d.evals.run_id == rid) & (d.evals.metric == "sampled_acc")]
    return float(e.sort_values("step").value.iloc[-1]) if len(e) else math.nan


LARGE_K = 16  # "large k" for the exploration claim: pass@64 saturates at 1.0 on the embedded task


def _final_pass_at(d: StudyData, rid: str, k_max: int | None = None) -> float:
    """pass@k at the final evaluation for the largest evaluated k (at most ``k_max``)."""
    e = d.evals[(d.evals.run_id == rid) & (d.evals.metric == "pass@k")]
    last = e[(e.step == e.step.max()) & ((e.k <= k_max) if k_max is not None else True)] if len(e) else e
    return float(last.sort_values("k").value.iloc[-1]) if len(last) else math.nan


def pass_at_max_k(d: StudyData, rid: str) -> float:
    return _final_pass_at(d, rid)


def pass_at_large_k(d: StudyData, rid: str) -> float:
    """pass@16 at the final evaluation (or the largest k below it that was evaluated)."""
    return _final_pass_at(d, rid, LARGE_K)


def _window(d: StudyData, rid: str, col: str, lo: float, hi: float) -> float:
    s = d.steps[d.steps.run_id == rid]
    if not len(s):
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


# ------------------------------------------------------------------ verdicts
@dataclass
class Part:
    text: str
    setting: str
    reference: str
    metric: str
    kind: str  # "lower" | "higher" | "at_least" | "equivalent"
    delta: float = 0.0
    n: int = 0
    mean: float = math.nan
    se: float = math.nan
    verdict: str = "not measured"


def judge(diffs: list[float], kind: str, delta: float = 0.0) -> tuple[str, float, float]:
    """Apply the module's rule to paired differences; returns (verdict, mean, se)."""
    diffs = [x for x in diffs if not math.isnan(x)]
    n = len(diffs)
    if n == 0:
        return "not measured", math.nan, math.nan
    m = statistics.fmean(diffs)
    if n < 2:
        return "inconclusive", m, math.nan
    se = statistics.stdev(diffs) / math.sqrt(n)
    if kind in ("lower", "higher"):
        s = 1.0 if kind == "higher" else -1.0
        if s * m > 2 * se:
            return "holds", m, se
        if -s * m > 2 * se:
            return "does not hold", m, se
        return "inconclusive", m, se
    if kind == "at_least":
        if m - 2 * se > -delta:
            return "holds", m, se
        if m + 2 * se < -delta:
            return "does not hold", m, se
        return "inconclusive", m, se
    if kind == "equivalent":
        if abs(m) + 2 * se <= delta:
            return "holds", m, se
        if abs(m) - 2 * se > delta:
            return "does not hold", m, se
        return "inconclusive", m, se
    raise ValueError(kind)


METRICS = {"final test accuracy": final_acc, "pass@64 (max k)": pass_at_max_k, "pass@16": pass_at_large_k, "late entropy": ent_late,
           "late length": len_late, "early entropy": ent_early, "early reward": reward_early}


def evaluate_part(d: StudyData, p: Part) -> Part:
    a, b = d.seeds(p.setting), d.seeds(p.reference)
    common = sorted(set(a) & set(b))
    fn = METRICS[p.metric]
    diffs = [fn(d, a[s]) - fn(d, b[s]) for s in common]
    p.n = len([x for x in diffs if not math.isnan(x)])
    p.verdict, p.mean, p.se = judge(diffs, p.kind, p.delta)
    return p


def combine(verdicts: list[str]) -> str:
    if not verdicts or all(v == "not measured" for v in verdicts):
        return "not measured"
    if any(v == "does not hold" for v in verdicts):
        return "does not hold"
    if all(v == "holds" for v in verdicts):
        return "holds"
    return "inconclusive"


def claims(d: StudyData) -> list[dict]:
    L, H, AL, EQ = "lower", "higher", "at_least", "equivalent"
    spec = [
        ("Positive samples sharpen: PSR-only ends with lower entropy and shorter responses than GRPO",
         [Part("entropy lower", "psr", "grpo", "late entropy", L), Part("length shorter", "psr", "grpo", "late length", L)]),
        ("Negative samples explore: NSR-only keeps higher entropy than GRPO, and its pass@k at large k is at least GRPO's",
         [Part("entropy higher", "nsr", "grpo", "late entropy", H),
          Part("pass@16 at least GRPO's", "nsr", "grpo", "pass@16", AL, ACC_DELTA)]),
        ("A single polarity is worse than both on test accuracy",
         [Part("PSR below GRPO", "psr", "grpo", "final test accuracy", L), Part("NSR below GRPO", "nsr", "grpo", "final test accuracy", L)]),
        ("Raising positive weights speeds reward growth but lowers entropy; raising negative weights does the reverse",
         [Part("P2N1 faster reward", "p2n1", "grpo", "early reward", H), Part("P2N1 lower entropy", "p2n1", "grpo", "late entropy", L),
          Part("P1N2 slower reward", "p1n2", "grpo", "early reward", L), Part("P1N2 higher entropy", "p1n2", "grpo", "late entropy", H)]),
        ("Only the ratio of the polarity weights matters (P2N1 vs P1N0.5 at 2x lr)",
         [Part("same final accuracy (+-0.03)", "p1n0.5-lr2x", "p2n1", "final test accuracy", EQ, 0.03)]),
        ("Token level: low-prob tokens in positive and high-prob tokens in negative samples raise early entropy; the opposite choices lower it",
         [Part("positive/prob/low x2 raises", "tok-pos-prob-low-x2", "grpo", "early entropy", H),
          Part("negative/prob/high x2 raises", "tok-neg-prob-high-x2", "grpo", "early entropy", H),
          Part("positive/prob/high x2 lowers", "tok-pos-prob-high-x2", "grpo", "early entropy", L),
          Part("negative/prob/low x2 lowers", "tok-neg-prob-low-x2", "grpo", "early entropy", L)]),
        ("A3PO reaches test accuracy at least that of GRPO and DAPO",
         [Part("A3PO >= GRPO", "a3po", "grpo", "final test accuracy", AL, ACC_DELTA),
          Part("A3PO >= DAPO", "a3po", "dapo", "final test accuracy", AL, ACC_DELTA)]),
    ]
    out = []
    for text, parts in spec:
        parts = [evaluate_part(d, p) for p in parts]
        out.append({"claim": text, "verdict": combine([p.verdict for p in parts]), "parts": parts})
    return out


# ------------------------------------------------------------------ figures
def _mean_curves(d: StudyData, settings, col: str, source: str = "steps") -> pd.DataFrame:
    rows = []
    for s in settings:
        for seed, rid in d.seeds(s.name).items():
            if source == "steps":
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
        fig = make_subplots(rows=3, cols=3, subplot_titles=(
            "test accuracy (sampled)", "reward", "pass@k at the end", "entropy: all", "entropy: positive", "entropy: negative",
            "length: all", "length: positive", "length: negative"))
        panels = [(1, 1, "sampled_acc", "evals"), (1, 2, "reward", "steps"), (2, 1, "entropy", "steps"),
                  (2, 2, "entropy_pos", "steps"), (2, 3, "entropy_neg", "steps"), (3, 1, "length", "steps"),
                  (3, 2, "length_pos", "steps"), (3, 3, "length_neg", "steps")]
        palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79"]
        colors = {s.label: palette[i % len(palette)] for i, s in enumerate(ss)}
        for r, c, col, src in panels:
            df = _mean_curves(d, ss, col, src)
            for lab, g in df.groupby("setting", sort=False):
                fig.add_trace(go.Scatter(x=g.step, y=g.value, name=lab, legendgroup=lab, showlegend=(r, c) == (1, 1),
                                         line=dict(color=colors.get(lab))), row=r, col=c)
        for s in ss:  # pass@k curve, mean over seeds at the last eval step
            pts = []
            for rid in d.seeds(s.name).values():
                e = d.evals[(d.evals.run_id == rid) & (d.evals.metric == "pass@k")]
                if len(e):
                    pts.append(e[e.step == e.step.max()][["k", "value"]])
            if pts:
                g = pd.concat(pts).groupby("k", as_index=False)["value"].mean()
                fig.add_trace(go.Scatter(x=g.k, y=g.value, name=s.label, legendgroup=s.label, showlegend=False,
                                         mode="lines+markers", line=dict(color=colors.get(s.label))), row=1, col=3)
        fig.update_xaxes(type="log", row=1, col=3)
        fig.update_layout(title=f"{sec} settings (mean over seeds)", height=900)
        figs.append((sec, fig))
    return figs


# ------------------------------------------------------------------ writing
def _fmt(p: Part) -> str:
    if math.isnan(p.mean):
        return "–"
    se = "n/a" if math.isnan(p.se) else f"{p.se:.4f}"
    return f"{p.mean:+.4f} (se {se}, n={p.n})"


def summary_table(d: StudyData, settings) -> pd.DataFrame:
    rows = []
    for s in settings:
        seeds = d.seeds(s.name)
        if not seeds:
            continue

        def agg(fn):
            v = [fn(d, r) for r in seeds.values()]
            v = [x for x in v if not math.isnan(x)]
            if not v:
                return "–"
            return f"{statistics.fmean(v):.3f}" + (f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else "")

        rows.append({"setting": s.label, "seeds": len(seeds), "final test acc": agg(final_acc),
                     "pass@16": agg(pass_at_large_k), "pass@max k": agg(pass_at_max_k), "late entropy": agg(ent_late), "late length": agg(len_late),
                     "early entropy": agg(ent_early), "early reward": agg(reward_early)})
    return pd.DataFrame(rows)


def write_report(store, study_id: str, out: Path, settings) -> dict:
    """Write ``report.html`` (self-contained, Plotly inline) and ``report.md`` to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    d = load_study(store, study_id)
    cl = claims(d)
    summ = summary_table(d, settings)
    md = [f"# Sample-polarity study `{study_id}`", "",
          f"{(d.runs.status == 'finished').sum()} finished runs of {len(d.runs)}; settings: {', '.join(s.name for s in settings)}.", "",
          "## Claims", "", "| claim | verdict | parts (effect = setting − reference, mean over seeds) |", "|---|---|---|"]
    for c in cl:
        parts = "<br>".join(f"{p.text}: {p.metric} {_fmt(p)} → {p.verdict}" for p in c["parts"])
        md.append(f"| {c['claim']} | **{c['verdict']}** | {parts} |")
    md += ["", "Verdict rule:", "", *[f"> {line}" if line else ">" for line in (__doc__ or "").split("The verdict rule (printed in every report):")[1].strip().splitlines()],
           "", "## Settings", "", summ.to_markdown(index=False) if len(summ) else "(no finished runs)", "",
           "## The paper's numbers, for context", "",
           "Average over AIME24, AIME25, MATH500, GPQA, LiveCodeBench (Tang et al. 2025). Not comparable in scale with a "
           "1M-parameter model on synthetic arithmetic; shown for the ordering of methods.", "",
           "| method | Qwen2.5-Math-7B | Qwen3-8B-Base | R1-Distill-Qwen-7B | ours: final test acc |", "|---|---|---|---|---|"]
    for name, a, b, c in PAPER:
        seeds = d.seeds(PAPER_KEYS[name])
        v = [final_acc(d, r) for r in seeds.values()]
        ours = f"{100 * statistics.fmean(v):.1f}" if v else "–"
        md.append(f"| {name} | {a} | {b} | {c} | {ours} |")
    (out / "report.md").write_text("\n".join(md) + "\n")

    figs = figures(d, settings)
    body = [f"<h1>Sample-polarity study <code>{html.escape(study_id)}</code></h1>", "<h2>Claims</h2>",
            "<table border=1 cellpadding=4 style='border-collapse:collapse'><tr><th>claim</th><th>verdict</th><th>parts</th></tr>"]
    for c in cl:
        parts = "<br>".join(html.escape(f"{p.text}: {p.metric} {_fmt(p)} → {p.verdict}") for p in c["parts"])
        body.append(f"<tr><td>{html.escape(c['claim'])}</td><td><b>{c['verdict']}</b></td><td>{parts}</td></tr>")
    body.append("</table><pre>" + html.escape((__doc__ or "").strip()) + "</pre>")
    body.append("<h2>Settings</h2>" + (summ.to_html(index=False) if len(summ) else "<p>no finished runs</p>"))
    for i, (sec, fig) in enumerate(figs):
        body.append(f"<h2>{html.escape(sec)}</h2>" + fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    (out / "report.html").write_text("<!doctype html><html><head><meta charset='utf-8'><title>A3PO Lab study</title></head><body>"
                                     + "\n".join(body) + "</body></html>")
    js = [{"claim": c["claim"], "verdict": c["verdict"],
           "parts": [{k: getattr(p, k) for k in ("text", "setting", "reference", "metric", "kind", "n", "mean", "se", "verdict")}
                     for p in c["parts"]]} for c in cl]
    (out / "claims.json").write_text(json.dumps(js, indent=1, default=str))
    return {"html": str(out / "report.html"), "markdown": str(out / "report.md"), "claims": js}
