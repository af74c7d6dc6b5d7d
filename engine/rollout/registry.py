"""One registry of rollout backends: ``rollout.backend`` names a backend, ``make_backend`` builds it.

    hf    engine/rollout/hf.py    transformers' generate on the policy (the reference)
    kv    engine/rollout/kv.py    the engine's own decode loop and KV cache (CPU and GPU)
    vllm  engine/rollout/vllm.py  vLLM's engine beside the trainer, weights pushed after each update

Backends are imported when built, so importing this module loads neither vLLM nor the C kernels.
"""

from __future__ import annotations

from engine.errors import ConfigError
from engine.rollout.base import RolloutBackend


def _hf(model, tokenizer, cfg):
    from engine.rollout.hf import HFBackend

    return HFBackend(model, tokenizer)


def _kv(model, tokenizer, cfg):
    from engine.rollout.kv import KVEngine

    if cfg is None:
        return KVEngine(model, tokenizer)
    workers = cfg.rollout.workers
    threads = max(1, cfg.train.threads // workers)
    return KVEngine(
        model,
        tokenizer,
        fast=cfg.model.fast_forward,
        workers=workers,
        threads=threads,
        native=cfg.rollout.native_kernels,
    )


def _vllm(model, tokenizer, cfg):
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ConfigError(
            "config key 'rollout.backend': vllm does not import in this environment — pip install 'a3po-lab[gpu]' "
            "on a CUDA machine, or make install-vllm and run .venv-vllm/bin/a3po on CPU"
        ) from None
    from engine.model.policy import resolve_model_path
    from engine.rollout.vllm import VLLMBackend, engine_max_len

    new_tokens = max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens or 0)
    return VLLMBackend(
        model,
        tokenizer,
        model_path=resolve_model_path(cfg.model.path),
        seed=cfg.seed,
        gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization,
        sleep=cfg.rollout.vllm_sleep,
        max_model_len=engine_max_len(model.config, cfg.data.max_prompt_tokens, new_tokens),
    )


# name -> builder(model, tokenizer, cfg): the values ``rollout.backend`` accepts (engine/config.py lists these)
BACKENDS = {"hf": _hf, "kv": _kv, "vllm": _vllm}


def make_backend(name: str, model, tokenizer, cfg=None) -> RolloutBackend:
    """The backend ``name`` (a key of ``BACKENDS``) sampling from ``model``; ``cfg`` (an engine ``Config``) sets
    its options, and the defaults apply without one (the vLLM backend needs it)."""
    try:
        build = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown rollout backend {name!r}") from None
    return build(model, tokenizer, cfg)
