"""The rollout interface: what every backend takes (``SamplingParams``) and returns (``Rollouts``).

Backends turn prompts into G sampled responses per prompt. The trainer only sees
``RolloutBackend.generate`` and the ``Rollouts`` it returns, so a vLLM backend (GPU) can replace
the Hugging Face one without touching the training loop. The padding and EOS helpers here are
shared by every backend and by the update's forward (``position_ids``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class SamplingParams:
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 48
    seed: int = 0


@dataclass
class Rollouts:
    """Responses for ``P`` prompts x ``n`` samples, ``B = P * n`` rows, prompt-major order.

    prompt_ids: ``(B, Lp)`` left-padded prompt tokens; prompt_mask ``(B, Lp)``.
    response_ids: ``(B, T)`` right-padded response tokens up to and including the first EOS.
    response_mask: ``(B, T)`` 1 on valid response tokens. truncated: ``(B,)`` no EOS within budget.
    logprobs, entropy: ``(B, T)`` float32, recorded while sampling by backends that can: log-prob of
    each sampled token (the ``kv`` engine and vLLM; NaN where vLLM gave none) and entropy of the full
    distribution it was sampled from (``logits / temperature``; the ``kv`` engine only), 0 on masked
    positions; None for backends that do not record them. The trainer stores the recorded log-prob
    beside its own as ``rollout_logprob``: the training-inference mismatch per token.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    truncated: torch.Tensor
    logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    def to(self, device) -> Rollouts:
        """The same rollouts with every tensor on ``device``."""
        return Rollouts(*(None if x is None else x.to(device) for x in self._tensors()))

    def rows(self, idx: torch.Tensor) -> Rollouts:
        """Rows ``idx`` (a 1-D index tensor) of every tensor."""
        return Rollouts(*(None if x is None else x[idx.to(x.device)] for x in self._tensors()))

    def _tensors(self) -> list:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @staticmethod
    def concat(parts: list[Rollouts], pad_id: int) -> Rollouts:
        """Several batches as one, rows in order: prompts left-padded and responses right-padded to the
        longest; recorded log-probs (entropies) kept when every part has them (0 on the padding)."""
        Lp = max(p.prompt_ids.shape[1] for p in parts)
        T = max(p.response_ids.shape[1] for p in parts)

        def cat(xs, L, value, left=False):
            return torch.cat([F.pad(x, (L - x.shape[1], 0) if left else (0, L - x.shape[1]), value=value) for x in xs])

        has_lp = all(p.logprobs is not None for p in parts)
        has_ent = all(p.entropy is not None for p in parts)
        return Rollouts(
            cat([p.prompt_ids for p in parts], Lp, pad_id, left=True),
            cat([p.prompt_mask for p in parts], Lp, 0, left=True),
            cat([p.response_ids for p in parts], T, pad_id),
            cat([p.response_mask for p in parts], T, 0),
            torch.cat([p.truncated for p in parts]),
            cat([p.logprobs for p in parts], T, 0.0) if has_lp else None,
            cat([p.entropy for p in parts], T, 0.0) if has_ent else None,
        )


class RolloutBackend(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Rollouts: ...

    def sync_weights(self, model) -> None: ...


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, L)`` ids and mask, sequences aligned to the right."""
    L = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, L - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, L - len(s) :] = 1
    return ids.to(device), mask.to(device)


def cut_at_eos(gen: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep each row up to and including its first EOS; later positions become pad with mask 0.

    Args: gen ``(B, T)`` generated ids. Returns ``(ids, mask, truncated)``.
    """
    B, T = gen.shape
    is_eos = gen == eos_id
    has = is_eos.any(dim=1)
    first = torch.where(has, is_eos.float().argmax(dim=1), torch.full((B,), T, device=gen.device))
    length = torch.where(has, first + 1, first)
    mask = (torch.arange(T, device=gen.device).unsqueeze(0) < length.unsqueeze(1)).long()
    ids = torch.where(mask.bool(), gen, torch.full_like(gen, pad_id))
    keep = max(1, int(length.max().item())) if B else 1
    return ids[:, :keep], mask[:, :keep], ~has


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) - 1`` clamped at 0: the position ids ``generate`` uses with left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
