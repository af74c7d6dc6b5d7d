"""engine.store.schema: the one record schema. Hand-checkable rows, metrics and the one write path."""

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from engine.shaping.advantage import gradient_push
from engine.store import schema
from engine.store.schema import (
    SCHEMAS,
    STEP_METRICS,
    SchemaError,
    evals_table,
    metrics_from_rollouts,
    run_meta,
    run_row,
    step_tables,
    steps_table,
)
from engine.store.store import Store

REQ = {"reward": 0.5, "acc": 0.5, "entropy": 1.0, "length": 3.0}


# ------------------------------------------------------------------ steps_table
def test_steps_table_has_every_registered_column_and_nulls_for_missing():
    t = steps_table("r", 4, {**REQ, "clipfrac": 0.25})
    assert t.schema.equals(SCHEMAS["steps"])
    assert t.column_names == ["run_id", "step"] + [m.name for m in STEP_METRICS]
    row = t.to_pylist()[0]
    assert (row["run_id"], row["step"], row["reward"], row["clipfrac"]) == ("r", 4, 0.5, 0.25)
    assert row["push_rule_pos"] is None and row["t_step"] is None  # optional and missing: null
    assert math.isnan(t.to_pandas().t_step.iloc[0])  # NaN to pandas readers


def test_steps_table_refuses_unknown_metric_names():
    with pytest.raises(SchemaError, match=r"'rewrad'.*STEP_METRICS"):
        steps_table("r", 1, {**REQ, "rewrad": 1.0})
    assert not issubclass(SchemaError, ValueError)  # a writer's bug keeps its traceback in the CLI


def test_steps_table_refuses_a_missing_required_metric():
    with pytest.raises(SchemaError, match="required metric.*acc"):
        steps_table("r", 1, {k: v for k, v in REQ.items() if k != "acc"})
    # passed as NaN or None: "not measured" (e.g. entropy a writer could not compute) is allowed
    row = steps_table("r", 1, {**REQ, "entropy": float("nan"), "acc": None}).to_pylist()[0]
    assert math.isnan(row["entropy"]) and row["acc"] is None


def test_registry_marks_what_the_pages_select_by_name():
    # polarity101 and the launch page select these four by name; every writer can derive them
    assert schema.REQUIRED_METRICS == ("reward", "acc", "entropy", "length")
    assert all(m.meaning and m.unit for m in STEP_METRICS)
    assert len({m.name for m in STEP_METRICS}) == len(STEP_METRICS)


def test_conform_steps_brings_a_built_table_to_the_registry():
    raw = pa.table({"run_id": ["r", "r"], "step": [1, 2], "reward": [0.1, 0.2], "acc": [0.0, 1.0],
                    "entropy": [1.0, 1.0], "length": [2.0, 3.0]})  # fmt: skip
    t = schema.conform_steps(raw)
    assert t.schema.equals(SCHEMAS["steps"]) and t.column("step").to_pylist() == [1, 2]
    with pytest.raises(SchemaError, match="reward_mean"):
        schema.conform_steps(raw.append_column("reward_mean", pa.array([0.1, 0.2])))
    with pytest.raises(SchemaError, match="required metric.*acc"):
        schema.conform_steps(raw.drop_columns(["acc"]))


# ------------------------------------------------------------------ step_tables
def _padded_batch():
    """3 rollouts, T = 3: lengths 3, 1 (a length-1 response) and 2. Padding holds junk (99, key)."""
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    junk = 99.0
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, junk, junk], [-1.0, -1.0, junk]])
    ent = torch.tensor([[0.3, 0.6, 0.9], [2.0, junk, junk], [0.1, 0.3, junk]])
    ids = torch.tensor([[5, 6, 7], [8, 0, 0], [9, 10, 0]])
    key = torch.tensor([[True, False, False], [True, True, True], [False, True, True]])
    raw = torch.tensor([[1.0, 1.0, 1.0], [-1.0, junk, junk], [0.5, 0.5, junk]])
    shaped = raw * 2
    return dict(
        mask=mask,
        token_ids=ids,
        logprob=lp,
        entropy=ent,
        adv_tokens_raw=raw,
        adv_shaped=shaped,
        is_key=key,
        polarity=torch.tensor([1, -1, 1]),
    )


def _rollout_cols(B=3):
    return {
        "group_idx": np.zeros(B, np.int32),
        "prompt_idx": np.zeros(B, np.int64),
        "prompt": ["p"] * B,
        "response": ["a", "b", "c"],
        "answer": ["x"] * B,
        "reward": np.array([1.0, 0.0, 1.0], np.float32),
        "correct": [True, False, True],
        "truncated": np.array([True, False, False]),
        "adv_raw": np.array([1.0, -1.0, 0.5], np.float32),
    }


def test_step_tables_rows_of_a_padded_batch():
    t = step_tables("r", 7, **_padded_batch(), rollouts=_rollout_cols(), token_text=lambda ids: [f"<{i}>" for i in ids])
    ro, tok = t["rollouts"].to_pandas(), t["tokens"].to_pandas()
    assert t["rollouts"].schema.equals(SCHEMAS["rollouts"]) and t["tokens"].schema.equals(SCHEMAS["tokens"])
    assert ro.rollout_idx.tolist() == [0, 1, 2] and ro.length.tolist() == [3, 1, 2]
    assert ro.mean_logprob.tolist() == [-2.0, -0.5, -1.0]  # (−1−2−3)/3, −0.5/1, (−1−1)/2: padding ignored
    assert ro.mean_entropy.tolist() == pytest.approx([0.6, 2.0, 0.2])
    assert ro.n_key.tolist() == [1, 1, 1]  # key flags on padding do not count
    assert ro.polarity.tolist() == [1, -1, 1] and (ro.step == 7).all()
    # one token row per valid token, in row then position order
    assert list(zip(tok.rollout_idx, tok.position)) == [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (2, 1)]
    assert tok.token_id.tolist() == [5, 6, 7, 8, 9, 10] and tok.token_text.tolist()[3] == "<8>"
    assert tok.polarity.tolist() == [1, 1, 1, -1, 1, 1]
    assert tok.is_key.tolist() == [True, False, False, True, False, True]
    assert tok.adv_shaped.tolist() == [2.0, 2.0, 2.0, -2.0, 1.0, 1.0] and 99.0 not in tok.logprob.tolist()


def test_step_tables_without_tokens():
    t = step_tables("r", 1, **_padded_batch(), rollouts=_rollout_cols(), token_text=None, with_tokens=False)
    assert set(t) == {"rollouts"}


# ------------------------------------------------------------------ metrics from rollouts
def _hand_rollouts():
    """3 groups of 2: group 0 all correct, group 1 all wrong, group 2 mixed."""
    return pa.table(
        {
            "group_idx": [0, 0, 1, 1, 2, 2],
            "reward": [1.0, 1.0, 0.0, 0.0, 1.0, -0.5],
            "correct": [True, True, False, False, True, False],
            "polarity": [1, 1, -1, -1, 1, -1],
            "length": [2, 4, 10, 0, 6, 2],
            "truncated": [False, False, True, False, False, False],
            "mean_entropy": [1.0, 0.5, 0.2, 0.0, 2.0, 1.0],
            "n_key": [1, 1, 2, 0, 1, 1],
        }
    )


def test_metrics_from_rollouts_by_hand():
    m = metrics_from_rollouts(_hand_rollouts())
    assert m["reward"] == pytest.approx(2.5 / 6)
    assert m["acc"] == pytest.approx(3 / 6)
    # token-weighted entropy: Σ mean·len / Σ len = (2 + 2 + 2 + 0 + 12 + 2) / 24
    assert m["entropy"] == pytest.approx(20 / 24)
    assert m["entropy_pos"] == pytest.approx((2 + 2 + 12) / 12)  # lengths 2, 4, 6
    assert m["entropy_neg"] == pytest.approx((2 + 0 + 2) / 12)  # lengths 10, 0, 2
    assert m["length"] == pytest.approx(24 / 6)
    assert (m["length_pos"], m["length_neg"]) == (4.0, 4.0)
    assert m["frac_all_correct"] == pytest.approx(1 / 3) and m["frac_all_wrong"] == pytest.approx(1 / 3)
    assert m["truncated_frac"] == pytest.approx(1 / 6)
    assert m["key_frac"] == pytest.approx(6 / 24)
    assert m["n_rollouts"] == 6.0
    assert not any(k.startswith("push") for k in m)  # push needs the tokens
    steps_table("r", 1, m)  # every derived name is registered


def test_metrics_from_rollouts_undefined_is_nan():
    ro = _hand_rollouts().filter(pa.array([True, True, False, False, False, False]))  # only correct responses
    m = metrics_from_rollouts(ro)
    assert math.isnan(m["length_neg"]) and math.isnan(m["entropy_neg"])
    assert m["frac_all_correct"] == 1.0 and m["frac_all_wrong"] == 0.0


def test_push_from_tokens_matches_gradient_push():
    b = _padded_batch()
    t = step_tables("r", 1, **b, rollouts=_rollout_cols(), token_text=lambda ids: [""] * len(ids))
    m = metrics_from_rollouts(t["rollouts"], t["tokens"])
    rule = gradient_push(b["adv_tokens_raw"], b["adv_shaped"], b["logprob"], b["mask"], b["polarity"])
    raw = gradient_push(torch.zeros(3, 3), b["adv_tokens_raw"], b["logprob"], b["mask"], b["polarity"])
    assert m["push_rule_pos"] == pytest.approx(rule["positive"]) and m["push_rule_neg"] == pytest.approx(
        rule["negative"]
    )
    assert m["push_raw_pos"] == pytest.approx(raw["positive"]) and m["push_raw_neg"] == pytest.approx(raw["negative"])
    # by hand: Σ|adv_shaped| over valid tokens of each polarity
    assert (m["push_pos"], m["push_neg"]) == (pytest.approx(2 * 3 + 1 * 2), pytest.approx(2.0))
    # raw push of rollout 1 (one token, adv −1, p = e^−0.5)
    assert m["push_raw_neg"] == pytest.approx(1 - math.exp(-0.5))


# ------------------------------------------------------------------ evals, run.json
def test_evals_table_rows():
    t = evals_table("r", 3, {"greedy_acc": 0.25, "sampled_acc": 0.5, "pass@k": {4: 0.75, 1: 0.5}, "n_prompts": 8})
    assert t.schema.equals(SCHEMAS["evals"])
    rows = [(r["metric"], r["k"], r["value"]) for r in t.to_pylist()]
    assert rows == [("greedy_acc", None, 0.25), ("sampled_acc", None, 0.5), ("pass@k", 1, 0.5), ("pass@k", 4, 0.75)]
    assert set(t.column("n").to_pylist()) == {8} and set(t.column("step").to_pylist()) == {3}


def test_run_meta_and_run_row():
    meta = run_meta("r", {"algorithm": {"name": "a3po"}, "train": {"steps": 5}}, name=None, study=None,
                    pid=1, host="h", lease=True, now=10.0)  # fmt: skip
    assert (meta["name"], meta["algorithm"], meta["status"], meta["total_steps"]) == ("r", "a3po", "created", 5)
    row, problems = run_row(meta)
    assert problems == [] and row["config"] == '{"algorithm": {"name": "a3po"}, "train": {"steps": 5}}'
    row, problems = run_row({**meta, "last_step": "3", "created": True})
    assert row["last_step"] is None and problems == ["created True is not a number", "last_step '3' is not an integer"]


# ------------------------------------------------------------------ the one write path
def test_write_step_builds_the_steps_row_and_times_the_write(tmp_path):
    s = Store(tmp_path)
    rid = s.create_run({"algorithm": {"name": "grpo"}, "train": {"steps": 2}}, name="w")
    t = step_tables(rid, 1, **_padded_batch(), rollouts=_rollout_cols(), token_text=lambda ids: [""] * len(ids))
    dt = s.write_step(rid, 1, t, metrics={**REQ, "t_store": 1.0, "t_step": 2.0})
    row = s.query("select * from steps").iloc[0]
    added = row.t_store - 1.0
    assert 0 < added <= dt and row.t_step == pytest.approx(2.0 + added)  # the write's share, in both
    assert row.time > 0 and math.isnan(row.clipfrac)
    # the steps row is in the same segment as the other tables
    seg = tmp_path / "w" / "segments" / "step_000001"
    assert sorted(p.name for p in seg.iterdir()) == ["rollouts.parquet", "steps.parquet", "tokens.parquet"]


def test_write_step_refuses_unknown_metrics_and_publishes_nothing(tmp_path):
    s = Store(tmp_path)
    rid = s.create_run({"algorithm": {"name": "grpo"}, "train": {"steps": 2}}, name="w")
    t = step_tables(rid, 1, **_padded_batch(), rollouts=_rollout_cols(), token_text=lambda ids: [""] * len(ids))
    with pytest.raises(SchemaError, match="bogus"):
        s.write_step(rid, 1, t, metrics={**REQ, "bogus": 1.0})
    with pytest.raises(SchemaError, match="both"):
        s.write_step(rid, 1, {**t, "steps": steps_table(rid, 1, REQ)}, metrics=REQ)
    assert not (tmp_path / "w" / "segments").exists() or not any((tmp_path / "w" / "segments").iterdir())
    assert s.query("select count(*) n from rollouts").n.iloc[0] == 0


def test_empty_store_views_have_the_registered_columns(tmp_path):
    # a page's "select acc, t_step from steps" works before any step exists
    assert Store(tmp_path).query("select run_id, step, acc, t_step from steps").empty


def test_trainer_steps_row_matches_metrics_from_its_rollouts(tmp_path):
    """The trainer computes its metrics from tensors; metrics_from_rollouts from the stored rows.
    Both must agree, or TRL/verl runs would plot other numbers than the trainer's."""
    from engine.config import load_config
    from engine.train.trainer import Trainer

    n = torch.get_num_threads()
    try:
        cfg = load_config(None, ["name=t", "train.steps=1", "train.prompts_per_step=2", "rollout.n=4",
                                 "eval.n_prompts=4", "eval.k=[1]", "train.save_final_model=false",
                                 "train.threads=1", "algorithm.name=a3po"])  # fmt: skip
        Trainer(cfg, Store(tmp_path), log=lambda s: None).fit(progress=False)
    finally:
        torch.set_num_threads(n)
    s = Store(tmp_path)
    with s.reading(["t"]) as con:
        ro = con.execute("select * from rollouts where step = 1").df()
        tok = con.execute("select * from tokens where step = 1").df()
        row = con.execute("select * from steps where step = 1").df().iloc[0]
    derived = metrics_from_rollouts(ro, tok)
    for k, v in derived.items():
        if math.isnan(v):
            assert math.isnan(row[k]), k
        else:
            assert row[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    assert row.t_store > 0 and row.t_step >= row.t_store and row.time > 0


def test_update_run_checks_fields_against_the_schema(tmp_path):
    s = Store(tmp_path)
    rid = s.create_run({"algorithm": {"name": "grpo"}, "train": {"steps": 2}}, name="w")
    assert s.update_run(rid, status="running", last_step=1, resolved={"name": "grpo"})["last_step"] == 1
    with pytest.raises(SchemaError, match="'last_setp'.*RUN_FIELDS"):
        s.update_run(rid, last_setp=2)
    with pytest.raises(SchemaError, match="last_step '2' is not an integer"):
        s.update_run(rid, last_step="2")
    assert s.read_run(rid)["last_step"] == 1  # nothing written by the refused updates


def test_readme_lists_the_registered_step_columns():
    import re
    from pathlib import Path

    line = next(
        x for x in (Path(__file__).parent.parent / "README.md").read_text().splitlines() if x.startswith("| `steps` |")
    )
    listed = line.split("per registered metric:", 1)[1]
    while "(" in listed:  # drop the (possibly nested) explanations
        listed = re.sub(r"\([^()]*\)", "", listed)
    listed = listed.strip(" |")
    assert [c.strip() for c in listed.split(",")] == [m.name for m in STEP_METRICS]


def test_mismatch_metrics_by_hand():
    """Ratios r = π_train/π_rollout of 1, 1/2, 1/4; a token without a sampler log-prob is left out."""
    lp = np.log([0.5, 0.25, 0.1, 0.2])
    rlp = np.array([np.log(0.5), np.log(0.5), np.log(0.4), np.nan])
    m = schema.mismatch_metrics(lp, rlp)
    ln2 = math.log(2)
    assert m["mismatch_abs"] == pytest.approx((0 + ln2 + 2 * ln2) / 3)
    assert m["mismatch_kl"] == pytest.approx((0 + (0.5 - 1 + ln2) + (0.25 - 1 + 2 * ln2)) / 3)
    assert m["mismatch_ratio_min"] == pytest.approx(0.25) and m["mismatch_ratio_max"] == pytest.approx(1.0)
    assert m["mismatch_ratio_q01"] == pytest.approx(0.255)  # linear between the sorted ratios 0.25, 0.5, 1
    assert m["mismatch_ratio_q99"] == pytest.approx(0.99)
    assert m["mismatch_out_frac"] == pytest.approx(1 / 3)  # only 1/4 lies outside [1/2, 2]; 1/2 is inside
    assert set(m) <= set(schema.METRICS)


def test_mismatch_metrics_identical_and_unmeasured():
    same = schema.mismatch_metrics(np.log([0.3, 0.9]), np.log([0.3, 0.9]))
    assert same["mismatch_abs"] == 0 and same["mismatch_kl"] == 0 and same["mismatch_out_frac"] == 0
    assert same["mismatch_ratio_min"] == same["mismatch_ratio_max"] == 1
    none = schema.mismatch_metrics(np.log([0.3]), [np.nan])
    assert all(math.isnan(v) for v in none.values()) and len(none) == 7
    assert all(math.isnan(v) for v in schema.mismatch_metrics([], []).values())


def test_step_tables_store_the_sampler_logprob_or_nan():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    kw = dict(
        mask=mask,
        token_ids=torch.tensor([[5, 6, 0], [7, 0, 0]]),
        logprob=torch.tensor([[-0.1, -0.2, 0.0], [-0.3, 0.0, 0.0]]),
        entropy=torch.zeros(2, 3),
        adv_tokens_raw=torch.zeros(2, 3),
        adv_shaped=torch.zeros(2, 3),
        is_key=torch.zeros(2, 3, dtype=torch.bool),
        polarity=torch.tensor([1, -1]),
        rollouts={
            "group_idx": np.zeros(2, np.int32),
            "prompt_idx": np.zeros(2, np.int64),
            "prompt": ["p", "p"],
            "response": ["a", "b"],
            "answer": ["1", "1"],
            "reward": np.array([1.0, 0.0], np.float32),
            "correct": [True, False],
            "truncated": np.array([False, False]),
            "adv_raw": np.array([0.5, -0.5], np.float32),
        },
        token_text=lambda ids: [str(i) for i in ids],
    )
    without = schema.step_tables("r", 1, **kw)["tokens"].to_pandas()
    assert without.rollout_logprob.isna().all() and len(without) == 3
    rec = torch.tensor([[-0.1, -0.25, 0.0], [float("nan"), 0.0, 0.0]])
    t = schema.step_tables("r", 1, rollout_logprob=rec, **kw)["tokens"].to_pandas()
    assert t.rollout_logprob.iloc[:2].tolist() == pytest.approx([-0.1, -0.25]) and math.isnan(t.rollout_logprob.iloc[2])
    m = schema.metrics_from_rollouts(schema.step_tables("r", 1, rollout_logprob=rec, **kw)["rollouts"], t)
    assert m["mismatch_abs"] == pytest.approx(0.025, abs=1e-6)  # (0 + 0.05) / 2 tokens with a sampler log-prob
