"""What a run is on disk: the one record schema every writer uses.

Why one module: the trainer, the TRL integration and the verl integration all write runs that the
same app pages read. When each writer built its own rows, a TRL run lacked step columns that a page
selected by name and broke it. Here live, once:

* ``SCHEMAS``: the Arrow schemas of the four step tables ``steps``, ``rollouts``, ``tokens``, ``evals``;
* ``STEP_METRICS``: every column of ``steps`` (name, meaning, unit, whether the app's pages select
  it by name) and ``steps_table``, which builds a steps row and refuses names it does not know;
* ``step_tables``: one step's ``rollouts``/``tokens`` rows from padded tensors;
* ``evals_table``: one evaluation's rows;
* ``metrics_from_rollouts``: the step metrics derivable from a step's rollouts (and tokens) alone,
  so writers that do not compute them (TRL, verl) fill the same columns the trainer does;
* ``RUN_FIELDS``/``RUN_COLUMNS``/``run_meta``/``run_row``: run.json and the ``runs`` table.

``engine.store.store`` only reads and writes these; it defines none of them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pyarrow as pa

TABLES = ("steps", "rollouts", "tokens", "evals")
_INT32 = (-(2**31), 2**31 - 1)


class SchemaError(RuntimeError):
    """A writer built a row the schema does not describe (an unknown or missing step metric).

    A bug in that writer, not a user mistake: deliberately not a ValueError, so it keeps its traceback."""


# ---------------------------------------------------------------------------------------------- steps
@dataclass(frozen=True)
class Metric:
    """One float64 column of the ``steps`` table."""

    name: str
    meaning: str
    unit: str
    required: bool = False  # an app page selects it by name: every writer must pass it (NaN = not measured)


def _m(name: str, meaning: str, unit: str, required: bool = False) -> Metric:
    return Metric(name, meaning, unit, required)


# In column order. "derived" in a meaning: metrics_from_rollouts computes it from the step's rows.
STEP_METRICS: tuple[Metric, ...] = (
    _m("reward", "mean reward of the step's rollouts (derived)", "reward", True),
    _m("acc", "fraction of the step's rollouts the verifier accepts (derived)", "fraction", True),
    _m("entropy", "token-weighted mean entropy over all response tokens (derived)", "nats", True),
    _m("entropy_pos", "mean token entropy of correct (polarity +1) responses (derived)", "nats"),
    _m("entropy_neg", "mean token entropy of incorrect (polarity -1) responses (derived)", "nats"),
    _m("length", "mean response length (derived)", "tokens", True),
    _m("length_pos", "mean length of correct responses (derived)", "tokens"),
    _m("length_neg", "mean length of incorrect responses (derived)", "tokens"),
    _m("frac_all_correct", "fraction of groups whose responses are all correct (derived)", "fraction"),
    _m("frac_all_wrong", "fraction of groups whose responses are all wrong (derived)", "fraction"),
    _m("truncated_frac", "fraction of responses cut at max_new_tokens (derived)", "fraction"),
    _m("clipfrac", "fraction of tokens whose PPO ratio was clipped (upper side)", "fraction"),
    _m("clipfrac_lower", "fraction of tokens clipped on the lower side", "fraction"),
    _m("approx_kl", "approximate KL(old || new) over the update's back-propagated tokens", "nats"),
    _m("kl_ref", "KL penalty to the reference model (0 without one)", "nats"),
    _m("loss", "mean policy loss over the update's mini-batches", "loss"),
    _m("grad_norm", "mean gradient norm before clipping", "norm"),
    _m("push_pos", "Σ|shaped advantage| over tokens of correct responses (derived from tokens)", "advantage"),
    _m("push_neg", "Σ|shaped advantage| over tokens of incorrect responses (derived from tokens)", "advantage"),
    _m("push_rule_pos", "Σ|adv_shaped − adv_raw|·(1−p), correct responses (derived from tokens)", "advantage"),
    _m("push_rule_neg", "Σ|adv_shaped − adv_raw|·(1−p), incorrect responses (derived from tokens)", "advantage"),
    _m("push_raw_pos", "Σ|adv_raw|·(1−p), correct responses (derived from tokens)", "advantage"),
    _m("push_raw_neg", "Σ|adv_raw|·(1−p), incorrect responses (derived from tokens)", "advantage"),
    _m("key_frac", "fraction of response tokens picked as key tokens (derived)", "fraction"),
    _m("mismatch_abs", "mean |logprob − rollout_logprob| over tokens the sampler gave a log-prob (derived)", "nats"),
    _m(
        "mismatch_kl",
        "k3 estimate of KL(rollout || trainer policy): mean of r − 1 − log r, r = π_train/π_rollout",
        "nats",
    ),
    _m("mismatch_ratio_min", "smallest token ratio r = π_train/π_rollout of the step (derived)", "ratio"),
    _m("mismatch_ratio_q01", "1st percentile of the token ratios r (derived)", "ratio"),
    _m("mismatch_ratio_q99", "99th percentile of the token ratios r (derived)", "ratio"),
    _m("mismatch_ratio_max", "largest token ratio r of the step (derived)", "ratio"),
    _m(
        "mismatch_out_frac",
        "fraction of tokens with r outside [1/2, 2] (verl's rollout_is_threshold 2) (derived)",
        "fraction",
    ),
    _m("alpha_pos", "A3PO's scale for correct responses at this step (1 without rules)", "factor"),
    _m("alpha_neg", "A3PO's scale for incorrect responses at this step (1 without rules)", "factor"),
    _m("n_rollouts", "number of rollouts trained on (derived)", "count"),
    _m("gen_rounds", "generation rounds used (dynamic sampling refills)", "count"),
    _m("trl_global_step", "TRL's global_step when the step was shaped (TRL runs only)", "step"),
    _m("test_acc", "held-out sampled accuracy (eval steps only)", "fraction"),
    _m("test_greedy_acc", "held-out greedy accuracy (eval steps only)", "fraction"),
    _m("t_generate", "time sampling responses", "s"),
    _m("t_score", "time decoding and verifying responses", "s"),
    _m("t_forward", "time of the old-policy (and reference) forward", "s"),
    _m("t_shaping", "time computing advantages", "s"),
    _m("t_update", "time of the policy update", "s"),
    _m("t_store", "time building and writing the step's tables (Store.write_step adds its share)", "s"),
    _m("t_eval", "time of the held-out evaluation (eval steps only)", "s"),
    _m("t_step", "wall time of the whole step, store included", "s"),
    _m("time", "wall-clock time the step was written (Unix seconds)", "s"),
)
METRICS: dict[str, Metric] = {m.name: m for m in STEP_METRICS}
REQUIRED_METRICS = tuple(m.name for m in STEP_METRICS if m.required)


def steps_table(run_id: str, step: int, metrics: Mapping[str, float | None]) -> pa.Table:
    """One ``steps`` row with every registered column: missing metrics are null (NaN to pandas).

    Raises SchemaError for a name ``STEP_METRICS`` does not list (a typo would otherwise become a
    column no page reads) or a required metric the writer did not pass at all (it forgot what a page
    plots); passing NaN/None for one says "not measured" (e.g. entropy a verl run did not compute)."""
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise SchemaError(
            f"unknown step metric(s) {', '.join(map(repr, unknown))} — register them in engine.store.schema.STEP_METRICS"
        )
    missing = [k for k in REQUIRED_METRICS if k not in metrics]
    if missing:
        raise SchemaError(f"step {step} of run {run_id!r} lacks the required metric(s) {', '.join(missing)}")
    cols = {"run_id": [run_id], "step": [int(step)]}
    for m in STEP_METRICS:
        v = metrics.get(m.name)
        cols[m.name] = [None if v is None else float(v)]
    return pa.table(cols, schema=SCHEMAS["steps"])


def conform_steps(table: pa.Table) -> pa.Table:
    """A steps table built elsewhere (any number of rows), checked like ``steps_table`` and brought to
    the registered columns, order and types."""
    if table.schema.equals(SCHEMAS["steps"]):
        return table  # built by steps_table
    if "run_id" not in table.column_names or "step" not in table.column_names:
        raise SchemaError("a steps table needs run_id and step columns")
    unknown = sorted(set(table.column_names) - set(METRICS) - {"run_id", "step"})
    if unknown:
        raise SchemaError(
            f"unknown step metric(s) {', '.join(map(repr, unknown))} — register them in engine.store.schema.STEP_METRICS"
        )
    n = table.num_rows
    cols = {"run_id": table["run_id"].cast(pa.string()), "step": table["step"].cast(pa.int32())}
    for m in STEP_METRICS:
        cols[m.name] = table[m.name].cast(pa.float64()) if m.name in table.column_names else pa.nulls(n, pa.float64())
    missing = [k for k in REQUIRED_METRICS if k not in table.column_names]
    if missing:
        raise SchemaError(f"a steps table lacks the required metric(s) {', '.join(missing)}")
    return pa.table(cols, schema=SCHEMAS["steps"])


def with_store_time(metrics: Mapping[str, float], seconds: float, now: float) -> dict:
    """``metrics`` with the store's write time added to ``t_store`` (and ``t_step`` when the writer
    timed the step) and ``time`` set: the one place these columns get the write's share."""
    out = dict(metrics)
    out["t_store"] = float(out.get("t_store") or 0.0) + seconds
    if out.get("t_step") is not None:
        out["t_step"] = float(out["t_step"]) + seconds
    out["time"] = now
    return out


# ------------------------------------------------------------------------------ rollouts, tokens, evals
SCHEMAS: dict[str, pa.Schema] = {
    "steps": pa.schema(
        [("run_id", pa.string()), ("step", pa.int32())] + [(m.name, pa.float64()) for m in STEP_METRICS]
    ),
    "rollouts": pa.schema(
        [
            ("run_id", pa.string()),
            ("step", pa.int32()),
            ("rollout_idx", pa.int32()),
            ("group_idx", pa.int32()),
            ("prompt_idx", pa.int64()),
            ("prompt", pa.string()),
            ("response", pa.string()),
            ("answer", pa.string()),
            ("reward", pa.float32()),
            ("correct", pa.bool_()),
            ("polarity", pa.int8()),  # +1 correct, -1 incorrect, 0 unknown (e.g. TRL without answers, zero advantage)
            ("length", pa.int32()),  # response tokens
            ("truncated", pa.bool_()),
            ("adv_raw", pa.float32()),  # the rollout's advantage before any shaping
            ("mean_logprob", pa.float32()),
            ("mean_entropy", pa.float32()),
            ("n_key", pa.int32()),  # key tokens of the response
        ]
    ),
    "tokens": pa.schema(
        [
            ("run_id", pa.string()),
            ("step", pa.int32()),
            ("rollout_idx", pa.int32()),
            ("position", pa.int32()),  # 0-based index in the response
            ("token_id", pa.int32()),
            ("token_text", pa.string()),
            ("logprob", pa.float32()),  # old policy, at the rollout temperature
            (
                "rollout_logprob",
                pa.float32(),
            ),  # what the sampler used (NaN: the backend gives none; absent in old runs)
            ("entropy", pa.float32()),
            ("adv_raw", pa.float32()),
            ("adv_shaped", pa.float32()),  # the advantage the loss used
            ("is_key", pa.bool_()),
            ("polarity", pa.int8()),
        ]
    ),
    "evals": pa.schema(
        [
            ("run_id", pa.string()),
            ("step", pa.int32()),
            ("metric", pa.string()),  # greedy_acc, sampled_acc or pass@k
            ("k", pa.int32()),  # null except for pass@k
            ("value", pa.float64()),
            ("n", pa.int32()),  # held-out prompts evaluated
        ]
    ),
}


def step_tables(
    run_id: str,
    step: int,
    *,
    mask,
    token_ids,
    logprob,
    entropy,
    adv_tokens_raw,
    adv_shaped,
    is_key,
    polarity,
    rollouts: dict,
    token_text: Callable,
    with_tokens: bool = True,
    rollout_logprob=None,
) -> dict[str, pa.Table]:
    """One step's ``rollouts`` (and ``tokens``) rows in the store's schema, from padded tensors.

    Args:
        mask: ``(B, T)`` valid response tokens; token_ids, logprob, entropy, adv_tokens_raw, adv_shaped,
            is_key: ``(B, T)``; polarity: ``(B,)``.
        rollouts: the per-rollout columns only the caller knows (group_idx, prompt_idx, prompt,
            response, answer, reward, correct, truncated, adv_raw); rollout_idx, polarity, length,
            mean_logprob, mean_entropy and n_key are derived here (over valid tokens only).
        token_text: maps an int32 numpy array of token ids to their texts.
        rollout_logprob: ``(B, T)`` the log-probs the rollout backend sampled with, or None (stored as NaN).
    Used by the trainer and by the TRL and verl integrations, so every writer produces one schema.
    """
    import numpy as np
    import torch

    m = mask.bool().cpu()
    B = m.shape[0]
    mf = m.float()
    n = mf.sum(1).clamp(min=1)
    lp, ent = logprob.detach().float().cpu(), entropy.detach().float().cpu()
    key = is_key.bool().cpu() & m
    pol = torch.as_tensor(polarity).cpu().numpy().astype(np.int8)
    cols = {
        "run_id": [run_id] * B,
        "step": np.full(B, step, np.int32),
        "rollout_idx": np.arange(B, dtype=np.int32),
        **rollouts,
        "polarity": pol,
        "length": m.sum(1).numpy().astype(np.int32),
        "mean_logprob": ((lp * mf).sum(1) / n).numpy(),
        "mean_entropy": ((ent * mf).sum(1) / n).numpy(),
        "n_key": key.sum(1).numpy().astype(np.int32),
    }
    out = {"rollouts": pa.table({k: cols[k] for k in SCHEMAS["rollouts"].names}, schema=SCHEMAS["rollouts"])}
    if with_tokens:
        rows, pos = m.nonzero(as_tuple=True)
        ids = token_ids.cpu()[rows, pos].numpy().astype(np.int32)
        out["tokens"] = pa.table(
            {
                "run_id": [run_id] * len(ids),
                "step": np.full(len(ids), step, np.int32),
                "rollout_idx": rows.numpy().astype(np.int32),
                "position": pos.numpy().astype(np.int32),
                "token_id": ids,
                "token_text": token_text(ids),
                "logprob": lp[m].numpy(),
                "rollout_logprob": (
                    np.full(len(ids), np.nan, np.float32)
                    if rollout_logprob is None
                    else rollout_logprob.detach().float().cpu()[m].numpy()
                ),
                "entropy": ent[m].numpy(),
                "adv_raw": adv_tokens_raw.detach().float().cpu()[m].numpy(),
                "adv_shaped": adv_shaped.detach().float().cpu()[m].numpy(),
                "is_key": key[m].numpy(),
                "polarity": pol[rows.numpy()],
            },
            schema=SCHEMAS["tokens"],
        )
    return out


def evals_table(run_id: str, step: int, result: Mapping) -> pa.Table:
    """One evaluation's rows from ``engine.train.evaluate.evaluate``'s result (greedy_acc, sampled_acc,
    ``pass@k: {k: value}``, n_prompts): one row per metric, k set only for pass@k."""
    rows = [("greedy_acc", None, result["greedy_acc"]), ("sampled_acc", None, result["sampled_acc"])]
    rows += [("pass@k", int(k), v) for k, v in sorted(result.get("pass@k", {}).items())]
    return pa.table(
        {
            "run_id": [run_id] * len(rows),
            "step": [int(step)] * len(rows),
            "metric": [r[0] for r in rows],
            "k": [r[1] for r in rows],
            "value": [float(r[2]) for r in rows],
            "n": [int(result["n_prompts"])] * len(rows),
        },
        schema=SCHEMAS["evals"],
    )


# ------------------------------------------------------------------------ metrics from stored rows
def metrics_from_rollouts(rollouts, tokens=None) -> dict[str, float]:
    """The step metrics one step's rows determine, computed as the trainer computes them (NaN where
    undefined, e.g. ``length_pos`` without a correct response).

    From ``rollouts``: reward, acc, entropy(_pos/_neg) (token-weighted), length(_pos/_neg),
    frac_all_correct/wrong (per ``group_idx``), truncated_frac, key_frac, n_rollouts. With ``tokens``
    also push_pos/neg (Σ|adv_shaped|) and push_rule_*/push_raw_* (Σ|Δadv|·(1−p), as
    ``engine.shaping.advantage.gradient_push``). Writers that do not compute these themselves (TRL, verl)
    call this so their runs fill the same columns as the trainer's. Takes Arrow tables or DataFrames."""
    import numpy as np

    ro = _frame(rollouts)
    if not len(ro):
        return {"n_rollouts": 0.0}
    length = ro.length.to_numpy(dtype=float)
    ent = ro.mean_entropy.to_numpy(dtype=float)
    pos, neg = (ro.polarity == 1).to_numpy(), (ro.polarity == -1).to_numpy()

    def tok_mean_entropy(sel):  # mean over the selected rows' tokens: Σ mean·length / Σ length
        n = length[sel].sum()
        return float((ent[sel] * length[sel]).sum() / n) if n > 0 else math.nan

    def mean_length(sel):
        return float(length[sel].mean()) if sel.any() else math.nan

    groups = ro.groupby("group_idx").correct
    out = {
        "reward": float(ro.reward.mean()),
        "acc": float(ro.correct.mean()),
        "entropy": tok_mean_entropy(np.ones(len(ro), bool)),
        "entropy_pos": tok_mean_entropy(pos),
        "entropy_neg": tok_mean_entropy(neg),
        "length": float(length.mean()),
        "length_pos": mean_length(pos),
        "length_neg": mean_length(neg),
        "frac_all_correct": float(groups.all().mean()),
        "frac_all_wrong": float((~groups.any()).mean()),
        "truncated_frac": float(ro.truncated.mean()),
        "key_frac": float(ro.n_key.sum() / length.sum()) if length.sum() > 0 else 0.0,
        "n_rollouts": float(len(ro)),
    }
    if tokens is not None:
        out.update(_push_from_tokens(tokens))
        t = _frame(tokens)
        if "rollout_logprob" in t:
            out.update(mismatch_metrics(t.logprob.to_numpy(dtype=float), t.rollout_logprob.to_numpy(dtype=float)))
    return out


MISMATCH_BAND = (0.5, 2.0)  # token ratios outside it count in mismatch_out_frac: verl's rollout_is_threshold 2


def mismatch_metrics(logprob, rollout_logprob) -> dict[str, float]:
    """The training-inference mismatch of one step's valid tokens (1-D arrays of equal length).

    ``logprob`` is the trainer's old-policy log-prob of each sampled token, ``rollout_logprob`` the one the
    sampler used. With ``r = exp(logprob − rollout_logprob)`` (π_train / π_rollout, the weight verl's
    rollout importance sampling uses): mean ``|Δ log-prob|``; the k3 estimate of KL(π_rollout || π_train),
    mean of ``r − 1 − log r`` (unbiased and ≥ 0 per token, since the tokens were drawn from the
    rollout policy); min, 1st and 99th percentile and max of ``r``; the fraction of tokens with ``r``
    outside ``MISMATCH_BAND``. Tokens without a rollout log-prob (NaN) are left out; all NaN when none
    has one (the backend gives none: not measured)."""
    import numpy as np

    lp, rlp = np.asarray(logprob, dtype=np.float64), np.asarray(rollout_logprob, dtype=np.float64)
    ok = np.isfinite(lp) & np.isfinite(rlp)
    names = ("abs", "kl", "ratio_min", "ratio_q01", "ratio_q99", "ratio_max", "out_frac")
    if not ok.any():
        return {f"mismatch_{k}": math.nan for k in names}
    d = lp[ok] - rlp[ok]
    r = np.exp(d)
    lo, hi = MISMATCH_BAND
    vals = (
        np.abs(d).mean(),
        (r - 1.0 - d).mean(),
        r.min(),
        np.quantile(r, 0.01),
        np.quantile(r, 0.99),
        r.max(),
        ((r < lo) | (r > hi)).mean(),
    )
    return {f"mismatch_{k}": float(v) for k, v in zip(names, vals)}


def _frame(t):
    return t.to_pandas() if isinstance(t, pa.Table) else t


def _push_from_tokens(tokens) -> dict[str, float]:
    import numpy as np

    t = _frame(tokens)
    shaped = t.adv_shaped.to_numpy(dtype=float)
    raw = t.adv_raw.to_numpy(dtype=float)
    room = np.clip(1.0 - np.exp(t.logprob.to_numpy(dtype=float)), 0.0, None)  # 1 − p
    out = {}
    for suffix, code in (("pos", 1), ("neg", -1)):
        sel = (t.polarity == code).to_numpy()
        out[f"push_{suffix}"] = float(np.abs(shaped[sel]).sum())
        out[f"push_rule_{suffix}"] = float((np.abs(shaped[sel] - raw[sel]) * room[sel]).sum())
        out[f"push_raw_{suffix}"] = float((np.abs(raw[sel]) * room[sel]).sum())
    return out


# ---------------------------------------------------------------------------------------- run.json
# run.json: what each field means. The first twelve are the ``runs`` table's columns (RUN_COLUMNS).
RUN_FIELDS: dict[str, str] = {
    "run_id": "the run's folder name",
    "name": "the name asked for (the run id unless it was taken)",
    "algorithm": "config.algorithm.name",
    "status": "created, running, finished, failed or killed (readers report a running run without a live writer as killed)",
    "study": "the study the run belongs to, or null",
    "created": "Unix seconds",
    "updated": "Unix seconds of the last run.json rewrite",
    "last_step": "the last stored step",
    "total_steps": "config.train.steps",
    "final_accuracy": "held-out sampled accuracy at the end, or null",
    "error": "why the run failed or was killed, or null",
    "config": "an engine config (engine.config.config_from_dict accepts it): how the app rebuilds the run",
    "resolved": "engine.shaping.algorithms.ResolvedAlgorithm.to_dict(): every algorithm default filled in",
    "pid": "the writer's process id",
    "host": "the writer's host name",
    "writer_lease": "true when the writer holds writer.lock (then pid/host are not used to judge liveness)",
    "checkpoint_step": "the step of the last checkpoint",
    "final_greedy_accuracy": "held-out greedy accuracy at the end",
    "traceback": "a failed run's traceback",
}
RUN_COLUMNS = [
    ("run_id", pa.string()),
    ("name", pa.string()),
    ("algorithm", pa.string()),
    ("status", pa.string()),
    ("study", pa.string()),
    ("created", pa.float64()),
    ("updated", pa.float64()),
    ("last_step", pa.int32()),
    ("total_steps", pa.int32()),
    ("final_accuracy", pa.float64()),
    ("error", pa.string()),
    ("config", pa.string()),
]
RUNS_SCHEMA = pa.schema(RUN_COLUMNS)


def run_meta(
    run_id: str, config: dict, *, name: str | None, study: str | None, pid: int, host: str, lease: bool, now: float
) -> dict:
    """A new run's run.json (status ``created``, step 0)."""
    return {
        "run_id": run_id,
        "name": name or run_id,
        "algorithm": str(config.get("algorithm", {}).get("name", "run")),
        "status": "created",
        "study": study,
        "created": now,
        "updated": now,
        "last_step": 0,
        "total_steps": int(config.get("train", {}).get("steps", 0)),
        "final_accuracy": None,
        "error": None,
        "pid": pid,
        "host": host,
        "writer_lease": lease,
        "config": config,
    }


def check_run_fields(fields: Mapping) -> None:
    """Refuse a run.json update the schema does not describe: an unregistered field name (a typo
    would be silently ignored by every reader) or a value that does not fit its ``runs`` column (the
    run would then be listed as ``invalid``). SchemaError: a writer's bug."""
    unknown = sorted(set(fields) - set(RUN_FIELDS))
    if unknown:
        raise SchemaError(
            f"unknown run.json field(s) {', '.join(map(repr, unknown))} — register them in engine.store.schema.RUN_FIELDS"
        )
    types = dict(RUN_COLUMNS)
    problems = [p for k, v in fields.items() if k in types for p in [_fit(k, types[k], v)[1]] if p]
    if problems:
        raise SchemaError("run.json update does not fit the runs table: " + "; ".join(problems))


def run_row(meta: Mapping) -> tuple[dict, list[str]]:
    """run.json as a ``runs`` row: ``(row, problems)``; a value that does not fit its column is None
    and named in ``problems`` (the store lists such a run as ``invalid``)."""
    row, problems = {}, []
    for k, typ in RUN_COLUMNS:
        value, problem = _fit(k, typ, meta.get(k))
        row[k] = value
        if problem:
            problems.append(problem)
    return row, problems


def _fit(key: str, typ: pa.DataType, v):
    """``(value, problem)``: ``v`` converted to the runs column type, or None and why it does not fit."""
    if v is None:
        return None, None
    if key == "config":
        if not isinstance(v, dict):
            return None, f"config is a {type(v).__name__}, not an object"
        return json.dumps(v, default=str), None
    if pa.types.is_string(typ):
        return (v, None) if isinstance(v, str) else (None, f"{key} {v!r} is not a string")
    if pa.types.is_int32(typ):
        if isinstance(v, bool) or not isinstance(v, int):
            return None, f"{key} {v!r} is not an integer"
        if not _INT32[0] <= v <= _INT32[1]:
            return None, f"{key} {v} out of range"
        return v, None
    if pa.types.is_float64(typ):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None, f"{key} {v!r} is not a number"
        return float(v), None
    return v, None
