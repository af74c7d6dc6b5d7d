"""Runs: every run in the store, and their curves overlaid."""

import json

import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from app.common import q, runs_df

st.title("Runs")
df = runs_df()
if not len(df):
    st.info("The store is empty. Launch a run on the Launch page, or `a3po train`.")
    st.stop()


def coeffs(cfg_json: str) -> str:
    a = json.loads(cfg_json).get("algorithm", {})
    out = [f"w={a.get('w_pos')}/{a.get('w_neg')}"]
    if a.get("name") == "a3po":
        out.append(f"α⁺₀={a.get('alpha_pos')} α⁻₀={a.get('alpha_neg')} {a.get('decay')} r={a.get('ratio')}")
    if a.get("token_rules"):
        out.append(f"{len(a['token_rules'])} token rule(s)")
    return ", ".join(out)


table = df.assign(coefficients=df.config.map(coeffs))[
    ["run_id", "algorithm", "coefficients", "status", "last_step", "total_steps", "final_accuracy", "study", "error"]]
st.dataframe(table, hide_index=True, width="stretch")

ids = df.run_id.tolist()
default = [r for r in ids if r in st.session_state.get("runs_sel", [])] or ids[:1]
sel = st.multiselect("Overlay runs", ids, default=default, key="runs_sel")

PANELS = [
    ("reward", ["reward"]), ("test accuracy (sampled, from evals)", []), ("entropy", ["entropy", "entropy_pos", "entropy_neg"]),
    ("response length", ["length", "length_pos", "length_neg"]), ("all-correct / all-wrong groups", ["frac_all_correct", "frac_all_wrong"]),
    ("clip fractions", ["clipfrac", "clipfrac_lower"]),
]


@st.fragment(run_every=2.0 if (df[df.run_id.isin(sel)].status == "running").any() else None)
def curves(sel):
    if not sel:
        return
    steps = q("select * from steps where list_contains(?, run_id) order by run_id, step", [sel], run_ids=sel)
    evals = q("select run_id, step, metric, k, value from evals where list_contains(?, run_id)", [sel], run_ids=sel)
    fig = make_subplots(rows=3, cols=3, subplot_titles=[p[0] for p in PANELS] + ["pass@k (last eval)", "", ""])
    dash = {0: "solid", 1: "dot", 2: "dash"}
    for i, (title, cols) in enumerate(PANELS):
        r, c = divmod(i, 3)
        for rid in sel:
            s = steps[steps.run_id == rid]
            for j, col in enumerate(cols):
                if col not in s or s[col].isna().all():
                    continue
                x = s[["step", col]].dropna()
                fig.add_trace(go.Scatter(x=x.step, y=x[col], mode="lines+markers" if col == "test_acc" else "lines",
                                         name=f"{rid}: {col}", line=dict(dash=dash.get(j, "solid"))), row=r + 1, col=c + 1)
    for rid in sel:
        acc = evals[(evals.run_id == rid) & (evals.metric == "sampled_acc")].sort_values("step")
        fig.add_trace(go.Scatter(x=acc.step, y=acc.value, mode="lines+markers", name=f"{rid}: test accuracy"), row=1, col=2)
        e = evals[(evals.run_id == rid) & (evals.metric == "pass@k")]
        if len(e):
            last = e[e.step == e.step.max()].sort_values("k")
            fig.add_trace(go.Scatter(x=last.k, y=last.value, mode="lines+markers", name=f"{rid}: pass@k"), row=3, col=1)
    fig.update_xaxes(type="log", row=3, col=1)
    fig.update_layout(height=950, legend=dict(orientation="h"))
    st.plotly_chart(fig, width="stretch")
    live = df[df.run_id.isin(sel) & (df.status == "running")]
    if len(live):
        st.caption(f"Refreshing every 2 s while {', '.join(live.run_id)} trains.")


curves(sel)
