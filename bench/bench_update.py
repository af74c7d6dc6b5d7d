"""The policy update: the lean ``Trainer._update`` vs the previous full-width one, same batch.

Why: the lean update cuts every mini-batch to its own prompt/response columns and computes log-probs
on response tokens only; this measures what that saves on the demo workload. One real batch is
captured from ``Trainer.step``; the two updates then run alternately from the same weights and
optimiser state (restored before each run), so machine noise hits both alike.

    python bench/bench_update.py [--reps 10] [key=value ...]     # demo config, rollout.backend=kv
"""

from __future__ import annotations

import argparse
import copy
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
from engine.rollout.base import Rollouts  # noqa: E402
from engine.store.store import Store  # noqa: E402
from engine.train.trainer import Trainer, response_logits  # noqa: E402
from engine.update.loss import policy_loss  # noqa: E402


def full_width_update(tr: Trainer, ro: Rollouts, old_lp, adv) -> None:
    """The previous update (no KL term): every mini-batch at the whole batch's width."""
    cfg = tr.cfg
    for _ in range(cfg.actor.ppo_epochs):
        for mb in torch.arange(adv.shape[0]).chunk(cfg.actor.mini_batches):
            sub = Rollouts(
                ro.prompt_ids[mb], ro.prompt_mask[mb], ro.response_ids[mb], ro.response_mask[mb], ro.truncated[mb]
            )
            lp = token_logprobs(response_logits(tr.model, sub, cfg.rollout.temperature), sub.response_ids)
            loss, _ = policy_loss(
                lp, old_lp[mb], adv[mb], sub.response_mask, clip_low=tr.clip_low, clip_high=tr.clip_high, agg=tr.agg
            )
            tr.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tr.model.parameters(), cfg.actor.grad_clip)
            tr.opt.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--steps", type=int, default=3, help="real steps run first; the last one's batch is used")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    cfg = load_config(demo_config(), ["rollout.backend=kv", "train.threads=2", *a.overrides])
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(cfg, Store(d), log=lambda s: None)
        seen, real = {}, tr._update
        tr._update = lambda *args: seen.update(args=args) or real(*args)
        for s in range(1, a.steps + 1):
            tr.step(s)
        tr._update = real
        tr.store.release_writer(tr.run_id)
    ro, old_lp, adv, ref_lp, _ = seen["args"]
    w0, o0 = copy.deepcopy(tr.model.state_dict()), copy.deepcopy(tr.opt.state_dict())
    times: dict[str, list[float]] = {"full width": [], "lean": []}
    runs = {
        "full width": lambda: full_width_update(tr, ro, old_lp, adv),
        "lean": lambda: tr._update(ro, old_lp, adv, ref_lp, None),
    }
    for i in range(a.reps + 1):
        for name in list(runs) if i % 2 else list(runs)[::-1]:
            tr.model.load_state_dict(w0)
            tr.opt.load_state_dict(o0)
            t0 = time.perf_counter()
            runs[name]()
            if i:  # the first pair warms up
                times[name].append(time.perf_counter() - t0)
    tokens = int(ro.attention_mask.sum())
    cells = sum(
        tr._mini_batch(ro, rows)[1].input_ids.numel()
        for rows in torch.arange(adv.shape[0]).chunk(cfg.actor.mini_batches)
    )
    print(
        f"{cfg.model.path}, {adv.shape[0]} rollouts, mini_batches {cfg.actor.mini_batches}, batch width "
        f"{ro.input_ids.shape[1]}, {tokens} real tokens; forward cells: full width {ro.input_ids.numel()}, "
        f"lean {cells}; {a.reps} alternating pairs, threads {torch.get_num_threads()}"
    )
    for name, v in times.items():
        print(f"{name:12s} median {statistics.median(v):.4f} s")
    f, lean = (statistics.median(times[k]) for k in ("full width", "lean"))
    print(f"lean / full width = {lean / f:.3f}")


if __name__ == "__main__":
    main()
