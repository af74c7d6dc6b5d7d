"""Held-out evaluation: greedy accuracy, sampled accuracy and unbiased pass@k.

a3po eval --model runs/<id>/final --k 1,4,8
"""

from __future__ import annotations

from math import comb

import torch

from engine.rollout.base import SamplingParams
from engine.tasks.reward import math_correct


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): ``1 - C(n-c, k) / C(n, k)`` for n samples, c correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def encode_prompts(
    tok, problems, template: str = "{prompt}", chat: bool = False, max_len: int = 256
) -> list[list[int]]:
    out = []
    for p in problems:
        text = template.format(prompt=p.prompt)
        if chat:
            ids = tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        else:
            ids = tok.encode(text, add_special_tokens=False)
            if tok.bos_token_id is not None:
                ids = [tok.bos_token_id] + ids
        out.append(ids[-max_len:])
    return out


def decode_responses(tok, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [tok.decode(row[m.bool()].tolist(), skip_special_tokens=True) for row, m in zip(ids.cpu(), mask.cpu())]


def evaluate(
    backend,
    tok,
    problems,
    *,
    ks=(1, 4, 8),
    temperature: float = 1.0,
    max_new_tokens: int = 48,
    seed: int = 0,
    template: str = "{prompt}",
    chat: bool = False,
    batch_prompts: int = 64,
    verify=math_correct,
) -> dict:
    """Greedy accuracy, mean sampled accuracy and pass@k over ``problems``.

    ``verify(response_text, problem) -> bool`` is the task's verifier (``engine.tasks.reward.VERIFIERS``).

    Returns ``{"greedy_acc", "sampled_acc", "pass@k": {k: v}, "n_prompts", "n_samples"}``.
    """
    n = max(ks)
    greedy_ok, counts = [], []
    prompts = encode_prompts(tok, problems, template, chat)
    for i in range(0, len(problems), batch_prompts):
        chunk, pids = problems[i : i + batch_prompts], prompts[i : i + batch_prompts]
        g = backend.generate(pids, SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens, seed=seed))
        greedy_ok += [verify(t, p) for t, p in zip(decode_responses(tok, g.response_ids, g.response_mask), chunk)]
        s = backend.generate(
            pids, SamplingParams(n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed + 1 + i)
        )
        texts = decode_responses(tok, s.response_ids, s.response_mask)
        for j, p in enumerate(chunk):
            counts.append(sum(verify(t, p) for t in texts[j * n : (j + 1) * n]))
    P = max(1, len(problems))
    return {
        "greedy_acc": sum(greedy_ok) / P,
        "sampled_acc": sum(counts) / (P * n),
        "pass@k": {k: sum(pass_at_k(n, c, k) for c in counts) / P for k in ks},
        "n_prompts": len(problems),
        "n_samples": n,
    }
