"""The study's design: its settings (one engine config each, as CLI overrides) and its presets.

A setting is what the report compares (``SETTINGS``: polarity, sample-level weights, token-level
grid cells and the paper's methods); a preset picks settings, paired seeds, steps and the shared
overrides (``PRESETS``). ``engine/study/runner.py`` turns them into runs, ``engine/study/report.py``
into tables, so both import this module and neither imports the other's choices.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    name: str
    section: str  # polarity | sample | token | methods
    label: str
    overrides: tuple[str, ...] = ()
    lr_scale: float = 1.0


def _tok(pol: str, metric: str, end: str, scale: float) -> Setting:
    sc = f"x{scale:g}"
    rule = f"[{{polarity: {pol}, metric: {metric}, end: {end}, ratio: 0.2, scale: {scale:g}}}]"
    return Setting(
        f"tok-{pol[:3]}-{metric}-{end}-{sc}",
        "token",
        f"{pol} / {metric} / {end} x{scale:g}",
        ("algorithm.name=token_weighted", f"algorithm.token_rules={rule}"),
    )


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in [
        Setting("grpo", "polarity", "GRPO (both polarities)", ("algorithm.name=grpo",)),
        Setting("psr", "polarity", "PSR only", ("algorithm.name=psr",)),
        Setting("nsr", "polarity", "NSR only", ("algorithm.name=nsr",)),
        Setting(
            "w_reinforce", "polarity", "W-REINFORCE (lambda 0.1)", ("algorithm.name=w_reinforce", "algorithm.lam=0.1")
        ),
        Setting(
            "p2n1", "sample", "P2N1", ("algorithm.name=polarity_weighted", "algorithm.w_pos=2", "algorithm.w_neg=1")
        ),
        Setting(
            "p1n2", "sample", "P1N2", ("algorithm.name=polarity_weighted", "algorithm.w_pos=1", "algorithm.w_neg=2")
        ),
        # same ratio as P2N1 at the same lr: Adam cancels the constant scale (see engine/report.py, RATIO_NOTE)
        Setting(
            "p1n0.5",
            "sample",
            "P1N0.5",
            ("algorithm.name=polarity_weighted", "algorithm.w_pos=1", "algorithm.w_neg=0.5"),
        ),
        *[_tok(p, m, e, 2.0) for m in ("prob", "entropy") for p in ("positive", "negative") for e in ("high", "low")],
        _tok("positive", "prob", "high", 0.5),
        _tok("positive", "entropy", "high", 0.5),
        Setting("dapo", "methods", "DAPO", ("algorithm.name=dapo",)),
        Setting(
            "dapo-clip-sym", "methods", "DAPO, symmetric clip 0.2", ("algorithm.name=dapo", "actor.clip_ratio_high=0.2")
        ),
        Setting("fork_tokens", "methods", "DAPO + fork tokens (top 20% entropy)", ("algorithm.name=fork_tokens",)),
        Setting("a3po", "methods", "A3PO (decay on)", ("algorithm.name=a3po",)),
        # A3PO on DAPO's sampling: dynamic sampling and DAPO's default overlong buffer (max_new_tokens // 4);
        # A3PO already has DAPO's clip-higher 0.28 and token-mean loss
        Setting(
            "a3po-dapo",
            "methods",
            "A3PO on DAPO",
            (
                "algorithm.name=a3po",
                "algorithm.dynamic_sampling=true",
                "algorithm.overlong_buffer={dapo_overlong_buffer}",
            ),
        ),
        Setting(
            "a3po-static",
            "methods",
            "A3PO static scales (decay off)",
            ("algorithm.name=a3po", "algorithm.decay=constant"),
        ),
        # the scale sweep the A3PO defaults are chosen from (alpha+_0 = alpha-_0)
        Setting(
            "a3po-a1.5",
            "a3po scales",
            "A3PO alpha0 1.5",
            ("algorithm.name=a3po", "algorithm.alpha_pos=1.5", "algorithm.alpha_neg=1.5"),
        ),
        Setting(
            "a3po-a3",
            "a3po scales",
            "A3PO alpha0 3",
            ("algorithm.name=a3po", "algorithm.alpha_pos=3", "algorithm.alpha_neg=3"),
        ),
    ]
}
# P1N1 is GRPO; the sample-level section reuses the grpo runs as its reference.
CORE = ("grpo", "dapo", "a3po", "a3po-dapo", "p2n1", "psr", "nsr")  # the comparisons the main claims rest on


@dataclass(frozen=True)
class Preset:
    settings: tuple[str, ...]
    seeds: int  # paired seeds of the core settings
    steps: int
    overrides: tuple[str, ...] = ()
    core: tuple[str, ...] | None = None  # settings run with ``seeds``; None: all of them
    secondary_seeds: int | None = None  # seeds of the other settings (at most ``seeds``); None: ``seeds``

    def seeds_for(self, name: str, seeds: int, secondary: int | None = None) -> int:
        """Seeds of setting ``name`` when the core settings get ``seeds`` (``secondary`` overrides the preset's)."""
        sec = secondary if secondary is not None else self.secondary_seeds
        if self.core is None or name in self.core or sec is None:
            return seeds
        return min(seeds, sec)


# The deciding presets evaluate once, at the end, on all 500 test prompts with 4 samples each plus a greedy
# one (pass@4 is the exploration claim's "large k"); the start is the same model in every run, so it is not
# re-evaluated. 30 steps x 12 prompts x 8 rollouts (4 mini-batches each) keep a run near 1.5 min on one busy
# core, so the 10-seed core grid (70 runs) fits about an hour on 2 cores.
DECIDE = (
    "train.prompts_per_step=12",
    "train.eval_every=0",
    "eval.at_start=false",
    "eval.n_prompts=0",
    "eval.final_k=[1,2,4]",
    "train.store_tokens=false",
    "train.save_final_model=false",
)
PRESETS = {
    "quick": Preset(
        ("grpo", "psr", "nsr", "w_reinforce", "dapo", "a3po"),
        seeds=1,
        steps=80,
        overrides=(
            "train.eval_every=20",
            "eval.n_prompts=100",
            "eval.final_k=[1,2,4,8,16,32,64]",
            "train.store_tokens=false",
            "train.save_final_model=false",
        ),
    ),
    "pilot": Preset(("grpo", "dapo", "a3po"), seeds=10, steps=30, overrides=DECIDE),
    "full": Preset(tuple(SETTINGS), seeds=10, steps=30, overrides=DECIDE, core=CORE, secondary_seeds=3),
}
