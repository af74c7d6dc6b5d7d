"""vLLM rollout backend (GPU): a colocated ``vllm.LLM`` that samples, and gets the policy's weights
pushed after every update.

The conversion from vLLM's ``RequestOutput`` objects to ``Rollouts`` is a pure function
(``rollouts_from_vllm``) so it is unit-tested without vLLM; the backend class itself needs CUDA and
the ``[gpu]`` extra (``pip install 'a3po-lab[gpu]'``). The trainer recomputes old log-probs and
entropy with the policy as usual, so vLLM's own log-probs are only used to report the
sampler/trainer mismatch.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from engine.rollout import Rollouts, SamplingParams, left_pad


def rollouts_from_vllm(outputs: Sequence[Any], prompts: list[list[int]], n: int, *, eos_id: int, pad_id: int,
                       max_new_tokens: int, device=None) -> tuple[Rollouts, torch.Tensor]:
    """Convert vLLM outputs (one ``RequestOutput`` per prompt, ``n`` completions each) to ``Rollouts``.

    Each completion needs ``token_ids``; ``finish_reason`` ("stop"/"length") and ``logprobs`` (a list
    of ``{token_id: obj with .logprob}``) are used when present. vLLM strips the EOS it stopped on
    from ``token_ids`` unless asked not to; we append it back so the response mask covers the EOS the
    policy must learn to emit, exactly like the HF backend.

    Returns ``(rollouts, sampler_logprobs (B, T))``, NaN where vLLM gave no log-prob.
    """
    if len(outputs) != len(prompts):
        raise ValueError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
    rows, lps, trunc = [], [], []
    for out in outputs:
        comps = list(out.outputs)
        if len(comps) != n:
            raise ValueError(f"vLLM returned {len(comps)} completions for a prompt, expected n={n}")
        for c in comps:
            ids = list(c.token_ids)
            lp = [float("nan")] * len(ids)
            if getattr(c, "logprobs", None):
                lp = [float(d[t].logprob) if d and t in d else float("nan") for d, t in zip(c.logprobs, ids)]
            if eos_id in ids:  # keep up to and including the first EOS
                k = ids.index(eos_id) + 1
                ids, lp = ids[:k], lp[:k]
                stopped = True
            else:
                stopped = getattr(c, "finish_reason", "length") == "stop" and len(ids) < max_new_tokens
                if stopped:
                    ids, lp = ids + [eos_id], lp + [float("nan")]
            rows.append(ids)
            lps.append(lp)
            trunc.append(not stopped)
    T = max(1, max(len(r) for r in rows))
    resp = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    slp = torch.full((len(rows), T), float("nan"))
    for i, (r, lp) in enumerate(zip(rows, lps)):
        resp[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
        slp[i, :len(lp)] = torch.tensor(lp)
    pids, pmask = left_pad([p for p in prompts for _ in range(n)], pad_id)
    ro = Rollouts(pids.to(device), pmask.to(device), resp.to(device), mask.to(device), torch.tensor(trunc, device=device))
    return ro, slp


class VLLMBackend:
    """Colocated vLLM engine on the training GPU (needs CUDA and vllm)."""

    def __init__(self, model, tokenizer, *, model_path: str, gpu_memory_utilization: float = 0.35, dtype: str = "bfloat16",
                 max_model_len: int = 4096, seed: int = 0):
        from vllm import LLM  # noqa: PLC0415  (optional dependency)

        self.tok = tokenizer
        self.device = next(model.parameters()).device
        self.llm = LLM(model=model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                       max_model_len=max_model_len, seed=seed, enable_prefix_caching=True)
        self.sync_weights(model)

    def sync_weights(self, model) -> None:
        """Push the policy's current weights into the vLLM engine."""
        weights = list(model.state_dict().items())
        engine = self.llm.llm_engine
        try:  # single-process executor: reach the model runner directly
            engine.model_executor.driver_worker.model_runner.model.load_weights(weights=weights)
        except AttributeError:  # newer engines: run load_weights on every worker
            self.llm.collective_rpc(lambda self_, w=weights: self_.model_runner.model.load_weights(weights=w))
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Rollouts:
        from vllm import SamplingParams as VSP  # noqa: PLC0415

        greedy = params.temperature <= 0
        sp = VSP(n=params.n, temperature=0.0 if greedy else params.temperature, top_p=1.0 if greedy else params.top_p,
                 top_k=-1 if (greedy or params.top_k <= 0) else params.top_k, max_tokens=params.max_new_tokens,
                 seed=params.seed, logprobs=0, stop_token_ids=[self.tok.eos_token_id])
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        ro, self.last_sampler_logprobs = rollouts_from_vllm(outs, prompts, params.n, eos_id=self.tok.eos_token_id,
                                                            pad_id=self.tok.pad_token_id, max_new_tokens=params.max_new_tokens,
                                                            device=self.device)
        return ro
