"""The embedded models: standard HF format, offline loading, deterministic build, the polarity targets."""

import json

import pytest
import torch
from conftest import ROOT

from engine.model.policy import BUILTIN
from engine.tasks.tiny_model import MODEL_DIRS, build_tiny_model, build_tokenizer, rollout_stats

MODEL = ROOT / "data" / "tiny-model"


@pytest.mark.parametrize("task", sorted(MODEL_DIRS))
def test_loads_offline_with_auto_classes(monkeypatch, task):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = MODEL_DIRS[task]
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    text = "37+48-12=37+48=85;85-12=73;\\boxed{73} 10 8 9 7:117=10+8=18(9 7 18)"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text) and tok.decode(ids) == text  # one token per character, lossless
    assert (path / "model.safetensors").stat().st_size < 8_000_000
    assert path in BUILTIN.values()


def test_shipped_arith_accuracy_in_rl_band():
    stats = json.loads((MODEL / "build_stats.json").read_text())
    assert 0.2 <= stats["test_sampled_accuracy_t1"] <= 0.6


def test_shipped_countdown_model_meets_the_polarity_targets():
    """The default model must give shaping something to act on (fresh T=1 rollouts of the test split)."""
    stats = json.loads((MODEL_DIRS["countdown"] / "build_stats.json").read_text())
    st = stats["rollout_stats_t1"]
    assert stats["task"] == "countdown" and st["n_prompts"] == 500 and st["group"] == 8
    assert 0.20 <= st["accuracy"] <= 0.50
    assert st["mixed_groups"] >= 0.50
    assert st["length"] >= 30
    assert st["entropy"] >= 0.15
    assert st["fork_frac"] >= 0.10


def test_rollout_stats_hand_checked_on_a_fixed_policy():
    """A model whose every logit is 0 samples uniformly: entropy log V everywhere, all tokens are forks."""
    from engine.tasks.problems import Problem

    tok = build_tokenizer()
    from transformers import LlamaForCausalLM

    from engine.tasks.tiny_model import build_config

    model = LlamaForCausalLM(build_config(len(tok)))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    st = rollout_stats(model, tok, [Problem("1 2:3=", "3")] * 2, "countdown", group=4, max_new_tokens=5)
    assert st["entropy"] == pytest.approx(float(torch.log(torch.tensor(float(len(tok))))), rel=1e-4)
    assert st["fork_frac"] == 1.0 and st["accuracy"] == 0.0 and st["all_wrong_groups"] == 1.0
    assert st["mixed_groups"] == 0.0 and 1 <= st["length"] <= 5


@pytest.mark.parametrize("task", ["arith", "countdown"])
def test_build_is_deterministic(tmp_path, task):
    kw = dict(task=task, steps=3, batch=8, write_data=False, n_eval=4, log=lambda s: None)
    a = build_tiny_model(tmp_path / "a", **kw)
    b = build_tiny_model(tmp_path / "b", **kw)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a["rollout_stats_t1"] == b["rollout_stats_t1"] and a["task"] == task


def test_tokenizer_keeps_spaces_and_newlines():
    tok = build_tokenizer()
    s = "a b\n1 + 2"
    assert tok.decode(tok.encode(s, add_special_tokens=False)) == s
