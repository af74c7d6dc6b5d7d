"""TRL's GRPOTrainer with vLLM in colocate mode (``use_vllm=True``), through ``A3POGRPOTrainer``, on the
real engine (vLLM's CPU build).

TRL 1.16 pushes colocated weights with ``model_runner.model.load_weights``, which fails on vLLM 0.32
("'Parameter' object has no attribute 'weight_loader'"); ``A3POGRPOTrainer`` routes the push through
vLLM's in-place reload (``engine.rollout.vllm.push_weights``). The run goes in a process of its own: its
engine must not share a process with the one the backend tests hold.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here: make install-vllm, then make test-vllm")
pytest.importorskip("trl")

from engine.store.store import Store  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import os, sys
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
import trl
from datasets import Dataset
from engine.integrations.trl import A3POGRPOTrainer
from engine.model.policy import load_policy
from engine.tasks.problems import load_problems
from engine.tasks.reward import is_correct

def reward(completions, answer, **kw):
    return [float(is_correct(c, a)) for c, a in zip(completions, answer)]

out = sys.argv[1]
model, tok, _ = load_policy("builtin:tiny", device="cpu")
rows = [{"prompt": tok.bos_token + p.prompt, "answer": p.answer} for p in load_problems("builtin:arith", "train", limit=16)]
args = trl.GRPOConfig(
    output_dir=out + "/out", per_device_train_batch_size=8, num_generations=4, max_completion_length=48,
    max_steps=2, use_cpu=True, report_to=[], learning_rate=1e-5, save_strategy="no", temperature=1.0, top_k=0,
    beta=0.0, seed=0, bf16=False, use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.1,
    vllm_max_model_length=128,
)
tr = A3POGRPOTrainer(
    model=model, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
    store=out + "/runs", run_name="trl-vllm", data="builtin:arith", model_path="builtin:tiny",
)
tr.train()
"""


def test_a3po_grpo_trainer_trains_with_colocated_vllm(tmp_path):
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), str(tmp_path)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    s = Store(tmp_path / "runs")
    assert s.read_run("trl-vllm")["status"] == "finished"
    t = s.query("select step, logprob, rollout_logprob from tokens")
    assert sorted(t.step.unique()) == [1, 2]
    # TRL keeps vLLM's sampler log-probs; the store has them beside the trainer's for every token
    assert t.rollout_logprob.notna().all()
    d = (t.logprob - t.rollout_logprob).abs()
    assert d.median() < 1e-4  # the same weights: most tokens agree to rounding (TRL's forward differs on a few)
    steps = s.query("select mismatch_abs, mismatch_out_frac from steps order by step")
    assert steps.mismatch_abs.notna().all() and (steps.mismatch_out_frac == 0).all()
