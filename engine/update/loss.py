"""Clipped policy-gradient surrogate, loss aggregation modes and KL penalties.

Names follow verl (``loss_agg_mode``, ``clip_ratio_low/high``, dual-clip ``clip_ratio_c``) so a
verl user reads the same numbers here.
"""

from __future__ import annotations

import torch

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask``; 0 when the mask is empty."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


def agg_weights(
    mask: torch.Tensor, mode: str = "token-mean", norm_len: float | None = None, dtype=torch.float32
) -> torch.Tensor:
    """Per-token weights ``(B, T)`` of a loss aggregation: ``aggregate_loss(l) == (l * w).sum()``.

    Why weights: the aggregation is linear in the per-token loss, so any split of the rows (the CPU
    workers' shares of a mini-batch) adds up to the whole batch's loss and gradient when each share
    sums its tokens with these weights, which are computed once over the whole mini-batch.

    - ``token-mean``: ``1 / (valid tokens)`` (DAPO, TRL ``dapo``).
    - ``seq-mean-token-sum``: ``1 / B``: per response sum, then mean over the B responses.
    - ``seq-mean-token-mean``: ``1 / (B * valid tokens of the row)`` (original GRPO).
    - ``seq-mean-token-sum-norm``: ``1 / norm_len`` (default the padded length T): Dr. GRPO's constant
      normaliser, so long and short responses weigh their tokens equally.

    Zero where ``mask`` is 0; an empty mask gives all zeros."""
    m = mask.to(dtype)
    if mode == "token-mean":
        return m / m.sum().clamp(min=1.0)
    if mode == "seq-mean-token-sum":
        return m / max(m.shape[0], 1)
    if mode == "seq-mean-token-mean":
        return m / (m.sum(-1, keepdim=True).clamp(min=1.0) * max(m.shape[0], 1))
    if mode == "seq-mean-token-sum-norm":
        return m / float(m.shape[-1] if norm_len is None else norm_len)
    raise ValueError(f"unknown loss_agg_mode {mode!r}; choose one of {', '.join(AGG_MODES)}")


def aggregate_loss(
    loss: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", norm_len: float | None = None
) -> torch.Tensor:
    """Reduce a per-token loss ``(B, T)`` to a scalar with ``agg_weights`` (modes documented there)."""
    return (loss * agg_weights(mask, mode, norm_len, loss.dtype)).sum()


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = 3.0,
    agg: str = "token-mean",
    norm_len: float | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate with clip-higher and dual clip, all tensors ``(B, T)``.

    Per token: ``r = exp(logprobs - old_logprobs)``;
    ``l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))``; where ``A < 0`` and ``dual_clip``
    is set, ``l = min(l, -A dual_clip)`` (Ye et al. 2020). Aggregated by ``aggregate_loss``, or, when
    ``weights`` ``(B, T)`` are given (``agg_weights`` of a larger batch that these rows are a share
    of), summed with them.

    Returns ``(loss, metrics)``; metrics are floats over ``response_mask``: ``clipfrac`` (share of valid
    tokens where the clipped term is strictly larger), ``clipfrac_lower`` (share where the dual clip
    binds), ``approx_kl`` (masked mean of old - new log-prob), ``ratio_mean``.
    """
    mask = response_mask.bool()
    adv = advantages.to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clipped = torch.maximum(pg1, pg2)
    per_token = clipped
    lower = torch.zeros_like(mask)
    if dual_clip is not None:
        pg3 = -adv * float(dual_clip)
        neg = adv < 0
        lower = neg & (clipped > pg3)
        per_token = torch.where(neg, torch.minimum(clipped, pg3), clipped)
    loss = aggregate_loss(per_token, mask, agg, norm_len) if weights is None else (per_token * weights).sum()
    with torch.no_grad():
        metrics = {
            "clipfrac": float(masked_mean((pg2 > pg1).float(), mask)),
            "clipfrac_lower": float(masked_mean(lower.float(), mask)),
            "approx_kl": float(masked_mean((old_logprobs - logprobs).float(), mask)),
            "ratio_mean": float(masked_mean(ratio.float(), mask)),
        }
    return loss, metrics


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "low_var_kl") -> torch.Tensor:
    """Per-token KL(pi || ref) estimate, ``(B, T)``.

    ``k1``: ``lp - ref``; ``k2``/``mse``: ``0.5 (lp - ref)^2``; ``low_var_kl``/``k3`` (Schulman's k3,
    verl's default for GRPO): ``exp(ref - lp) - (ref - lp) - 1``, at most 10 (verl's clamp). k3 is
    never negative; computed as ``expm1(r) - r`` and clamped at 0, so the rounding of two nearly equal
    log-probs (policy = reference, computed by different kernels) cannot make it negative.
    """
    d = logprobs - ref_logprobs
    if kind == "k1":
        return d
    if kind in ("k2", "mse"):
        return 0.5 * d * d
    if kind in ("k3", "low_var_kl"):
        r = (-d).clamp(-20.0, 20.0)
        return (torch.expm1(r) - r).clamp(0.0, 10.0)
    raise ValueError(f"unknown kl type {kind!r}; choose k1, k2, low_var_kl")
