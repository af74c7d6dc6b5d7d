"""End-to-end: the real CLI on the embedded model with tiny budgets, checked through the store."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, a3po

from engine.store.store import Store


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_train_writes_every_table(tmp_path, tiny):
    p = a3po(
        "train", "--quiet", "--store", str(tmp_path), "train.steps=3", "train.checkpoint_every=2", "name=e2e", *tiny
    )
    res = _last_json(p.stdout)
    assert res["run_id"] == "e2e"
    store = Store(tmp_path)
    meta = store.read_run("e2e")
    assert meta["status"] == "finished" and meta["last_step"] == 3 and meta["algorithm"] == "a3po"
    q = store.query
    steps = q(
        "select step, reward, acc, entropy, entropy_pos, entropy_neg, length, clipfrac, grad_norm, t_generate, t_store "
        "from steps order by step"
    )
    assert steps["step"].tolist() == [1, 2, 3]
    assert (steps["t_generate"] > 0).all() and (steps["entropy"] > 0).all()
    ro = q("select * from rollouts order by step, rollout_idx")
    assert len(ro) == 3 * 16
    assert set(ro["polarity"]) <= {1, -1}
    assert (ro["correct"] == (ro["reward"] > 0.5)).all()
    assert (ro["polarity"] == ro["correct"].map({True: 1, False: -1})).all()
    # every valid response token is stored once, positions 0..length-1
    tok = q(
        "select step, rollout_idx, count(*) n, min(position) lo, max(position) hi, "
        "bool_or(is_key) any_key from tokens group by all order by step, rollout_idx"
    )
    assert len(tok) == len(ro)
    assert (tok["n"].values == ro["length"].values).all()
    assert (tok["lo"] == 0).all() and ((tok["hi"] + 1).values == ro["length"].values).all()
    # A3PO picked key tokens in every response of a mixed group, raw advantages are per response
    mixed = q(
        "select t.is_key, t.adv_raw, t.adv_shaped, r.adv_raw r_adv from tokens t join rollouts r "
        "using (run_id, step, rollout_idx) where r.adv_raw <> 0"
    )
    if len(mixed):
        assert mixed["is_key"].any()
        assert (abs(mixed["adv_raw"] - mixed["r_adv"]) < 1e-6).all()
        unkeyed = mixed[~mixed["is_key"]]
        assert (abs(unkeyed["adv_shaped"] - unkeyed["adv_raw"]) < 1e-6).all()
    # text of tokens concatenates back into the response (plus the EOS)
    one = q("select string_agg(token_text, '' order by position) s from tokens where step = 1 and rollout_idx = 0")[
        "s"
    ][0]
    assert one.startswith(ro["response"][0])
    ev = q("select step, metric, k, value from evals order by step, metric, k")
    assert sorted(set(ev["step"])) == [0, 3]
    assert {"greedy_acc", "sampled_acc", "pass@k"} <= set(ev["metric"])
    # runs and export
    listing = a3po("runs", "--store", str(tmp_path)).stdout
    assert "e2e" in listing and "finished" in listing
    out = tmp_path / "export"
    a3po("export", "e2e", "--format", "parquet", str(out), "--store", str(tmp_path))
    import pyarrow.parquet as pq

    assert pq.read_table(out / "tokens.parquet").num_rows == int(ro["length"].sum())
    assert pq.read_table(out / "runs.parquet").num_rows == 1
    a3po("export", "e2e", "--format", "duckdb", str(out), "--store", str(tmp_path))
    import duckdb

    con = duckdb.connect(str(out / "e2e.duckdb"), read_only=True)
    assert con.execute("select count(*) from rollouts").fetchone()[0] == 48
    con.close()


def test_same_seed_same_run(tmp_path, tiny):
    for name in ("a", "b"):
        a3po("train", "--quiet", "--store", str(tmp_path), "train.steps=2", f"name={name}", *tiny)
    store = Store(tmp_path)
    ra = store.query("select step, rollout_idx, response, reward from rollouts where run_id='a' order by all")
    rb = store.query("select step, rollout_idx, response, reward from rollouts where run_id='b' order by all")
    assert ra.equals(rb)
    ta = store.query(
        "select logprob, adv_shaped from tokens where run_id='a' and step=2 order by rollout_idx, position"
    )
    tb = store.query(
        "select logprob, adv_shaped from tokens where run_id='b' and step=2 order by rollout_idx, position"
    )
    assert ta.equals(tb)


def test_killed_run_resumes_without_loss_or_duplicates(tmp_path, tiny):
    args = [
        sys.executable,
        "-m",
        "engine.cli",
        "train",
        "--quiet",
        "--store",
        str(tmp_path),
        "train.steps=7",
        "train.checkpoint_every=2",
        "name=k",
        *tiny,
    ]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seg = tmp_path / "k" / "segments"
    deadline = time.time() + 240
    while time.time() < deadline and not (seg / "step_000003").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = Store(tmp_path)
    assert store.read_run("k")["status"] == "killed"
    before = store.query("select distinct step from rollouts order by step")["step"].tolist()
    assert before[:3] == [1, 2, 3]  # every completed step survived the kill
    a3po("train", "--quiet", "--resume", "k", "--store", str(tmp_path))
    meta = store.read_run("k")
    assert meta["status"] == "finished"
    steps = store.query("select step from steps order by step")["step"].tolist()
    assert steps == list(range(1, 8))
    dup = store.query("select step, rollout_idx, count(*) c from rollouts group by all having c > 1")
    assert len(dup) == 0
    n_tok = store.query("select count(*) c from tokens")["c"][0]
    assert n_tok == store.query("select sum(length) s from rollouts")["s"][0]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("algorithm.name=ppo_magic", "algorithm.name"),
        ("algorithm.ratio=-0.5", "algorithm.ratio"),
        ("model.path=/nonexistent/model", "/nonexistent/model"),
        ("nonsense.key=1", "nonsense"),
    ],
)
def test_bad_input_fails_with_one_line(tmp_path, override, needle):
    p = a3po("train", "--quiet", "--store", str(tmp_path), "train.steps=1", override, check=False)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("a3po: error:") and needle in err[0], p.stderr


def test_malformed_dataset_row(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=" "answer": 4}\n')
    p = a3po("train", "--quiet", "--store", str(tmp_path / "s"), f"data.train={bad}", "train.steps=1", check=False)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "row 2" in err[0] and "bad.jsonl" in err[0]
    assert not any((tmp_path / "s").glob("*/run.json"))  # nothing half-created


def test_eval_command():
    p = a3po("eval", "--model", "builtin:tiny", "--k", "1,2", "--n-prompts", "6")
    res = _last_json(p.stdout)
    assert 0.0 <= res["greedy_acc"] <= 1.0 and set(res["pass@k"]) == {"1", "2"}
    assert res["pass@k"]["2"] >= res["pass@k"]["1"]
