"""Loading the policy and its tokenizer: the embedded tiny model, a local folder, or an HF id."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.resources import data_dir

DATA_DIR = data_dir()  # data/ in a checkout, a3po_data in an installed wheel (engine.resources)

BUILTIN = {"builtin:tiny-countdown": DATA_DIR / "tiny-countdown", "builtin:tiny": DATA_DIR / "tiny-model"}


class ModelError(ValueError):
    """The model path or id cannot be loaded (one-line message)."""


def resolve_model_path(spec: str) -> str:
    if spec in BUILTIN:
        return str(BUILTIN[spec])
    if spec.startswith("builtin:"):
        raise ModelError(f"unknown builtin model {spec!r} — the embedded ones are {', '.join(BUILTIN)}")
    return spec


def pick_device(spec: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything torch cannot use here is one ModelError line."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise ModelError(f"unknown device {spec!r} — use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {spec!r} but CUDA is not available here — use auto or cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(
                f"device {spec!r} but only {torch.cuda.device_count()} CUDA device(s) exist — use cuda:0..cuda:N-1"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"device {spec!r} but MPS is not available here — use auto or cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ModelError(f"unsupported device {spec!r} — use auto, cpu, cuda, cuda:N or mps")
    return dev


def pick_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec]
    except KeyError:
        raise ModelError(f"model.dtype={spec!r} is not a dtype — use auto, float32, bfloat16 or float16") from None


def load_policy(spec: str, *, device: str = "auto", dtype: str = "auto", gradient_checkpointing: bool = False):
    """Return ``(model, tokenizer, device)``. Local folders load offline; other strings are HF ids."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    path = resolve_model_path(spec)
    local = Path(path).expanduser()
    looks_local = local.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local and not (local / "config.json").exists():
        what = "does not exist" if not local.exists() else "is not a Hugging Face model folder (no config.json)"
        raise ModelError(
            f"model path {path!r} {what} — use builtin:tiny-countdown, a folder saved with "
            "save_pretrained, or a Hugging Face model id"
        )
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    src = str(local) if looks_local else path
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a failed load explains itself in the one error line below
    try:
        AutoConfig.from_pretrained(src)  # an unknown model_type fails here, before the tokenizer guesses
        tok = AutoTokenizer.from_pretrained(src)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dt)
    except (OSError, ValueError, KeyError) as e:
        # OSError: missing/corrupt files or an unknown hub id; ValueError/KeyError: a config.json transformers
        # cannot map to a model class (unknown model_type, bad fields)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if len(first) > 200:
            first = first[:197] + "..."
        raise ModelError(
            f"cannot load model {path!r}: {first} — check the folder's config.json and weights, or the "
            "model id (no network: only local folders and the HF cache work)"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model.to(dev)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model, tok, dev
