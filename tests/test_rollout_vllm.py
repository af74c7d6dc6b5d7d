"""vLLM output -> Rollouts conversion, with stand-in objects shaped like vLLM's RequestOutput."""

import math
from types import SimpleNamespace as NS

import pytest
import torch

from engine.rollout_vllm import rollouts_from_vllm

EOS, PAD = 2, 0


def comp(ids, finish="stop", lps=None):
    lp = None if lps is None else [{t: NS(logprob=v)} for t, v in zip(ids, lps)]
    return NS(token_ids=ids, finish_reason=finish, logprobs=lp)


def test_conversion_masks_eos_and_truncation():
    prompts = [[1, 5, 6], [1, 7]]
    outs = [NS(outputs=[comp([10, 11], "stop", [-0.1, -0.2]), comp([12, 13, 14, 15], "length")]),
            NS(outputs=[comp([16, EOS, 9]), comp([17], "stop")])]
    ro, slp = rollouts_from_vllm(outs, prompts, 2, eos_id=EOS, pad_id=PAD, max_new_tokens=4)
    # row 0: stopped on EOS that vLLM stripped -> EOS appended; row 1: hit the budget -> truncated
    assert ro.response_ids.tolist() == [[10, 11, EOS, PAD], [12, 13, 14, 15], [16, EOS, PAD, PAD], [17, EOS, PAD, PAD]]
    assert ro.response_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]
    assert ro.truncated.tolist() == [False, True, False, False]
    # prompts repeated n times, prompt-major, left-padded
    assert ro.prompt_ids.tolist() == [[1, 5, 6], [1, 5, 6], [PAD, 1, 7], [PAD, 1, 7]]
    assert ro.prompt_mask.tolist() == [[1, 1, 1], [1, 1, 1], [0, 1, 1], [0, 1, 1]]
    assert slp[0, :2].tolist() == pytest.approx([-0.1, -0.2]) and math.isnan(slp[0, 2].item())
    assert torch.isnan(slp[1]).all()


def test_conversion_checks_counts():
    with pytest.raises(ValueError, match="completions"):
        rollouts_from_vllm([NS(outputs=[comp([3])])], [[1]], 2, eos_id=EOS, pad_id=PAD, max_new_tokens=4)
    with pytest.raises(ValueError, match="outputs for"):
        rollouts_from_vllm([], [[1]], 1, eos_id=EOS, pad_id=PAD, max_new_tokens=4)


def test_vllm_backend_needs_vllm():
    from engine.policy import load_policy
    from engine.rollout import make_backend

    try:
        import vllm  # noqa: F401
        pytest.skip("vllm installed: covered by scripts/gpu_check.sh")
    except ImportError:
        pass
    model, tok, _ = load_policy("builtin:tiny")
    with pytest.raises(RuntimeError, match=r"\[gpu\]"):
        make_backend("vllm", model, tok)
