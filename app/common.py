"""Shared helpers for the app pages: the store, cached queries, token rendering, validation.

Every query goes through ``engine.store.store.Store`` (parameterised SQL over Parquet files, no database
lock), so pages work while a run is being written.
"""

from __future__ import annotations

import html
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import streamlit as st

from engine.store.store import Store, StoreError, check_name
from engine.tasks.problems import DATA_DIR

EMBEDDED_STORE = DATA_DIR / "store"
QUANTITIES = {
    "shaped advantage": "adv_shaped",
    "raw advantage": "adv_raw",
    "probability": "prob",
    "entropy": "entropy",
    "gradient push": "push",
    "sampler mismatch": "mismatch",
}
# What each colouring means, shown under the tokens.
LEGENDS = {
    "adv_shaped": "Green = positive, red = negative shaped advantage (the one the loss used); stronger = larger.",
    "adv_raw": "Green = positive, red = negative raw advantage (before polarity weights and token rules); stronger = larger.",
    "prob": "Blue = the token's probability under the policy that sampled it; darker = surer.",
    "entropy": "Blue = entropy of the next-token distribution at that position; darker = more uncertain (a fork).",
    "push": "Blue = gradient push |shaped advantage| · (1 − p): how far the update moves this token's logit (the gradient "
    "of log p with respect to its own logit is 1 − p). Near-certain tokens stay pale whatever their advantage.",
    "mismatch": "Training–inference mismatch: log-prob of the token under the trainer's policy minus the one the sampler "
    "used. Green = the trainer gives it more probability, red = less; stronger = larger. Uncoloured = no difference, or "
    "not measured.",
}
# Why a run's tokens have no sampler log-probs, shown where the mismatch is asked for.
MISMATCH_MISSING = (
    "Mismatch not measured for this run: its rollout backend records no sampler log-probs (rollout.backend=hf, "
    "TRL, verl), or the run was written before the store kept them. The kv and vllm backends record them."
)
# SQL over the tokens table for each quantity (same values as token_values).
QUANTITY_SQL = {
    "adv_shaped": "adv_shaped",
    "adv_raw": "adv_raw",
    "prob": "exp(logprob)",
    "entropy": "entropy",
    "push": "abs(adv_shaped) * greatest(1 - exp(logprob), 0)",
    "mismatch": "logprob - rollout_logprob",
}


def token_values(tokens: pd.DataFrame, col: str) -> np.ndarray:
    """Per-token values of a colouring column (``QUANTITIES`` value) from stored token rows."""
    if col == "prob":
        return np.exp(tokens["logprob"].to_numpy(dtype=float))
    if col == "push":
        p = np.exp(tokens["logprob"].to_numpy(dtype=float))
        return np.abs(tokens["adv_shaped"].to_numpy(dtype=float)) * np.clip(1.0 - p, 0.0, None)
    if col == "mismatch":  # NaN where not measured (no sampler log-prob, or a run from before the column)
        if "rollout_logprob" not in tokens:
            return np.full(len(tokens), np.nan)
        return tokens["logprob"].to_numpy(dtype=float) - tokens["rollout_logprob"].to_numpy(dtype=float)
    return tokens[col].to_numpy(dtype=float)


def has_mismatch(tokens: pd.DataFrame) -> bool:
    """Whether any of these token rows has a sampler log-prob (the mismatch is measured)."""
    return "rollout_logprob" in tokens and bool(np.isfinite(tokens["rollout_logprob"].to_numpy(dtype=float)).any())


def task_of(config: dict | str | None) -> str:
    """The training task of a run's config (``data.train``), e.g. ``builtin:countdown``."""
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError:
            return "?"
    return str(((config or {}).get("data") or {}).get("train", "?"))


def task_label(spec: str) -> str:
    """``builtin:countdown`` -> ``countdown``; a file path -> its file name."""
    return spec.split(":", 1)[1] if spec.startswith("builtin:") else Path(spec).name


def default_task() -> str:
    """The default task (``builtin:<DEFAULT_TASK>``, else the demo config's ``data.train``)."""
    try:
        from engine.tasks.problems import DEFAULT_TASK

        return f"builtin:{DEFAULT_TASK}"
    except ImportError:
        pass
    try:
        import yaml

        from engine.resources import demo_config

        return task_of(yaml.safe_load(demo_config().read_text()))
    except (OSError, ValueError, AttributeError):
        return "?"


def default_run(df: pd.DataFrame) -> str | None:
    """The run a page opens on: the newest run of the default task, preferring a standalone run (not
    part of a study) that has not failed; with no run of the default task, the newest run."""
    if not len(df):
        return None
    task = default_task()
    d = df.assign(_task=df.config.map(task_of) == task, _solo=df.study.isna(), _ok=~df.status.isin(["failed"]))
    d = d.sort_values(["_task", "_solo", "_ok", "created"], ascending=False)
    return str(d.run_id.iloc[0])


def store_root() -> Path:
    return Path(os.environ.get("A3PO_STORE", "runs")).expanduser().resolve()


def get_store() -> Store:
    """The app's store; an empty one is seeded with the embedded default runs (data/store)."""
    root = store_root()
    s = Store(root)
    if not s.run_ids() and EMBEDDED_STORE.exists():
        root.mkdir(parents=True, exist_ok=True)
        for d in EMBEDDED_STORE.iterdir():
            if (d / "run.json").exists() and not (root / d.name).exists():
                shutil.copytree(d, root / d.name)
    return s


def embedded_store() -> Store:
    return Store(EMBEDDED_STORE)


def store_failed(e: Exception) -> None:
    """Show why the store cannot be read instead of a traceback, and end this page run."""
    st.error(f"Cannot read the store {store_root()}: {e} — fix or move the run folder it names, then reload.")
    st.stop()


# What a bad run.json raises from Store.runs_table: StoreError, or pyarrow's ArrowInvalid (a value that
# does not fit a column) from a store that does not yet list such runs as 'invalid'.
UNREADABLE = (StoreError, pa.ArrowInvalid)


def q(
    sql: str, params: list | None = None, run_ids: list[str] | None = None, store: Store | None = None
) -> pd.DataFrame:
    """One parameterised query against the store (fresh file list each time, so live runs show up).

    An unreadable store ends the page with one error message (``store_failed``)."""
    try:
        return (store or get_store()).query(sql, params or [], run_ids=run_ids)
    except UNREADABLE as e:
        store_failed(e)


def guard(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` for engine helpers that read the store themselves (e.g. engine.shaping.replay):
    an unreadable store ends the page with one error message, like ``q``."""
    try:
        return fn(*args, **kwargs)
    except UNREADABLE as e:
        store_failed(e)


def all_runs_df(store: Store | None = None) -> pd.DataFrame:
    """Every run in the store, newest first, including those whose run.json is unusable (status 'invalid')."""
    try:
        df = (store or get_store()).runs_table().to_pandas()
    except UNREADABLE as e:
        store_failed(e)
    return df.sort_values("created", ascending=False, na_position="last") if len(df) else df


def split_invalid(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(usable runs, runs whose run.json the store could not read: status 'invalid')."""
    bad = df.status == "invalid"
    return df[~bad], df[bad]


def warn_invalid(bad: pd.DataFrame) -> None:
    """One warning line per unreadable run, so a broken folder is named rather than hidden."""
    for r in bad.itertuples(index=False):
        st.warning(f"run {r.run_id} is unreadable: {r.error or 'no reason given'}")


def runs_df(store: Store | None = None, warn: bool = True) -> pd.DataFrame:
    """The usable runs, newest first, for tables, pickers and plots; unreadable runs are left out and
    (with ``warn``) named in a warning each."""
    good, bad = split_invalid(all_runs_df(store))
    if warn:
        warn_invalid(bad)
    return good


def safe_run_id(run_id: str) -> str:
    """Validate a run id coming from the UI before it touches a path or a query."""
    try:
        return check_name(run_id)
    except StoreError as e:
        st.error(str(e))
        st.stop()


def pick_run(label: str = "Run", key: str = "run", with_tokens: bool = True, store: Store | None = None) -> str | None:
    df = runs_df(store)
    if with_tokens and len(df):
        has = q("select distinct run_id from tokens", store=store)
        df = df[df.run_id.isin(has.run_id)]
    if not len(df):
        st.info("No runs with stored tokens yet: launch one on the Launch page or run `a3po train`.")
        return None
    ids = df.run_id.tolist()
    default = st.session_state.get(key)
    if default not in ids:
        default = default_run(df)
    return st.selectbox(
        label,
        ids,
        index=ids.index(default),
        key=key,
        format_func=lambda r: (
            f"{r}  ({df.set_index('run_id').loc[r, 'algorithm']}, {df.set_index('run_id').loc[r, 'status']})"
        ),
    )


# ------------------------------------------------------------------ token rendering
def _color(v: float, vmax: float, signed: bool) -> str:
    if not np.isfinite(v):
        return "transparent"
    if signed:
        a = min(1.0, abs(v) / vmax) if vmax > 0 else 0.0
        return f"rgba(34,139,34,{0.15 + 0.7 * a:.2f})" if v >= 0 else f"rgba(220,20,60,{0.15 + 0.7 * a:.2f})"
    a = min(1.0, v / vmax) if vmax > 0 else 0.0
    return f"rgba(65,105,225,{0.1 + 0.8 * a:.2f})"


def render_tokens(tokens: pd.DataFrame, quantity: str, vmax: float | None = None, key_col: str = "is_key") -> str:
    """HTML for one response: each token a span coloured by ``quantity``, key tokens outlined,
    a tooltip with text, id, probability, entropy, raw and shaped advantage."""
    col = QUANTITIES[quantity]
    vals = token_values(tokens, col)
    push = token_values(tokens, "push")
    signed = col.startswith("adv") or col == "mismatch"
    if vmax is None:
        vmax = float(np.nanmax(np.abs(vals))) if np.isfinite(vals).any() else 1.0
    mis = token_values(tokens, "mismatch")
    if col == "mismatch":  # an exact agreement is no colour, not the palest green
        vals = np.where(vals == 0, np.nan, vals)
    spans = []
    for row, v, pu, dm in zip(tokens.itertuples(index=False), vals, push, mis):
        text = row.token_text if row.token_text != "" else "∅"
        tip = (
            f"token {text!r} (id {row.token_id}) | p={np.exp(row.logprob):.4f} | H={row.entropy:.4f} | "
            f"raw adv={row.adv_raw:+.4f} | shaped adv={row.adv_shaped:+.4f} | push={pu:.2e}"
            + (f" | Δlog p (trainer − sampler)={dm:+.2e}" if np.isfinite(dm) else "")
            + (" | KEY TOKEN" if getattr(row, key_col) else "")
        )
        style = f"background:{_color(v, vmax, signed)};padding:1px 0;font-family:monospace;white-space:pre"
        cls = "tok key" if getattr(row, key_col) else "tok"
        if getattr(row, key_col):
            style += ";outline:2px solid #111;outline-offset:-1px;font-weight:bold"
        spans.append(f'<span class="{cls}" title="{html.escape(tip)}" style="{style}">{html.escape(text)}</span>')
    return "<div style='line-height:1.9'>" + "".join(spans) + "</div>"


def bounded(value: float, lo: float, hi: float, name: str) -> float | None:
    """Refuse an out-of-range coefficient with a message (returns None)."""
    if value is None or not np.isfinite(value) or value < lo or value > hi:
        st.error(f"{name} must be between {lo} and {hi}; got {value}.")
        return None
    return value
