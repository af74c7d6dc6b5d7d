"""A3PO with TRL's GRPOTrainer, on one machine or many (accelerate: DDP, DeepSpeed ZeRO, FSDP).

    accelerate launch --num_processes 8 examples/trl_a3po.py \
        --model Qwen/Qwen2.5-Math-1.5B --data /data/dapo-math-17k.parquet --store runs
    python examples/trl_a3po.py --steps 2            # the embedded tiny model, on CPU

Every generation batch is shaped with the engine's A3PO rules; every process's rollouts are
gathered and written to the store by the main process, so `a3po app --store runs` browses the run
like one of our own.

    accelerate launch --num_processes 2 --cpu examples/trl_a3po.py --steps 1 --batch 4 --generations 4
                                                     # two CPU processes (gloo), as the tests do
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from engine.integrations.trl import A3POGRPOTrainer  # noqa: E402
from engine.model.policy import load_policy  # noqa: E402
from engine.tasks.problems import Problem, load_problems  # noqa: E402
from engine.tasks.reward import resolve_verifier  # noqa: E402


def make_reward(data: str):
    """TRL reward function: the task's own verifier (Countdown-lite's step checker, math-verify, ...)."""
    verify = resolve_verifier(data)

    def reward(completions, task_prompt, answer, **kw):
        return [
            float(verify(c if isinstance(c, str) else c[-1]["content"], Problem(prompt=p, answer=str(a))))
            for c, p, a in zip(completions, task_prompt, answer)
        ]

    return reward


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:tiny-countdown")
    ap.add_argument("--data", default="builtin:countdown")
    ap.add_argument("--store", default="runs")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--alpha", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=16, help="per-device train batch (completions per process)")
    ap.add_argument("--generations", type=int, default=8, help="num_generations, the group size")
    ap.add_argument("--max-tokens", type=int, default=48, help="max_completion_length")
    ap.add_argument("--prompts", type=int, default=None, help="use only the first N training prompts")
    ap.add_argument("--run-name", default=None)
    ap.add_argument("--out", default="trl-out", help="TRL's output_dir")
    a = ap.parse_args()
    model, tok, _ = load_policy(a.model, device="cuda" if torch.cuda.is_available() else "cpu")
    bos = tok.bos_token or ""
    ds = Dataset.from_list(
        [
            {"prompt": bos + p.prompt, "task_prompt": p.prompt, "answer": p.answer}
            for p in load_problems(a.data, "train", limit=a.prompts)
        ]
    )
    args = GRPOConfig(
        output_dir=a.out,
        per_device_train_batch_size=a.batch,
        num_generations=a.generations,
        max_completion_length=a.max_tokens,
        max_steps=a.steps,
        learning_rate=1e-5,
        temperature=1.0,
        top_k=0,
        beta=0.0,
        report_to=[],
        save_strategy="no",
        logging_steps=10,
        seed=0,
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
    )
    A3POGRPOTrainer(
        model=model,
        reward_funcs=make_reward(a.data),
        args=args,
        train_dataset=ds,
        processing_class=tok,
        a3po={"alpha_pos": a.alpha, "alpha_neg": a.alpha},
        store=a.store,
        run_name=a.run_name,
        data=a.data,
        model_path=a.model,
    ).train()


if __name__ == "__main__":
    main()
