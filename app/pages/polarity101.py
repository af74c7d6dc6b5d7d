"""Polarity 101: what positive and negative samples do to a policy."""

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from app.common import default_task, embedded_store, get_store, q, task_label, task_of
from app.toy import entropy, pg_step, softmax

st.title("Polarity 101")
st.markdown(
    "In RLVR every sampled answer is **positive** (verified correct, advantage > 0) or **negative** (wrong, advantage < 0). "
    "Tang et al. (2025) find that positive samples *sharpen* what the model already does (entropy falls, answers get "
    "shorter), negative samples make it *explore* (entropy stays up), and that training on both is best. Below: the "
    "same comparison on one of this project's tiny built-in models, then a one-step toy you can play with."
)

LABELS = {"grpo": "GRPO (both)", "psr": "PSR only (positive)", "nsr": "NSR only (negative)", "a3po": "A3PO"}
COLORS = {"grpo": "#1f77b4", "psr": "#2ca02c", "nsr": "#d62728", "a3po": "#9467bd"}


def setting_of(run_id: str) -> str | None:
    parts = run_id.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LABELS else None


def study_runs():
    """A study's finished runs, one per setting (lowest seed): the quick study's when there are any, else
    the full study's; on the default task when there are such runs, else on the task with the most
    recent runs. Returns (store, {setting: run_id}, task, study)."""
    for store in (get_store(), embedded_store()):
        r = q(
            "select run_id, config, created, study from runs where study in ('study-quick', 'study-full') "
            "and status = 'finished'",
            store=store,
        )
        r = r.assign(setting=r.run_id.map(setting_of), task=r.config.map(task_of)).dropna(subset=["setting"])
        if (r.study == "study-quick").any():
            r = r[r.study == "study-quick"]
        if not len(r):
            continue
        task = default_task()
        if task not in set(r.task):
            task = r.sort_values("created").task.iloc[-1]
        r = r[r.task == task].sort_values("run_id", ascending=False)
        return store, {s: rid for s, rid in zip(r.setting, r.run_id)}, task, r.study.iloc[0]
    return None, {}, None, None


store, runs, task, study = study_runs()
if not runs:
    st.info("No study runs found: run `a3po study --preset quick`.")
else:
    try:
        from engine.tasks.problems import TASKS

        about = TASKS[task_label(task)].doc if task.startswith("builtin:") else ""
    except (ImportError, KeyError, AttributeError):
        about = ""
    st.markdown(
        f"**Task: `{task_label(task)}`**" + (f" — {about}" if about else "") + f" Runs of `{study}`, one seed each."
    )
    ids = list(runs.values())
    steps = q("select run_id, step, entropy, length, reward, acc from steps order by step", run_ids=ids, store=store)
    evals = q("select run_id, step, metric, k, value from evals", run_ids=ids, store=store)
    fig = make_subplots(
        rows=1,
        cols=4,
        subplot_titles=("entropy", "response length", "accuracy: batch (line), test (dots)", "pass@k at the end"),
    )
    for key, rid in runs.items():
        s, e = steps[steps.run_id == rid], evals[evals.run_id == rid]
        kw = dict(name=LABELS[key], legendgroup=key, line=dict(color=COLORS[key]))
        fig.add_trace(go.Scatter(x=s.step, y=s.entropy.rolling(5, min_periods=1).mean(), **kw), 1, 1)
        fig.add_trace(go.Scatter(x=s.step, y=s.length.rolling(5, min_periods=1).mean(), showlegend=False, **kw), 1, 2)
        fig.add_trace(go.Scatter(x=s.step, y=s.acc.rolling(5, min_periods=1).mean(), showlegend=False, **kw), 1, 3)
        acc = e[e.metric == "sampled_acc"].sort_values("step")
        fig.add_trace(
            go.Scatter(
                x=acc.step,
                y=acc.value,
                mode="markers",
                showlegend=False,
                marker=dict(size=9),
                name=LABELS[key],
                legendgroup=key,
                line=dict(color=COLORS[key]),
            ),
            1,
            3,
        )
        pk = e[(e.metric == "pass@k") & (e.step == e.step.max())].sort_values("k")
        fig.add_trace(go.Scatter(x=pk.k, y=pk.value, mode="lines+markers", showlegend=False, **kw), 1, 4)
    fig.update_xaxes(type="log", row=1, col=4)
    fig.update_layout(height=380, legend=dict(orientation="h", y=-0.2))
    st.plotly_chart(fig, width="stretch")
    st.markdown(
        "- **Entropy**: how unsure the policy is about its next token (5-step moving average). Positive-only training "
        "should drive it down fastest; negative-only should keep it highest.\n"
        "- **Response length**: sharpening tends to shorten answers; exploration lengthens them.\n"
        "- **Accuracy**: the line is the share of correct rollouts in each training batch (5-step moving average); "
        "the dots are held-out test accuracy (samples at temperature 1).\n"
        "- **pass@k**: the chance that at least one of k samples is right; at large k it measures the reasoning "
        "*boundary*, where exploration (negative samples) is expected to help.\n\n"
        "These are single-seed runs; the full study (`a3po study --preset full`, report in docs/study-full) states "
        "which of these effects hold over 10 paired seeds."
    )

st.header("One step on one token")
st.markdown(
    "A softmax over five candidate next tokens. Pick which one was sampled, whether the answer it was part of "
    "was correct, and the size of the advantage; see the distribution before and after one policy-gradient step."
)
tokens = ["7", "8", "9", "+", ";"]
c1, c2, c3 = st.columns(3)
sampled = c1.selectbox("Sampled token", range(5), format_func=lambda i: f"{tokens[i]!r}", key="toy_token")
polarity = c2.radio("Its response was", ["correct (positive)", "incorrect (negative)"], key="toy_pol")
scale = c3.slider("Advantage size |A|", 0.1, 3.0, 1.0, 0.1, key="toy_scale")
logits = np.array([2.5, 1.0, 0.5, -0.5, -1.0])
A = scale if polarity.startswith("correct") else -scale
before = softmax(logits)
after = softmax(pg_step(logits, sampled, A, lr=1.0))
h0, h1 = entropy(before), entropy(after)
fig = go.Figure(
    [
        go.Bar(x=tokens, y=before, name="before", marker_color="#aaaaaa"),
        go.Bar(x=tokens, y=after, name="after", marker_color="#1f77b4" if A > 0 else "#d62728"),
    ]
)
fig.update_layout(barmode="group", height=320, yaxis_title="probability", xaxis_type="category")
st.plotly_chart(fig, width="stretch")
st.container(key="toy_entropy").metric("Entropy", f"{h1:.3f}", delta=f"{h1 - h0:+.3f} (before {h0:.3f})")
p = before[sampled]
kind = "low" if p < 0.5 else "high"
if A > 0:
    msg = (
        "Raising a **low-probability** token of a correct answer spreads mass away from the favourite: entropy goes **up**."
        if h1 > h0
        else "Raising a **high-probability** token of a correct answer sharpens the favourite: entropy goes **down**."
    )
else:
    msg = (
        "Pushing down a **high-probability** token of a wrong answer spreads mass to the alternatives: entropy goes **up**."
        if h1 > h0
        else "Pushing down a **low-probability** token of a wrong answer makes the favourite even surer: entropy goes **down**."
    )
st.info(
    f"The sampled token had probability {p:.2f} ({kind}). {msg} A3PO boosts exactly the two entropy-raising cases "
    "early in training: low-probability tokens in positive samples, high-probability tokens in negative samples."
)
