"""Our engine vs TRL's GRPOTrainer, tuned and with its defaults: seconds per step by phase, tokens/s.

Why this shape: TRL cannot be stepped by hand, so the three contenders run as alternating *processes*
(one segment = a fresh process, warm-up steps, then measured steps): per round TRL tuned, ours, TRL
defaults, ours (the next round in reverse), so that machine load drifting over the run hits all of
them alike. Medians are over all measured steps of a contender. The load average is printed at the
start and the end: the benchmark's own threads add about 2 to it; a start value above 1, or an end
value above threads + 0.5, means other work shared the 2 cores and the figures are noisy.

Because the machine's speed also drifts between whole runs, the ratios to tuned TRL are also given
round by round (each round's segments ran next to each other), with their geometric mean and a 95%
t-interval over rounds.

    python bench/bench_vs_trl.py [--task countdown|arith] [--rounds 3] [--steps 6] [--warmup 2] [--workers 2]
        [--ours-set actor.skip_zero_advantage=false ...] [--no-defaults]

The workload, identical for all three: the embedded model of the task (``builtin:tiny-countdown`` on
Countdown-lite, the demo's; ``builtin:tiny`` on arith), the same token ids per prompt (BOS + prompt),
16 prompts x 8 rollouts, <= 48 new tokens, T = 1 with no top-k / top-p, 2 torch threads, float32
weights, one generation round and one optimiser step per step (TRL: ``steps_per_generation = 1``,
``num_iterations = 1``, so it skips its old-policy forward; ours: ``actor.mini_batches = 1``, whose
old log-probs are the kv engine's recorded ones), no KL term, lr 1e-4, the task's own 0/1 verifier.

TRL defaults: only the workload above is set; everything else is GRPOConfig's default. On a CPU that
means ``bf16=True`` (mixed-precision autocast) and ``gradient_checkpointing=True`` (both TRL 1.16
defaults, see its GRPOConfig / _BaseConfig).

TRL tuned, as a speed-minded user would set it (read from the installed TRL 1.16 GRPOConfig):
  * ``bf16=False``: fp32. On a CPU without bf16 matrix units autocast adds a cast per op and runs
    slower bf16 kernels; the weights are fp32 anyway, and ours runs fp32.
  * ``gradient_checkpointing=False``: a 0.9M-parameter model has no memory problem; checkpointing
    recomputes the forward inside the backward (TRL's own docs: about 20% slower).
  * ``model.config.use_cache=True`` and generation's default ``use_cache``: the KV cache stays on for
    ``generate`` (checkpointing would otherwise switch the config's cache flag off).
  * ``steps_per_generation=1``, ``num_iterations=1``, ``gradient_accumulation_steps=1``: one 128-row
    generate and one forward/backward per step, as above (also set for the defaults run: it is the
    workload, and TRL's default gives the same).
  * no micro-batches (``--trl-micro-batches 1``): TRL can run the 128 rows' forward/backward as two
    micro-batches of 64 (``per_device_train_batch_size=64``, ``gradient_accumulation_steps =
    steps_per_generation = 2``: still one generate of 128 rows and one optimiser step). Tried on arith,
    three alternating pairs: its update took 0.33-0.36 s either way, so tuned TRL keeps one batch (ours
    keeps ``actor.micro_batch_tokens=0`` as well); the option stays to re-check.
  * left as they are, on purpose: ``torch_compile`` (minutes of compilation on CPU and recompiles
    for every new sequence length, more than a 10-step segment); ``cache_implementation`` (the
    default dynamic cache; a static one pads every row to the full budget);
    ``use_transformers_continuous_batching`` and vLLM (GPU-oriented); ``logging_steps=1`` is set
    to read each step's completion length, its cost falls after the step's timer.

Our engine, at its fastest honest settings: ``rollout.backend=kv`` (our KV-cache engine with EOS
retirement) and ``rollout.workers=2`` (``--workers``: the prompts split between 2 decode processes of
``threads / 2`` threads each, on the same cores TRL gets; the weights are shared, not copied; the
processes start before the warm-up steps; the same processes then split each update's forward and
backward, ``actor.split_update``, on by default), everything else as shipped: A3PO shaping, per-token
entropy, every token of every rollout written to the Parquet store inside the step, and the rows
without a gradient (zero-variance groups) left out of the update (``actor.skip_zero_advantage``, on
by default: the same gradient; TRL back-propagates them). ``--ours-set KEY=VALUE`` (repeatable)
overrides a setting of ours, e.g. ``actor.skip_zero_advantage=false`` to measure without the skip.

Phases. Ours: the trainer's own timers (``t_generate``; the update = the loss forward + backward +
optimiser step; store = building the tables + writing the segment). TRL: its own profiling timers
(``trl.extras.profiling``, which TRL only forwards to wandb/mlflow/trackio, read here by patching
``ProfilingContext._log_metrics``): generate = ``transformers.generate``; old-forward = its
``_get_per_token_logps_and_entropies`` calls inside ``_prepare_inputs`` (none when on-policy);
update = the step minus ``_prepare_inputs`` (loss forward, backward, clip, optimiser step); store is
"n/a" (TRL keeps no per-token record). Step = from ``on_step_begin`` to ``on_step_end`` for TRL,
``Trainer.step`` + the store write for ours. Generated tokens/s = response tokens of the step over
the generate phase's seconds (rollout throughput) and over the whole step (training throughput).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TASKS = {"countdown": ("builtin:tiny-countdown", "builtin:countdown"), "arith": ("builtin:tiny", "builtin:arith")}
KINDS = ("ours", "trl-tuned", "trl-defaults")
PHASES = ("generate", "old_forward", "update", "store", "step")


# ------------------------------------------------------------------ segments (one per child process)
def our_segment(a, d) -> list[dict]:
    from engine.config import load_config
    from engine.resources import demo_config
    from engine.store.store import Store
    from engine.train.trainer import Trainer

    model, task = TASKS[a.task]
    cfg = load_config(
        demo_config(),
        [
            f"model.path={model}",
            f"data.train={task}",
            f"data.test={task}",
            f"train.prompts_per_step={a.prompts}",
            f"rollout.n={a.n}",
            f"rollout.max_new_tokens={a.max_new_tokens}",
            "rollout.temperature=1.0",
            "rollout.top_k=0",
            "rollout.top_p=1.0",
            "rollout.backend=kv",
            f"rollout.workers={a.workers}",
            "actor.mini_batches=1",
            "actor.ppo_epochs=1",
            "actor.lr=1e-4",
            "train.steps=1000",
            f"train.threads={a.threads}",
            f"seed={a.seed}",
            *a.ours_set,
        ],
    )
    tr = Trainer(cfg, Store(Path(d) / "ours"), log=lambda s: None)
    rows = []
    for s in range(1, a.warmup + a.steps + 1):
        t0 = time.perf_counter()
        m, tables = tr.step(s)
        t1 = time.perf_counter()
        tr.store.write_step(tr.run_id, s, tables)
        t2 = time.perf_counter()
        if s <= a.warmup:
            continue
        single = cfg.actor.ppo_epochs == 1 and cfg.actor.mini_batches == 1
        fwd = m.get("t_forward", 0.0)
        rows.append(
            {
                "generate": m["t_generate"],
                # single pass: the "forward" timer is the loss's own forward (with grad), i.e. update work
                "old_forward": 0.0 if single else fwd,
                "update": m["t_update"] + (fwd if single else 0.0),
                "store": m.get("t_store", 0.0) + (t2 - t1),
                "step": t2 - t0,
                "tokens": m["length"] * m["n_rollouts"],
            }
        )
    tr.store.release_writer(tr.run_id)
    return rows


def _trl_timers():
    """Record TRL's own profiling timers as (name, start, end); TRL only sends them to trackers."""
    from trl.extras import profiling

    rec: list[tuple[str, float, float]] = []

    def log_metrics(self, duration):
        rec.append((self.name.split(".", 1)[-1], self._start_time, self._start_time + duration))

    profiling.ProfilingContext._log_metrics = log_metrics
    return rec


def trl_segment(a, d, tuned: bool) -> list[dict]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from engine.model.policy import load_policy
    from engine.tasks.problems import load_problems
    from engine.tasks.reward import resolve_verifier

    rec = _trl_timers()
    model_path, task = TASKS[a.task]
    model, tok, _ = load_policy(model_path, device="cpu")
    problems = load_problems(task, "train")
    verify = resolve_verifier(task)
    by_prompt = {tok.bos_token + p.prompt: p for p in problems}
    # same token ids as ours: BOS + prompt (the tokenizer adds no BOS of its own; checked below)
    ds = Dataset.from_list([{"prompt": k} for k in by_prompt])
    first = next(iter(by_prompt))
    from engine.train.evaluate import encode_prompts

    assert tok(text=[first])["input_ids"][0] == encode_prompts(tok, [by_prompt[first]])[0], "prompt ids differ"

    def reward(prompts, completions, **kw):
        return [float(verify(c, by_prompt[p])) for p, c in zip(prompts, completions)]

    steps: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            steps.append({"t0": time.perf_counter()})

        def on_step_end(self, args, state, control, **kw):
            steps[-1]["t1"] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs and steps:
                steps[-1]["tokens"] = float(logs["completions/mean_length"]) * a.prompts * a.n

    # tuned: the 128 rows may go through forward/backward as K micro-batches (gradient accumulation);
    # one generate of all rows and one optimiser step per step either way
    K = a.trl_micro_batches if tuned else 1
    workload = dict(
        output_dir=str(Path(d) / "trl"),
        per_device_train_batch_size=a.prompts * a.n // K,
        num_generations=a.n,
        max_completion_length=a.max_new_tokens,
        steps_per_generation=K,
        num_iterations=1,
        gradient_accumulation_steps=K,
        max_steps=a.steps + a.warmup,
        use_cpu=True,
        learning_rate=1e-4,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        beta=0.0,
        seed=a.seed,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    tuning = dict(bf16=False, gradient_checkpointing=False) if tuned else {}
    args = GRPOConfig(**workload, **tuning)
    if tuned:
        model.config.use_cache = True
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()]
    )
    trainer.train()
    settings = {
        "bf16": args.bf16,
        "gradient_checkpointing": args.gradient_checkpointing,
        "micro_batches": args.gradient_accumulation_steps,
    }
    rows = []
    for s in steps[a.warmup :]:
        t0, t1 = s["t0"], s["t1"]

        def within(name, lo=t0, hi=t1):
            return [(b, e) for n, b, e in rec if n == name and b >= lo and e <= hi]

        prep = within("_prepare_inputs")
        old = sum(e - b for p0, p1 in prep for b, e in within("_get_per_token_logps_and_entropies", p0, p1))
        gen = sum(e - b for b, e in within("transformers.generate"))
        rows.append(
            {
                "generate": gen,
                "old_forward": old,
                "update": (t1 - t0) - sum(e - b for b, e in prep),
                "store": None,
                "step": t1 - t0,
                "tokens": s.get("tokens", float("nan")),
                **settings,
            }
        )
    return rows


def child(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as d:
        if a.child == "ours":
            rows = our_segment(a, d)
        else:
            rows = trl_segment(a, d, tuned=a.child == "trl-tuned")
    for r in rows:
        r["threads"] = torch.get_num_threads()
    print("ROWS " + json.dumps(rows))


# ------------------------------------------------------------------ driver
def run_segment(a, kind: str, seed: int) -> list[dict]:
    cmd = [sys.executable, __file__, "--child", kind, "--seed", str(seed)]
    for k in ("task", "steps", "warmup", "prompts", "n", "threads", "max_new_tokens", "workers", "trl_micro_batches"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    for kv in a.ours_set:
        cmd += ["--ours-set", kv]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [x for x in p.stdout.splitlines() if x.startswith("ROWS ")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"segment {kind} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][5:])


def med(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def rate(rows: list[dict], over: str) -> float | None:
    vals = [r["tokens"] / r[over] for r in rows if r[over] > 0]
    return statistics.median(vals) if vals else None


def per_round(a, rows: dict[str, list[dict]]) -> None:
    """The ratios to tuned TRL round by round, and their spread.

    The machine's speed drifts between runs by more than the pooled medians show (the same code has
    measured 0.52 and 0.64 in two back-to-back runs), so each round, whose segments ran next to each
    other, gives one ratio; the summary is the geometric mean over rounds with a 95% t-interval on the
    log ratios (df = rounds - 1)."""
    from engine.study.stats import paired_interval

    if a.rounds < 2:
        return
    for key, label in (("step", "step time ours/trl-tuned"), ("generate", "tokens/s (generate) ours/trl-tuned")):
        logs = []
        for r in range(a.rounds):
            ours = [x for x in rows["ours"] if x["round"] == r]
            trl = [x for x in rows["trl-tuned"] if x["round"] == r]
            ratio = med(ours, "step") / med(trl, "step") if key == "step" else rate(ours, key) / rate(trl, key)
            logs.append(math.log(ratio))
        ci = paired_interval(logs)
        print(
            f"per round, {label}: " + " ".join(f"{math.exp(x):.2f}" for x in logs) + f"; geometric mean "
            f"{math.exp(ci.mean):.2f}, 95% t-interval [{math.exp(ci.ci_low):.2f}, {math.exp(ci.ci_high):.2f}]"
        )


def report(a, rows: dict[str, list[dict]], load0, load1, wall) -> None:
    def cell(x, fmt):
        return f"{'n/a':>14s}" if x is None else f"{x:{fmt}}"

    print(
        f"task {a.task} ({TASKS[a.task][0]}), {a.prompts} prompts x {a.n} rollouts, <= {a.max_new_tokens} new tokens, "
        f"T=1, {a.threads} threads; {a.rounds} rounds of alternating segments, {a.steps} measured steps after "
        f"{a.warmup} warm-up each; medians over {', '.join(f'{k} {len(v)}' for k, v in rows.items())} steps"
    )
    print(f"{'':28s}" + "".join(f"{k:>14s}" for k in KINDS))
    for ph in PHASES:
        label = {"old_forward": "old-forward (s)", "step": "step (s)"}.get(ph, f"{ph} (s)")
        print(f"{label:28s}" + "".join(cell(med(rows[k], ph), "14.4f") for k in KINDS))
    print(f"{'generated tokens / step':28s}" + "".join(cell(med(rows[k], "tokens"), "14.0f") for k in KINDS))
    print(f"{'tokens / s (generate)':28s}" + "".join(cell(rate(rows[k], "generate"), "14.0f") for k in KINDS))
    print(f"{'tokens / s (whole step)':28s}" + "".join(cell(rate(rows[k], "step"), "14.0f") for k in KINDS))
    s_our = med(rows["ours"], "step")
    ran = [k for k in ("trl-tuned", "trl-defaults") if rows[k]]
    for k in ran:
        print(
            f"ours vs {k}: step time ours/{k} = {s_our / med(rows[k], 'step'):.2f}; "
            f"tokens/s (generate) ours/{k} = {rate(rows['ours'], 'generate') / rate(rows[k], 'generate'):.2f}; "
            f"tokens/s (step) ours/{k} = {rate(rows['ours'], 'step') / rate(rows[k], 'step'):.2f}"
        )
    per_round(a, rows)
    for k in ran:
        r0 = rows[k][0]
        print(
            f"{k}: bf16={r0['bf16']} gradient_checkpointing={r0['gradient_checkpointing']} "
            f"micro_batches={r0['micro_batches']} threads={r0['threads']}"
        )
    print(f"ours: threads={rows['ours'][0]['threads']}" + "".join(f" {kv}" for kv in a.ours_set))
    # the benchmark itself adds about `threads` to the 1-minute load: others' work shows at the start,
    # or as an end value well above that
    noisy = " (noisy: other load on the machine)" if load0[0] > 1 or load1[0] > a.threads + 0.5 else ""
    print(
        f"load average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
        f"at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}{noisy}; wall {wall / 60:.1f} min"
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=sorted(TASKS), default="countdown")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6, help="measured steps per segment")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="ours: rollout.workers (decode processes)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument(
        "--trl-micro-batches", type=int, default=1, help="TRL tuned: forward/backward in this many micro-batches"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--ours-set", action="append", default=[], metavar="KEY=VALUE", help="ours: a config override (repeatable)"
    )
    ap.add_argument(
        "--no-defaults",
        action="store_true",
        help="leave TRL's defaults out (rounds of TRL tuned and ours only, for more rounds in the same time)",
    )
    ap.add_argument("--child", choices=KINDS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    load0, t0 = os.getloadavg(), time.perf_counter()
    rows: dict[str, list[dict]] = {k: [] for k in KINDS}
    for r in range(a.rounds):
        order = ["trl-tuned", "ours"] if a.no_defaults else ["trl-tuned", "ours", "trl-defaults", "ours"]
        for kind in order if r % 2 == 0 else order[::-1]:
            rows[kind] += [dict(x, round=r) for x in run_segment(a, kind, a.seed + r)]
            print(f"round {r + 1}/{a.rounds}: {kind} done", file=sys.stderr, flush=True)
    report(a, rows, load0, os.getloadavg(), time.perf_counter() - t0)


if __name__ == "__main__":
    main()
