"""Rollouts: one group of G responses at a time, every token coloured, key tokens outlined."""

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from app.common import (
    LEGENDS,
    MISMATCH_MISSING,
    QUANTITIES,
    QUANTITY_SQL,
    has_mismatch,
    pick_run,
    q,
    render_tokens,
    token_values,
)

st.title("Rollouts")
run = pick_run(key="run")
if run is None:
    st.stop()
steps = q("select distinct step from rollouts where run_id = ? order by step", [run], run_ids=[run]).step.tolist()
if not steps:
    st.info("This run has no stored rollouts yet.")
    st.stop()
c1, c2, c3 = st.columns([2, 2, 3])
step = c1.select_slider(
    "Step",
    steps,
    value=st.session_state.get("ro_step", steps[-1]) if st.session_state.get("ro_step") in steps else steps[-1],
    key="ro_step",
)
quantity = c2.selectbox(
    "Colour tokens by",
    list(QUANTITIES),
    key="ro_quantity",
    help="gradient push = |shaped advantage| · (1 − p): how much the update can move each token",
)
search = c3.text_input("Search response text", key="ro_search")
f1, f2 = st.columns(2)
mixed_only = f1.checkbox("Only groups with both polarities", key="ro_mixed")
wrong_only = f2.checkbox("Only incorrect responses", key="ro_wrong")

ro = q("select * from rollouts where run_id = ? and step = ? order by rollout_idx", [run, step], run_ids=[run])
groups = (
    ro.groupby("group_idx")
    .agg(prompt=("prompt", "first"), n_pos=("polarity", lambda p: int((p == 1).sum())), n=("polarity", "size"))
    .reset_index()
)
if mixed_only:
    groups = groups[(groups.n_pos > 0) & (groups.n_pos < groups.n)]
if search:
    hit = ro[ro.response.str.contains(search, regex=False)].group_idx.unique()
    groups = groups[groups.group_idx.isin(hit)]
if not len(groups):
    st.warning("No group matches these filters at this step.")
    st.stop()
g = st.selectbox(
    "Prompt (group)",
    groups.group_idx.tolist(),
    key="ro_group",
    format_func=lambda i: (
        f"#{i}: {groups.set_index('group_idx').loc[i, 'prompt']}  "
        f"({groups.set_index('group_idx').loc[i, 'n_pos']}/{groups.set_index('group_idx').loc[i, 'n']} correct)"
    ),
)
grp = ro[ro.group_idx == g]
if wrong_only:
    grp = grp[grp.polarity == -1]
if search:
    grp = grp[grp.response.str.contains(search, regex=False)]
tok = q(
    "select * from tokens where run_id = ? and step = ? and list_contains(?, rollout_idx) order by rollout_idx, position",
    [run, step, [int(i) for i in grp.rollout_idx]],
    run_ids=[run],
)
col = QUANTITIES[quantity]
vals = token_values(tok, col)
vmax = float(np.nanmax(np.abs(vals))) if np.isfinite(vals).any() else 1.0
st.markdown(f"**{grp.prompt.iloc[0] if len(grp) else ''}** — gold answer `{grp.answer.iloc[0] if len(grp) else ''}`.")
st.caption(
    f"{LEGENDS[col]} Outlined = key token; hover a token for details."
    + (f" Largest push shown: {vmax:.2e}." if col == "push" and len(tok) else "")
    + (f" Largest |Δ log-prob| shown: {vmax:.2e}." if col == "mismatch" and has_mismatch(tok) and vmax > 0 else "")
    + (
        " Trainer and sampler agree exactly on every token here (the kv engine's recorded log-probs serve as the "
        "old policy)."
        if col == "mismatch" and has_mismatch(tok) and vmax == 0
        else ""
    )
)
if col == "mismatch" and not has_mismatch(tok):
    st.info(MISMATCH_MISSING)
cols = st.columns(2)
for i, r in enumerate(grp.itertuples(index=False)):
    with cols[i % 2]:
        mark = ":green[**correct**]" if r.polarity == 1 else ":red[**incorrect**]"
        st.markdown(
            f"**#{r.rollout_idx}** {mark} · reward {r.reward:.2f} · advantage {r.adv_raw:+.3f} · {r.n_key} key tokens"
        )
        st.html(render_tokens(tok[tok.rollout_idx == r.rollout_idx], quantity, vmax))

st.subheader("Strongest key tokens at this step")
keys = q(
    """select t.rollout_idx, t.position, t.token_text, t.token_id, exp(t.logprob) as prob, t.entropy, t.adv_raw, t.adv_shaped,
            t.polarity from tokens t where t.run_id = ? and t.step = ? and t.is_key order by abs(t.adv_shaped) desc limit 25""",
    [run, step],
    run_ids=[run],
)
st.dataframe(keys, hide_index=True, width="stretch")

st.subheader("Token-level distributions by polarity")
hq = st.selectbox("Quantity", list(QUANTITIES), index=3, key="ro_hist_q")
hc = QUANTITIES[hq]
expr = QUANTITY_SQL[hc]
if hc == "mismatch" and not has_mismatch(q("select * from tokens where run_id = ? limit 1", [run], run_ids=[run])):
    st.info(MISMATCH_MISSING)
    st.stop()
h = q(f"select polarity, {expr} as v, is_key from tokens where run_id = ? and step = ?", [run, step], run_ids=[run])
fig = go.Figure()
for pol, name, color in ((1, "positive", "seagreen"), (-1, "negative", "crimson")):
    fig.add_trace(go.Histogram(x=h[h.polarity == pol].v, name=name, opacity=0.6, marker_color=color, nbinsx=50))
fig.update_layout(barmode="overlay", xaxis_title=hq, yaxis_title="tokens", height=350, yaxis_type="log")
st.plotly_chart(fig, width="stretch")
