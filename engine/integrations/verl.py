"""A3PO for verl: the paper's shaping rules as named policy losses in verl's registry.

Why a policy loss: verl's advantage estimators run on the driver without log-probs, so token
selection cannot happen there; the policy loss runs in the actor workers and receives
``old_log_prob``, ``log_prob``, ``advantages`` (B, T) and ``response_mask``. We shape the advantages
with the engine's own functions (polarity = sign of the GRPO advantage, which for 0/1 rewards is the
verifier's verdict in mixed groups) and delegate the clipped surrogate and its aggregation to verl's
own ``vanilla`` loss, so every verl option (clip-higher, dual clip, loss_agg_mode, global token
normalisation) still applies.

Load it in every Ray worker with verl's external-modules mechanism, pick the loss, and set the
coefficients through the environment (Ray forwards ``runtime_env`` variables to workers)::

    export VERL_USE_EXTERNAL_MODULES=engine.integrations.verl
    export A3PO_ALPHA_POS=2 A3PO_ALPHA_NEG=2 A3PO_RATIO=0.2 A3PO_DECAY=linear A3PO_TOTAL_STEPS=500
    python -m verl.trainer.main_ppo algorithm.adv_estimator=grpo \\
        actor_rollout_ref.actor.policy_loss.loss_mode=a3po ...

Registered names: ``a3po``, ``a3po_static`` (no decay), ``psr``, ``nsr``, ``p2n1``, and
``token_weighted`` (rules from ``A3PO_TOKEN_RULES`` as JSON, prob-based only: the loss has no
entropies). The decay needs the training step, which verl does not pass to the loss: each worker
counts optimizer steps as ``calls // A3PO_CALLS_PER_STEP`` (set it to ppo_epochs x mini-batches x
micro-batches per step), or use ``a3po_static``.
See examples/verl_a3po_multinode.sh for a multi-node launch, and ``log_verl_batch`` for the store.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from verl.trainer.ppo.core_algos import get_policy_loss_fn, register_policy_loss

from engine.algorithms import ALGORITHMS
from engine.advantage import TokenRule, a3po_rules, polarity_weighting, token_shaping
from engine.store import step_tables

_calls = {"n": 0}


def _env(name: str, default):
    v = os.environ.get(name)
    return default if v is None else type(default)(v)


def polarity_from_advantages(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` in {+1, -1, 0}: the sign of each response's (broadcast) advantage."""
    m = response_mask.to(advantages.dtype)
    seq = (advantages * m).sum(-1) / m.sum(-1).clamp(min=1)
    return torch.sign(seq).long()


def shape_for_verl(mode: str, old_log_prob, advantages, response_mask, step: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Shaped ``(B, T)`` advantages and key mask for a registered mode (pure; used by the losses and tests)."""
    pol = polarity_from_advantages(advantages, response_mask)
    ratio = _env("A3PO_RATIO", 0.2)
    if step is None:
        step = _calls["n"] // max(1, _env("A3PO_CALLS_PER_STEP", 1))
    total = _env("A3PO_TOTAL_STEPS", 1000)
    adv = advantages
    rules: list[TokenRule] = []
    if mode in ("a3po", "a3po_static"):
        rules = a3po_rules(step, total, ratio=ratio, alpha_pos=_env("A3PO_ALPHA_POS", 2.0), alpha_neg=_env("A3PO_ALPHA_NEG", 2.0),
                           decay="constant" if mode == "a3po_static" else _env("A3PO_DECAY", "linear"))
    elif mode in ("psr", "nsr"):  # the engine registry's fixed polarity weights
        w_pos, w_neg = ALGORITHMS[mode].polarity_weights
        adv = polarity_weighting(adv, pol, w_pos=w_pos, w_neg=w_neg)
    elif mode == "p2n1":
        adv = polarity_weighting(adv, pol, w_pos=2.0, w_neg=1.0)
    elif mode == "token_weighted":
        rules = [TokenRule(**r) for r in json.loads(os.environ.get("A3PO_TOKEN_RULES", "[]"))]
        if any(r.metric != "prob" for r in rules):
            raise ValueError("verl's policy loss receives no entropies: token_weighted supports metric 'prob' only")
    return token_shaping(adv, response_mask, pol, rules, logprobs=old_log_prob)


def _make(mode: str):
    def loss_fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                rollout_is_weights=None):
        shaped, key = shape_for_verl(mode, old_log_prob, advantages, response_mask)
        _calls["n"] += 1
        loss, metrics = get_policy_loss_fn("vanilla")(old_log_prob, log_prob, shaped, response_mask, loss_agg_mode, config,
                                                      rollout_is_weights)
        m = response_mask.bool()
        metrics["a3po/key_frac"] = float(key[m].float().mean()) if m.any() else 0.0
        return loss, metrics

    loss_fn.__name__ = f"a3po_lab_{mode}"
    return loss_fn


LOSSES = {mode: register_policy_loss(mode)(_make(mode)) for mode in ("a3po", "a3po_static", "psr", "nsr", "p2n1", "token_weighted")}


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
    scores = t["token_level_scores"].float().cpu().sum(-1) if "token_level_scores" in t.keys() else torch.zeros(len(ids))
    pol = polarity_from_advantages(adv, mask.long())
    B = ids.shape[0]
    uid = batch.non_tensor_batch.get("uid", np.arange(B)) if hasattr(batch, "non_tensor_batch") else np.arange(B)
    groups = {u: i for i, u in enumerate(dict.fromkeys(list(uid)))}
    tables = step_tables(
        run_id, step, mask=mask, token_ids=ids, logprob=old, entropy=ent, adv_tokens_raw=adv, adv_shaped=shaped, is_key=key,
        polarity=pol, token_text=lambda tid: [tokenizer.decode([i]) for i in tid.tolist()],
        rollouts={"group_idx": np.array([groups[u] for u in uid], np.int32), "prompt_idx": np.arange(B, dtype=np.int64),
                  "prompt": [""] * B, "response": tokenizer.batch_decode([r[m] for r, m in zip(ids, mask)], skip_special_tokens=True),
                  "answer": [""] * B, "reward": scores.numpy().astype(np.float32), "correct": (scores > 0).numpy(),
                  "truncated": np.zeros(B, bool), "adv_raw": ((adv * mask).sum(1) / mask.sum(1).clamp(min=1)).numpy().astype(np.float32)})
    store.write_step(run_id, step, tables)
    return tables["tokens"].num_rows
