"""The policy update's unit of work: one share of a mini-batch, its loss, its backward.

Why a unit: on CPU with ``rollout.workers > 1`` the kv engine's helper processes sit idle while the
trainer runs the update, and they already hold the policy's parameters (shared memory). The update's
forward/backward is a sum over tokens (``engine.update.loss.agg_weights``: every aggregation is linear in the
per-token loss), so a mini-batch can be split between the processes at any row (a group cut in two
has its prompt computed by both), each process back-propagates its share with the whole mini-batch's
weights, and the trainer adds the gradients before clipping and the optimizer step: the same
gradient, to float rounding (tests/test_update.py).
One process of one thread runs the update's small kernels more efficiently than one process of two
threads (the products split well across threads, the rest does not), so two shares finish sooner
than the whole (README "Rollout workers").

The trainer runs the same ``backward`` for its own share, or for the whole mini-batch when nothing
is split, so there is one code path for the loss.
"""

from __future__ import annotations

import dataclasses

import torch

from engine.model import fast_forward
from engine.model.ops import token_logprobs
from engine.rollout.base import Rollouts, position_ids
from engine.update.loss import kl_penalty, policy_loss


def response_logits(model, ro: Rollouts, temperature: float = 1.0, fast: bool = False):
    """Forward prompt + response; return the logits that predict the response tokens, ``(B, T, V)``.

    The logits are divided by the rollout ``temperature`` (when > 0), so log-probs, entropies, key
    tokens and the PPO ratio all refer to the distribution the rollouts were sampled from (verl does
    the same). ``fast``: through ``engine.model.fast_forward`` (no padding, one prompt computation per
    group; logits are 0 where ``response_mask`` is 0); else the model's own forward, where only the
    last ``T + 1`` positions go through the LM head (``logits_to_keep``)."""
    if fast:
        logits = fast_forward.response_logits(model, ro.prompt_ids, ro.prompt_mask, ro.response_ids, ro.response_mask)
    else:
        ids, att = ro.input_ids, ro.attention_mask
        T = ro.response_ids.shape[1]
        out = model(
            input_ids=ids, attention_mask=att, position_ids=position_ids(att), logits_to_keep=T + 1, use_cache=False
        )
        logits = out.logits[:, :-1, :]  # position t predicts token t+1: keep the T predictions of response tokens
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    return logits


def cut(ro: Rollouts, rows: torch.Tensor) -> Rollouts:
    """Rows ``rows`` of the batch without the padding columns that all of them share.

    Prompts are left-padded: leading columns where no row has a prompt token go. Responses are
    right-padded: columns after the rows' longest response go (at least one column is kept). Position
    ids come from the attention mask's cumsum, so they do not move."""
    pm, rm = ro.prompt_mask[rows], ro.response_mask[rows]
    used_p = pm.any(0).nonzero()
    p0 = int(used_p[0]) if used_p.numel() else pm.shape[1] - 1
    used_r = rm.any(0).nonzero()
    r1 = int(used_r[-1]) + 1 if used_r.numel() else 1
    return Rollouts(ro.prompt_ids[rows, p0:], pm[:, p0:], ro.response_ids[rows, :r1], rm[:, :r1], ro.truncated[rows])


def group_shares(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, tokens: torch.Tensor, parts: int, whole_groups: bool = True
) -> list[slice]:
    """Split rows into at most ``parts`` contiguous shares of about equal token counts.

    With ``whole_groups`` a share boundary may fall only where a row's prompt differs from the previous
    row's (the start of a group: its prompt is then computed once, see ``fast_forward``); without, at
    any row, and a group cut in two has its prompt computed in both shares (a prompt's few tokens more,
    for shares that are equal to a row instead of to a group). ``tokens`` ``(B,)``: the work of each row
    (its prompt + response tokens). Each boundary is the allowed row whose preceding token count is
    closest to ``j / parts`` of the total; shares never come out empty."""
    B = prompt_ids.shape[0]
    if B == 0 or parts < 2:
        return [slice(0, B)]
    if whole_groups:
        key = prompt_ids.masked_fill(prompt_mask == 0, -1)
        starts = ((key[1:] != key[:-1]).any(1).nonzero().squeeze(1) + 1).tolist()  # rows that begin a group
    else:
        starts = list(range(1, B))
    before = [0, *tokens.cumsum(0).tolist()]  # before[i]: tokens of rows < i
    total, cuts = before[-1], []
    for j in range(1, parts):
        options = [s for s in starts if s > (cuts[-1] if cuts else 0)]
        if not options:
            break
        cuts.append(min(options, key=lambda s: (abs(before[s] - total * j / parts), s)))
    bounds = [0, *sorted(set(cuts)), B]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


@dataclasses.dataclass
class LossSpec:
    """Everything besides the data that a share's loss needs (the trainer's actor settings).

    ``micro_batch_tokens``: ``backward`` cuts a share into micro-batches of whole groups of at most about
    this many prompt + response tokens (``actor.micro_batch_tokens``; 0: never)."""

    clip_low: float
    clip_high: float
    dual_clip: float | None
    temperature: float
    logit_chunk: int
    fast: bool
    kl_type: str = "low_var_kl"
    kl_coef: float = 0.0
    micro_batch_tokens: int = 0


@dataclasses.dataclass
class Share:
    """One process's rows of a mini-batch, cut to their own columns; tensors ``(b, t)``.

    ``weights``: the mini-batch's ``agg_weights`` on these tokens; ``kl_weights`` (with ``ref_logprobs``):
    the mini-batch's token-mean weights for the KL term."""

    rollouts: Rollouts
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    weights: torch.Tensor
    ref_logprobs: torch.Tensor | None = None
    kl_weights: torch.Tensor | None = None


@dataclasses.dataclass
class ShareResult:
    loss: float  # this share's part of the mini-batch's loss, KL term included (the parts add up to it)
    kl: float | None  # its part of the mini-batch's KL to the reference (None without one)
    logprobs: torch.Tensor  # (b, t), detached: the trainer's metrics see the whole mini-batch


def take(share: Share, rows: torch.Tensor) -> Share:
    """Rows ``rows`` ``(k,)`` of ``share``, cut to their own columns (``cut``); the weights stay the whole
    mini-batch's, so the losses and gradients of disjoint takes add up to the share's."""
    part = cut(share.rollouts, rows)
    c = slice(0, part.response_ids.shape[1])
    pick = [None if x is None else x[rows, c] for x in (share.ref_logprobs, share.kl_weights)]
    return Share(part, share.old_logprobs[rows, c], share.advantages[rows, c], share.weights[rows, c], *pick)


def split_share(share: Share, parts: int, whole_groups: bool = True) -> list[tuple[slice, Share]]:
    """``share`` in at most ``parts`` pieces of about equal tokens, of whole groups unless told otherwise
    (``group_shares``), each cut to its own columns (``take``); with the rows each piece takes."""
    ro = share.rollouts
    shares = group_shares(ro.prompt_ids, ro.prompt_mask, ro.attention_mask.sum(1), parts, whole_groups)
    return [(sl, take(share, torch.arange(sl.start, sl.stop, device=ro.prompt_ids.device))) for sl in shares]


def active_rows(share: Share, kl_coef: float) -> torch.Tensor:
    """Rows of ``share`` whose loss has a gradient, ``(b,)`` bool.

    A token's clipped surrogate is ``-A`` times a function of its ratio (``policy_loss``: both clip
    branches and the dual clip), so a token with advantage ``A = 0`` adds exactly 0 to the loss and to
    the gradient, whatever its log-prob. A row counts when one of its tokens has a nonzero advantage and
    a nonzero loss weight, or carries a KL term (``ref_logprobs`` with ``kl_coef != 0``). The others are
    the rows of groups whose samples all got the same reward under GRPO-style advantages (a
    zero-variance group; DAPO's dynamic sampling drops the same groups from the batch): on the
    embedded tasks, 10-60% of a batch early in training. NaN advantages count as nonzero."""
    on = ((share.advantages != 0) & (share.weights != 0)).any(1)
    if share.ref_logprobs is not None and kl_coef != 0:
        on |= (share.kl_weights != 0).any(1)
    return on


def backward(model, share: Share, spec: LossSpec, logprobs: torch.Tensor | None = None) -> ShareResult:
    """Forward ``share`` (unless its ``logprobs`` with grad are given), its loss, and ``loss.backward()``.

    Gradients accumulate into the parameters' ``.grad``; the caller zeroes them before the first share.
    A share of more than ``spec.micro_batch_tokens`` tokens (when > 0) runs as several micro-batches of
    whole groups, one after the other (gradient accumulation): it bounds the activation memory of one
    forward/backward (verl's ``ppo_max_token_len_per_gpu``)."""
    ro = share.rollouts
    cap = spec.micro_batch_tokens
    if logprobs is None and cap > 0:
        total = int(ro.attention_mask.sum())
        if total > cap:
            pieces = split_share(share, -(-total // cap))
            if len(pieces) > 1:
                done = [(sl, _backward(model, piece, spec)) for sl, piece in pieces]
                return merge(done, share.old_logprobs.new_zeros(share.old_logprobs.shape))
    return _backward(model, share, spec, logprobs)


def pool_backward(pool, shares: list[Share], spec: LossSpec, params: list[torch.Tensor], local) -> list[ShareResult]:
    """Back-propagate ``shares`` (one per process, at most ``pool.workers``; ``pool`` an
    ``engine.model.workers.WorkerPool``): the first here with ``local(share)``, which accumulates into
    ``params``' gradients, the others in the pool's helpers, whose gradients are then added to ``params``'
    (zeroed by the caller before). Returns one ``ShareResult`` per share."""
    mine, theirs = pool.run([(_backward_share, share, spec) for share in shares], lambda job: local(job[1]))
    pool.add_grads(params, len(theirs))
    return [mine, *theirs]


def _backward_share(helper, share: Share, spec: LossSpec) -> ShareResult:
    """A worker-pool job: ``backward`` of one share in a helper process, from zeroed gradients, exported to the
    buffer the trainer adds (``Helper.export_grads``)."""
    helper.model.train()
    for p in helper.params:
        p.grad = None
    res = backward(helper.model, share, spec)
    helper.export_grads()
    return res


def merge(parts: list, logprobs: torch.Tensor) -> ShareResult:
    """The results of pieces of a share as one: ``parts`` is ``(rows, ShareResult)`` pairs (rows: a slice
    or an index tensor into the share); each piece's log-probs are written into ``logprobs`` ``(b, t)`` at
    its rows and first columns; losses and KL parts add up (KL None when the pieces have none)."""
    for rows, res in parts:
        logprobs[rows, : res.logprobs.shape[1]] = res.logprobs
    kls = [res.kl for _, res in parts if res.kl is not None]
    return ShareResult(sum(res.loss for _, res in parts), sum(kls) if kls else None, logprobs)


def _backward(model, share: Share, spec: LossSpec, logprobs: torch.Tensor | None = None) -> ShareResult:
    """One forward/backward of ``share`` as it is."""
    ro = share.rollouts
    m = ro.response_mask
    if logprobs is None:
        logits = response_logits(model, ro, spec.temperature, spec.fast)
        logprobs = token_logprobs(logits, ro.response_ids, chunk_size=spec.logit_chunk, mask=m)
    loss, _ = policy_loss(
        logprobs,
        share.old_logprobs,
        share.advantages,
        m,
        clip_low=spec.clip_low,
        clip_high=spec.clip_high,
        dual_clip=spec.dual_clip,
        weights=share.weights,
    )
    kl = None
    if share.ref_logprobs is not None:
        kl = (kl_penalty(logprobs, share.ref_logprobs, spec.kl_type) * share.kl_weights).sum()
        loss = loss + spec.kl_coef * kl
    loss.backward()
    return ShareResult(float(loss.detach()), None if kl is None else float(kl.detach()), logprobs.detach())
