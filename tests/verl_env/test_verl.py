"""verl integration, run in verl's own environment (verl pins transformers<5.11): `make test-verl`.

The loss in the workers, the step it decays on, and the store writer of verl_main on batches built by
verl's own code paths: the legacy trainer's ``DataProto`` after ``compute_advantage``, and the v1
trainer's TransferQueue rows after its real ``_compute_advantage``."""

import pytest
import torch

pytest.importorskip("verl.trainer.ppo.core_algos")

from verl.trainer.ppo.core_algos import get_policy_loss_fn  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

from engine.config import ConfigError, config_from_dict  # noqa: E402
from engine.integrations import verl_records as vr  # noqa: E402
from engine.shaping.algorithms import ResolvedAlgorithm, resolve, shape_tokens  # noqa: E402
from engine.update.loss import policy_loss  # noqa: E402


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


def _resolved(**algo) -> ResolvedAlgorithm:
    return resolve(config_from_dict({"algorithm": {"name": "a3po", **algo}, "train": {"steps": 500}}))


@pytest.fixture
def worker(monkeypatch):
    """A worker that has not seen a step yet, with no A3PO_* from the outer environment; returns a
    function that ships a resolved algorithm the way verl_main does (A3PO_RESOLVED)."""
    import os

    from engine.integrations import verl as ours

    for k in list(os.environ):
        if k.startswith("A3PO_"):
            monkeypatch.delenv(k)
    monkeypatch.setattr(ours, "_state", {"global_step": None, "warned": False})

    def ship(r: ResolvedAlgorithm):
        monkeypatch.setenv(vr.RESOLVED_ENV, vr.resolved_env(r))
        return ours

    return ship


def test_registered_through_external_modules(monkeypatch):
    monkeypatch.setenv("VERL_USE_EXTERNAL_MODULES", "engine.integrations.verl")
    from verl.utils.import_utils import import_external_libs

    import_external_libs("engine.integrations.verl")
    from engine.integrations import verl as ours

    assert get_policy_loss_fn("a3po") is ours.a3po_loss


def test_a3po_loss_equals_engine_shaped_loss(worker):
    r = _resolved(alpha_pos=3, alpha_neg=2, decay="constant")
    worker(r)
    old, new, adv, mask = _batch()
    loss, metrics = get_policy_loss_fn("a3po")(old, new, adv, mask.bool(), "token-mean", _config())
    pol = torch.tensor([1, -1, -1, 0])
    shaped = shape_tokens(r, adv, pol, mask, logprobs=old, step=0)
    assert (shaped.adv != adv).any()  # the rules act on this batch
    ref, _ = policy_loss(new, old, shaped.adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0, agg="token-mean")
    assert torch.allclose(loss, ref, atol=1e-6)
    assert metrics["a3po/key_frac"] > 0 and metrics["a3po/alpha_pos"] == 3.0
    g1 = torch.autograd.grad(loss, new, retain_graph=True)[0]
    g2 = torch.autograd.grad(ref, new)[0]
    assert torch.allclose(g1, g2, atol=1e-6)


def test_psr_config_drops_negative_rows(worker):
    worker(resolve(config_from_dict({"algorithm": {"name": "psr"}})))
    old, new, adv, mask = _batch()
    loss, _ = get_policy_loss_fn("a3po")(old, new, adv, mask.bool(), "token-mean", _config())
    (g,) = torch.autograd.grad(loss, new)
    assert g[1].abs().sum() == 0 and g[2].abs().sum() == 0 and g[0].abs().sum() > 0


def _positive_key_scale(ours, old, adv, mask):
    """The factor on row 0's (positive, adv 1.5) key tokens after shaping at the worker's current step."""
    s = vr.shape(vr.resolved_from_env(), adv, mask, old, ours.current_step())
    return float(s.adv[0][s.key_mask[0]][0] / adv[0, 0])


def test_decay_follows_the_recorded_trainer_step(worker):
    ours = worker(_resolved(alpha_pos=3, decay="linear", decay_steps=500))
    old, new, adv, mask = _batch()
    assert ours.current_step() == 0  # nothing recorded: step 0 (with a warning)
    ours.record_global_step(250)  # linear: alpha = 1 + (3 - 1) * (1 - 250/500) = 2
    assert _positive_key_scale(ours, old, adv, mask) == pytest.approx(2.0)
    for _ in range(40):  # many micro-batches in one step do not move the schedule
        _, m = get_policy_loss_fn("a3po")(old, new, adv, mask.bool(), "token-mean", _config())
    assert m["a3po/step"] == 250.0 and m["a3po/alpha_pos"] == pytest.approx(2.0)
    ours.record_global_step(None)  # a sync without a step (verl's colocated reward path) changes nothing
    assert ours.current_step() == 250
    ours.record_global_step(500)
    assert _positive_key_scale(ours, old, adv, mask) == pytest.approx(1.0)


def test_worker_refuses_old_variables_and_a_missing_config(worker, monkeypatch):
    old, new, adv, mask = _batch()
    with pytest.raises(ConfigError, match="A3PO_RESOLVED is not set"):
        get_policy_loss_fn("a3po")(old, new, adv, mask.bool(), "token-mean", _config())
    worker(_resolved())
    monkeypatch.setenv("A3PO_RATIO", "0.3")
    with pytest.raises(ConfigError) as e:
        get_policy_loss_fn("a3po")(old, new, adv, mask.bool(), "token-mean", _config())
    msg = str(e.value)
    assert "A3PO_RATIO is no longer read — pass a3po.algorithm.ratio" in msg and "\n" not in msg


FAKE_WORKERS = """
from verl.single_controller.base.decorator import Dispatch, register


class ActorRolloutRefWorker:
    synced = []

    @register(dispatch_mode=Dispatch.ONE_TO_ALL, blocking=False)
    async def update_weights(self, global_steps: int = None, mode: str = "auto"):
        self.synced.append((global_steps, mode))
        return {"synced": global_steps}
"""


def test_update_weights_wrapper_records_the_step_and_keeps_verls_dispatch(worker, tmp_path, monkeypatch):
    """The hook on a stand-in of verl's worker (same decorator and signature); imported after the hook is set."""
    import asyncio
    import inspect
    import sys

    from verl.single_controller.base.decorator import MAGIC_ATTR

    ours = worker(_resolved())
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
    assert ours.current_step() == 300
    asyncio.run(w.update_weights(301))  # positional, as the step finishes
    asyncio.run(w.update_weights())  # no step: ignored
    assert ours.current_step() == 301 and w.synced == [(300, "naive"), (301, "auto"), (None, "auto")]
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
