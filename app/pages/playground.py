"""Shaping playground: change the shaping rule and see its effect on stored rollouts at once.

The page rebuilds the selected step's tensors from the store and calls the engine's own
``shape_advantages`` (engine.shaping.replay), so what you see is exactly what training would use.
"""

import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app.common import get_store, guard, pick_run, q, render_tokens, store_failed
from engine.config import ConfigError, config_from_dict
from engine.shaping.advantage import DECAYS
from engine.shaping.algorithms import ALGORITHMS, alpha_schedule, resolve
from engine.shaping.replay import batch_push, load_step, replay
from engine.store.store import StoreError

st.title("Shaping playground")
run = pick_run(key="run")
if run is None:
    st.stop()
try:
    meta = get_store().read_run(run)
except (StoreError, ValueError) as e:  # run.json changed or broke since the picker read it
    store_failed(e)
cfg0 = meta["config"]
a0 = cfg0["algorithm"]
steps = q("select distinct step from rollouts where run_id = ? order by step", [run], run_ids=[run]).step.tolist()
total = int(cfg0["train"]["steps"])
step = st.select_slider("Stored step", steps, value=steps[-1], key="pg_step")

st.sidebar.header("Shaping rule")
names = sorted(ALGORITHMS)
algo = st.sidebar.selectbox(
    "Algorithm",
    names,
    index=names.index(st.session_state.get("pg_algo", "a3po")),
    key="pg_algo",
    help="; ".join(f"{n}: {ALGORITHMS[n].doc}" for n in names),
)
ratio = st.sidebar.slider("Key-token ratio", 0.05, 1.0, float(a0.get("ratio", 0.2)), 0.05, key="pg_ratio")
alpha_pos = st.sidebar.slider(
    "α⁺₀ (low-prob tokens of correct responses)", 0.0, 5.0, float(a0.get("alpha_pos", 2.0)), 0.1, key="pg_alpha_pos"
)
alpha_neg = st.sidebar.slider(
    "α⁻₀ (high-prob tokens of incorrect responses)", 0.0, 5.0, float(a0.get("alpha_neg", 2.0)), 0.1, key="pg_alpha_neg"
)
decay = st.sidebar.selectbox(
    "Decay d(s/S)", sorted(DECAYS), index=sorted(DECAYS).index(a0.get("decay", "linear")), key="pg_decay"
)
w_pos = st.sidebar.number_input(
    "w_pos (sample weight, correct)", value=float(a0.get("w_pos", 1.0)), step=0.5, key="pg_w_pos"
)
w_neg = st.sidebar.number_input(
    "w_neg (sample weight, incorrect)", value=float(a0.get("w_neg", 1.0)), step=0.5, key="pg_w_neg"
)
rules = []
with st.sidebar.expander("Extra token rules (token_weighted grid)"):
    for pol in ("positive", "negative"):
        on = st.checkbox(f"Rule on {pol} responses", key=f"pg_rule_{pol}")
        if on:
            m = st.selectbox("metric", ["prob", "entropy"], key=f"pg_metric_{pol}")
            e = st.selectbox("end", ["high", "low"], key=f"pg_end_{pol}")
            sc = st.slider("scale", 0.0, 5.0, 2.0, 0.1, key=f"pg_scale_{pol}")
            rules.append({"polarity": pol, "metric": m, "end": e, "ratio": ratio, "scale": sc})

# Validate through the engine's own config checks: out-of-range values are refused with a message.
settings = {
    "name": algo,
    "ratio": ratio,
    "alpha_pos": alpha_pos,
    "alpha_neg": alpha_neg,
    "decay": decay,
    "w_pos": w_pos,
    "w_neg": w_neg,
    "token_rules": rules,
}
try:
    cfg = config_from_dict({**{k: v for k, v in cfg0.items() if k != "name"}, "algorithm": {**a0, **settings}})
except ConfigError as e:
    st.error(f"Refused: {e}")
    st.stop()
st.session_state["playground_settings"] = {"algorithm": settings, "source_run": run}

batch = guard(load_step, get_store(), run, step)
resolved = resolve(cfg)
new = replay(batch, resolved, step=step - 1)
run_push, new_push = batch_push(batch), batch_push(batch, new)  # Σ|shaped − raw adv|·(1 − p) by polarity
mask = batch.mask.bool()

# ---- key tokens of one group, before (as stored) and after (this rule)
tok = q("select * from tokens where run_id = ? and step = ? order by rollout_idx, position", [run, step], run_ids=[run])
row_of = {int(r): i for i, r in enumerate(batch.rollout_idx)}
b = tok.rollout_idx.map(row_of).to_numpy(dtype=np.int64, copy=True)
p = tok.position.to_numpy(dtype=np.int64, copy=True)
tok["adv_stored"] = tok.adv_shaped
tok["key_stored"] = tok.is_key
tok["adv_shaped"] = new.adv[b, p].numpy()
tok["is_key"] = new.key_mask[b, p].numpy()
ro = q(
    "select rollout_idx, group_idx, prompt, polarity, reward from rollouts where run_id = ? and step = ? order by rollout_idx",
    [run, step],
    run_ids=[run],
)
mixed = ro.groupby("group_idx").polarity.nunique()
gids = mixed[mixed > 1].index.tolist() or ro.group_idx.unique().tolist()
g = st.selectbox("Group", gids, key="pg_group", format_func=lambda i: f"#{i}: {ro[ro.group_idx == i].prompt.iloc[0]}")
c1, c2, c3, c4, c5 = st.columns(5)
changed = int((tok.is_key != tok.key_stored).sum())
c1.container(key="pg_key_tokens").metric(
    "Key tokens (this rule)", int(tok.is_key.sum()), delta=int(tok.is_key.sum() - tok.key_stored.sum())
)
c2.metric("Tokens whose key flag changed", changed)
c3.metric("α⁺ / α⁻ at this step", f"{new.alpha_pos:.2f} / {new.alpha_neg:.2f}" if algo == "a3po" else "–")
for c, pol, sign in ((c4, "positive", "+"), (c5, "negative", "−")):
    c.metric(
        f"Push {sign} (this rule)",
        f"{new_push['rule'][pol]:.2e}",
        delta=f"run's rule: {run_push['rule'][pol]:.2e}",
        delta_color="off",
        delta_arrow="off",
        help=f"Σ|shaped − raw advantage|·(1 − p) over the tokens of {pol} responses at this step (see the chart below)",
    )
vmax = float(np.abs(tok.adv_shaped).max() or 1.0)
for r in ro[ro.group_idx == g].itertuples(index=False):
    t = tok[tok.rollout_idx == r.rollout_idx]
    st.markdown(
        f"**#{r.rollout_idx}** {':green[**correct**]' if r.polarity == 1 else ':red[**incorrect**]'} · reward {r.reward:.2f}"
    )
    st.html(render_tokens(t, "shaped advantage", vmax))

# ---- before/after per token, distribution by polarity, schedule, push
st.subheader("Before / after, per token (selected group)")
sel = tok[tok.rollout_idx.isin(ro[ro.group_idx == g].rollout_idx)]
st.dataframe(
    sel[
        [
            "rollout_idx",
            "position",
            "token_text",
            "logprob",
            "entropy",
            "adv_raw",
            "adv_stored",
            "adv_shaped",
            "key_stored",
            "is_key",
        ]
    ].rename(
        columns={
            "adv_stored": "adv (run)",
            "adv_shaped": "adv (this rule)",
            "key_stored": "key (run)",
            "is_key": "key (this rule)",
        }
    ),
    hide_index=True,
    width="stretch",
    height=260,
)
left, r_ = st.columns(2)
fig = go.Figure()
for pol, name, color in ((1, "positive", "seagreen"), (-1, "negative", "crimson")):
    fig.add_trace(
        go.Histogram(x=tok[tok.polarity == pol].adv_shaped, name=name, marker_color=color, opacity=0.6, nbinsx=60)
    )
fig.update_layout(barmode="overlay", title="Shaped advantage by polarity (this step)", height=330, yaxis_type="log")
left.plotly_chart(fig, width="stretch")
sch = pd.DataFrame(alpha_schedule(resolved, total), columns=["step", "alpha_pos", "alpha_neg"])
fig2 = go.Figure(
    [go.Scatter(x=sch.step, y=sch.alpha_pos, name="α⁺(s)"), go.Scatter(x=sch.step, y=sch.alpha_neg, name="α⁻(s)")]
)
fig2.add_vline(x=step - 1, line_dash="dot")
fig2.update_layout(
    title="A3PO schedule over the run (dotted: this step)", height=330, xaxis_title="s = training step − 1"
)
r_.plotly_chart(fig2, width="stretch")
st.subheader("Gradient push by polarity: does the rule move anything?")
push = pd.DataFrame(
    [
        {
            "polarity": pol,
            "run's rule": run_push["rule"][pol],
            "this rule": new_push["rule"][pol],
            "raw advantage (scale)": run_push["raw"][pol],
        }
        for pol in ("positive", "negative")
    ]
)
fig3 = go.Figure(
    [
        go.Bar(
            x=push.polarity,
            y=push[c].where(push[c] > 0),
            name=c,
            text=[f"{v:.2e}" for v in push[c]],
            textposition="outside",
            marker_color=col,
        )
        for c, col in (("run's rule", "#888888"), ("this rule", "#9467bd"), ("raw advantage (scale)", "#bbbbdd"))
    ]
)
fig3.update_layout(
    title="Σ|shaped − raw advantage|·(1 − p) at this step (log)",
    height=360,
    barmode="group",
    yaxis_type="log",
    yaxis_exponentformat="power",
)
pl, pr = st.columns([3, 2])
pl.plotly_chart(fig3, width="stretch")
pr.dataframe(
    push.set_index("polarity").T.rename_axis("push"),
    width="stretch",
    key="pg_push_table",
    column_config={c: st.column_config.NumberColumn(format="scientific") for c in ("positive", "negative")},
)
ratio_txt = (
    f"{new_push['rule']['negative'] / new_push['rule']['positive']:.1e}" if new_push["rule"]["positive"] > 0 else "–"
)
pr.caption(
    "Push = how far a change of advantage can move the policy: the gradient of log p with respect to a token's "
    "own logit is 1 − p, so re-weighting near-certain tokens (p ≈ 1) pushes almost nothing. *this rule*: the "
    "replayed rule's shaped minus raw advantage; *run's rule*: the same for what the run stored; *raw "
    f"advantage*: Σ|raw adv|·(1 − p), the push of plain GRPO. Negative / positive push of this rule: {ratio_txt}. "
    "Bars at 0 do not show on the log axis."
)
st.caption(
    "Settings validated by the engine's config checks; 'Run with these settings' on the Launch page uses them: "
    + json.dumps(settings)
)
