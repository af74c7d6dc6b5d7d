"""vLLM output -> Rollouts conversion (a pure function), with objects shaped like vLLM's RequestOutput.

The backend against the real engine: tests/vllm_env (make install-vllm, then make test-vllm)."""

import math
from types import SimpleNamespace as NS

import pytest
import torch

from engine.errors import ConfigError
from engine.rollout.vllm import rollouts_from_vllm

EOS, PAD = 2, 0


def comp(ids, finish="stop", lps=None, stop=None):
    lp = None if lps is None else [{t: NS(logprob=v)} for t, v in zip(ids, lps)]
    return NS(token_ids=ids, finish_reason=finish, stop_reason=stop, logprobs=lp)


def test_conversion_keeps_the_sampled_stop_token_and_flags_truncation():
    prompts = [[1, 5, 6], [1, 7]]
    outs = [
        NS(outputs=[comp([10, 11, EOS], "stop", [-0.1, -0.2, -0.3], stop=EOS), comp([12, 13, 14, 15], "length")]),
        NS(outputs=[comp([16, EOS, 9], "stop", stop=EOS), comp([17], "stop", stop=EOS)]),
    ]
    ro, slp = rollouts_from_vllm(outs, prompts, 2, eos_id=EOS, pad_id=PAD, max_new_tokens=4)
    # row 0: EOS kept as vLLM returns it; row 1: budget hit -> truncated; row 2: cut after the first EOS;
    # row 3: an engine build that stripped the stop token: the token named by stop_reason comes back
    assert ro.response_ids.tolist() == [[10, 11, EOS, PAD], [12, 13, 14, 15], [16, EOS, PAD, PAD], [17, EOS, PAD, PAD]]
    assert ro.response_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]
    assert ro.truncated.tolist() == [False, True, False, False]
    # prompts repeated n times, prompt-major, left-padded
    assert ro.prompt_ids.tolist() == [[1, 5, 6], [1, 5, 6], [PAD, 1, 7], [PAD, 1, 7]]
    assert ro.prompt_mask.tolist() == [[1, 1, 1], [1, 1, 1], [0, 1, 1], [0, 1, 1]]
    assert slp[0, :3].tolist() == pytest.approx([-0.1, -0.2, -0.3]) and torch.isnan(slp[1]).all()
    assert math.isnan(slp[3, 1].item())  # the restored token has no sampler log-prob


def test_conversion_never_appends_a_token_the_policy_did_not_sample():
    """A stop on another token (e.g. a generation-config EOS, id 3) keeps that token, not the tokenizer's EOS."""
    other = 3
    outs = [
        NS(
            outputs=[
                comp([10, other], "stop", stop=other),
                comp([11], "stop", stop=other),
                comp([12], "stop", stop="\n"),
            ]
        )
    ]
    ro, _ = rollouts_from_vllm(outs, [[1]], 3, eos_id=EOS, pad_id=PAD, max_new_tokens=4)
    assert ro.response_ids.tolist() == [[10, other], [11, other], [12, PAD]]
    assert ro.response_mask.tolist() == [[1, 1], [1, 1], [1, 0]]
    assert ro.truncated.tolist() == [False, False, False]


def test_conversion_checks_counts():
    with pytest.raises(ValueError, match="completions"):
        rollouts_from_vllm([NS(outputs=[comp([3])])], [[1]], 2, eos_id=EOS, pad_id=PAD, max_new_tokens=4)
    with pytest.raises(ValueError, match="outputs for"):
        rollouts_from_vllm([], [[1]], 1, eos_id=EOS, pad_id=PAD, max_new_tokens=4)


def test_vllm_backend_needs_vllm():
    from engine.model.policy import load_policy
    from engine.rollout.registry import make_backend

    try:
        import vllm  # noqa: F401

        pytest.skip("vllm installed: the backend is tested in tests/vllm_env")
    except ImportError:
        pass
    model, tok, _ = load_policy("builtin:tiny")
    with pytest.raises(ConfigError, match=r"rollout.backend.*\[gpu\].*make install-vllm"):
        make_backend("vllm", model, tok)


def test_engine_max_len_is_capped_at_the_models_positions():
    from engine.rollout.vllm import engine_max_len

    assert engine_max_len(NS(max_position_embeddings=128), 256, 64) == 128
    assert engine_max_len(NS(max_position_embeddings=4096), 256, 64) == 320
    assert engine_max_len(NS(), 10, 5) == 15


# The backend itself (engine start, weight push, sampling, sleep refusal) runs against the real vLLM
# engine in tests/vllm_env (its own environment: make install-vllm).
