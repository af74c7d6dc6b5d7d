"""Named RLVR algorithms as small declarative specs, and the one function that applies them.

Each algorithm picks a sample-level estimator, optional fixed polarity weights, optional token
rules and a few loss/sampling defaults. ``shape_advantages`` is the single place where a batch's
scores become per-token advantages; the trainer and the app's playground both call it.

Add your own with ``register_algorithm(Algorithm(name=..., ...))``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.shaping.advantage import (
    TokenRule,
    a3po_rules,
    decay_alpha,
    fork_token_mask,
    group_advantages,
    polarity_weighting,
    token_shaping,
    w_reinforce_advantages,
)


# ------------------------------------------------------------------ sample-level estimators
def _grpo(scores, group_ids, polarity, *, std_normalize: bool, lam: float):
    return group_advantages(scores, group_ids, std_normalize=std_normalize)


def _w_reinforce(scores, group_ids, polarity, *, std_normalize: bool, lam: float):
    return w_reinforce_advantages(polarity, lam=lam)


ESTIMATORS: dict[str, Callable] = {"grpo": _grpo, "w_reinforce": _w_reinforce}


def _no_rules(r: ResolvedAlgorithm, step: int) -> list[TokenRule]:
    return []


def _a3po(r: ResolvedAlgorithm, step: int) -> list[TokenRule]:
    return a3po_rules(
        step,
        r.decay_steps,
        ratio=r.ratio,
        alpha_pos=r.alpha_pos,
        alpha_neg=r.alpha_neg,
        decay=r.decay,
        rate=r.decay_rate,
    )


@dataclass(frozen=True)
class Algorithm:
    name: str
    doc: str
    estimator: str = "grpo"
    std_normalize: bool = True
    polarity_weights: tuple[float, float] | None = None  # fixed (w_pos, w_neg); None = from config
    rules: Callable = field(default=_no_rules)  # (ResolvedAlgorithm, step) -> the algorithm's own [TokenRule]
    fork_tokens: bool = False
    dynamic_sampling: bool = False
    overlong_penalty: bool = False
    clip_ratio_high: float = 0.2
    loss_agg_mode: str = "token-mean"


ALGORITHMS: dict[str, Algorithm] = {}


def register_algorithm(algo: Algorithm) -> Algorithm:
    if algo.estimator not in ESTIMATORS:
        raise ValueError(f"algorithm {algo.name!r}: unknown estimator {algo.estimator!r}")
    ALGORITHMS[algo.name] = algo
    return algo


for _a in [
    Algorithm("grpo", "GRPO (Shao et al. 2024): group-normalised advantage, symmetric clip 0.2."),
    Algorithm(
        "dr_grpo",
        "Dr. GRPO (Liu et al. 2025): no std division, constant-length normaliser.",
        std_normalize=False,
        loss_agg_mode="seq-mean-token-sum-norm",
    ),
    Algorithm(
        "dapo",
        "DAPO (Yu et al. 2025): clip-higher 0.2/0.28, token-mean, dynamic sampling, soft overlong penalty.",
        dynamic_sampling=True,
        overlong_penalty=True,
        clip_ratio_high=0.28,
    ),
    Algorithm(
        "psr",
        "Positive sample reinforcement only: GRPO with incorrect responses weighted 0.",
        polarity_weights=(1.0, 0.0),
    ),
    Algorithm(
        "nsr",
        "Negative sample reinforcement only: GRPO with correct responses weighted 0.",
        polarity_weights=(0.0, 1.0),
    ),
    Algorithm(
        "w_reinforce",
        "W-REINFORCE (Zhu et al. 2025): +lam correct, -1 incorrect, no normalisation.",
        estimator="w_reinforce",
    ),
    Algorithm("polarity_weighted", "GRPO with sample-level weights algorithm.w_pos / algorithm.w_neg (P2N1 = 2, 1)."),
    Algorithm("token_weighted", "GRPO with the token rules in algorithm.token_rules (the paper's token-level grid)."),
    Algorithm(
        "fork_tokens",
        "DAPO trained only on the top fork_quantile entropy tokens of the batch (Wang et al. 2025).",
        fork_tokens=True,
        dynamic_sampling=True,
        overlong_penalty=True,
        clip_ratio_high=0.28,
    ),
    Algorithm(
        "a3po",
        "A3PO (Tang et al. 2025): asymmetric prob-based key tokens with decaying scales, clip-higher.",
        rules=_a3po,
        clip_ratio_high=0.28,
    ),
]:
    register_algorithm(_a)


@dataclass(frozen=True)
class ResolvedAlgorithm:
    """Every coefficient a run actually uses, each "null = the algorithm's default" filled in.

    ``resolve(cfg)`` builds it once; the trainer reads its loss and sampling settings from it, and
    run.json stores it whole (``resolved``) next to the config as written, so a reader (the app, a
    replay, a comparison across runs) sees the values that trained the run, not the nulls."""

    name: str
    estimator: str
    std_normalize: bool
    w_pos: float  # effective sample weights (an algorithm's fixed weights times the configured scale)
    w_neg: float
    lam: float
    ratio: float
    alpha_pos: float
    alpha_neg: float
    decay: str
    decay_rate: float
    decay_steps: int  # horizon of the decay: algorithm.decay_steps or train.steps
    token_rules: tuple[TokenRule, ...]  # extra rules on top of the algorithm's own (A3PO's are per step)
    fork_tokens: bool
    fork_quantile: float
    dynamic_sampling: bool
    max_gen_batches: int
    overlong_buffer: int  # DAPO soft overlong penalty length, 0 = off
    clip_ratio_low: float
    clip_ratio_high: float
    clip_ratio_c: float | None
    loss_agg_mode: str

    def to_dict(self) -> dict:
        import dataclasses

        d = dataclasses.asdict(self)
        d["token_rules"] = [dataclasses.asdict(r) for r in self.token_rules]
        return d


def resolve(cfg) -> ResolvedAlgorithm:
    """The run's algorithm with every default filled in, from a full ``engine.config.Config``."""
    algo, a, act = ALGORITHMS[cfg.algorithm.name], cfg.algorithm, cfg.actor
    w_pos, w_neg = a.w_pos, a.w_neg
    if algo.polarity_weights is not None:
        w_pos, w_neg = algo.polarity_weights[0] * a.w_pos, algo.polarity_weights[1] * a.w_neg
    overlong = (
        a.overlong_buffer
        if a.overlong_buffer is not None
        else (cfg.rollout.max_new_tokens // 4 if algo.overlong_penalty else 0)
    )
    return ResolvedAlgorithm(
        name=algo.name,
        estimator=algo.estimator,
        std_normalize=algo.std_normalize if a.std_normalize is None else a.std_normalize,
        w_pos=float(w_pos),
        w_neg=float(w_neg),
        lam=a.lam,
        ratio=a.ratio,
        alpha_pos=a.alpha_pos,
        alpha_neg=a.alpha_neg,
        decay=a.decay,
        decay_rate=a.decay_rate,
        decay_steps=a.decay_steps or cfg.train.steps,
        token_rules=tuple(r if isinstance(r, TokenRule) else TokenRule(**r) for r in a.token_rules),
        fork_tokens=algo.fork_tokens,
        fork_quantile=a.fork_quantile,
        dynamic_sampling=algo.dynamic_sampling if a.dynamic_sampling is None else a.dynamic_sampling,
        max_gen_batches=a.max_gen_batches,
        overlong_buffer=int(overlong),
        clip_ratio_low=act.clip_ratio_low if act.clip_ratio_low is not None else 0.2,
        clip_ratio_high=act.clip_ratio_high if act.clip_ratio_high is not None else algo.clip_ratio_high,
        clip_ratio_c=act.clip_ratio_c,
        loss_agg_mode=act.loss_agg_mode or algo.loss_agg_mode,
    )


@dataclass
class Shaped:
    """Result of ``shape_tokens``; all tensors on the input device."""

    adv_raw: torch.Tensor  # (B,) estimator output before polarity weights and token rules
    adv_tokens_raw: torch.Tensor  # (B, T) adv_raw broadcast over valid tokens
    adv: torch.Tensor  # (B, T) final per-token advantage used by the loss
    key_mask: torch.Tensor  # (B, T) bool, tokens picked by a rule (or fork tokens)
    rules: list[TokenRule]  # every rule applied at this step: the algorithm's own, then the extra ones
    alpha_pos: float = 1.0  # the algorithm's own scale on positive key tokens at this step (A3PO's alpha+)
    alpha_neg: float = 1.0  # ... and on negative ones (A3PO's alpha-); extra token_rules never change these


def algorithm_rules(resolved: ResolvedAlgorithm, step: int) -> list[TokenRule]:
    """The algorithm's own token rules at ``step`` (finished training steps, 0-based), e.g. A3PO's pair."""
    return list(ALGORITHMS[resolved.name].rules(resolved, step))


def sample_advantages(resolved: ResolvedAlgorithm, scores: torch.Tensor, group_ids, polarity: torch.Tensor):
    """``(B,)`` sample-level advantages from the run's estimator (GRPO group baseline, W-REINFORCE, ...)."""
    return ESTIMATORS[resolved.estimator](
        scores, group_ids, polarity, std_normalize=resolved.std_normalize, lam=resolved.lam
    )


def shape_tokens(
    resolved: ResolvedAlgorithm,
    adv_raw: torch.Tensor,
    polarity: torch.Tensor,
    mask: torch.Tensor,
    logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    step: int = 0,
) -> Shaped:
    """Raw advantages -> the per-token advantages the loss uses: the one shaping function.

    The trainer, the replay/playground, the TRL trainer and the verl loss all call this, so one
    resolved config gives the same shaped advantages on every path.

    Args:
        resolved: every coefficient of the run (``resolve(cfg)`` or ``engine.config.resolved_from_dict``).
        adv_raw: ``(B,)`` sample-level advantages, or ``(B, T)`` already broadcast over tokens (verl
            hands the loss a ``(B, T)`` tensor); a ``(B, T)`` input is read as its per-row mean over
            valid tokens for ``Shaped.adv_raw`` and used as is for the tokens.
        polarity: ``(B,)`` in {+1, -1, 0}; mask: ``(B, T)`` valid response tokens.
        logprobs, entropy: ``(B, T)`` old-policy values of the sampled tokens (what the rules rank by).
        step: finished training steps (0 for the first update); drives A3PO's decay over
            ``resolved.decay_steps``.

    Order: polarity weights (``w_pos``/``w_neg``), then the algorithm's own rules (A3PO), then the
    extra ``token_rules``, then the fork-token mask.
    """
    m = mask.to(torch.float32).to(adv_raw.device)
    if adv_raw.dim() == 1:
        raw = adv_raw.float()
        tok_raw = raw.unsqueeze(-1) * m
    elif adv_raw.dim() == 2:
        tok_raw = adv_raw.float() * m
        raw = tok_raw.sum(-1) / m.sum(-1).clamp(min=1)
    else:
        raise ValueError(f"shape_tokens: adv_raw must be (B,) or (B, T), got {tuple(adv_raw.shape)}")
    adv = polarity_weighting(tok_raw, polarity, w_pos=resolved.w_pos, w_neg=resolved.w_neg)
    own = algorithm_rules(resolved, step)
    rules = own + list(resolved.token_rules)
    adv, key = token_shaping(adv, mask, polarity, rules, logprobs=logprobs, entropy=entropy)
    if resolved.fork_tokens:
        if entropy is None:
            raise ValueError("fork_tokens needs token entropies")
        fork = fork_token_mask(entropy, mask, resolved.fork_quantile)
        adv = adv * fork.to(adv.dtype)
        key = key | fork
    scale = {r.polarity: r.scale for r in own}
    return Shaped(raw, tok_raw, adv, key, rules, scale.get("positive", 1.0), scale.get("negative", 1.0))


def shape_advantages(
    resolved: ResolvedAlgorithm,
    *,
    scores: torch.Tensor,
    group_ids,
    polarity: torch.Tensor,
    response_mask: torch.Tensor,
    logprobs: torch.Tensor | None,
    entropy: torch.Tensor | None,
    step: int,
) -> Shaped:
    """Scores -> per-token advantages for one batch: ``sample_advantages`` then ``shape_tokens``.

    Args:
        scores: ``(B,)`` rewards; group_ids: ``(B,)`` prompt ids; polarity: ``(B,)`` in {+1, -1, 0}.
        response_mask, logprobs, entropy: ``(B, T)``, old-policy values of the sampled tokens.
        step: finished training steps, for A3PO's decay.
    """
    raw = sample_advantages(resolved, scores, group_ids, polarity).to(response_mask.device)
    return shape_tokens(resolved, raw, polarity, response_mask, logprobs, entropy, step)


def alpha_schedule(resolved: ResolvedAlgorithm, total_steps: int, points: int = 101) -> list[tuple[int, float, float]]:
    """(s, alpha+, alpha-) for s in [0, total_steps], for plots; the horizon is ``resolved.decay_steps``.

    The trainer evaluates the schedule at ``s = step - 1``: training step 1 uses alpha0, and the
    last step S uses ``alpha(S - 1)``, one decay increment above 1 for the linear schedule."""
    r = resolved
    out = []
    for i in range(points):
        s = round(i * total_steps / max(1, points - 1))
        out.append(
            (
                s,
                decay_alpha(r.alpha_pos, s, r.decay_steps, r.decay, r.decay_rate),
                decay_alpha(r.alpha_neg, s, r.decay_steps, r.decay, r.decay_rate),
            )
        )
    return out
