"""Two variants of the kv engine's decode, paired generate by generate in one process.

Why: the decode step's attention reads every active row's cached keys and values once per layer, and
it is where the engine's two decode-specific choices live:

* ``--compare native`` (default): the C decode kernels (``engine/model/cpu_kernels.py``: attention, rotary
  and cache write, norms, activation) against torch's route over the same cache
  (``rollout.native_kernels=false``);
* ``--compare layout``: the position-major cache (``kv_engine._slot_layer_class``) against the
  row-major ``(rows, heads, capacity, D)`` storage it replaced, both on torch's products.

Both engines run in one process and alternate generate by generate (the order flips every batch), so
drifts in the machine's speed hit both alike; the figure is the geometric mean of the per-batch time
ratios with its 95% t-interval. Each pair also checks that both drew the same tokens.

    python bench/bench_decode.py [--compare native|layout] [--task arith|countdown] [--batches 40]
                                 [--threads 1] [--prompts 8]

The workload is one rollout worker's share of the benchmark step: ``--prompts`` prompts x 8 samples,
<= 48 new tokens, T = 1, the task's embedded model, float32.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from bench_vs_trl import TASKS  # noqa: E402  (this script's folder is on the path when run as a script)

import engine.rollout.kv as ke  # noqa: E402
from engine.model import cpu_kernels  # noqa: E402
from engine.model.policy import load_policy  # noqa: E402
from engine.rollout.base import SamplingParams  # noqa: E402
from engine.study.stats import paired_interval  # noqa: E402
from engine.tasks.problems import load_problems  # noqa: E402
from engine.train.evaluate import encode_prompts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", choices=["native", "layout"], default="native")
    ap.add_argument("--task", choices=sorted(TASKS), default="arith")
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_id, data = TASKS[args.task]
    model, tok, _ = load_policy(model_id, device="cpu")
    problems = load_problems(data, "train")

    shipped = ke._slot_layer_class

    def row_major_class():
        cls = shipped()

        def _empty(self, shape, like):
            return like.new_empty(shape) if self.arena is None else self.arena.take(shape, like)

        return type("_RowMajorSlotLayer", (cls,), {"_empty": _empty})

    if args.compare == "native":
        if not cpu_kernels.library():
            raise SystemExit(cpu_kernels.status())
        variants = {"native kernels": (shipped, True), "torch route": (shipped, False)}
    else:
        variants = {"position-major": (shipped, False), "row-major": (row_major_class, False)}
    engines = {name: ke.KVEngine(model, tok, native=native) for name, (_, native) in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    warmup = 2
    for b in range(args.batches + warmup):
        at = (b * args.prompts) % max(1, len(problems) - args.prompts)
        prompts = encode_prompts(tok, problems[at : at + args.prompts])
        params = SamplingParams(n=8, max_new_tokens=48, temperature=1.0, top_k=0, top_p=1.0, seed=b)
        drawn = []
        for name in list(variants) if b % 2 == 0 else list(variants)[::-1]:
            ke._slot_layer_class = variants[name][0]
            t0 = time.perf_counter()
            drawn.append(engines[name].generate(prompts, params).response_ids)
            if b >= warmup:
                times[name].append(time.perf_counter() - t0)
        if not torch.equal(*drawn):
            print(f"batch {b}: the two variants drew different tokens (float rounding flipped a draw)")
    ke._slot_layer_class = shipped
    first, second = variants
    ci = paired_interval([math.log(a / b) for a, b in zip(times[first], times[second])])
    for name, ts in times.items():
        print(f"{name:>15}: median generate {statistics.median(ts) * 1e3:.1f} ms over {len(ts)} batches")
    print(
        f"{first} / {second}: {math.exp(ci.mean):.3f} "
        f"[{math.exp(ci.ci_low):.3f}, {math.exp(ci.ci_high):.3f}] (95% t-interval, n={ci.n}, df={ci.n - 1})"
    )


if __name__ == "__main__":
    main()
