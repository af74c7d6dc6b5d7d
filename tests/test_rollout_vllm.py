"""vLLM output -> Rollouts conversion, with stand-in objects shaped like vLLM's RequestOutput."""

import math
from types import SimpleNamespace as NS

import pytest
import torch

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

        pytest.skip("vllm installed: covered by scripts/gpu_check.sh")
    except ImportError:
        pass
    model, tok, _ = load_policy("builtin:tiny")
    with pytest.raises(RuntimeError, match=r"\[gpu\]"):
        make_backend("vllm", model, tok)


class _FakeRunnerModel:
    def __init__(self, log):
        self.log = log

    def load_weights(self, weights):
        self.log.append(("load", [(n, t) for n, t in weights]))


class _FakeLLM:
    """Stands in for ``vllm.LLM`` with the attributes the backend uses in V1's in-process (external
    launcher) mode: ``llm_engine.model_executor.driver_worker.model_runner.model``, sleep/wake_up,
    reset_prefix_cache and generate."""

    instances: list = []

    def __init__(self, **kw):
        self.kw, self.log = kw, []
        runner = NS(model=_FakeRunnerModel(self.log))
        self.llm_engine = NS(model_executor=NS(driver_worker=NS(model_runner=runner)))
        _FakeLLM.instances.append(self)

    def sleep(self, level):
        self.log.append(("sleep", level))

    def wake_up(self, tags=None):
        self.log.append(("wake", tuple(tags)))

    def reset_prefix_cache(self):
        self.log.append(("reset",))

    def generate(self, prompts, sp, use_tqdm=False):
        self.log.append(("generate", len(prompts)))
        self.last_sp = sp
        return [NS(outputs=[comp([7, EOS], "stop", stop=EOS) for _ in range(sp.n)]) for _ in prompts]


@pytest.fixture
def fake_vllm(monkeypatch):
    import sys
    import types

    mod = types.ModuleType("vllm")
    mod.LLM = _FakeLLM
    mod.SamplingParams = lambda **kw: NS(**kw)
    monkeypatch.setitem(sys.modules, "vllm", mod)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        monkeypatch.delenv(k, raising=False)
    _FakeLLM.instances.clear()
    return mod


def test_vllm_backend_builds_an_in_process_engine_sized_to_the_run(fake_vllm):
    import os

    from engine.config import load_config
    from engine.model.policy import load_policy
    from engine.rollout.registry import make_backend

    cfg = load_config(
        None,
        [
            "rollout.backend=vllm",
            "data.max_prompt_tokens=40",
            "rollout.max_new_tokens=30",
            "eval.max_new_tokens=50",
            "rollout.vllm_gpu_memory_utilization=0.5",
        ],
    )
    model, tok, _ = load_policy("builtin:tiny-countdown")
    make_backend("vllm", model, tok, cfg)
    (llm,) = _FakeLLM.instances
    assert llm.kw["distributed_executor_backend"] == "external_launcher"
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and os.environ["WORLD_SIZE"] == "1"
    assert llm.kw["max_model_len"] == min(40 + 50, model.config.max_position_embeddings)
    assert llm.kw["gpu_memory_utilization"] == 0.5 and llm.kw["dtype"] == "bfloat16"
    # weights pushed at construction, one parameter per call, the policy's own tensors (no copies, no pickling)
    loads = [e for e in llm.log if e[0] == "load"]
    params = dict(model.named_parameters())
    assert len(loads) == len(params) and all(len(e[1]) == 1 for e in loads)
    name, t = loads[0][1][0]
    assert t.data_ptr() == params[name].data_ptr()


def test_vllm_backend_caps_max_model_len_at_the_models_positions(fake_vllm):
    from engine.rollout.vllm import engine_max_len

    assert engine_max_len(NS(max_position_embeddings=128), 256, 64) == 128
    assert engine_max_len(NS(max_position_embeddings=4096), 256, 64) == 320
    assert engine_max_len(NS(), 10, 5) == 15


def test_vllm_backend_sleeps_between_generations_and_repushes_weights(fake_vllm):
    from engine.model.policy import load_policy
    from engine.rollout.base import SamplingParams
    from engine.rollout.vllm import VLLMBackend

    model, tok, _ = load_policy("builtin:tiny-countdown")
    be = VLLMBackend(model, tok, model_path="m", max_model_len=128, sleep=True)
    (llm,) = _FakeLLM.instances
    n_params = len(list(model.parameters()))
    assert llm.log[-1] == ("sleep", 2)
    llm.log.clear()
    be.sync_weights(model)  # asleep: nothing reaches the engine until it wakes
    assert llm.log == []
    ro = be.generate([[5, 6], [7]], SamplingParams(n=2, temperature=1.0, max_new_tokens=4))
    kinds = [e[0] for e in llm.log]
    assert kinds[0] == "wake" and llm.log[0][1] == ("weights",)
    assert kinds[1 : 1 + n_params] == ["load"] * n_params
    assert llm.log[1 + n_params] == ("reset",) and llm.log[2 + n_params] == ("wake", ("kv_cache",))
    assert kinds[-2:] == ["generate", "sleep"]
    # the sampler stops on the tokenizer's EOS only, as the HF backend does
    assert llm.last_sp.stop_token_ids == [tok.eos_token_id] and llm.last_sp.ignore_eos is True
    assert ro.response_ids.shape[0] == 4 and not ro.truncated.any()


def test_vllm_backend_explains_an_out_of_process_engine(fake_vllm):
    from engine.model.policy import load_policy
    from engine.rollout.vllm import VLLMBackend

    class Remote(_FakeLLM):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.llm_engine = NS()  # V1 with multiprocessing: no model_executor in this process

    fake_vllm.LLM = Remote
    model, tok, _ = load_policy("builtin:tiny-countdown")
    with pytest.raises(RuntimeError, match="VLLM_ENABLE_V1_MULTIPROCESSING=0"):
        VLLMBackend(model, tok, model_path="m", max_model_len=64)
