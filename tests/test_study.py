"""The study command on a tiny budget: report and claims table come from the stored runs."""

import json
import math
import shutil

import pytest

from conftest import a3po
from engine.report import combine, judge
from engine.store import Store
from engine.study import PRESETS, SETTINGS

TINY = ["train.prompts_per_step=4", "rollout.n=4", "eval.n_prompts=6"]


def test_study_quick_reduced_budget_and_resume(tmp_path):
    store, out = tmp_path / "runs", tmp_path / "report"
    args = ["study", "--preset", "quick", "--steps", "2", "--only", "grpo,psr,nsr,a3po", "--id", "t",
            "--store", str(store), "--out", str(out), *TINY]
    res = json.loads(a3po(*args, timeout=600).stdout.strip().splitlines()[-1])
    assert res["failed"] == []
    s = Store(store)
    runs = s.query("select run_id, status, study from runs order by run_id")
    assert runs.run_id.tolist() == ["t.a3po.s0", "t.grpo.s0", "t.nsr.s0", "t.psr.s0"]
    assert (runs.status == "finished").all() and (runs.study == "t").all()
    # the quick preset's final evaluation goes up to pass@64
    ks = s.query("select max(k) k from evals where metric = 'pass@k' and step = 2")["k"][0]
    assert ks == 64
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    assert "<script" in html and "plotly" in html.lower()
    assert "| claim | verdict |" in md and "PSR only" in md
    claims = json.loads((out / "claims.json").read_text())
    assert len(claims) == 7
    by = {c["claim"].split(":")[0]: c for c in claims}
    # PSR vs GRPO is measured from the stored runs (1 seed -> inconclusive by the rule); P2N1 runs are absent
    psr = by["Positive samples sharpen"]
    assert psr["verdict"] == "inconclusive" and all(p["n"] == 1 for p in psr["parts"])
    assert not math.isnan(psr["parts"][0]["mean"])
    assert by["Raising positive weights speeds reward growth but lowers entropy; raising negative weights does the reverse"]["verdict"] == "not measured"
    # resume: a finished study is not rerun; a missing run is redone
    shutil.rmtree(store / "t.nsr.s0")
    res2 = json.loads(a3po(*args, timeout=600).stdout.strip().splitlines()[-1])
    assert res2["runs"]["t.grpo.s0"].startswith("skipped") and res2["runs"]["t.nsr.s0"] == "finished"


def test_study_rejects_unknown_setting(tmp_path):
    p = a3po("study", "--only", "grpo,bogus", "--store", str(tmp_path), "--out", str(tmp_path / "r"), check=False)
    assert p.returncode == 2 and "bogus" in p.stderr.strip().splitlines()[-1]


def test_grid_covers_the_issue():
    full = set(PRESETS["full"].settings)
    assert {"grpo", "psr", "nsr", "w_reinforce", "p2n1", "p1n2", "p1n0.5-lr2x", "dapo", "fork_tokens", "a3po", "a3po-static"} <= full
    tok = [n for n in full if SETTINGS[n].section == "token"]
    assert len(tok) == 10  # {prob, entropy} x {pos, neg} x {high, low} at x2, plus positive/high at x0.5 for both metrics
    assert SETTINGS["p1n0.5-lr2x"].lr_scale == 2.0
    assert PRESETS["full"].seeds >= 3
    assert {"grpo", "psr", "nsr", "a3po"} <= set(PRESETS["quick"].settings)


@pytest.mark.parametrize("diffs, kind, delta, verdict", [
    ([-0.10, -0.12, -0.08], "lower", 0, "holds"),          # m=-0.10, se=0.0115 -> |m| > 2se, right sign
    ([0.10, 0.12, 0.08], "lower", 0, "does not hold"),     # same size, wrong sign
    ([-0.10, 0.12, 0.01], "lower", 0, "inconclusive"),     # m=0.01, se=0.064
    ([-0.10], "lower", 0, "inconclusive"),                 # one seed: no standard error
    ([], "higher", 0, "not measured"),
    ([0.0, 0.01, -0.01], "at_least", 0.02, "holds"),       # m=0, se=0.0058: 0 - 0.0115 > -0.02
    ([-0.10, -0.11, -0.09], "at_least", 0.02, "does not hold"),  # m + 2se = -0.0885 < -0.02
    ([0.005, -0.005, 0.0], "equivalent", 0.03, "holds"),   # |m| + 2se = 0.0058 <= 0.03
    ([0.10, 0.11, 0.09], "equivalent", 0.03, "does not hold"),
])
def test_verdict_rule(diffs, kind, delta, verdict):
    assert judge(diffs, kind, delta)[0] == verdict


def test_combine():
    assert combine(["holds", "holds"]) == "holds"
    assert combine(["holds", "inconclusive"]) == "inconclusive"
    assert combine(["holds", "does not hold", "inconclusive"]) == "does not hold"
    assert combine(["not measured", "not measured"]) == "not measured"
    assert combine(["holds", "not measured"]) == "inconclusive"
