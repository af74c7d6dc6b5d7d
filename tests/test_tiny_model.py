"""The embedded model: standard HF format, offline loading, deterministic build, accuracy band."""

import json

import torch

from conftest import ROOT
from engine.tiny_model import build_tiny_model, build_tokenizer

MODEL = ROOT / "data" / "tiny-model"


def test_loads_offline_with_auto_classes(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(MODEL)
    tok = AutoTokenizer.from_pretrained(MODEL)
    assert model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    text = "37+48-12=37+48=85;85-12=73;\\boxed{73}"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text) and tok.decode(ids) == text  # one token per character, lossless
    assert (MODEL / "model.safetensors").stat().st_size < 8_000_000


def test_shipped_accuracy_in_rl_band():
    stats = json.loads((MODEL / "build_stats.json").read_text())
    assert 0.2 <= stats["test_sampled_accuracy_t1"] <= 0.6


def test_build_is_deterministic(tmp_path):
    a = build_tiny_model(tmp_path / "a", steps=3, batch=8, write_data=False, n_eval=20, log=lambda s: None)
    b = build_tiny_model(tmp_path / "b", steps=3, batch=8, write_data=False, n_eval=20, log=lambda s: None)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a["test_sampled_accuracy_t1"] == b["test_sampled_accuracy_t1"]


def test_tokenizer_keeps_spaces_and_newlines():
    tok = build_tokenizer()
    s = "a b\n1 + 2"
    assert tok.decode(tok.encode(s, add_special_tokens=False)) == s
