"""A3PO for verl: the paper's shaping rules as named policy losses in verl's registry.

Why a policy loss: verl's advantage estimators run on the driver without log-probs, so token
selection cannot happen there; the policy loss runs in the actor workers and receives
``old_log_prob``, ``log_prob``, ``advantages`` (B, T) and ``response_mask``. We shape the advantages
with the engine's own functions (polarity = sign of the GRPO advantage, which for 0/1 rewards is the
verifier's verdict in mixed groups) and delegate the clipped surrogate and its aggregation to verl's
own ``vanilla`` loss, so every verl option (clip-higher, dual clip, loss_agg_mode, global token
normalisation) still applies.

Load it in every Ray worker with verl's external-modules mechanism, pick the loss, and set the
coefficients through the environment. Ray does not copy the launching shell's environment to
workers on other nodes, so pass every name in ``FORWARDED`` through
``ray_kwargs.ray_init.runtime_env.env_vars`` as a string (Hydra reads ``2`` as an int, which Ray
rejects; write ``"'2'"``)::

    export VERL_USE_EXTERNAL_MODULES=engine.integrations.verl
    export A3PO_ALPHA_POS=2 A3PO_ALPHA_NEG=2 A3PO_RATIO=0.2 A3PO_DECAY=linear A3PO_TOTAL_STEPS=500
    python -m engine.integrations.verl      # checks the A3PO_* values, one error line if one is wrong
    python -m verl.trainer.main_ppo algorithm.adv_estimator=grpo \\
        actor_rollout_ref.actor.policy_loss.loss_mode=a3po \\
        +ray_kwargs.ray_init.runtime_env.env_vars.A3PO_ALPHA_POS="'2'" ...

Registered names: ``a3po``, ``a3po_static`` (no decay), ``psr``, ``nsr``, ``p2n1``, and
``token_weighted`` (rules from ``A3PO_TOKEN_RULES`` as JSON, prob-based only: the loss has no
entropies). The A3PO_* values are checked by the engine's own config checks
(``engine.config.config_from_dict``), so a bad value fails in one line naming the variable.

The decay needs the training step, and verl 0.9.1 does not give it to the loss: the policy loss is
called as ``fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
rollout_is_weights)`` once per micro-batch (``verl.workers.utils.losses.ppo_loss``), ``config`` is
the ``ActorConfig`` (no step in it), and the batch the trainer sends to ``update_actor`` carries no
``global_steps`` either (the legacy trainer puts it on the generation batch only). The one place a
worker is told the true step is ``ActorRolloutRefWorker.update_weights(global_steps=...)``: both
trainers (``RayPPOTrainer.fit`` and the v1 trainers) call it right after loading a checkpoint
(with the resumed step) and after every actor update (with the step just finished), on the very
workers that compute the loss. So this module wraps that one method, at the narrowest seam there
is: the wrapper records ``global_steps`` and calls verl's method unchanged (its dispatch attributes
are kept). The wrap is installed when ``verl.workers.engine_workers`` is imported (an import hook,
so nothing heavy is imported here). The step the loss uses is therefore the number of finished
training steps: right across micro-batches, mini-batches and epochs, and right after a resume.

Fallback (another worker class, a verl without that method): until a step has been recorded, the
step is ``loss calls // A3PO_CALLS_PER_STEP`` in this worker (set it to ppo_epochs x micro-batches
per worker and step). That count restarts at 0 on resume; ``a3po_static`` needs no step at all.
See examples/verl_a3po_multinode.sh for a multi-node launch, and ``log_verl_batch`` for the store.
"""

from __future__ import annotations

import difflib
import functools
import importlib.abc
import importlib.util
import inspect
import json
import logging
import os
import sys

import numpy as np
import torch
from verl.trainer.ppo.core_algos import get_policy_loss_fn, register_policy_loss

from engine.advantage import TokenRule, a3po_rules, polarity_weighting, token_shaping
from engine.algorithms import ALGORITHMS
from engine.config import ConfigError, config_from_dict
from engine.store import step_tables

log = logging.getLogger(__name__)

# Environment variable -> engine config key (algorithm.<key>), checked by the engine's own rules.
ENV_KEYS = {
    "A3PO_RATIO": "ratio",
    "A3PO_ALPHA_POS": "alpha_pos",
    "A3PO_ALPHA_NEG": "alpha_neg",
    "A3PO_DECAY": "decay",
    "A3PO_DECAY_RATE": "decay_rate",
    "A3PO_TOTAL_STEPS": "decay_steps",
    "A3PO_TOKEN_RULES": "token_rules",
}
CALLS_PER_STEP = "A3PO_CALLS_PER_STEP"
# Every variable the losses read: a launcher must forward all of these to the Ray workers.
FORWARDED = (*ENV_KEYS, CALLS_PER_STEP)
DEFAULT_TOTAL_STEPS = 1000

WORKER_MODULE = "verl.workers.engine_workers"
WORKER_CLASS = "ActorRolloutRefWorker"

# global_step: finished training steps, recorded from update_weights (None until the first call);
# calls: loss calls in this process, only for the fallback.
_state = {"global_step": None, "calls": 0, "warned": False}
_settings_cache: dict = {}


def settings(environ=None) -> dict:
    """The A3PO_* values, checked; raises ConfigError naming the variable (one line) on a bad value."""
    environ = os.environ if environ is None else environ
    raw = {k: environ[k] for k in (*FORWARDED, *(k for k in environ if k.startswith("A3PO_"))) if k in environ}
    key = tuple(sorted(raw.items()))
    if key not in _settings_cache:
        _settings_cache[key] = _check(raw)
    return _settings_cache[key]


def _check(raw: dict) -> dict:
    for name in raw:
        if name not in FORWARDED:
            close = difflib.get_close_matches(name, FORWARDED, n=1)
            hint = f"did you mean {close[0]}?" if close else f"the known ones are {', '.join(FORWARDED)}"
            raise ConfigError(f"unknown environment variable {name} — {hint}")
    algo = {ENV_KEYS[k]: v for k, v in raw.items() if k in ENV_KEYS and k != "A3PO_TOKEN_RULES"}
    if "A3PO_TOKEN_RULES" in raw:
        try:
            algo["token_rules"] = json.loads(raw["A3PO_TOKEN_RULES"])
        except json.JSONDecodeError:
            raise ConfigError(
                "A3PO_TOKEN_RULES is not JSON — write a list such as "
                '[{"polarity": "positive", "metric": "prob", "end": "low", "ratio": 0.2, "scale": 2}]'
            ) from None
    try:
        a = config_from_dict({"algorithm": algo}).algorithm
    except ConfigError as e:
        msg = str(e)
        for env, k in ENV_KEYS.items():
            msg = msg.replace(f"config key 'algorithm.{k}", f"environment variable '{env}").replace(
                f"'algorithm.{k}'", env
            )
        raise ConfigError(msg) from None
    calls = raw.get(CALLS_PER_STEP, "1")
    if not calls.strip().isdigit() or int(calls) < 1:
        raise ConfigError(
            f"environment variable {CALLS_PER_STEP} must be a whole number >= 1, got {calls!r} — "
            "set it to ppo_epochs x micro-batches per worker and step"
        )
    return {
        "ratio": a.ratio,
        "alpha_pos": a.alpha_pos,
        "alpha_neg": a.alpha_neg,
        "decay": a.decay,
        "rate": a.decay_rate,
        "total": a.decay_steps or DEFAULT_TOTAL_STEPS,
        "calls_per_step": int(calls),
        "token_rules": [TokenRule(**r) for r in a.token_rules],
    }


def record_global_step(global_steps) -> None:
    """Remember the trainer's step (finished steps); ``None`` (a weight sync outside the loop) is ignored."""
    if global_steps is not None:
        _state["global_step"] = int(global_steps)


def current_step(calls_per_step: int) -> int:
    """The step the decay uses: the recorded trainer step, else the per-worker call count fallback."""
    if _state["global_step"] is not None:
        return _state["global_step"]
    if not _state["warned"]:
        _state["warned"] = True
        log.warning(
            "A3PO: no trainer step recorded in this worker (update_weights not seen); the decay counts "
            "loss calls // %s=%d, which restarts on resume",
            CALLS_PER_STEP,
            calls_per_step,
        )
    return _state["calls"] // calls_per_step


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
        log.warning(
            "A3PO: %s.%s.update_weights not found; the decay falls back to %s",
            module.__name__,
            WORKER_CLASS,
            CALLS_PER_STEP,
        )


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


def polarity_from_advantages(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` in {+1, -1, 0}: the sign of each response's (broadcast) advantage."""
    m = response_mask.to(advantages.dtype)
    seq = (advantages * m).sum(-1) / m.sum(-1).clamp(min=1)
    return torch.sign(seq).long()


def shape_for_verl(
    mode: str, old_log_prob, advantages, response_mask, step: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shaped ``(B, T)`` advantages and key mask for a registered mode (used by the losses and tests)."""
    s = settings()
    pol = polarity_from_advantages(advantages, response_mask)
    if step is None:
        step = current_step(s["calls_per_step"])
    adv = advantages
    rules: list[TokenRule] = []
    if mode in ("a3po", "a3po_static"):
        rules = a3po_rules(
            step,
            s["total"],
            ratio=s["ratio"],
            alpha_pos=s["alpha_pos"],
            alpha_neg=s["alpha_neg"],
            decay="constant" if mode == "a3po_static" else s["decay"],
            rate=s["rate"],
        )
    elif mode in ("psr", "nsr"):  # the engine registry's fixed polarity weights
        w_pos, w_neg = ALGORITHMS[mode].polarity_weights
        adv = polarity_weighting(adv, pol, w_pos=w_pos, w_neg=w_neg)
    elif mode == "p2n1":
        adv = polarity_weighting(adv, pol, w_pos=2.0, w_neg=1.0)
    elif mode == "token_weighted":
        rules = s["token_rules"]
        if any(r.metric != "prob" for r in rules):
            raise ConfigError("A3PO_TOKEN_RULES: verl's policy loss receives no entropies — use metric 'prob' only")
    return token_shaping(adv, response_mask, pol, rules, logprobs=old_log_prob)


def _make(mode: str):
    def loss_fn(
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode="token-mean",
        config=None,
        rollout_is_weights=None,
    ):
        shaped, key = shape_for_verl(mode, old_log_prob, advantages, response_mask)
        _state["calls"] += 1
        loss, metrics = get_policy_loss_fn("vanilla")(
            old_log_prob, log_prob, shaped, response_mask, loss_agg_mode, config, rollout_is_weights
        )
        m = response_mask.bool()
        metrics["a3po/key_frac"] = float(key[m].float().mean()) if m.any() else 0.0
        if _state["global_step"] is not None:
            metrics["a3po/step"] = float(_state["global_step"])
        return loss, metrics

    loss_fn.__name__ = f"a3po_lab_{mode}"
    return loss_fn


LOSSES = {
    mode: register_policy_loss(mode)(_make(mode))
    for mode in ("a3po", "a3po_static", "psr", "nsr", "p2n1", "token_weighted")
}
install_step_hook()


def log_verl_batch(store, run_id: str, step: int, batch, tokenizer, mode: str = "a3po") -> int:
    """Write a verl ``DataProto`` batch (after advantages, with old log-probs) as one store step.

    Reads ``responses``, ``response_mask``, ``old_log_probs``, ``advantages``, ``token_level_scores``
    and, when the actor computed it, ``entropys``. Call it from a trainer subclass or hook on the
    driver after ``compute_advantage``. Returns the number of token rows written.
    """
    t = batch.batch
    ids, mask = t["responses"].cpu(), t["response_mask"].cpu().bool()
    old, adv = t["old_log_probs"].float().cpu(), t["advantages"].float().cpu()
    shaped, key = shape_for_verl(mode, old, adv, mask.long(), step=step)
    ent = t["entropys"].float().cpu() if "entropys" in t.keys() else torch.full_like(old, float("nan"))
    scores = (
        t["token_level_scores"].float().cpu().sum(-1) if "token_level_scores" in t.keys() else torch.zeros(len(ids))
    )
    pol = polarity_from_advantages(adv, mask.long())
    B = ids.shape[0]
    uid = batch.non_tensor_batch.get("uid", np.arange(B)) if hasattr(batch, "non_tensor_batch") else np.arange(B)
    groups = {u: i for i, u in enumerate(dict.fromkeys(list(uid)))}
    tables = step_tables(
        run_id,
        step,
        mask=mask,
        token_ids=ids,
        logprob=old,
        entropy=ent,
        adv_tokens_raw=adv,
        adv_shaped=shaped,
        is_key=key,
        polarity=pol,
        token_text=lambda tid: [tokenizer.decode([i]) for i in tid.tolist()],
        rollouts={
            "group_idx": np.array([groups[u] for u in uid], np.int32),
            "prompt_idx": np.arange(B, dtype=np.int64),
            "prompt": [""] * B,
            "response": tokenizer.batch_decode([r[m] for r, m in zip(ids, mask)], skip_special_tokens=True),
            "answer": [""] * B,
            "reward": scores.numpy().astype(np.float32),
            "correct": (scores > 0).numpy(),
            "truncated": np.zeros(B, bool),
            "adv_raw": ((adv * mask).sum(1) / mask.sum(1).clamp(min=1)).numpy().astype(np.float32),
        },
    )
    store.write_step(run_id, step, tables)
    return tables["tokens"].num_rows


def main() -> int:
    """``python -m engine.integrations.verl``: check the A3PO_* variables before a launch (exit 2, one line, if bad)."""
    try:
        s = settings()
    except ConfigError as e:
        print(f"a3po: error: {e}", file=sys.stderr)
        return 2
    print("A3PO settings ok: " + ", ".join(f"{k}={v}" for k, v in s.items() if k != "token_rules"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
