"""Advantages: group normalisation, sample-level polarity weights, token-level shaping, A3PO.

Every function here is pure (no module state, no in-place edits of its inputs) so that the trainer,
the app's shaping playground and the verl/TRL integrations call the very same code.

Shapes: ``B`` responses in a batch, ``T`` padded response length. ``polarity`` is an int tensor
``(B,)`` in {+1 correct, -1 incorrect, 0 neither}.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass

import torch

POSITIVE, NEGATIVE, NEUTRAL = 1, -1, 0


# --------------------------------------------------------------------------------------------
# Sample level
# --------------------------------------------------------------------------------------------
def _group_index(group_ids, n: int) -> torch.Tensor:
    """Map arbitrary hashable group ids (or a tensor) to dense ints ``(B,)``, first seen = 0."""
    if isinstance(group_ids, torch.Tensor):
        keys = group_ids.reshape(-1).tolist()
    else:
        keys = list(group_ids)
    if len(keys) != n:
        raise ValueError(f"group_ids has {len(keys)} entries for {n} scores")
    seen: dict[Hashable, int] = {}
    return torch.tensor([seen.setdefault(k, len(seen)) for k in keys], dtype=torch.long)


def group_advantages(scores: torch.Tensor, group_ids, *, eps: float = 1e-6, std_normalize: bool = True) -> torch.Tensor:
    """GRPO group-relative advantage, one value per response.

    ``A_i = (s_i - mean_g) / (std_g + eps)`` with the unbiased (n-1) std of the response's group g;
    without ``std_normalize`` (Dr. GRPO) ``A_i = s_i - mean_g``. A group of one response uses mean 0
    and std 1, as verl does. A group whose scores are all equal gets exactly 0 (no signal).

    Args:
        scores: ``(B,)`` float rewards.
        group_ids: ``(B,)`` tensor or sequence of hashables (e.g. prompt uids).
    Returns:
        ``(B,)`` advantages, float32 (or the scores' floating dtype).
    """
    scores = torch.as_tensor(scores)
    out_dtype = scores.dtype if scores.is_floating_point() else torch.float32
    s = scores.reshape(-1).double()
    B = s.shape[0]
    idx = _group_index(group_ids, B).to(s.device)
    G = int(idx.max().item()) + 1 if B else 0
    count = torch.zeros(G, dtype=torch.float64, device=s.device).index_add_(0, idx, torch.ones_like(s))
    total = torch.zeros(G, dtype=torch.float64, device=s.device).index_add_(0, idx, s)
    mean = total / count
    sq = torch.zeros(G, dtype=torch.float64, device=s.device).index_add_(0, idx, (s - mean[idx]) ** 2)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    single = count == 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    gmax = torch.full((G,), -math.inf, dtype=torch.float64, device=s.device).scatter_reduce(0, idx, s, "amax")
    gmin = torch.full((G,), math.inf, dtype=torch.float64, device=s.device).scatter_reduce(0, idx, s, "amin")
    flat = (gmax == gmin) & ~single
    adv = s - mean[idx]
    if std_normalize:
        adv = adv / (std[idx] + eps)
    adv = torch.where(flat[idx], torch.zeros_like(adv), adv)
    return adv.to(out_dtype).reshape(scores.shape)


def polarity_weighting(adv: torch.Tensor, polarity: torch.Tensor, *, w_pos: float, w_neg: float) -> torch.Tensor:
    """Scale whole responses by their polarity: correct rows × ``w_pos``, incorrect × ``w_neg``.

    PSR-only is ``(1, 0)``, NSR-only ``(0, 1)``, the paper's "P2N1" ``(2, 1)``. Rows of polarity 0 are
    returned unchanged. Only the ratio ``w_pos / w_neg`` changes the direction of the update; the
    overall size interacts with the learning rate (Tang et al. 2025, sample-level study).

    Args:
        adv: ``(B,)`` or ``(B, T)``.
        polarity: ``(B,)`` ints in {+1, -1, 0}.
    """
    pol = torch.as_tensor(polarity, device=adv.device).reshape(-1)
    if pol.shape[0] != adv.shape[0]:
        raise ValueError(f"polarity has {pol.shape[0]} rows, advantages {adv.shape[0]}")
    w = torch.ones(pol.shape, dtype=adv.dtype, device=adv.device)
    w = torch.where(pol == POSITIVE, torch.full_like(w, float(w_pos)), w)
    w = torch.where(pol == NEGATIVE, torch.full_like(w, float(w_neg)), w)
    return adv * w.reshape((-1,) + (1,) * (adv.dim() - 1))


def w_reinforce_advantages(polarity: torch.Tensor, lam: float = 0.1) -> torch.Tensor:
    """W-REINFORCE (Zhu et al. 2025): ``+lam`` for correct, ``-1`` for incorrect, 0 otherwise.

    No group normalisation: every response carries signal, also in all-correct/all-wrong groups.
    Recommended ``lam = 0.1``. Returns ``(B,)`` float32.
    """
    pol = torch.as_tensor(polarity).reshape(-1)
    out = torch.zeros(pol.shape, dtype=torch.float32, device=pol.device)
    out = torch.where(pol == POSITIVE, torch.full_like(out, float(lam)), out)
    return torch.where(pol == NEGATIVE, torch.full_like(out, -1.0), out)


# --------------------------------------------------------------------------------------------
# Token level
# --------------------------------------------------------------------------------------------
_POLARITY_NAMES = {"positive": POSITIVE, "negative": NEGATIVE}


@dataclass(frozen=True)
class TokenRule:
    """One token-level reweighting rule (Tang et al. 2025, Sec. token-level advantage shaping).

    In every response of ``polarity``, the ``ratio`` share of candidate tokens at the ``end`` of
    ``metric`` (token probability under the old policy, or its entropy) get advantage × ``scale``.
    """

    polarity: str  # "positive" | "negative"
    metric: str  # "prob" | "entropy"
    end: str  # "high" | "low"
    ratio: float = 0.2
    scale: float = 2.0

    def __post_init__(self):
        if self.polarity not in _POLARITY_NAMES:
            raise ValueError(f"TokenRule.polarity must be 'positive' or 'negative', got {self.polarity!r}")
        if self.metric not in ("prob", "entropy"):
            raise ValueError(f"TokenRule.metric must be 'prob' or 'entropy', got {self.metric!r}")
        if self.end not in ("high", "low"):
            raise ValueError(f"TokenRule.end must be 'high' or 'low', got {self.end!r}")
        if not (0.0 < float(self.ratio) <= 1.0):
            raise ValueError(f"TokenRule.ratio must be in (0, 1], got {self.ratio}")
        if not math.isfinite(float(self.scale)) or float(self.scale) < 0:
            raise ValueError(f"TokenRule.scale must be a finite number >= 0, got {self.scale}")

    def to_dict(self) -> dict:
        return asdict(self)


def select_tokens(metric: torch.Tensor, candidates: torch.Tensor, ratio: float, end: str) -> torch.Tensor:
    """Per row, pick the ``k = max(1, int(ratio * n))`` highest/lowest candidates.

    Args:
        metric: ``(B, T)`` float.
        candidates: ``(B, T)`` bool; ``n`` is its row sum. Rows with no candidate pick nothing.
    Returns:
        ``(B, T)`` bool. Ties are broken by position (earlier token first).
    """
    B, T = metric.shape
    if B == 0 or T == 0:
        return torch.zeros_like(candidates, dtype=torch.bool)
    high = end == "high"
    fill = -math.inf if high else math.inf
    metric = metric.double()
    m = torch.where(candidates, metric, torch.full_like(metric, fill))
    order = torch.sort(m, dim=-1, descending=high, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(T, device=m.device).expand(B, T))
    n = candidates.sum(-1)
    # int(ratio * n) with Python float semantics: float64 product, truncated toward zero.
    k = torch.floor(n.double() * float(ratio)).long().clamp(min=1)
    k = torch.where(n > 0, k, torch.zeros_like(k))
    return (rank < k.unsqueeze(-1)) & candidates


def token_shaping(
    adv: torch.Tensor,
    response_mask: torch.Tensor,
    polarity: torch.Tensor,
    rules: Sequence[TokenRule],
    *,
    logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply token-level rules to per-token advantages, separately per response.

    For every rule and every response of its polarity: the metric is ``exp(logprobs)`` (prob) or
    ``entropy`` on the valid tokens; candidates are valid tokens with a non-zero metric (a token with
    zero entropy has no gradient to shape, as in the authors' released code);
    ``k = max(1, int(ratio * n_candidates))`` of them at the chosen end get advantage × scale.
    All rules read the same unscaled metric; a token picked by two rules gets both scales.

    Args:
        adv: ``(B, T)`` advantages already broadcast over valid tokens.
        response_mask: ``(B, T)`` 1 for valid response tokens.
        polarity: ``(B,)`` ints in {+1, -1, 0}.
        rules: token rules; empty means no change.
        logprobs: ``(B, T)`` old-policy log-probs of the sampled tokens (needed by ``prob`` rules).
        entropy: ``(B, T)`` old-policy entropies (needed by ``entropy`` rules).
    Returns:
        ``(shaped (B, T), key_mask (B, T) bool)``; ``key_mask`` marks tokens any rule picked.
    """
    if adv.dim() != 2 or adv.shape != response_mask.shape:
        raise ValueError(
            f"token_shaping: adv {tuple(adv.shape)} and mask {tuple(response_mask.shape)} must both be (B, T)"
        )
    valid = response_mask.bool()
    pol = torch.as_tensor(polarity, device=adv.device).reshape(-1)
    scale = torch.ones_like(adv)
    key = torch.zeros_like(valid)
    for rule in rules:
        if rule.metric == "prob":
            if logprobs is None:
                raise ValueError("token_shaping: a 'prob' rule needs logprobs")
            metric = logprobs.detach().double().exp()  # float64: exp(-120) must stay non-zero
        else:
            if entropy is None:
                raise ValueError("token_shaping: an 'entropy' rule needs entropy")
            metric = entropy.detach().double()
        rows = (pol == _POLARITY_NAMES[rule.polarity]).unsqueeze(-1)
        cand = valid & rows & (metric != 0)
        picked = select_tokens(metric, cand, rule.ratio, rule.end)
        scale = torch.where(picked, scale * float(rule.scale), scale)
        key |= picked
    return adv * scale, key


def gradient_push(
    adv_from: torch.Tensor,
    adv_to: torch.Tensor,
    logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    polarity: torch.Tensor,
) -> dict[str, float]:
    """How much a change of advantages can move the policy, by polarity: ``Σ |adv_to − adv_from| · (1 − p)``.

    Why ``(1 − p)``: the gradient of ``log p(token)`` with respect to that token's own logit is
    ``1 − p``, so an advantage change on a near-certain token (p > 0.99) moves almost nothing. A token
    rule that only picks such tokens has a large ``Σ|Δadv|`` and a push near zero; this is the number
    that says whether a rule acts. With ``adv_from = 0`` it is the push of the advantages themselves.

    Args:
        adv_from, adv_to: ``(B, T)`` per-token advantages (e.g. raw and shaped).
        logprobs: ``(B, T)`` old-policy log-probs of the sampled tokens.
        response_mask: ``(B, T)`` 1 for valid tokens; polarity: ``(B,)`` in {+1, -1, 0}.
    Returns:
        ``{"positive": float, "negative": float}`` sums over valid tokens of each polarity's rows.
    """
    valid = response_mask.bool()
    w = (adv_to.double() - adv_from.double()).abs() * (1.0 - logprobs.detach().double().exp()).clamp(min=0.0)
    w = torch.where(valid, w, torch.zeros_like(w))
    pol = torch.as_tensor(polarity, device=w.device).reshape(-1)
    return {name: float(w[pol == code].sum()) for name, code in _POLARITY_NAMES.items()}


def fork_token_mask(entropy: torch.Tensor, response_mask: torch.Tensor, quantile: float = 0.2) -> torch.Tensor:
    """Top-``quantile`` highest-entropy valid tokens over the whole batch ("forking tokens").

    Wang et al. 2025, "Beyond the 80/20 rule": policy gradient only on the top 20% entropy tokens;
    threshold taken over all valid tokens of the batch (as TRL's ``top_entropy_quantile``).
    Args/Returns: ``(B, T)`` entropy and mask -> ``(B, T)`` bool.
    """
    valid = response_mask.bool()
    if not valid.any():
        return valid.clone()
    vals = entropy.detach().float()[valid]
    thr = torch.quantile(vals, 1.0 - float(quantile))
    return valid & (entropy.detach().float() >= thr)


# --------------------------------------------------------------------------------------------
# A3PO: asymmetric rules with a decaying scale
# --------------------------------------------------------------------------------------------
def _d_constant(x: float, rate: float) -> float:
    return 1.0


def _d_linear(x: float, rate: float) -> float:
    return 1.0 - x


def _d_cosine(x: float, rate: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * x))


def _d_exponential(x: float, rate: float) -> float:
    return math.exp(-rate * x)


DECAYS: dict[str, Callable[[float, float], float]] = {
    "constant": _d_constant,
    "linear": _d_linear,
    "cosine": _d_cosine,
    "exponential": _d_exponential,
}


def decay_alpha(alpha0: float, step: int, total_steps: int, decay: str = "linear", rate: float = 5.0) -> float:
    """``alpha(s) = 1 + (alpha0 - 1) * d(s / S)`` with ``s / S`` clipped to [0, 1].

    ``d`` is one of ``DECAYS``: constant 1; linear ``1 - x``; cosine ``(1 + cos(pi x)) / 2``;
    exponential ``exp(-rate * x)`` (rate 5 leaves 0.7% of the extra weight at the end).
    At ``s = 0`` every schedule gives ``alpha0``; linear and cosine reach exactly 1 at ``s = S``.
    """
    if decay not in DECAYS:
        raise ValueError(f"unknown decay {decay!r}; choose one of {sorted(DECAYS)}")
    x = 0.0 if total_steps <= 0 else min(1.0, max(0.0, step / total_steps))
    return 1.0 + (float(alpha0) - 1.0) * DECAYS[decay](x, rate)


def a3po_rules(
    step: int,
    total_steps: int,
    *,
    ratio: float = 0.2,
    alpha_pos: float = 2.0,
    alpha_neg: float = 2.0,
    decay: str = "linear",
    rate: float = 5.0,
) -> list[TokenRule]:
    """A3PO's two token rules at training step ``step``.

    Positive responses: the ``ratio`` lowest-probability tokens × alpha⁺(s) (rare correct steps are
    reinforced harder). Negative responses: the ``ratio`` highest-probability tokens × alpha⁻(s)
    (their advantage is negative, so confident mistakes are penalised harder). Both scales decay
    toward 1 over ``total_steps`` by ``decay``.
    """
    return [
        TokenRule("positive", "prob", "low", ratio, decay_alpha(alpha_pos, step, total_steps, decay, rate)),
        TokenRule("negative", "prob", "high", ratio, decay_alpha(alpha_neg, step, total_steps, decay, rate)),
    ]
