"""Loading the policy and its tokenizer: the embedded tiny model, a local folder, or an HF id."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.tasks import DATA_DIR

BUILTIN = {"builtin:tiny-countdown": DATA_DIR / "tiny-countdown", "builtin:tiny": DATA_DIR / "tiny-model"}


class ModelError(ValueError):
    """The model path or id cannot be loaded (one-line message)."""


def resolve_model_path(spec: str) -> str:
    if spec in BUILTIN:
        return str(BUILTIN[spec])
    if spec.startswith("builtin:"):
        raise ModelError(f"unknown builtin model {spec!r}; the embedded ones are {', '.join(BUILTIN)}")
    return spec


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"model.device={spec} but CUDA is not available")
    return torch.device(spec)


def pick_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec]
    except KeyError:
        raise ModelError(f"model.dtype={spec!r}: use auto, float32, bfloat16 or float16") from None


def load_policy(spec: str, *, device: str = "auto", dtype: str = "auto", gradient_checkpointing: bool = False):
    """Return ``(model, tokenizer, device)``. Local folders load offline; other strings are HF ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    path = resolve_model_path(spec)
    local = Path(path).expanduser()
    looks_local = local.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local and not (local / "config.json").exists():
        raise ModelError(f"model path {path!r} is not a Hugging Face model folder (no config.json)")
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    try:
        tok = AutoTokenizer.from_pretrained(str(local) if looks_local else path)
        model = AutoModelForCausalLM.from_pretrained(str(local) if looks_local else path, dtype=dt)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load model {path!r}: {first}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model.to(dev)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model, tok, dev
