"""Runs: every run in the store, and their curves overlaid.

A run whose run.json cannot be read (status 'invalid') is named in a warning above the table and left
out of the table, the picker and the plots; every other run shows as usual.
"""

import json

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from app.common import default_run, get_store, guard, q, runs_df, task_label, task_of
from engine.shaping.replay import PUSH_COLUMNS, step_push

st.title("Runs")
df = runs_df()
if not len(df):
    st.info("No readable runs in the store. Launch a run on the Launch page, or `a3po train`.")
    st.stop()


def coeffs(cfg_json: str | None) -> str:
    """The shaping coefficients of a run's config, in one short line."""
    try:
        cfg = json.loads(cfg_json) if cfg_json else {}
    except ValueError:
        cfg = {}
    a = (cfg.get("algorithm") if isinstance(cfg, dict) else None) or {}
    out = [f"w={a.get('w_pos')}/{a.get('w_neg')}"]
    if a.get("name") == "a3po":
        out.append(f"α⁺₀={a.get('alpha_pos')} α⁻₀={a.get('alpha_neg')} {a.get('decay')} r={a.get('ratio')}")
    if a.get("token_rules"):
        out.append(f"{len(a['token_rules'])} token rule(s)")
    return ", ".join(out)


table = df.assign(coefficients=df.config.map(coeffs), task=df.config.map(lambda c: task_label(task_of(c))))[
    [
        "run_id",
        "task",
        "algorithm",
        "coefficients",
        "status",
        "last_step",
        "total_steps",
        "final_accuracy",
        "study",
        "error",
    ]
]
st.dataframe(table, hide_index=True, width="stretch")

ids = df.run_id.tolist()
default = [r for r in ids if r in st.session_state.get("runs_sel", [])] or [default_run(df)]
sel = st.multiselect("Overlay runs", ids, default=default, key="runs_sel")

PANELS = [
    ("reward", ["reward"]),
    ("test accuracy (sampled, from evals)", []),
    ("entropy", ["entropy", "entropy_pos", "entropy_neg"]),
    ("response length", ["length", "length_pos", "length_neg"]),
    ("all-correct / all-wrong groups", ["frac_all_correct", "frac_all_wrong"]),
    ("clip fractions", ["clipfrac", "clipfrac_lower"]),
]
PUSH_TITLE = "gradient push Σ|Δadv|·(1−p) by rule (log)"
PUSH_NAMES = {
    "push_rule_pos": "rule, positive",
    "push_rule_neg": "rule, negative",
    "push_raw_pos": "raw adv, positive",
    "push_raw_neg": "raw adv, negative",
}
PUSH_DASH = {"push_rule_pos": "solid", "push_rule_neg": "dot", "push_raw_pos": "dash", "push_raw_neg": "dashdot"}
MISMATCH_TITLE = "sampler mismatch (log)"
MISMATCH = {"mismatch_abs": ("mean |Δ log-prob|", "solid"), "mismatch_kl": ("k3 KL", "dot")}


def mismatch_measured(steps: pd.DataFrame, rid: str) -> bool:
    s = steps[steps.run_id == rid]
    return "mismatch_abs" in s and s.mismatch_abs.notna().any()


def push_summary(push: pd.DataFrame, sel: list[str]) -> pd.DataFrame:
    """Mean push per step for each selected run; runs with nothing to compute it from say so."""
    rows = []
    for rid in sel:
        p = push[push.run_id == rid]
        if not len(p):
            rows.append({"run_id": rid, "source": "not recorded for this run"})
            continue
        m = p[list(PUSH_COLUMNS)].mean()
        rows.append(
            {
                "run_id": rid,
                "source": p.source.iloc[0],
                "steps": len(p),
                **{PUSH_NAMES[c]: float(m[c]) for c in PUSH_COLUMNS},
                "negative / positive rule": float(m.push_rule_neg / m.push_rule_pos) if m.push_rule_pos > 0 else None,
            }
        )
    return pd.DataFrame(rows)


@st.fragment(run_every=2.0 if (df[df.run_id.isin(sel)].status == "running").any() else None)
def curves(sel):
    if not sel:
        return
    steps = q("select * from steps where list_contains(?, run_id) order by run_id, step", [sel], run_ids=sel)
    evals = q("select run_id, step, metric, k, value from evals where list_contains(?, run_id)", [sel], run_ids=sel)
    push = guard(step_push, get_store(), sel, steps=steps)
    fig = make_subplots(
        rows=3, cols=3, subplot_titles=[p[0] for p in PANELS] + ["pass@k (last eval)", PUSH_TITLE, MISMATCH_TITLE]
    )
    dash = {0: "solid", 1: "dot", 2: "dash"}
    for i, (_title, cols) in enumerate(PANELS):
        r, c = divmod(i, 3)
        for rid in sel:
            s = steps[steps.run_id == rid]
            for j, col in enumerate(cols):
                if col not in s or s[col].isna().all():
                    continue
                x = s[["step", col]].dropna()
                fig.add_trace(
                    go.Scatter(
                        x=x.step,
                        y=x[col],
                        mode="lines+markers" if col == "test_acc" else "lines",
                        name=f"{rid}: {col}",
                        line=dict(dash=dash.get(j, "solid")),
                    ),
                    row=r + 1,
                    col=c + 1,
                )
    for rid in sel:
        acc = evals[(evals.run_id == rid) & (evals.metric == "sampled_acc")].sort_values("step")
        fig.add_trace(
            go.Scatter(x=acc.step, y=acc.value, mode="lines+markers", name=f"{rid}: test accuracy"), row=1, col=2
        )
        e = evals[(evals.run_id == rid) & (evals.metric == "pass@k")]
        if len(e):
            last = e[e.step == e.step.max()].sort_values("k")
            fig.add_trace(go.Scatter(x=last.k, y=last.value, mode="lines+markers", name=f"{rid}: pass@k"), row=3, col=1)
        p = push[push.run_id == rid]
        for c in PUSH_COLUMNS:
            x = p[p[c] > 0]  # a log axis cannot show 0 (e.g. GRPO's rule push)
            if len(x):
                color = ("seagreen" if c.endswith("_pos") else "crimson") if len(sel) == 1 else None
                fig.add_trace(
                    go.Scatter(
                        x=x.step,
                        y=x[c],
                        mode="lines",
                        name=f"{rid}: push {PUSH_NAMES[c]}",
                        line=dict(dash=PUSH_DASH[c], color=color),
                    ),
                    row=3,
                    col=2,
                )
        s = steps[steps.run_id == rid]
        for c, (label, style) in MISMATCH.items():
            x = s[s[c] > 0] if c in s else s.iloc[:0]  # a log axis cannot show 0 (kv's recorded log-probs: exactly 0)
            if len(x):
                fig.add_trace(
                    go.Scatter(x=x.step, y=x[c], mode="lines", name=f"{rid}: {label}", line=dict(dash=style)),
                    row=3,
                    col=3,
                )
    fig.update_xaxes(type="log", row=3, col=1)
    fig.update_yaxes(type="log", exponentformat="power", row=3, col=2)
    fig.update_yaxes(type="log", exponentformat="power", row=3, col=3)
    fig.update_layout(height=950, legend=dict(orientation="h"))
    st.plotly_chart(fig, width="stretch")
    st.markdown(
        "**Gradient push by rule** (mean per step). The push of a change of advantage is Σ|Δadv|·(1 − p) "
        "over the tokens of correct (positive) or incorrect (negative) responses: the gradient of log p with "
        "respect to a token's own logit is 1 − p, so a rule that only reweights near-certain tokens moves "
        "almost nothing however large its coefficient. *rule* = shaped − raw advantage (what the token rule "
        "and polarity weights add), *raw adv* = the unshaped advantage itself, for scale. Zero (e.g. GRPO's "
        "rule push) does not show on the log axis."
    )
    sci = st.column_config.NumberColumn(format="scientific")
    st.dataframe(
        push_summary(push, sel),
        hide_index=True,
        width="stretch",
        key="runs_push_table",
        column_config={c: sci for c in [*PUSH_NAMES.values(), "negative / positive rule"]},
    )
    unmeasured = [rid for rid in sel if not mismatch_measured(steps, rid)]
    zero = [
        rid for rid in sel if rid not in unmeasured and (steps[steps.run_id == rid].mismatch_abs.fillna(0) == 0).all()
    ]
    st.markdown(
        "**Training–inference mismatch**: the trainer's log-prob of each sampled token against the one the "
        "rollout engine sampled with (Rollouts can colour tokens by it). *mean |Δ log-prob|* per token, and the "
        "k3 estimate of KL(sampler ‖ trainer), mean of r − 1 − log r with r = π_train / π_sampler. Steps where "
        "they are exactly 0 (the kv engine's recorded log-probs serve as the old policy) do not show on the log axis."
        + (f" Not measured (no sampler log-probs stored): {', '.join(unmeasured)}." if unmeasured else "")
        + (f" Exactly 0 at every step, so nothing to draw: {', '.join(zero)}." if zero else "")
    )
    rec = set(push.run_id[push.source == "from tokens"])
    if rec:
        st.caption(
            "Recomputed from the stored tokens (the run predates the recorded push columns): " + ", ".join(sorted(rec))
        )
    live = df[df.run_id.isin(sel) & (df.status == "running")]
    if len(live):
        st.caption(f"Refreshing every 2 s while {', '.join(live.run_id)} trains.")


curves(sel)
