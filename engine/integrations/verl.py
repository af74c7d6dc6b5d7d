"""A3PO for verl: the engine's shaping as a policy loss in verl's registry, and the step it runs at.

Why a policy loss: verl's advantage estimators run on the driver without log-probs, so token
selection cannot happen there; the policy loss runs in the actor workers and receives
``old_log_prob``, ``log_prob``, ``advantages`` (B, T) and ``response_mask``. The loss ``a3po`` shapes
the advantages with the engine's one shaping function (``engine.shaping.algorithms.shape_tokens``, through
``verl_records.shape``; polarity = sign of the GRPO advantage) and hands the clipped surrogate and its
aggregation to verl's own ``vanilla`` loss, so every verl option (clip-higher, dual clip,
loss_agg_mode, global token normalisation) still applies.

What it shapes with: the run's resolved algorithm (``engine.shaping.algorithms.ResolvedAlgorithm``), which
``python -m engine.integrations.verl_main`` builds from the engine config (``a3po.config=FILE`` and
``a3po.<section>.<key>=VALUE``) and ships to every worker as one JSON string in ``A3PO_RESOLVED``
(``ray_kwargs.ray_init.runtime_env.env_vars``); the worker checks it again with
``engine.config.resolved_from_dict``. The loss reads no other environment variable; the per-coefficient
``A3PO_*`` variables of earlier versions are refused in one line. Use the entry point::

    python -m engine.integrations.verl_main algorithm.adv_estimator=grpo \\
        actor_rollout_ref.model.path=Qwen/Qwen2.5-Math-7B ... \\
        a3po.config=configs/demo.yaml a3po.algorithm.alpha_pos=2 a3po.store=runs

It sets ``VERL_USE_EXTERNAL_MODULES=engine.integrations.verl`` for the workers (which imports this
module there and registers the loss) and ``actor_rollout_ref.actor.policy_loss.loss_mode=a3po``.

The decay needs the training step, and verl 0.9.1 does not give it to the loss: the policy loss is
called as ``fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
rollout_is_weights)`` once per micro-batch (``verl.workers.utils.losses.ppo_loss``), ``config`` is
the ``ActorConfig`` (no step in it), and the batch the trainer sends to ``update_actor`` carries no
``global_steps`` either. The one place a worker is told the true step is
``ActorRolloutRefWorker.update_weights(global_steps=...)``: both trainers (``RayPPOTrainer.fit`` and
the v1 trainers) call it right after loading a checkpoint (with the resumed step) and after every
actor update (with the step just finished), on the very workers that compute the loss. So this
module wraps that one method: the wrapper records ``global_steps`` and calls verl's method unchanged
(its dispatch attributes are kept). The wrap is installed when ``verl.workers.engine_workers`` is
imported (an import hook, so nothing heavy is imported here). The step the loss uses is therefore
the number of finished training steps: right across micro-batches, mini-batches and epochs, and
right after a resume. The driver's store writer (``verl_main``) shapes with the same clock
(verl's ``global_steps - 1`` during step ``global_steps``). If no step was recorded (another worker
class), the loss warns once and uses step 0.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import inspect
import logging
import sys

from verl.trainer.ppo.core_algos import get_policy_loss_fn, register_policy_loss

from engine.integrations.verl_records import resolved_from_env, shape

log = logging.getLogger(__name__)

LOSS_NAME = "a3po"
WORKER_MODULE = "verl.workers.engine_workers"
WORKER_CLASS = "ActorRolloutRefWorker"

# global_step: finished training steps, recorded from update_weights (None until the first call).
_state = {"global_step": None, "warned": False}


def record_global_step(global_steps) -> None:
    """Remember the trainer's step (finished steps); ``None`` (a weight sync outside the loop) is ignored."""
    if global_steps is not None:
        _state["global_step"] = int(global_steps)


def current_step() -> int:
    """The step the decay uses: the recorded trainer step (finished steps), else 0 with a warning."""
    if _state["global_step"] is not None:
        return _state["global_step"]
    if not _state["warned"]:
        _state["warned"] = True
        log.warning("A3PO: no trainer step recorded in this worker (update_weights not seen); the decay uses step 0")
    return 0


def wrap_update_weights(cls) -> bool:
    """Wrap ``cls.update_weights`` so each call records its ``global_steps``; True if it was wrapped.

    verl's own method runs unchanged; ``functools.wraps`` keeps its ``@register`` dispatch
    attributes, name and signature, so the worker group binds it as before.
    """
    orig = cls.__dict__.get("update_weights")
    if orig is None or getattr(orig, "_a3po_records_step", False):
        return False
    sig = inspect.signature(orig)

    def _record(args, kwargs):
        try:
            record_global_step(sig.bind(None, *args, **kwargs).arguments.get("global_steps"))
        except TypeError:  # a call verl itself will reject; let it
            pass

    if inspect.iscoroutinefunction(orig):

        @functools.wraps(orig)
        async def update_weights(self, *args, **kwargs):
            _record(args, kwargs)
            return await orig(self, *args, **kwargs)
    else:

        @functools.wraps(orig)
        def update_weights(self, *args, **kwargs):
            _record(args, kwargs)
            return orig(self, *args, **kwargs)

    update_weights._a3po_records_step = True
    cls.update_weights = update_weights
    return True


def _patch_module(module) -> None:
    cls = getattr(module, WORKER_CLASS, None)
    if cls is None or not wrap_update_weights(cls):
        log.warning("A3PO: %s.%s.update_weights not found; the decay stays at step 0", module.__name__, WORKER_CLASS)


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Runs ``patch(module)`` right after ``name`` is first imported (the module itself is untouched)."""

    def __init__(self, name: str, patch):
        self.name, self.patch, self._busy = name, patch, False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module, patch = spec.loader.exec_module, self.patch

        def exec_then_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_then_patch
        return spec


def install_step_hook(module_name: str = WORKER_MODULE, patch=_patch_module) -> None:
    """Wrap the worker's update_weights now if its module is loaded, else as soon as it is imported."""
    if module_name in sys.modules:
        patch(sys.modules[module_name])
    elif not any(isinstance(f, _PatchAfterImport) and f.name == module_name for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport(module_name, patch))


def a3po_loss(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="token-mean",
    config=None,
    rollout_is_weights=None,
):
    """verl policy loss ``a3po``: the run's resolved algorithm shapes the advantages, verl's ``vanilla`` does the rest."""
    s = shape(resolved_from_env(), advantages, response_mask, old_log_prob, current_step())
    loss, metrics = get_policy_loss_fn("vanilla")(
        old_log_prob, log_prob, s.adv.to(advantages.dtype), response_mask, loss_agg_mode, config, rollout_is_weights
    )
    m = response_mask.bool()
    metrics["a3po/key_frac"] = float(s.key_mask[m].float().mean()) if m.any() else 0.0
    metrics["a3po/alpha_pos"], metrics["a3po/alpha_neg"] = s.alpha_pos, s.alpha_neg
    if _state["global_step"] is not None:
        metrics["a3po/step"] = float(_state["global_step"])
    return loss, metrics


register_policy_loss(LOSS_NAME)(a3po_loss)
install_step_hook()
