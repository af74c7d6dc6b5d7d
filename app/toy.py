"""The one-step toy of Polarity 101: a softmax over a few candidate tokens and one policy-gradient step.

For logits ``z`` and sampled token ``a`` with advantage ``A``, the REINFORCE gradient of
``A * log softmax(z)[a]`` w.r.t. ``z`` is ``A * (onehot(a) - p)``; one ascent step with learning rate
``lr`` gives ``z' = z + lr * A * (onehot(a) - p)``.
"""

from __future__ import annotations

import numpy as np


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def pg_step(logits: np.ndarray, sampled: int, advantage: float, lr: float = 1.0) -> np.ndarray:
    """Logits after one policy-gradient step on the sampled token with the given (signed) advantage."""
    p = softmax(np.asarray(logits, dtype=float))
    onehot = np.zeros_like(p)
    onehot[sampled] = 1.0
    return np.asarray(logits, dtype=float) + lr * advantage * (onehot - p)
