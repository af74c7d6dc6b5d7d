"""The sample-polarity study: a grid of runs on the embedded task, a report, a claims table.

Why: Tang et al. 2025 make claims about training dynamics (positive samples sharpen, negative
samples explore, only the ratio of polarity weights matters, token-level choices move entropy in
opposite directions, A3PO beats GRPO/DAPO). ``a3po study`` re-measures each claim on the embedded
task with paired seeds and states, by the rule in ``engine.study.stats``, whether it holds here.

    a3po study --preset quick --out reports/quick            # 1 seed, tiny budget: a smoke test
    a3po study --preset pilot --out reports/pilot            # A3PO, GRPO, DAPO x 10 seeds: the spread
    a3po study --preset full --seeds 14 --out docs/study-full  # the real study

Presets: "full" runs the core settings (``CORE``: the comparisons the paper's main claims rest on)
with ``seeds`` paired seeds and every secondary cell (token grid, P1N2, P1N0.5, ...) with
``secondary_seeds``; both evaluate on every test prompt at the end of each run (``eval.n_prompts=0``)
and skip intermediate evaluations (``train.eval_every=0``, ``eval.at_start=false``: the last step only). Choose
the seed count from the pilot's ``engine.study.report.power_table``.

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

from engine.store.store import Store, check_name
from engine.study.design import PRESETS, SETTINGS, Preset, Setting


@dataclass
class Job:
    setting: Setting
    seed: int
    run_id: str
    args: list[str] = field(default_factory=list)


def _fill(text: str, values: dict[str, str]) -> str:
    for k, v in values.items():
        text = text.replace(k, v)
    return text


def plan(
    study_id: str,
    preset: Preset,
    *,
    seeds: int,
    steps: int,
    only: list[str] | None,
    extra: list[str],
    base_lr: float,
    threads: int,
    config: str | None,
    secondary_seeds: int | None = None,
    max_new_tokens: int = 48,
) -> list[Job]:
    """The runs of a study, seed-major (an interrupted study has whole seeds of every setting).

    ``{dapo_overlong_buffer}`` in a setting's overrides becomes DAPO's default, ``max_new_tokens // 4``.
    """
    names = only or list(preset.settings)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown study setting(s) {unknown}; known: {', '.join(SETTINGS)}")
    fill = {"{dapo_overlong_buffer}": str(max_new_tokens // 4)}
    jobs = []
    for seed in range(seeds):
        for name in names:
            if seed >= preset.seeds_for(name, seeds, secondary_seeds):
                continue
            s = SETTINGS[name]
            rid = check_name(f"{study_id}.{name}.s{seed}")
            args = ([f"--config={config}"] if config else []) + list(preset.overrides)
            args += [_fill(o, fill) for o in s.overrides]
            args += [f"seed={seed}", f"train.steps={steps}", f"train.threads={threads}", f"name={rid}"] + list(extra)
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


def run_study(
    *,
    preset: str = "quick",
    seeds: int | None = None,
    steps: int | None = None,
    out: str | Path = "reports/study",
    store: Store,
    study_id: str | None = None,
    jobs: int | None = None,
    only: list[str] | None = None,
    extra: list[str] | None = None,
    config: str | None = None,
    secondary_seeds: int | None = None,
    log=print,
) -> dict:
    """Run (or continue) a study and write its report. Returns the report's paths and claims.

    ``seeds`` are the core settings' paired seeds; ``secondary_seeds`` (default: the preset's) the others'.
    """
    from engine.config import load_config

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    pr = PRESETS[preset]
    study_id = check_name(study_id or f"study-{preset}")
    cores = os.cpu_count() or 1
    jobs = jobs or max(1, min(cores, 4))
    threads = max(1, cores // jobs)
    from engine.resources import demo_config

    config = config or str(demo_config())
    extra = list(extra or [])
    base_cfg = load_config(config, list(pr.overrides) + extra)  # validates the overrides once, before any launch
    seeds, steps = seeds or pr.seeds, steps or pr.steps
    todo = plan(
        study_id,
        pr,
        seeds=seeds,
        steps=steps,
        only=only,
        extra=extra,
        base_lr=base_cfg.actor.lr,
        threads=threads,
        config=config,
        secondary_seeds=secondary_seeds,
        max_new_tokens=base_cfg.rollout.max_new_tokens,
    )
    log(f"study {study_id}: {len(todo)} runs, {jobs} at a time, {threads} thread(s) each, store {store.root}")
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=jobs) as ex:
        results = list(ex.map(lambda j: _run_job(j, store, study_id, log), todo))
    from engine.study.report import write_report

    names = only or list(pr.settings)
    notes = [
        _seed_note(preset, pr, names, seeds, secondary_seeds, steps, config),
        f"This invocation ran {len(todo)} jobs ({jobs} at a time, {threads} thread(s) each) in "
        f"{(time.time() - t0) / 3600:.2f} h (finished runs are skipped when a study is continued).",
    ]
    paths = write_report(store, study_id, Path(out), settings=[SETTINGS[n] for n in names], notes=notes)
    return {"study": study_id, "runs": dict(results), **paths}


def _seed_note(
    preset: str, pr: Preset, names: list[str], seeds: int, secondary: int | None, steps: int, config: str
) -> str:
    """One sentence for the report: the preset, steps, and which settings got how many paired seeds."""
    counts: dict[int, list[str]] = {}
    for n in names:
        counts.setdefault(pr.seeds_for(n, seeds, secondary), []).append(n)
    per = "; ".join(f"{k} paired seed{'s' * (k != 1)}: {', '.join(v)}" for k, v in sorted(counts.items(), reverse=True))
    return (
        f"Preset {preset!r} on {Path(config).name}, {steps} steps per run. {per}. Core comparisons use the most "
        f"seeds; secondary grid cells fewer, so their intervals are wider. "
        f"Preset overrides: {' '.join(pr.overrides)}."
    )
