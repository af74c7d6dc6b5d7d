"""The vLLM rollout backend against our kv engine: generation speed, weight-push cost, and learning.

Why: ``rollout.backend=vllm`` is what a user switches on when leaving the CPU demo; this says what it
costs and whether it trains the same. Run it with the vLLM environment's Python (``make install-vllm``),
which has both backends:

    .venv-vllm/bin/python bench/bench_vllm.py --gen [--rounds 6]       # tokens/s and the weight push
    .venv-vllm/bin/python bench/bench_vllm.py --learn [--seeds 3] [--steps 20]

``--gen``: the demo's step workload (16 Countdown-lite prompts x 8 samples, <= 64 new tokens, T = 1, the
shipped model in float32). Each round runs one process per backend, in alternating order (the machine's
speed drifts); a process builds its backend (not timed), generates once to warm up, then times
``--batches`` generates on the same prompts (seeds differ). Reported: generated tokens/s of each, the
geometric mean of the per-round ratios vLLM / kv with its 95% t-interval (df = rounds - 1), and the
vLLM backend's weight push (``sync_weights``) in seconds and as a share of its own generate of one step.

``--learn``: the demo run (A3PO) with each backend, paired seeds, ``--steps`` steps, no intermediate
evaluation. The measure is the mean training reward over the second half of the run; reported as the
per-seed paired difference vLLM - kv with its 95% t-interval, beside each backend's gain over its
first five steps (does the run learn at all). The two backends draw different samples
from the same policy, so this asks whether training through vLLM goes off course (a broken weight push
would freeze the sampler at the step-0 policy), not whether the two are identical. The seed count is
what the time allows, not a power calculation: the interval says how large a difference it can exclude.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.study.stats import paired_interval  # noqa: E402

WORKER = r"""
import json, sys, time
from engine.config import load_config
from engine.model.policy import load_policy
from engine.resources import demo_config
from engine.rollout.base import SamplingParams
from engine.rollout.registry import make_backend
from engine.tasks.problems import load_problems
from engine.train.evaluate import encode_prompts

backend, batches = sys.argv[1], int(sys.argv[2])
cfg = load_config(demo_config(), [f"rollout.backend={backend}", "model.device=cpu"])
model, tok, _ = load_policy(cfg.model.path, device="cpu")
be = make_backend(backend, model, tok, cfg)
prompts = encode_prompts(tok, load_problems(cfg.data.train, "train")[:16])
def gen(seed):
    return be.generate(prompts, SamplingParams(n=8, temperature=1.0, max_new_tokens=64, seed=seed))
gen(0)
tokens, t = 0, 0.0
for b in range(batches):
    t0 = time.perf_counter()
    ro = gen(1 + b)
    t += time.perf_counter() - t0
    tokens += int(ro.response_mask.sum())
push = []
if backend == "vllm":
    for _ in range(5):
        be.sync_weights(model)
        push.append(be.push_seconds)
print(json.dumps({"tokens": tokens, "seconds": t, "push": push}))
"""


def _geo(ratios: list[float]) -> tuple[float, float, float]:
    iv = paired_interval([math.log(r) for r in ratios])
    return math.exp(iv.mean), math.exp(iv.ci_low), math.exp(iv.ci_high)


def run_gen(rounds: int, batches: int) -> None:
    rows = []
    for r in range(rounds):
        order = ("vllm", "kv") if r % 2 == 0 else ("kv", "vllm")
        got = {}
        for b in order:
            p = subprocess.run(
                [sys.executable, "-c", WORKER, b, str(batches)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
            )
            if p.returncode != 0:
                sys.exit(
                    f"{b} worker failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}"
                )
            got[b] = json.loads(p.stdout.strip().splitlines()[-1])
        tps = {b: got[b]["tokens"] / got[b]["seconds"] for b in got}
        push = sorted(got["vllm"]["push"])[len(got["vllm"]["push"]) // 2]
        gen = {b: got[b]["seconds"] / batches for b in got}
        rows.append((tps["vllm"], tps["kv"], push, gen["vllm"]))
        print(
            f"round {r + 1}: vllm {tps['vllm']:.0f} tok/s, kv {tps['kv']:.0f} tok/s, ratio {tps['vllm'] / tps['kv']:.3f}; "
            f"push {push * 1000:.1f} ms (median of 5); one generate: vllm {gen['vllm']:.2f} s, kv {gen['kv']:.2f} s",
            flush=True,
        )
    g, lo, hi = _geo([v / k for v, k, _, _ in rows])
    pushes = sorted(p for _, _, p, _ in rows)
    print(f"\ngenerated tokens/s, vLLM / kv: {g:.3f}x [{lo:.3f}, {hi:.3f}] (geometric mean of {rounds} rounds, 95% t)")
    print(
        f"weight push: median {pushes[len(pushes) // 2] * 1000:.1f} ms per step "
        f"({pushes[len(pushes) // 2] / (sum(k for *_, k in rows) / len(rows)):.1%} of the vLLM backend's generate "
        "of one demo step)"
    )


def _train(backend: str, seed: int, steps: int, store: Path) -> tuple[float, float]:
    name = f"{backend}-s{seed}"
    cmd = [
        sys.executable,
        "-m",
        "engine.cli",
        "train",
        "--quiet",
        "--store",
        str(store),
        f"name={name}",
        f"seed={seed}",
        f"rollout.backend={backend}",
        "model.device=cpu",
        f"train.steps={steps}",
        "train.eval_every=0",
        "eval.at_start=false",
        "eval.n_prompts=8",
        "train.save_final_model=false",
    ]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        sys.exit(f"{name} failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
    from engine.store.store import Store

    s = Store(store).query(f"select step, reward from steps where run_id = '{name}' order by step")
    return float(s.reward[s.step > steps // 2].mean()), float(s.reward[s.step <= 5].mean())


def run_learn(seeds: int, steps: int) -> None:
    diffs, gains = [], {"vllm": [], "kv": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):
            t0 = time.time()
            order = ("vllm", "kv") if seed % 2 == 0 else ("kv", "vllm")
            got = {b: _train(b, seed, steps, Path(tmp)) for b in order}
            diffs.append(got["vllm"][0] - got["kv"][0])
            for b in got:
                gains[b].append(got[b][0] - got[b][1])
            print(
                f"seed {seed}: mean reward, steps {steps // 2 + 1}-{steps} (steps 1-5): "
                f"vllm {got['vllm'][0]:.3f} ({got['vllm'][1]:.3f}), kv {got['kv'][0]:.3f} ({got['kv'][1]:.3f}) "
                f"({time.time() - t0:.0f} s)",
                flush=True,
            )
    for b, g in gains.items():
        gi = paired_interval(g)
        print(f"{b}: reward gain, second half - steps 1-5: {gi.mean:+.3f} [{gi.ci_low:+.3f}, {gi.ci_high:+.3f}]")
    iv = paired_interval(diffs)
    print(
        f"\nvLLM - kv, mean training reward over the second half: {iv.mean:+.3f} "
        f"[{iv.ci_low:+.3f}, {iv.ci_high:+.3f}] (n = {iv.n} paired seeds, 95% t, df = {iv.n - 1})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gen", action="store_true", help="generation tokens/s and the weight push (default)")
    ap.add_argument("--learn", action="store_true", help="paired-seed demo runs through each backend")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    try:
        import vllm  # noqa: F401
    except ImportError:
        sys.exit("vLLM does not import here: run this with .venv-vllm/bin/python (make install-vllm)")
    if a.learn:
        run_learn(a.seeds, a.steps)
    if a.gen or not a.learn:
        run_gen(a.rounds, a.batches)


if __name__ == "__main__":
    main()
