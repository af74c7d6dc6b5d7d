"""Replay a shaping rule on stored rollouts, without training.

Why: before relaunching a run with other coefficients, see which tokens would become key tokens
and how much advantage each polarity would get, on real stored rollouts. This is the engine's own
``shape_advantages`` applied to tensors rebuilt from the store's ``rollouts`` and ``tokens`` rows.

    from engine.replay import load_step, replay
    batch = load_step(Store("runs"), run_id, step)
    shaped = replay(batch, cfg.algorithm, step=step, total_steps=200)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from engine.algorithms import ALGORITHMS, Shaped, shape_advantages


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
    return StoredBatch(ro.rollout_idx.to_numpy(), torch.tensor(ro.reward.to_numpy(), dtype=torch.float32),
                       ro.group_idx.tolist(), torch.tensor(ro.polarity.to_numpy(), dtype=torch.int8), mask,
                       grid("logprob"), grid("entropy"), grid("adv_shaped"), grid("is_key", torch.bool, False))


def load_step(store, run_id: str, step: int) -> StoredBatch:
    ro = store.query("select * from rollouts where run_id = ? and step = ?", [run_id, step], run_ids=[run_id])
    tok = store.query("select rollout_idx, position, logprob, entropy, adv_shaped, is_key from tokens "
                      "where run_id = ? and step = ?", [run_id, step], run_ids=[run_id])
    if not len(ro) or not len(tok):
        raise ValueError(f"run {run_id} has no stored rollouts/tokens at step {step}")
    return to_batch(ro, tok)


def replay(batch: StoredBatch, acfg, *, step: int, total_steps: int) -> Shaped:
    """Shape the stored batch with algorithm ``acfg.name`` and its coefficients."""
    return shape_advantages(ALGORITHMS[acfg.name], acfg, scores=batch.scores, group_ids=batch.group_ids,
                            polarity=batch.polarity, response_mask=batch.mask, logprobs=batch.logprobs,
                            entropy=batch.entropy, step=step, total_steps=total_steps)
