"""Our engine vs TRL's GRPOTrainer: seconds per step and generated tokens per second.

Same model (the embedded one), task, group size, batch, sampling and length budget, same thread
count, in one process: TRL's steps first, then ours (TRL cannot be stepped by hand).

    python bench/bench_vs_trl.py [--steps 10] [--prompts 16] [--n 8]
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


def trl_steps(a, d) -> tuple[list[float], list[float]]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from engine.policy import load_policy
    from engine.reward import is_correct
    from engine.tasks import load_problems

    model, tok, _ = load_policy("builtin:tiny", device="cpu")
    ds = Dataset.from_list(
        [{"prompt": tok.bos_token + p.prompt, "answer": p.answer} for p in load_problems("builtin:arith", "train")]
    )

    def reward(completions, answer, **kw):
        return [float(is_correct(c, x)) for c, x in zip(completions, answer)]

    times, toks = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                toks.append(float(logs["completions/mean_length"]) * a.prompts * a.n)

    args = GRPOConfig(
        output_dir=str(Path(d) / "trl"),
        per_device_train_batch_size=a.prompts * a.n,
        num_generations=a.n,
        max_completion_length=48,
        max_steps=a.steps + a.warmup,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        learning_rate=1e-4,
        save_strategy="no",
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        beta=0.0,
        seed=0,
        bf16=False,
        disable_tqdm=True,
    )
    GRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()]
    ).train()
    return times[a.warmup :], toks[a.warmup :]


def our_steps(a, d) -> tuple[list[float], list[float]]:
    from engine.config import load_config
    from engine.resources import demo_config
    from engine.store import Store
    from engine.trainer import Trainer

    cfg = load_config(
        demo_config(),
        [f"train.prompts_per_step={a.prompts}", f"rollout.n={a.n}", "train.steps=1000", f"train.threads={a.threads}"],
    )
    tr = Trainer(cfg, Store(Path(d) / "ours"), log=lambda s: None)
    times, toks = [], []
    for s in range(1, a.steps + a.warmup + 1):
        t0 = time.perf_counter()
        m, tables = tr.step(s)
        tr.store.write_step(tr.run_id, s, tables)
        if s > a.warmup:
            times.append(time.perf_counter() - t0)
            toks.append(m["length"] * m["n_rollouts"])
    return times, toks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as d:
        t_trl, k_trl = trl_steps(a, d)
        torch.set_num_threads(a.threads)
        t_our, k_our = our_steps(a, d)
    s_trl, s_our = statistics.median(t_trl), statistics.median(t_our)
    g_trl, g_our = sum(k_trl) / sum(t_trl), sum(k_our) / sum(t_our)
    print(
        f"{a.prompts} prompts x {a.n} rollouts, max 48 new tokens, {a.threads} threads, {a.steps} steps after {a.warmup} warm-up"
    )
    print(f"{'':26s} {'TRL GRPOTrainer':>16s} {'A3PO Lab (A3PO, all tokens stored)':>36s}")
    print(f"{'seconds per step (median)':26s} {s_trl:16.3f} {s_our:36.3f}")
    print(f"{'generated tokens / s':26s} {g_trl:16.0f} {g_our:36.0f}")
    print(f"ratio: TRL step time / ours = {s_trl / s_our:.2f}x; our tokens/s / TRL's = {g_our / g_trl:.2f}x")


if __name__ == "__main__":
    main()
