"""The study command on a tiny budget (report and claims table come from the stored runs), and its presets."""

import json
import math
import shutil

from conftest import a3po

from engine.config import load_config
from engine.store.store import Store
from engine.study.design import CORE, PRESETS, SETTINGS
from engine.study.runner import plan

TINY = ["train.prompts_per_step=4", "rollout.n=4", "eval.n_prompts=6"]
PART_KEYS = {
    "text",
    "setting",
    "reference",
    "metric",
    "kind",
    "n",
    "mean",
    "se",
    "ci_low",
    "ci_high",
    "min_effect",
    "verdict",
}


def test_study_quick_reduced_budget_and_resume(tmp_path):
    store, out = tmp_path / "runs", tmp_path / "report"
    args = [
        "study",
        "--preset",
        "quick",
        "--steps",
        "2",
        "--only",
        "grpo,psr,nsr,a3po",
        "--id",
        "t",
        "--store",
        str(store),
        "--out",
        str(out),
        *TINY,
    ]
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
    assert "| claim" in md and "PSR only" in md and "## Verdict rule" in md and "## Power" in md
    assert "Preset 'quick'" in md and "1 paired seed: grpo, psr, nsr, a3po" in md
    claims = json.loads((out / "claims.json").read_text())
    assert len(claims) == 11
    by = {c["id"]: c for c in claims}
    assert all(set(p) == PART_KEYS for c in claims for p in c["parts"])
    # PSR vs GRPO is measured from the stored runs (1 seed -> no interval -> inconclusive); P2N1 runs are absent
    psr = by["psr-sharpens"]
    assert psr["verdict"] == "inconclusive" and all(p["n"] == 1 and p["ci_low"] is None for p in psr["parts"])
    assert not math.isnan(psr["parts"][0]["mean"])
    assert by["raise-positive"]["verdict"] == "not measured"
    assert by["a3po-vs-grpo"]["parts"][0]["n"] == 1
    # resume: a finished study is not rerun; a missing run is redone
    shutil.rmtree(store / "t.nsr.s0")
    res2 = json.loads(a3po(*args, timeout=600).stdout.strip().splitlines()[-1])
    assert res2["runs"]["t.grpo.s0"].startswith("skipped") and res2["runs"]["t.nsr.s0"] == "finished"


def test_study_rejects_unknown_setting(tmp_path):
    p = a3po("study", "--only", "grpo,bogus", "--store", str(tmp_path), "--out", str(tmp_path / "r"), check=False)
    assert p.returncode == 2 and "bogus" in p.stderr.strip().splitlines()[-1]


def test_grid_covers_the_issue():
    full = PRESETS["full"]
    assert {
        "grpo",
        "psr",
        "nsr",
        "w_reinforce",
        "p2n1",
        "p1n2",
        "p1n0.5",
        "dapo",
        "fork_tokens",
        "a3po",
        "a3po-dapo",
        "a3po-static",
        "dapo-clip-sym",
    } <= set(full.settings)
    assert "p1n0.5-lr2x" not in SETTINGS  # the ratio claim is tested at the same learning rate
    assert SETTINGS["p1n0.5"].lr_scale == 1.0 and "algorithm.w_neg=0.5" in SETTINGS["p1n0.5"].overrides
    tok = [n for n in full.settings if SETTINGS[n].section == "token"]
    assert len(tok) == 10  # {prob, entropy} x {pos, neg} x {high, low} at x2, and positive/high x0.5 for both metrics
    assert set(CORE) == {"grpo", "dapo", "a3po", "a3po-dapo", "p2n1", "psr", "nsr"} and full.core == CORE
    assert full.seeds >= 10 and full.secondary_seeds < full.seeds
    assert PRESETS["pilot"].settings == ("grpo", "dapo", "a3po") and PRESETS["pilot"].seeds == 10
    assert {"grpo", "psr", "nsr", "a3po"} <= set(PRESETS["quick"].settings) and PRESETS["quick"].seeds == 1
    for name in ("full", "pilot"):  # every test prompt at the end, no intermediate evaluations
        assert {"eval.n_prompts=0", "train.eval_every=0"} <= set(PRESETS[name].overrides)


def test_plan_gives_core_settings_more_seeds():
    full = PRESETS["full"]
    jobs = plan("s", full, seeds=10, steps=7, only=None, extra=["rollout.n=4"], base_lr=1e-4, threads=1, config=None)
    per = {}
    for j in jobs:
        per.setdefault(j.setting.name, []).append(j.seed)
    assert all(per[n] == list(range(10)) for n in CORE)
    assert all(per[n] == list(range(full.secondary_seeds)) for n in full.settings if n not in CORE)
    assert len(jobs) == 10 * len(CORE) + full.secondary_seeds * (len(full.settings) - len(CORE))
    assert jobs[0].seed == 0 and jobs[-1].seed == 9  # seed-major: an interrupted study has whole seeds
    # fewer core seeds than the secondary default caps the secondary ones; an explicit secondary count wins
    assert {
        j.seed for j in plan("s", full, seeds=2, steps=7, only=["p1n2"], extra=[], base_lr=1e-4, threads=1, config=None)
    } == {0, 1}
    assert (
        len(
            plan(
                "s",
                full,
                seeds=10,
                steps=7,
                only=["p1n2", "grpo"],
                extra=[],
                base_lr=1e-4,
                threads=1,
                config=None,
                secondary_seeds=3,
            )
        )
        == 13
    )
    # the run arguments load as a config: A3PO on DAPO gets DAPO's sampling and overlong buffer
    j = next(j for j in jobs if j.run_id == "s.a3po-dapo.s3")
    cfg = load_config(None, [a for a in j.args if not a.startswith("--")])
    assert (cfg.algorithm.name, cfg.algorithm.dynamic_sampling, cfg.algorithm.overlong_buffer) == ("a3po", True, 12)
    assert (cfg.seed, cfg.train.steps, cfg.eval.n_prompts, cfg.train.eval_every, cfg.rollout.n) == (3, 7, 0, 0, 4)
    long = plan(
        "s",
        full,
        seeds=1,
        steps=7,
        only=["a3po-dapo"],
        extra=[],
        base_lr=1e-4,
        threads=1,
        config=None,
        max_new_tokens=64,
    )
    assert "algorithm.overlong_buffer=16" in long[0].args
    p = next(j for j in jobs if j.run_id == "s.p1n0.5.s0")
    assert not any(a.startswith("actor.lr=") for a in p.args)
