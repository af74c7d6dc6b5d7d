"""Page query latency on a large store (default 10 million token rows).

Why: the app must stay responsive (< 1 s per page) on big runs. This builds a synthetic store with
the real schema (compacted chunks as the trainer writes them, plus a tail of live per-step
segments), then times the exact queries each page issues.

    python bench/bench_app_queries.py [--rows 10000000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from engine.shaping.replay import load_step  # noqa: E402
from engine.store.store import Store  # noqa: E402

B, L = 128, 30  # rollouts per step, tokens per rollout


def synth(store: Store, run_id: str, steps: int, live_tail: int) -> None:
    rng = np.random.default_rng(0)
    store.create_run({"algorithm": {"name": "a3po"}, "train": {"steps": steps}}, name=run_id)
    cdir = store.run_dir(run_id) / "chunks"
    cdir.mkdir()
    vocab = pa.array(list("0123456789+-=;\\boxed{}"))

    def tables(s0, s1):
        n_steps = s1 - s0 + 1
        st = np.repeat(np.arange(s0, s1 + 1, dtype=np.int32), B * L)
        ro = np.tile(np.repeat(np.arange(B, dtype=np.int32), L), n_steps)
        pos = np.tile(np.arange(L, dtype=np.int32), B * n_steps)
        ids = rng.integers(0, len(vocab), len(st)).astype(np.int32)
        pol = np.where(rng.random(len(st)) < 0.5, 1, -1).astype(np.int8)
        lp = -rng.exponential(0.3, len(st)).astype(np.float32)
        tok = pa.table(
            {
                "run_id": pa.array([run_id] * len(st)).dictionary_encode(),
                "step": st,
                "rollout_idx": ro,
                "position": pos,
                "token_id": ids,
                "token_text": vocab.take(pa.array(ids)),
                "logprob": lp,
                "entropy": rng.random(len(st)).astype(np.float32),
                "adv_raw": (pol * 0.7).astype(np.float32),
                "adv_shaped": (pol * 0.7 * np.where(rng.random(len(st)) < 0.2, 2, 1)).astype(np.float32),
                "is_key": rng.random(len(st)) < 0.2,
                "polarity": pol,
            }
        )
        rs = np.repeat(np.arange(s0, s1 + 1, dtype=np.int32), B)
        rr = np.tile(np.arange(B, dtype=np.int32), n_steps)
        rp = np.where(rng.random(len(rs)) < 0.5, 1, -1).astype(np.int8)
        rol = pa.table(
            {
                "run_id": [run_id] * len(rs),
                "step": rs,
                "rollout_idx": rr,
                "group_idx": rr // 8,
                "prompt_idx": rr.astype(np.int64),
                "prompt": ["12+34-5="] * len(rs),
                "response": ["12+34=46;46-5=41;\\boxed{41}"] * len(rs),
                "answer": ["41"] * len(rs),
                "reward": (rp > 0).astype(np.float32),
                "correct": rp > 0,
                "polarity": rp,
                "length": np.full(len(rs), L, np.int32),
                "truncated": np.zeros(len(rs), bool),
                "adv_raw": (rp * 0.7).astype(np.float32),
                "mean_logprob": np.zeros(len(rs), np.float32),
                "mean_entropy": np.zeros(len(rs), np.float32),
                "n_key": np.full(len(rs), 6, np.int32),
            }
        )
        stp = pa.table(
            {
                "run_id": [run_id] * n_steps,
                "step": np.arange(s0, s1 + 1, dtype=np.int32),
                **{
                    k: rng.random(n_steps)
                    for k in (
                        "reward",
                        "acc",
                        "entropy",
                        "entropy_pos",
                        "entropy_neg",
                        "length",
                        "length_pos",
                        "length_neg",
                        "frac_all_correct",
                        "frac_all_wrong",
                        "clipfrac",
                        "clipfrac_lower",
                        "test_acc",
                    )
                },
            }
        )
        return {"tokens": tok, "rollouts": rol, "steps": stp}

    chunk = 100
    body = steps - live_tail
    for s0 in range(1, body + 1, chunk):
        s1 = min(body, s0 + chunk - 1)
        for name, t in tables(s0, s1).items():
            pq.write_table(t, cdir / f"{name}-{s0:06d}-{s1:06d}.parquet", compression="zstd", row_group_size=256_000)
    for s in range(body + 1, steps + 1):  # a run still training: per-step segments
        store.write_step(run_id, s, tables(s, s))


def timed(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--keep", help="build the store here and keep it")
    a = ap.parse_args()
    steps = max(2, a.rows // (B * L))
    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp())
    store = Store(root)
    t0 = time.perf_counter()
    if not (root / "big" / "run.json").exists():
        synth(store, "big", steps, live_tail=20)
    n = store.query("select count(*) c from tokens")["c"][0]
    print(f"store: {n:,} token rows, {steps} steps ({time.perf_counter() - t0:.1f}s to build/open) at {root}")
    rid, s = "big", steps // 2
    pages = {
        "Runs": [
            lambda: store.runs_table(),
            lambda: store.query(
                "select * from steps where list_contains(?, run_id) order by run_id, step", [[rid]], run_ids=[rid]
            ),
            lambda: store.query(
                "select run_id, step, metric, k, value from evals where list_contains(?, run_id)",
                [[rid]],
                run_ids=[rid],
            ),
        ],
        "Rollouts": [
            lambda: store.query("select distinct run_id from tokens"),
            lambda: store.query(
                "select distinct step from rollouts where run_id = ? order by step", [rid], run_ids=[rid]
            ),
            lambda: store.query(
                "select * from rollouts where run_id = ? and step = ? order by rollout_idx", [rid, s], run_ids=[rid]
            ),
            lambda: store.query(
                "select * from tokens where run_id = ? and step = ? and list_contains(?, rollout_idx) "
                "order by rollout_idx, position",
                [rid, s, list(range(8))],
                run_ids=[rid],
            ),
            lambda: store.query(
                "select rollout_idx, position, token_text from tokens where run_id = ? and step = ? and is_key "
                "order by abs(adv_shaped) desc limit 25",
                [rid, s],
                run_ids=[rid],
            ),
            lambda: store.query(
                "select polarity, entropy as v from tokens where run_id = ? and step = ?", [rid, s], run_ids=[rid]
            ),
        ],
        "Playground": [
            lambda: load_step(store, rid, s),
            lambda: store.query(
                "select * from tokens where run_id = ? and step = ? order by rollout_idx, position",
                [rid, s],
                run_ids=[rid],
            ),
        ],
    }
    print(f"{'page':12s} {'queries':>7s} {'total (s)':>10s} {'slowest (s)':>12s}")
    for page, qs in pages.items():
        times = [timed(f) for f in qs]
        print(f"{page:12s} {len(qs):7d} {sum(times):10.3f} {max(times):12.3f}")
    live = steps
    print(f"live step (segment) rollouts+tokens: {timed(lambda: load_step(store, rid, live)):.3f}s")


if __name__ == "__main__":
    main()
