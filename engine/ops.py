"""Per-token log-probabilities and entropies from logits, chunked over rows.

Why chunked: a Qwen-size vocabulary (~150k) at a few thousand response tokens would need tens of GB
for a full float32 softmax. Both functions flatten the leading dimensions and process ``chunk_size``
rows at a time, so the float32 temporaries are bounded by ``chunk_size * V``. The results keep the
input dtype (bf16 logits give bf16 log-probs), but every chunk is computed in float32 internally.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK = 1024


def _chunks(n: int, size: int):
    size = max(1, int(size))
    for start in range(0, n, size):
        yield start, min(n, start + size)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Log-probability of ``labels`` under ``softmax(logits)``.

    Args:
        logits: ``(..., V)`` un-normalised scores.
        labels: ``(...)`` integer token ids, same leading shape as ``logits``.
    Returns:
        ``(...)`` log-probs in ``logits.dtype``. Differentiable w.r.t. ``logits``.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"token_logprobs: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    lab = labels.reshape(-1).long()
    out = []
    for a, b in _chunks(flat.shape[0], chunk_size):
        x = flat[a:b].float()
        picked = x.gather(-1, lab[a:b].unsqueeze(-1)).squeeze(-1)
        out.append((picked - torch.logsumexp(x, dim=-1)).to(logits.dtype))
    if not out:
        return logits.new_zeros(labels.shape)
    return torch.cat(out).reshape(labels.shape)


def token_entropy(logits: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Entropy ``-sum p log p`` of ``softmax(logits)`` over the last dimension.

    Args:
        logits: ``(..., V)``.
    Returns:
        ``(...)`` entropies (nats) in ``logits.dtype``. Differentiable w.r.t. ``logits``.
    """
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    out = []
    for a, b in _chunks(flat.shape[0], chunk_size):
        x = flat[a:b].float()
        logp = torch.log_softmax(x, dim=-1)
        # sum p*logp with p = exp(logp). A -inf logit would give exp(-inf)*(-inf) = nan in the forward
        # and, even when masked by where(), nan in the backward: zero the log first, then multiply.
        safe = torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))
        plogp = logp.exp() * safe
        out.append((-plogp.sum(-1)).to(logits.dtype))
    if not out:
        return logits.new_zeros(logits.shape[:-1])
    return torch.cat(out).reshape(logits.shape[:-1])
