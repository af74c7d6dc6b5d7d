"""Engine step cost vs a bare GRPO step, by phase, on the same model, prompts and token budget.

Why: shaping, per-token entropy and per-token storage must stay cheap (target: a full engine step
<= 1.3x a bare GRPO step, storage < 10% of step time). The two kinds of step are measured
alternately in one process so that machine noise hits both alike.

    python bench/bench_step.py [--steps 20] [--prompts 16] [--n 8] [key=value ...]
    python bench/bench_step.py --backends [--steps 10] [key=value ...]   # HFBackend vs the kv engine
    python bench/bench_step.py --caches [--steps 10]      # kv engine: preallocated cache vs DynamicCache
    python bench/bench_step.py --fast [--steps 10] [key=value ...]   # the model's forward vs fast_forward

A bare step = generate + score + group advantages + one forward/backward + optimiser step, nothing
stored and no entropy. A full step = ``Trainer.step`` (A3PO shaping, entropy, all metrics) plus
writing the step's rollouts and tokens to the store.

``--backends`` instead runs full steps of two trainers that differ only in ``rollout.backend``
(``hf``: transformers ``generate``; ``kv``: our engine, which also records the old-policy log-probs so
the separate old-policy forward is skipped), alternating one step of each, on the issue's workload:
16 prompts x 8 rollouts, <= 48 new tokens, T=1, 2 torch threads. ``--fast`` does the same for
``model.fast_forward`` (both on the kv engine): the model's own forward vs engine/model/fast_forward.py in the
update and the decode steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from engine.config import load_config  # noqa: E402
from engine.model.ops import token_logprobs  # noqa: E402
from engine.resources import demo_config  # noqa: E402
from engine.rollout.base import SamplingParams  # noqa: E402
from engine.shaping.advantage import group_advantages  # noqa: E402
from engine.store.store import Store  # noqa: E402
from engine.train.evaluate import decode_responses  # noqa: E402
from engine.train.trainer import Trainer, response_logits  # noqa: E402
from engine.update.loss import policy_loss  # noqa: E402


def bare_step(tr: Trainer, step: int) -> dict:
    cfg = tr.cfg
    t = {}
    t0 = time.perf_counter()
    idx = tr.prompt_indices(step, cfg.train.prompts_per_step)
    ro = tr.backend.generate(
        [tr.train_prompts[i] for i in idx],
        SamplingParams(n=cfg.rollout.n, temperature=1.0, max_new_tokens=cfg.rollout.max_new_tokens, seed=step),
    )
    t["generate"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    texts = decode_responses(tr.tok, ro.response_ids, ro.response_mask)
    n = cfg.rollout.n
    scores = torch.tensor([float(tr.verify(x, tr.train_set[idx[b // n]])) for b, x in enumerate(texts)])
    adv = group_advantages(scores, [b // n for b in range(len(texts))]).unsqueeze(-1) * ro.response_mask
    lp = token_logprobs(response_logits(tr.model, ro, tr.cfg.rollout.temperature), ro.response_ids)
    loss, _ = policy_loss(lp, lp.detach(), adv, ro.response_mask, clip_high=0.2)
    tr.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(tr.model.parameters(), 1.0)
    tr.opt.step()
    t["rest"] = time.perf_counter() - t1
    t["total"] = time.perf_counter() - t0
    return t


def full_step(tr: Trainer, step: int) -> dict:
    t0 = time.perf_counter()
    metrics, tables = tr.step(step)
    t1 = time.perf_counter()
    tr.store.write_step(tr.run_id, step, tables)
    store_write = time.perf_counter() - t1
    out = {k[2:]: v for k, v in metrics.items() if k.startswith("t_") and k != "t_step"}
    out["store"] = out.get("store", 0.0) + store_write  # building tables + writing Parquet
    out["total"] = time.perf_counter() - t0
    out["tokens"] = tables["tokens"].num_rows if "tokens" in tables else 0
    return out


def compare_variants(a, variants: dict[str, list[str]]) -> None:
    """Full steps of two trainers that differ only in ``variants`` (name -> overrides), alternated so
    machine noise hits both alike; the second is reported over the first."""
    base = [
        f"train.prompts_per_step={a.prompts}",
        f"rollout.n={a.n}",
        "train.steps=1000",
        "rollout.max_new_tokens=48",
        "rollout.temperature=1.0",
        "train.threads=2",
        *a.overrides,
    ]
    rows: dict[str, list[dict]] = {name: [] for name in variants}
    first, second = variants
    with tempfile.TemporaryDirectory() as d:
        trs = {
            b: Trainer(
                load_config(demo_config(), [*base, *over, f"name={b}"]),
                Store(Path(d) / b),
                log=lambda s: None,
            )
            for b, over in variants.items()
        }
        for i in range(1, a.warmup + a.steps + 1):
            order = (first, second) if i % 2 else (second, first)
            for b in order:  # same step index: same prompts for both
                f = full_step(trs[b], i)
                if i > a.warmup:
                    rows[b].append(f)
        for tr in trs.values():
            tr.store.release_writer(tr.run_id)

    def med(b, k):
        return statistics.median(r.get(k, 0.0) for r in rows[b])

    cfg = trs[first].cfg
    print(
        f"model {cfg.model.path}, {a.prompts} prompts x {a.n} rollouts, max_new_tokens {cfg.rollout.max_new_tokens}, "
        f"T={cfg.rollout.temperature}, mini_batches {cfg.actor.mini_batches}, {a.steps} alternating steps after "
        f"{a.warmup} warm-up, torch threads {torch.get_num_threads()}"
    )
    ratio = f"{second}/{first}"
    print(f"{'phase':14s} {first + ' (s)':>12s} {second + ' (s)':>12s} {ratio:>12s}")
    for k, label in (
        ("generate", "generate"),
        ("forward", "old-forward"),
        ("update", "update"),
        ("store", "store"),
        ("total", "step"),
    ):
        h, v = med(first, k), med(second, k)
        print(f"{label:14s} {h:12.4f} {v:12.4f} {v / h if h else float('nan'):12.2f}")
    for b, rs in rows.items():
        print(f"{b}: generated tokens/s {statistics.median(r['tokens'] / r['generate'] for r in rs):.0f}")


def compare_caches(a) -> None:
    """kv engine generate only: our preallocated cache vs the model's DynamicCache, alternated."""
    import engine.rollout.kv as ke
    from engine.rollout.kv import KVEngine

    cfg = load_config(
        demo_config(),
        [
            f"train.prompts_per_step={a.prompts}",
            f"rollout.n={a.n}",
            "rollout.max_new_tokens=48",
            "train.threads=2",
            *a.overrides,
        ],
    )
    plain = ke._plain_attention
    times: dict[str, list[float]] = {"preallocated": [], "DynamicCache": []}
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(cfg, Store(d), log=lambda s: None)
        eng = KVEngine(tr.model, tr.tok)
        for i in range(1, a.warmup + a.steps + 1):
            prompts = [tr.train_prompts[j] for j in tr.prompt_indices(i, a.prompts)]
            for name in list(times) if i % 2 else list(times)[::-1]:
                ke._plain_attention = plain if name == "preallocated" else (lambda config: False)
                t0 = time.perf_counter()
                eng.generate(prompts, SamplingParams(n=a.n, temperature=1.0, max_new_tokens=48, seed=i))
                if i > a.warmup:
                    times[name].append(time.perf_counter() - t0)
        ke._plain_attention = plain
        tr.store.release_writer(tr.run_id)
    print(
        f"kv engine generate, {a.prompts} prompts x {a.n}, 48 new tokens, threads {torch.get_num_threads()}, "
        f"median of {a.steps}"
    )
    for name, v in times.items():
        print(f"{name:14s} {statistics.median(v):.4f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--backends", action="store_true", help="compare rollout.backend=hf with rollout.backend=kv")
    ap.add_argument("--caches", action="store_true", help="kv engine: preallocated cache vs DynamicCache")
    ap.add_argument(
        "--fast", action="store_true", help="kv engine: model.fast_forward=false vs true (engine/model/fast_forward.py)"
    )
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    if a.caches:
        compare_caches(a)
        return
    if a.backends:
        compare_variants(a, {"hf": ["rollout.backend=hf"], "kv": ["rollout.backend=kv"]})
        return
    if a.fast:
        kv = "rollout.backend=kv"
        compare_variants(
            a, {"model-fwd": [kv, "model.fast_forward=false"], "fast-fwd": [kv, "model.fast_forward=true"]}
        )
        return
    cfg = load_config(
        demo_config(), [f"train.prompts_per_step={a.prompts}", f"rollout.n={a.n}", "train.steps=1000", *a.overrides]
    )
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(cfg, Store(d), log=lambda s: None)
        bare, full = [], []
        for i in range(1, a.warmup + a.steps + 1):
            b = bare_step(tr, 2 * i)
            f = full_step(tr, 2 * i + 1)
            if i > a.warmup:
                bare.append(b)
                full.append(f)

    def med(rows, k):
        return statistics.median(r.get(k, 0.0) for r in rows)

    print(
        f"model {cfg.model.path}, {a.prompts} prompts x {a.n} rollouts, max_new_tokens {cfg.rollout.max_new_tokens}, "
        f"{a.steps} alternating pairs after {a.warmup} warm-up, torch threads {torch.get_num_threads()}"
    )
    print(f"{'phase':12s} {'bare (s)':>10s} {'full (s)':>10s}")
    for k in ("generate", "score", "forward", "shaping", "update", "store", "rest"):
        b = med(bare, k) if k in ("generate", "rest") else None
        print(f"{k:12s} {'' if b is None else f'{b:10.4f}':>10s} {med(full, k) if k != 'rest' else float('nan'):10.4f}")
    tb, tf = med(bare, "total"), med(full, "total")
    print(f"{'step':12s} {tb:10.4f} {tf:10.4f}")
    print(f"tokens stored per step: {med(full, 'tokens'):.0f}")
    print(f"storage overhead: {100 * med(full, 'store') / tf:.1f}% of a full step ({1000 * med(full, 'store'):.1f} ms)")
    print(f"full / bare step time ratio: {tf / tb:.3f}  (target <= 1.3)")


if __name__ == "__main__":
    main()
