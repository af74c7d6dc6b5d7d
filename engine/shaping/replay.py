"""Replay a shaping rule on stored rollouts, without training.

Why: before relaunching a run with other coefficients, see which tokens would become key tokens
and how much advantage each polarity would get, on real stored rollouts. This is the engine's own
``shape_advantages`` (the trainer's own shaping) applied to tensors rebuilt from the store's ``rollouts`` and ``tokens`` rows.

    from engine.shaping.replay import load_step, replay
    batch = load_step(Store("runs"), run_id, step)
    shaped = replay(batch, resolve(cfg), step=step - 1)
    batch_push(batch, shaped)    # how much that rule can move the policy, by polarity

Gradient push (see ``engine.shaping.advantage.gradient_push``): ``Σ |Δadv| · (1 − p)`` over valid tokens, by
polarity. ``step_push`` gives it per stored step for the Runs page, ``batch_push`` for one replayed
step in the playground; both use the same formula on the same stored rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from engine.shaping.advantage import gradient_push
from engine.shaping.algorithms import ResolvedAlgorithm, Shaped, shape_advantages

# Per-step push columns of the ``steps`` table (written by the trainer; older runs lack them).
PUSH_COLUMNS = ("push_rule_pos", "push_rule_neg", "push_raw_pos", "push_raw_neg")


@dataclass
class StoredBatch:
    """One stored step as padded tensors; row b is rollout ``rollout_idx[b]``."""

    rollout_idx: np.ndarray  # (B,)
    scores: torch.Tensor  # (B,)
    group_ids: list  # (B,)
    polarity: torch.Tensor  # (B,) int8
    mask: torch.Tensor  # (B, T)
    logprobs: torch.Tensor  # (B, T)
    entropy: torch.Tensor  # (B, T)
    stored_adv: torch.Tensor  # (B, T) shaped advantage the run used
    stored_key: torch.Tensor  # (B, T) bool
    stored_adv_raw: torch.Tensor | None = None  # (B, T) raw (unshaped) advantage the run stored


def to_batch(rollouts: pd.DataFrame, tokens: pd.DataFrame) -> StoredBatch:
    ro = rollouts.sort_values("rollout_idx").reset_index(drop=True)
    row_of = {int(r): i for i, r in enumerate(ro.rollout_idx)}
    B = len(ro)
    T = int(tokens.position.max()) + 1 if len(tokens) else 1
    b = torch.as_tensor(tokens.rollout_idx.map(row_of).to_numpy(dtype=np.int64, copy=True))
    p = torch.as_tensor(tokens.position.to_numpy(dtype=np.int64, copy=True))

    def grid(col, dtype=torch.float32, fill=0.0):
        out = torch.full((B, T), fill, dtype=dtype)
        out[b, p] = torch.as_tensor(tokens[col].to_numpy(copy=True)).to(dtype)
        return out

    mask = torch.zeros((B, T), dtype=torch.long)
    mask[b, p] = 1
    return StoredBatch(
        ro.rollout_idx.to_numpy(),
        torch.tensor(ro.reward.to_numpy(), dtype=torch.float32),
        ro.group_idx.tolist(),
        torch.tensor(ro.polarity.to_numpy(), dtype=torch.int8),
        mask,
        grid("logprob"),
        grid("entropy"),
        grid("adv_shaped"),
        grid("is_key", torch.bool, False),
        grid("adv_raw") if "adv_raw" in tokens else None,
    )


def load_step(store, run_id: str, step: int) -> StoredBatch:
    ro = store.query("select * from rollouts where run_id = ? and step = ?", [run_id, step], run_ids=[run_id])
    tok = store.query(
        "select rollout_idx, position, logprob, entropy, adv_raw, adv_shaped, is_key from tokens "
        "where run_id = ? and step = ?",
        [run_id, step],
        run_ids=[run_id],
    )
    if not len(ro) or not len(tok):
        raise ValueError(f"run {run_id} has no stored rollouts/tokens at step {step}")
    return to_batch(ro, tok)


def replay(batch: StoredBatch, resolved: ResolvedAlgorithm, *, step: int) -> Shaped:
    """Shape the stored batch with ``resolved`` (``engine.shaping.algorithms.resolve(cfg)``), as training would.

    ``step`` counts finished training steps, as in the trainer: stored step ``s`` was shaped at ``s - 1``."""
    return shape_advantages(
        resolved,
        scores=batch.scores,
        group_ids=batch.group_ids,
        polarity=batch.polarity,
        response_mask=batch.mask,
        logprobs=batch.logprobs,
        entropy=batch.entropy,
        step=step,
    )


def batch_push(batch: StoredBatch, shaped: Shaped | None = None) -> dict[str, dict[str, float]]:
    """Gradient push by polarity of one step's shaping.

    With ``shaped`` (a ``replay`` result): the push of that rule, ``Σ|shaped.adv − shaped.adv_tokens_raw|·(1 − p)``;
    without: the push of the rule the run used, from the stored raw and shaped advantages.
    Returns ``{"rule": {"positive", "negative"}, "raw": {"positive", "negative"}}``; ``raw`` is the push
    of the unshaped advantage itself (``Σ|adv_raw|·(1 − p)``), for scale.
    """
    if shaped is not None:
        frm, to = shaped.adv_tokens_raw, shaped.adv
    else:
        if batch.stored_adv_raw is None:
            raise ValueError("this batch was built without the stored adv_raw column")
        frm, to = batch.stored_adv_raw, batch.stored_adv
    lp, m, pol = batch.logprobs.to(frm.device), batch.mask.to(frm.device), batch.polarity
    return {"rule": gradient_push(frm, to, lp, m, pol), "raw": gradient_push(torch.zeros_like(frm), frm, lp, m, pol)}


_PUSH_FROM_TOKENS = """
select run_id, step,
  sum(case when polarity = 1 then abs(adv_shaped::double - adv_raw::double) * greatest(1 - exp(logprob::double), 0) else 0 end) as push_rule_pos,
  sum(case when polarity = -1 then abs(adv_shaped::double - adv_raw::double) * greatest(1 - exp(logprob::double), 0) else 0 end) as push_rule_neg,
  sum(case when polarity = 1 then abs(adv_raw::double) * greatest(1 - exp(logprob::double), 0) else 0 end) as push_raw_pos,
  sum(case when polarity = -1 then abs(adv_raw::double) * greatest(1 - exp(logprob::double), 0) else 0 end) as push_raw_neg
from tokens where list_contains(?, run_id) group by run_id, step order by run_id, step
"""


def push_from_tokens(store, run_ids: list[str]) -> pd.DataFrame:
    """``run_id, step`` and the ``PUSH_COLUMNS`` recomputed from the stored token rows of ``run_ids``."""
    run_ids = list(run_ids)
    return store.query(_PUSH_FROM_TOKENS, [run_ids], run_ids=run_ids)


def step_push(store, run_ids: list[str], steps: pd.DataFrame | None = None) -> pd.DataFrame:
    """Gradient push per stored step: ``run_id, step, push_rule_pos, push_rule_neg, push_raw_pos,
    push_raw_neg, source``.

    ``source`` is ``"recorded"`` where the trainer stored the columns in ``steps``, ``"from tokens"``
    where they are recomputed from the stored token rows (older runs; the same formula as
    ``engine.shaping.advantage.gradient_push``). A run with neither (no push columns, tokens not stored) has no
    rows: callers say "not recorded for this run". ``steps``: the runs' ``steps`` rows if already read.
    """
    run_ids = list(run_ids)
    cols = ["run_id", "step", *PUSH_COLUMNS, "source"]
    if not run_ids:
        return pd.DataFrame(columns=cols)
    if steps is None:
        steps = store.query("select * from steps where list_contains(?, run_id)", [run_ids], run_ids=run_ids)
    parts = []
    if len(steps) and all(c in steps for c in PUSH_COLUMNS):
        rec = steps[["run_id", "step", *PUSH_COLUMNS]].dropna(subset=list(PUSH_COLUMNS), how="all")
        parts.append(rec.assign(source="recorded"))
    have = set(parts[0].run_id) if parts else set()
    missing = [r for r in run_ids if r not in have]
    if missing:
        tok = push_from_tokens(store, missing)
        if len(tok):
            parts.append(tok.assign(source="from tokens"))
    if not parts:
        return pd.DataFrame(columns=cols)
    out = pd.concat(parts, ignore_index=True)[cols]
    out["step"] = out.step.astype(int)
    for c in PUSH_COLUMNS:
        out[c] = out[c].astype(float)
    return out.sort_values(["run_id", "step"]).reset_index(drop=True)
