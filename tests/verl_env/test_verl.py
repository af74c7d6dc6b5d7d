"""verl integration, run in verl's own environment (verl pins transformers<5.11): `make test-verl`."""

import importlib

import pytest
import torch

pytest.importorskip("verl.trainer.ppo.core_algos")

from verl.trainer.ppo.core_algos import get_policy_loss_fn  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

from engine.advantage import a3po_rules, token_shaping  # noqa: E402
from engine.loss import policy_loss  # noqa: E402


def _batch():
    torch.manual_seed(0)
    B, T = 4, 6
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    adv = torch.tensor([1.5, -0.5, -0.5, 0.0]).unsqueeze(-1) * mask
    old = -torch.rand(B, T) * 2
    new = (old + 0.1 * torch.randn(B, T)).requires_grad_()
    return old, new, adv, mask


def _config():
    return ActorConfig(
        strategy="fsdp",
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio=0.2,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        rollout_n=1,
    )


def test_registered_through_external_modules(monkeypatch):
    monkeypatch.setenv("VERL_USE_EXTERNAL_MODULES", "engine.integrations.verl")
    from verl.utils.import_utils import import_external_libs

    import_external_libs("engine.integrations.verl")
    from engine.integrations import verl as ours

    for name in ("a3po", "a3po_static", "psr", "nsr", "p2n1", "token_weighted"):
        assert get_policy_loss_fn(name) is ours.LOSSES[name]


def test_a3po_loss_equals_engine_shaped_loss(monkeypatch):
    importlib.import_module("engine.integrations.verl")
    monkeypatch.setenv("A3PO_ALPHA_POS", "3")
    monkeypatch.setenv("A3PO_ALPHA_NEG", "2")
    monkeypatch.setenv("A3PO_DECAY", "constant")
    old, new, adv, mask = _batch()
    loss, metrics = get_policy_loss_fn("a3po")(old, new, adv, mask.bool(), "token-mean", _config())
    pol = torch.tensor([1, -1, -1, 0])
    shaped, key = token_shaping(
        adv, mask, pol, a3po_rules(0, 10, alpha_pos=3.0, alpha_neg=2.0, decay="constant"), logprobs=old
    )
    ref, _ = policy_loss(new, old, shaped, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0, agg="token-mean")
    assert torch.allclose(loss, ref, atol=1e-6)
    assert metrics["a3po/key_frac"] > 0
    g1 = torch.autograd.grad(loss, new, retain_graph=True)[0]
    g2 = torch.autograd.grad(ref, new)[0]
    assert torch.allclose(g1, g2, atol=1e-6)


def test_psr_drops_negative_rows():
    importlib.import_module("engine.integrations.verl")
    old, new, adv, mask = _batch()
    loss, _ = get_policy_loss_fn("psr")(old, new, adv, mask.bool(), "token-mean", _config())
    (g,) = torch.autograd.grad(loss, new)
    assert g[1].abs().sum() == 0 and g[2].abs().sum() == 0 and g[0].abs().sum() > 0


def test_log_verl_batch_writes_store_rows(tmp_path):
    import numpy as np
    from conftest import ROOT
    from transformers import AutoTokenizer
    from verl import DataProto

    from engine.integrations.verl import log_verl_batch
    from engine.store import Store

    tok = AutoTokenizer.from_pretrained(ROOT / "data" / "tiny-model")
    old, _, adv, mask = _batch()
    ids = torch.tensor([tok.encode("12+3=15", add_special_tokens=False)[:6]] * 4)
    scores = torch.zeros(4, 6)
    scores[0, 5] = 1.0
    batch = DataProto.from_dict(
        tensors={
            "responses": ids,
            "response_mask": mask,
            "old_log_probs": old,
            "advantages": adv,
            "token_level_scores": scores,
        },
        non_tensors={"uid": np.array(["a", "a", "b", "b"], dtype=object)},
    )
    store = Store(tmp_path)
    rid = store.create_run({"algorithm": {"name": "a3po"}, "integration": "verl"}, name="verl-run")
    n = log_verl_batch(store, rid, 1, batch, tok)
    assert n == int(mask.sum())
    t = store.query(
        "select rollout_idx, position, token_text, is_key, polarity from tokens order by rollout_idx, position"
    )
    assert len(t) == n and t.is_key.any()
    r = store.query("select rollout_idx, group_idx, polarity, reward from rollouts order by rollout_idx")
    assert (
        r.group_idx.tolist() == [0, 0, 1, 1] and r.polarity.tolist() == [1, -1, -1, 0] and r.reward.tolist()[0] == 1.0
    )
    assert "".join(t[t.rollout_idx == 0].token_text) == "12+3=1"


@pytest.fixture
def fresh_step(monkeypatch):
    """A worker that has not seen a step or a loss call yet; no A3PO_* from the outer environment."""
    from engine.integrations import verl as ours

    for k in list(__import__("os").environ):
        if k.startswith("A3PO_"):
            monkeypatch.delenv(k)
    monkeypatch.setattr(ours, "_state", {"global_step": None, "calls": 0, "warned": False})
    return ours


def _positive_key_scale(ours, old, adv, mask):
    """The factor on row 0's (positive, adv 1.5) key tokens after shaping at the worker's current step."""
    shaped, key = ours.shape_for_verl("a3po", old, adv, mask)
    return float(shaped[0][key[0]][0] / adv[0, 0])


def test_decay_follows_the_recorded_trainer_step(fresh_step, monkeypatch):
    ours = fresh_step
    monkeypatch.setenv("A3PO_ALPHA_POS", "3")
    monkeypatch.setenv("A3PO_TOTAL_STEPS", "500")
    old, new, adv, mask = _batch()
    ours.record_global_step(250)  # linear: alpha = 1 + (3 - 1) * (1 - 250/500) = 2
    assert _positive_key_scale(ours, old, adv, mask) == pytest.approx(2.0)
    for _ in range(40):  # many micro-batches in one step do not move the schedule
        get_policy_loss_fn("a3po")(old, new, adv, mask.bool(), "token-mean", _config())
    assert _positive_key_scale(ours, old, adv, mask) == pytest.approx(2.0)
    ours.record_global_step(None)  # a sync without a step (verl's colocated reward path) changes nothing
    assert ours.current_step(1) == 250
    ours.record_global_step(500)
    assert _positive_key_scale(ours, old, adv, mask) == pytest.approx(1.0)


def test_fallback_counts_loss_calls_per_step(fresh_step, monkeypatch):
    ours = fresh_step
    monkeypatch.setenv("A3PO_CALLS_PER_STEP", "4")
    old, new, adv, mask = _batch()
    for _ in range(9):
        get_policy_loss_fn("a3po")(old, new, adv, mask.bool(), "token-mean", _config())
    assert ours.current_step(4) == 2  # 9 calls // 4
    ours.record_global_step(7)
    assert ours.current_step(4) == 7  # the trainer's step wins as soon as it is known


FAKE_WORKERS = """
from verl.single_controller.base.decorator import Dispatch, register


class ActorRolloutRefWorker:
    synced = []

    @register(dispatch_mode=Dispatch.ONE_TO_ALL, blocking=False)
    async def update_weights(self, global_steps: int = None, mode: str = "auto"):
        self.synced.append((global_steps, mode))
        return {"synced": global_steps}
"""


def test_update_weights_wrapper_records_the_step_and_keeps_verls_dispatch(fresh_step, tmp_path, monkeypatch):
    """The hook on a stand-in of verl's worker (same decorator and signature); imported after the hook is set."""
    import asyncio
    import inspect
    import sys

    from verl.single_controller.base.decorator import MAGIC_ATTR

    ours = fresh_step
    (tmp_path / "a3po_fake_engine_workers.py").write_text(FAKE_WORKERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    ours.install_step_hook("a3po_fake_engine_workers")
    import a3po_fake_engine_workers as fake

    method = fake.ActorRolloutRefWorker.update_weights
    assert method._a3po_records_step and inspect.iscoroutinefunction(method)
    attrs = getattr(method, MAGIC_ATTR)  # what verl's worker group binds the method by
    assert attrs["dispatch_mode"] == fake.Dispatch.ONE_TO_ALL and attrs["blocking"] is False
    w = fake.ActorRolloutRefWorker()
    # resume from global_step_300: the trainer syncs weights with the resumed step before training
    assert asyncio.run(w.update_weights(global_steps=300, mode="naive")) == {"synced": 300}
    assert ours.current_step(1) == 300
    asyncio.run(w.update_weights(301))  # positional, as the step finishes
    asyncio.run(w.update_weights())  # no step: ignored
    assert ours.current_step(1) == 301 and w.synced == [(300, "naive"), (301, "auto"), (None, "auto")]
    ours.install_step_hook("a3po_fake_engine_workers")  # already loaded: wraps at most once
    assert fake.ActorRolloutRefWorker.update_weights is method
    sys.modules.pop("a3po_fake_engine_workers")


def test_verl_has_the_seam_the_hook_relies_on():
    """verl 0.9.1's source: the worker method and both trainers' calls with the true step (read, not imported:
    engine_workers needs the GPU stack)."""
    import ast
    from pathlib import Path

    import verl

    root = Path(verl.__file__).parent
    tree = ast.parse((root / "workers" / "engine_workers.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ActorRolloutRefWorker")
    fn = next(n for n in cls.body if getattr(n, "name", "") == "update_weights")
    assert isinstance(fn, ast.AsyncFunctionDef) and [a.arg for a in fn.args.args][:2] == ["self", "global_steps"]
    assert (
        "self.checkpoint_manager.update_weights(self.global_steps)"
        in (root / "trainer" / "ppo" / "ray_trainer.py").read_text()
    )
    assert (
        "self.checkpoint_manager.update_weights(self.global_steps)"
        in (root / "trainer" / "ppo" / "v1" / "trainer_sync.py").read_text()
    )
    assert "actor_wg.update_weights(global_steps=global_steps" in (root / "checkpoint_engine" / "base.py").read_text()


def test_bad_env_value_is_one_config_error_line_naming_the_variable(fresh_step, monkeypatch):
    from engine.config import ConfigError

    old, new, adv, mask = _batch()
    for name, value in (
        ("A3PO_RATIO", "1.5"),
        ("A3PO_ALPHA_NEG", "lots"),
        ("A3PO_DECAY", "fast"),
        ("A3PO_ALPHA_PSO", "2"),
    ):
        monkeypatch.setenv(name, value)
        with pytest.raises(ConfigError) as e:
            get_policy_loss_fn("a3po")(old, new, adv, mask.bool(), "token-mean", _config())
        msg = str(e.value)
        assert name in msg and " — " in msg and "\n" not in msg
        monkeypatch.delenv(name)
    assert "A3PO_ALPHA_POS" in str(e.value)  # the typo's message suggests the real name
