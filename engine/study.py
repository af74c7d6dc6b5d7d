"""The sample-polarity study: a grid of runs on the embedded task, a report, a claims table.

Why: Tang et al. 2025 make claims about training dynamics (positive samples sharpen, negative
samples explore, only the ratio of polarity weights matters, token-level choices move entropy in
opposite directions, A3PO beats GRPO/DAPO). ``a3po study`` re-measures each claim on the embedded
task with several seeds and states, by a fixed rule, whether it holds here.

    a3po study --preset quick --out reports/quick          # ~15 min on 2 cores, 1 seed
    a3po study --preset full --seeds 3 --out reports/full  # hours; the real study

Every run is a normal run in the store (run id ``<study>.<setting>.s<seed>``, tagged with the
study id), launched through the real CLI. A killed study continues where it stopped: finished runs
are skipped and unfinished ones resume from their checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from engine.store import Store, check_name


@dataclass(frozen=True)
class Setting:
    name: str
    section: str  # polarity | sample | token | methods
    label: str
    overrides: tuple[str, ...] = ()
    lr_scale: float = 1.0


def _tok(pol: str, metric: str, end: str, scale: float) -> Setting:
    sc = f"x{scale:g}"
    rule = f"[{{polarity: {pol}, metric: {metric}, end: {end}, ratio: 0.2, scale: {scale:g}}}]"
    return Setting(f"tok-{pol[:3]}-{metric}-{end}-{sc}", "token", f"{pol} / {metric} / {end} x{scale:g}",
                   ("algorithm.name=token_weighted", f"algorithm.token_rules={rule}"))


SETTINGS: dict[str, Setting] = {s.name: s for s in [
    Setting("grpo", "polarity", "GRPO (both polarities)", ("algorithm.name=grpo",)),
    Setting("psr", "polarity", "PSR only", ("algorithm.name=psr",)),
    Setting("nsr", "polarity", "NSR only", ("algorithm.name=nsr",)),
    Setting("w_reinforce", "polarity", "W-REINFORCE (lambda 0.1)", ("algorithm.name=w_reinforce", "algorithm.lam=0.1")),
    Setting("p2n1", "sample", "P2N1", ("algorithm.name=polarity_weighted", "algorithm.w_pos=2", "algorithm.w_neg=1")),
    Setting("p1n2", "sample", "P1N2", ("algorithm.name=polarity_weighted", "algorithm.w_pos=1", "algorithm.w_neg=2")),
    Setting("p1n0.5-lr2x", "sample", "P1N0.5 at 2x lr", ("algorithm.name=polarity_weighted", "algorithm.w_pos=1",
                                                           "algorithm.w_neg=0.5"), lr_scale=2.0),
    *[_tok(p, m, e, 2.0) for m in ("prob", "entropy") for p in ("positive", "negative") for e in ("high", "low")],
    _tok("positive", "prob", "high", 0.5),
    _tok("positive", "entropy", "high", 0.5),
    Setting("dapo", "methods", "DAPO", ("algorithm.name=dapo",)),
    Setting("fork_tokens", "methods", "DAPO + fork tokens (top 20% entropy)", ("algorithm.name=fork_tokens",)),
    Setting("a3po", "methods", "A3PO (decay on)", ("algorithm.name=a3po",)),
    Setting("a3po-static", "methods", "A3PO static scales (decay off)", ("algorithm.name=a3po", "algorithm.decay=constant")),
    # the scale sweep the A3PO defaults are chosen from (alpha+_0 = alpha-_0)
    Setting("a3po-a1.5", "a3po scales", "A3PO alpha0 1.5", ("algorithm.name=a3po", "algorithm.alpha_pos=1.5", "algorithm.alpha_neg=1.5")),
    Setting("a3po-a3", "a3po scales", "A3PO alpha0 3", ("algorithm.name=a3po", "algorithm.alpha_pos=3", "algorithm.alpha_neg=3")),
]}
# P1N1 is GRPO; the sample-level section reuses the grpo runs as its reference.


@dataclass(frozen=True)
class Preset:
    settings: tuple[str, ...]
    seeds: int
    steps: int
    overrides: tuple[str, ...] = ()


PRESETS = {
    "quick": Preset(("grpo", "psr", "nsr", "w_reinforce", "dapo", "a3po"), seeds=1, steps=80,
                    overrides=("train.eval_every=20", "eval.n_prompts=100", "eval.final_k=[1,2,4,8,16,32,64]",
                               "train.store_tokens=false", "train.save_final_model=false")),
    "full": Preset(tuple(SETTINGS), seeds=3, steps=60,
                   overrides=("train.eval_every=20", "eval.n_prompts=48", "eval.final_k=[1,2,4,8,16,32,64]",
                              "train.store_tokens=false", "train.save_final_model=false")),
}


@dataclass
class Job:
    setting: Setting
    seed: int
    run_id: str
    args: list[str] = field(default_factory=list)


def plan(study_id: str, preset: Preset, *, seeds: int, steps: int, only: list[str] | None, extra: list[str],
         base_lr: float, threads: int, config: str | None) -> list[Job]:
    names = only or list(preset.settings)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown study setting(s) {unknown}; known: {', '.join(SETTINGS)}")
    jobs = []
    for seed in range(seeds):  # seed-major: an interrupted study has whole seeds of every setting
        for name in names:
            s = SETTINGS[name]
            rid = check_name(f"{study_id}.{name}.s{seed}")
            args = ([f"--config={config}"] if config else []) + list(preset.overrides) + list(s.overrides) + [
                f"seed={seed}", f"train.steps={steps}", f"train.threads={threads}", f"name={rid}"] + list(extra)
            if s.lr_scale != 1.0:
                args.append(f"actor.lr={base_lr * s.lr_scale:g}")
            jobs.append(Job(s, seed, rid, args))
    return jobs


def _run_job(job: Job, store: Store, study_id: str, log) -> tuple[str, str]:
    """Run (or resume) one job through the real CLI; returns (run_id, status)."""
    try:
        meta = store.read_run(job.run_id)
    except Exception:
        meta = None
    base = [sys.executable, "-m", "engine.cli", "train", "--quiet", f"--store={store.root}"]
    if meta and meta.get("status") == "finished":
        return job.run_id, "skipped (finished)"
    if meta:
        cmd = base + ["--resume", job.run_id]
    else:
        cmd = base + [f"--study={study_id}"] + job.args
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        err = (p.stderr.strip().splitlines() or ["?"])[-1]
        log(f"  {job.run_id}: failed ({err})")
        return job.run_id, f"failed: {err}"
    log(f"  {job.run_id}: finished in {time.time() - t0:.0f}s")
    return job.run_id, "finished"


def run_study(*, preset: str = "quick", seeds: int | None = None, steps: int | None = None, out: str | Path = "reports/study",
              store: Store, study_id: str | None = None, jobs: int | None = None, only: list[str] | None = None,
              extra: list[str] | None = None, config: str | None = None, log=print) -> dict:
    """Run (or continue) a study and write its report. Returns the report's paths and claims."""
    from engine.config import load_config

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose quick or full")
    pr = PRESETS[preset]
    study_id = check_name(study_id or f"study-{preset}")
    cores = os.cpu_count() or 1
    jobs = jobs or max(1, min(cores, 4))
    threads = max(1, cores // jobs)
    from engine.cli import DEFAULT_CONFIG

    config = config or str(DEFAULT_CONFIG)
    base_cfg = load_config(config, list(extra or []))  # validates the overrides once, before launching anything
    todo = plan(study_id, pr, seeds=seeds or pr.seeds, steps=steps or pr.steps, only=only, extra=list(extra or []),
                base_lr=base_cfg.actor.lr, threads=threads, config=config)
    log(f"study {study_id}: {len(todo)} runs, {jobs} at a time, {threads} thread(s) each, store {store.root}")
    with ThreadPoolExecutor(max_workers=jobs) as ex:
        results = list(ex.map(lambda j: _run_job(j, store, study_id, log), todo))
    from engine.report import write_report

    paths = write_report(store, study_id, Path(out), settings=[SETTINGS[n] for n in (only or pr.settings)])
    return {"study": study_id, "runs": dict(results), **paths}
