"""A3PO with TRL's GRPOTrainer, on one machine or many (accelerate: DDP, DeepSpeed ZeRO, FSDP).

    accelerate launch --num_processes 8 examples/trl_a3po.py \
        --model Qwen/Qwen2.5-Math-1.5B --data /data/dapo-math-17k.parquet --store runs
    python examples/trl_a3po.py --steps 2            # the embedded tiny model, on CPU

Every generation batch is shaped with the engine's A3PO rules and written to the store (main
process), so `a3po app --store runs` browses the run like one of our own.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from engine.integrations.trl import A3POGRPOTrainer  # noqa: E402
from engine.policy import load_policy  # noqa: E402
from engine.reward import is_correct  # noqa: E402
from engine.tasks import load_problems  # noqa: E402


def verifier_reward(completions, answer, **kw):
    return [float(is_correct(c if isinstance(c, str) else c[-1]["content"], str(a))) for c, a in zip(completions, answer)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--data", default="builtin:arith")
    ap.add_argument("--store", default="runs")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--alpha", type=float, default=2.0)
    a = ap.parse_args()
    model, tok, _ = load_policy(a.model, device="cpu")
    bos = tok.bos_token or ""
    ds = Dataset.from_list([{"prompt": bos + p.prompt, "answer": p.answer} for p in load_problems(a.data, "train")])
    args = GRPOConfig(output_dir="trl-out", per_device_train_batch_size=16, num_generations=8, max_completion_length=48,
                      max_steps=a.steps, learning_rate=1e-5, temperature=1.0, top_k=0, beta=0.0, report_to=[],
                      save_strategy="no", logging_steps=10)
    A3POGRPOTrainer(model=model, reward_funcs=verifier_reward, args=args, train_dataset=ds, processing_class=tok,
                    a3po={"alpha_pos": a.alpha, "alpha_neg": a.alpha}, store=a.store).train()


if __name__ == "__main__":
    main()
