"""Per-token log-probabilities and entropies from logits, chunked over rows.

Why chunked: a Qwen-size vocabulary (~150k) at a few thousand response tokens would need tens of GB
for a full float32 softmax. The functions flatten the leading dimensions and process ``chunk_size``
rows at a time, so the float32 temporaries are bounded by ``chunk_size * V``. The results keep the
input dtype (bf16 logits give bf16 log-probs), but every chunk is computed in float32 internally.

Two savings for the trainer's use:

* ``mask``: only the positions where the mask is set (the real response tokens) go through the
  vocabulary-sized softmax; padded positions are returned as exactly 0 and get no gradient. With
  responses right-padded to the longest one, that skips the padding's share of the work.
* ``token_logprobs_entropy`` computes both quantities from one log-softmax per chunk instead of two
  passes over the logits.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK = 1024


def _chunks(n: int, size: int):
    size = max(1, int(size))
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _entropy_from_logp(logp: torch.Tensor) -> torch.Tensor:
    """``-sum p log p`` over the last dimension of float32 log-probs.

    A -inf logit would give exp(-inf)*(-inf) = nan in the forward and, even when masked by where(),
    nan in the backward: zero the log first, then multiply."""
    safe = torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))
    return -(logp.exp() * safe).sum(-1)


def _rows(n: int, mask: torch.Tensor | None, shape, device) -> torch.Tensor | None:
    """Flat indices of the rows to compute (None: all of them)."""
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask {tuple(mask.shape)} does not match the logits' leading shape {tuple(shape)}")
    return mask.reshape(-1).to(device).bool().nonzero().squeeze(1)


def _per_row(logits, labels, mask, chunk_size, want_lp: bool, want_ent: bool):
    """The shared chunk loop: float32 per chunk, only the rows in ``mask``, scattered back into zeros."""
    lead, V = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, V)
    lab = labels.reshape(-1).long() if labels is not None else None
    idx = _rows(flat.shape[0], mask, lead, flat.device)
    n = flat.shape[0] if idx is None else idx.numel()
    lps, ents = [], []
    for a, b in _chunks(n, chunk_size):
        if idx is None:
            x, y = flat[a:b].float(), (lab[a:b] if lab is not None else None)
        else:
            x = flat.index_select(0, idx[a:b]).float()
            y = lab.index_select(0, idx[a:b]) if lab is not None else None
        if want_ent:
            logp = torch.log_softmax(x, dim=-1)
            ents.append(_entropy_from_logp(logp))
            if want_lp:
                lps.append(logp.gather(-1, y.unsqueeze(-1)).squeeze(-1))
        else:  # log-prob alone: the picked logit minus logsumexp needs no (rows, V) output tensor
            lps.append(x.gather(-1, y.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, dim=-1))

    def assemble(parts):
        vals = torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float32)
        if idx is not None:  # padding stays exactly 0 and gets no gradient
            vals = flat.new_zeros(flat.shape[0], dtype=torch.float32).index_copy(0, idx, vals)
        elif not parts:
            vals = flat.new_zeros(flat.shape[0], dtype=torch.float32)
        return vals.to(logits.dtype).reshape(lead)

    return (assemble(lps) if want_lp else None), (assemble(ents) if want_ent else None)


def _check_labels(logits: torch.Tensor, labels: torch.Tensor, who: str) -> None:
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"{who}: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-probability of ``labels`` under ``softmax(logits)``.

    Args:
        logits: ``(..., V)`` un-normalised scores.
        labels: ``(...)`` integer token ids, same leading shape as ``logits``.
        mask: optional ``(...)``; only positions where it is nonzero are computed, the rest are 0.
    Returns:
        ``(...)`` log-probs in ``logits.dtype``. Differentiable w.r.t. ``logits``.
    """
    _check_labels(logits, labels, "token_logprobs")
    return _per_row(logits, labels, mask, chunk_size, True, False)[0]


def token_entropy(
    logits: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Entropy ``-sum p log p`` of ``softmax(logits)`` over the last dimension.

    Args:
        logits: ``(..., V)``.
        mask: optional ``(...)``; only positions where it is nonzero are computed, the rest are 0.
    Returns:
        ``(...)`` entropies (nats) in ``logits.dtype``. Differentiable w.r.t. ``logits``.
    """
    return _per_row(logits, None, mask, chunk_size, False, True)[1]


def token_logprobs_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token_logprobs, token_entropy)`` from one log-softmax per chunk.

    Why: the trainer needs both for the same positions; two separate calls normalise every logit
    row twice. Same arguments and results as the two functions (``mask`` included)."""
    _check_labels(logits, labels, "token_logprobs_entropy")
    return _per_row(logits, labels, mask, chunk_size, True, True)
