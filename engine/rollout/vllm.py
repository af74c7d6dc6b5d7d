"""vLLM rollout backend (GPU): a colocated ``vllm.LLM`` in the training process that samples, and
gets the policy's weights pushed after every update.

How it is wired, read against vLLM's V1 engine and TRL's colocate mode (TRL 1.16):

* **In-process engine.** V1 runs the engine core in a separate process by default
  (``VLLM_ENABLE_V1_MULTIPROCESSING``); then ``llm.llm_engine.model_executor`` does not exist and weights
  could only reach the workers pickled through ``collective_rpc``. Like TRL's colocate mode we build
  the engine with ``distributed_executor_backend="external_launcher"`` (a one-process "distributed"
  group whose rendezvous variables we set) and multiprocessing off, so the worker lives in this
  process and ``model_runner.model.load_weights`` takes the policy's CUDA tensors directly, one
  parameter at a time: no pickling, no full state-dict copy.
* **Lengths.** ``max_model_len`` = prompt budget + response budget of the run, capped by the
  model's ``max_position_embeddings`` (vLLM refuses a longer one).
* **Memory.** ``rollout.vllm_gpu_memory_utilization`` sizes the KV cache; with
  ``rollout.vllm_sleep`` the engine sleeps (level 2: weights and KV cache released) while the
  policy trains and wakes for each generation, the weights pushed again after waking.
* **EOS.** vLLM keeps the token it stopped on in ``token_ids`` (TRL finds EOS there too). The
  response mask covers exactly the sampled tokens; when an engine build strips the stop token, the
  token named by ``stop_reason`` (the one actually sampled) is put back, never the tokenizer's EOS
  by assumption. We stop on the tokenizer's EOS only (``ignore_eos`` + ``stop_token_ids``), as the HF
  backend does, so a generation-config EOS that differs from it does not end responses early.
* **Log-probs.** vLLM's are kept for display (``last_sampler_logprobs``); training recomputes them
  with the policy.

``rollouts_from_vllm`` is a pure function, unit-tested without vLLM; the backend is tested on CPU
against stand-ins shaped like vLLM's classes (tests/test_rollout_vllm.py) and needs CUDA and the
``[gpu]`` extra (``pip install 'a3po-lab[gpu]'``) to run for real.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any

import torch

from engine.rollout.base import Rollouts, SamplingParams, left_pad


def rollouts_from_vllm(
    outputs: Sequence[Any],
    prompts: list[list[int]],
    n: int,
    *,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    device=None,
) -> tuple[Rollouts, torch.Tensor]:
    """Convert vLLM outputs (one ``RequestOutput`` per prompt, ``n`` completions each) to ``Rollouts``.

    Each completion needs ``token_ids``; ``finish_reason`` ("stop"/"length"), ``stop_reason`` (the stop
    token id) and ``logprobs`` (a list of ``{token_id: obj with .logprob}``) are used when present.
    Rows end at their first EOS (kept, so the mask covers the EOS the policy must learn to emit, as
    in the HF backend); a stop token missing from ``token_ids`` is restored from ``stop_reason``;
    ``truncated`` is True unless the engine stopped on a stop token.

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
            finish = getattr(c, "finish_reason", None)
            stop = getattr(c, "stop_reason", None)
            if eos_id in ids:  # keep up to and including the first EOS
                k = ids.index(eos_id) + 1
                ids, lp = ids[:k], lp[:k]
                stopped = True
            elif (
                finish == "stop"
                and isinstance(stop, int)
                and not isinstance(stop, bool)
                and (not ids or ids[-1] != stop)
            ):
                ids, lp = ids + [stop], lp + [float("nan")]  # a build that stripped the sampled stop token
                stopped = True
            else:
                stopped = finish == "stop"
            rows.append(ids)
            lps.append(lp)
            trunc.append(not stopped)
    T = max(1, max(len(r) for r in rows))
    resp = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    slp = torch.full((len(rows), T), float("nan"))
    for i, (r, lp) in enumerate(zip(rows, lps)):
        resp[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
        slp[i, : len(lp)] = torch.tensor(lp)
    pids, pmask = left_pad([p for p in prompts for _ in range(n)], pad_id)
    ro = Rollouts(
        pids.to(device), pmask.to(device), resp.to(device), mask.to(device), torch.tensor(trunc, device=device)
    )
    return ro, slp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_max_len(model_config, prompt_tokens: int, new_tokens: int) -> int:
    """The run's longest sequence, capped by the model's positions (vLLM refuses a longer max_model_len)."""
    need = int(prompt_tokens) + int(new_tokens)
    cap = getattr(model_config, "max_position_embeddings", None)
    return min(need, int(cap)) if cap else need


class VLLMBackend:
    """Colocated vLLM engine in the training process (needs CUDA and vllm). See the module docstring."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        model_path: str,
        gpu_memory_utilization: float = 0.35,
        dtype: str = "bfloat16",
        max_model_len: int | None = None,
        seed: int = 0,
        sleep: bool = False,
    ):
        # one-process group for the external launcher; setdefault keeps a launcher's own values
        for k, v in (
            ("RANK", "0"),
            ("LOCAL_RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", str(_free_port())),
            ("VLLM_ENABLE_V1_MULTIPROCESSING", "0"),
        ):
            os.environ.setdefault(k, v)
        from vllm import LLM  # noqa: PLC0415  (optional dependency)

        self.tok = tokenizer
        self.device = next(model.parameters()).device
        self.sleep = sleep
        self.max_model_len = max_model_len or engine_max_len(model.config, 256, 64)
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=self.max_model_len,
            seed=seed,
            enable_prefix_caching=True,
            enable_sleep_mode=sleep,
            distributed_executor_backend="external_launcher",
            logprobs_mode="processed_logprobs",
        )
        self._model = model
        self._asleep = False
        self.sync_weights(model)
        self._nap()

    def _runner_model(self):
        try:
            return self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        except AttributeError:
            raise RuntimeError(
                "the vLLM engine runs its worker in another process, so weights cannot be pushed in "
                "place — keep VLLM_ENABLE_V1_MULTIPROCESSING=0 (set by this backend)"
            ) from None

    def sync_weights(self, model) -> None:
        """Push the policy's current weights into the engine, one parameter tensor at a time."""
        self._model = model
        if self._asleep:  # the weights are pushed when the engine wakes for the next generation
            return
        target = self._runner_model()
        for name, param in model.named_parameters():
            target.load_weights([(name, param.detach())])
        self.llm.reset_prefix_cache()

    def _nap(self) -> None:
        if self.sleep:
            self.llm.sleep(level=2)
            self._asleep = True

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up(tags=["weights"])
            self._asleep = False
            self.sync_weights(self._model)
            self.llm.wake_up(tags=["kv_cache"])

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Rollouts:
        from vllm import SamplingParams as VSP  # noqa: PLC0415

        greedy = params.temperature <= 0
        eos = self.tok.eos_token_id
        sp = VSP(
            n=params.n,
            temperature=0.0 if greedy else params.temperature,
            top_p=1.0 if greedy else params.top_p,
            top_k=-1 if (greedy or params.top_k <= 0) else params.top_k,
            max_tokens=params.max_new_tokens,
            seed=params.seed,
            logprobs=0,
            ignore_eos=True,
            stop_token_ids=[eos],
        )
        self._wake()
        try:
            outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        finally:
            self._nap()
        ro, self.last_sampler_logprobs = rollouts_from_vllm(
            outs,
            prompts,
            params.n,
            eos_id=eos,
            pad_id=self.tok.pad_token_id,
            max_new_tokens=params.max_new_tokens,
            device=self.device,
        )
        return ro
