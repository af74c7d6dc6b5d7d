"""The verl-free half of the verl integration: the ``a3po.*`` config, and a verl batch as store rows.

Why a module of its own: everything here works on plain tensors, numpy arrays and dicts, so it runs
(and is tested) without verl, Ray or Hydra installed. ``engine.integrations.verl`` (the loss, in the
workers) and ``engine.integrations.verl_main`` (the entry point and the writer on the driver) import
it; neither duplicates a check or a formula that lives here.

The config: the A3PO keys of a verl launch are the engine's own config — a YAML/JSON file
(``a3po.config=path.yaml``, the same keys as ``configs/demo.yaml``) and/or dotted keys
(``a3po.algorithm.alpha_pos=2``) — checked by ``engine.config.load_config``, then resolved with
``engine.shaping.algorithms.resolve``. The resolved algorithm travels to the Ray workers as one JSON string
in one environment variable (``A3PO_RESOLVED``, see ``RESOLVED_ENV``) and is checked again there by
``engine.config.resolved_from_dict``. No other environment variable is read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import torch

from engine.config import AGG_MODES, MAX_STEPS, ConfigError, config_from_dict, load_config, resolved_from_dict
from engine.shaping.algorithms import ResolvedAlgorithm, Shaped, resolve, shape_tokens
from engine.store.schema import metrics_from_rollouts, step_tables

PREFIX = "a3po."
RESOLVED_ENV = "A3PO_RESOLVED"
# a3po.<key> keys that are not engine config keys (everything else is a dotted engine config key).
OWN_KEYS = ("config", "store", "run_name", "run_id")
# The per-coefficient variables of earlier versions: refused with a pointer to the config keys, so an
# old launch script fails in one line instead of silently training with defaults.
RETIRED_ENV = {
    "A3PO_RATIO": "algorithm.ratio",
    "A3PO_ALPHA_POS": "algorithm.alpha_pos",
    "A3PO_ALPHA_NEG": "algorithm.alpha_neg",
    "A3PO_DECAY": "algorithm.decay",
    "A3PO_DECAY_RATE": "algorithm.decay_rate",
    "A3PO_TOTAL_STEPS": "algorithm.decay_steps",
    "A3PO_TOKEN_RULES": "algorithm.token_rules",
    "A3PO_CALLS_PER_STEP": None,
}
# Engine algorithms whose shaping the verl loss can do: verl computes the sample-level (GRPO)
# advantage itself and the policy loss gets no entropies.
VERL_ALGORITHMS = ("a3po", "grpo", "dr_grpo", "psr", "nsr", "polarity_weighted", "token_weighted")
RUN_FILE = "a3po_run.json"  # next to verl's checkpoints: which store run this training writes


@dataclass
class A3POArgs:
    """The ``a3po.*`` command-line keys, split from verl's own."""

    config: str | None = None
    store: str | None = None
    run_name: str | None = None
    run_id: str | None = None
    overrides: tuple[str, ...] = ()  # dotted engine config keys, e.g. "algorithm.alpha_pos=2"


def _key(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~")


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(a3po.* arguments, verl's Hydra overrides), each in command-line order."""
    ours = [a for a in argv if _key(a).startswith(PREFIX)]
    return ours, [a for a in argv if not _key(a).startswith(PREFIX)]


def parse_a3po_args(args: list[str]) -> A3POArgs:
    """``a3po.key=value`` arguments -> ``A3POArgs``; a malformed one raises a one-line ConfigError."""
    out, overrides = A3POArgs(), []
    for a in args:
        if "=" not in a or a.startswith(("+", "~")):
            raise ConfigError(f"argument {a!r} is not a3po.key=value — write e.g. a3po.algorithm.alpha_pos=2")
        key, value = a.split("=", 1)
        key = key[len(PREFIX) :]
        if key in OWN_KEYS:
            if not value.strip():
                raise ConfigError(f"a3po.{key} is empty — give a value, e.g. a3po.{key}={_example(key)}")
            setattr(out, key, value)
        elif "." in key:
            overrides.append(f"{key}={value}")
        else:
            raise ConfigError(
                f"unknown key a3po.{key} — use a3po.config, a3po.store, a3po.run_name, a3po.run_id "
                "or a3po.<section>.<key> (an engine config key, e.g. a3po.algorithm.alpha_pos=2)"
            )
    out.overrides = tuple(overrides)
    return out


def _example(key: str) -> str:
    return {"config": "configs/demo.yaml", "store": "runs"}.get(key, "my-run")


def engine_config(args: A3POArgs, verl: dict) -> dict:
    """The run's engine config (run.json's ``config``): the a3po file and keys, then what verl runs.

    ``verl`` holds the verl settings the engine config describes (plain values, see
    ``verl_main.verl_view``): model_path, n, temperature, top_p, top_k, max_response_length,
    max_prompt_length, train_batch_size, total_training_steps (or None), lr, ppo_epochs, seed,
    train_file, and the actor's clip_ratio_low/high/c and loss_agg_mode. verl's values win over the
    file's: the record must describe the run that happened. Raises ConfigError (one line) on any bad
    value."""
    cfg = load_config(args.config, list(args.overrides)).to_dict()
    if cfg["algorithm"]["name"] not in VERL_ALGORITHMS:
        raise ConfigError(
            f"algorithm.name {cfg['algorithm']['name']!r} cannot run inside verl's policy loss (it needs "
            f"its own estimator, sampling or token entropies) — use one of {', '.join(VERL_ALGORITHMS)}"
        )
    total = verl.get("total_training_steps")
    decaying = cfg["algorithm"]["name"] == "a3po" and cfg["algorithm"]["decay"] != "constant"
    if total is None and decaying and cfg["algorithm"]["decay_steps"] is None:
        raise ConfigError(
            "A3PO's decay needs its horizon and verl's trainer.total_training_steps is null — "
            "set trainer.total_training_steps=N or a3po.algorithm.decay_steps=N"
        )
    cfg["name"] = args.run_name or cfg.get("name")
    cfg["model"]["path"] = str(verl["model_path"])
    cfg["data"]["train"] = cfg["data"]["test"] = str(verl.get("train_file") or "verl-dataset")
    cfg["data"]["max_prompt_tokens"] = int(verl["max_prompt_length"])
    ro = cfg["rollout"]
    ro["n"], ro["temperature"] = int(verl["n"]), float(verl["temperature"])
    ro["top_p"], ro["top_k"] = float(verl["top_p"]), max(0, int(verl["top_k"]))
    ro["max_new_tokens"] = int(verl["max_response_length"])
    act = cfg["actor"]
    act["lr"], act["ppo_epochs"] = float(verl["lr"]), int(verl["ppo_epochs"])
    for k in ("clip_ratio_low", "clip_ratio_high", "clip_ratio_c"):
        if verl.get(k) is not None:
            act[k] = float(verl[k])
    if verl.get("loss_agg_mode") in AGG_MODES:  # a verl-only mode cannot be recorded; the file's stays
        act["loss_agg_mode"] = verl["loss_agg_mode"]
    cfg["train"]["prompts_per_step"] = int(verl["train_batch_size"])
    if total is not None:
        cfg["train"]["steps"] = max(1, min(int(total), MAX_STEPS))
    if verl.get("seed") is not None:
        cfg["seed"] = int(verl["seed"])
    out = config_from_dict(cfg)
    check_verl_algorithm(resolve(out))
    return out.to_dict()


def check_verl_algorithm(r: ResolvedAlgorithm) -> None:
    """Refuse what verl's policy loss cannot shape (it gets old log-probs but no entropies)."""
    if r.fork_tokens or any(t.metric != "prob" for t in r.token_rules):
        raise ConfigError("verl's policy loss receives no token entropies — use token rules with metric 'prob' only")
    if r.estimator != "grpo" or r.dynamic_sampling or r.overlong_buffer:
        raise ConfigError(
            f"algorithm {r.name!r}: verl computes the sample advantage, dynamic sampling and overlong "
            "penalty itself (algorithm.adv_estimator, algorithm.filter_groups, reward settings) — "
            "set a3po.algorithm.dynamic_sampling=false and a3po.algorithm.overlong_buffer=0"
        )


# ---------------------------------------------------------------- shipping the resolved algorithm
def resolved_env(r: ResolvedAlgorithm) -> str:
    """The value of ``A3PO_RESOLVED``: the resolved algorithm as one JSON string (Ray wants str)."""
    return json.dumps(r.to_dict(), sort_keys=True)


_env_cache: dict[str, ResolvedAlgorithm] = {}


def resolved_from_env(environ=None) -> ResolvedAlgorithm:
    """The run's resolved algorithm in a worker, re-checked; ConfigError (one line) if missing or bad."""
    environ = os.environ if environ is None else environ
    old = sorted(k for k in RETIRED_ENV if k in environ)
    if old:
        key = RETIRED_ENV[old[0]]
        hint = f"pass a3po.{key}=... instead" if key else "it is not needed any more; unset it"
        raise ConfigError(
            f"environment variable {old[0]} is no longer read — {hint} "
            "(python -m engine.integrations.verl_main ... a3po.config=FILE)"
        )
    text = environ.get(RESOLVED_ENV)
    if not text:
        raise ConfigError(
            f"{RESOLVED_ENV} is not set in this verl worker — launch with python -m engine.integrations.verl_main, "
            "which puts it in ray_kwargs.ray_init.runtime_env.env_vars"
        )
    if text not in _env_cache:
        try:
            d = json.loads(text)
        except json.JSONDecodeError:
            raise ConfigError(f"{RESOLVED_ENV} is not JSON — let verl_main write it (resolved_env)") from None
        r = resolved_from_dict(d, where=RESOLVED_ENV)
        check_verl_algorithm(r)
        _env_cache[text] = r
    return _env_cache[text]


# ---------------------------------------------------------------- shaping and rows
def polarity_from_advantages(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` in {+1, -1, 0}: the sign of each response's (broadcast) advantage.

    What the loss can know in a worker: with 0/1 rewards and GRPO, the sign in a mixed group is the
    verifier's verdict, and all-equal groups (advantage 0) get 0, which no rule touches."""
    m = response_mask.to(advantages.dtype)
    seq = (advantages * m).sum(-1) / m.sum(-1).clamp(min=1)
    return torch.sign(seq).long()


def shape(r: ResolvedAlgorithm, advantages, response_mask, old_log_probs, step: int) -> Shaped:
    """verl's ``(B, T)`` advantages shaped by ``engine.shaping.algorithms.shape_tokens``: what the loss trains on.

    ``step`` = finished training steps (0 for the first update), the decay's clock."""
    pol = polarity_from_advantages(advantages, response_mask)
    return shape_tokens(r, advantages, pol, response_mask, logprobs=old_log_probs, step=step)


@dataclass
class VerlBatch:
    """The plain tensors of one verl step at the advantage stage (rows already in order, no padding rows)."""

    responses: torch.Tensor  # (B, T) token ids, right-padded
    response_mask: torch.Tensor  # (B, T)
    old_log_probs: torch.Tensor  # (B, T)
    advantages: torch.Tensor  # (B, T) verl's (raw) advantage
    scores: torch.Tensor  # (B,) sequence reward (token_level_scores summed)
    uid: list  # (B,) prompt id of each row (verl's group key)
    entropy: torch.Tensor | None = None  # (B, T) when the old-log-prob pass computed it
    correct: np.ndarray | None = None  # (B,) bool; None = reward > 0
    prompts: list[str] | None = None
    answers: list[str] | None = None


class StepRecords(NamedTuple):
    """One verl step as the store takes it."""

    tables: dict[str, pa.Table]  # rollouts, tokens (run_id "pending" until RunWriter writes them)
    metrics: dict[str, float]  # the steps row (engine.store.schema.STEP_METRICS names)
    shaped: Shaped  # what the loss trains on at this step


def step_records(run_id: str, step: int, b: VerlBatch, r: ResolvedAlgorithm, token_text, decode) -> StepRecords:
    """One store step (rollouts, tokens, steps row) from a verl batch; ``step`` is verl's global step.

    The shaping runs at ``step - 1`` finished steps, the same clock the workers' loss uses, so the
    stored ``adv_shaped`` is what the loss trained on. The steps row is what every writer derives
    from its rows (``engine.store.schema.metrics_from_rollouts``) plus A3PO's alphas at this step.
    ``token_text(ids) -> list[str]``; ``decode(list of id lists) -> list[str]``."""
    mask = b.response_mask.bool().cpu()
    adv = b.advantages.float().cpu()
    old = b.old_log_probs.float().cpu()
    ent = b.entropy.float().cpu() if b.entropy is not None else torch.full_like(old, float("nan"))
    pol = polarity_from_advantages(adv, mask)
    shaped = shape(r, adv, mask, old, step - 1)
    B = mask.shape[0]
    groups = {u: i for i, u in enumerate(dict.fromkeys(b.uid))}
    scores = b.scores.float().cpu()
    correct = np.asarray(b.correct, bool) if b.correct is not None else (scores > 0).numpy()
    ids = b.responses.cpu()
    tables = step_tables(
        run_id,
        step,
        mask=mask,
        token_ids=ids,
        logprob=old,
        entropy=ent,
        adv_tokens_raw=shaped.adv_tokens_raw,
        adv_shaped=shaped.adv,
        is_key=shaped.key_mask,
        polarity=pol,
        token_text=token_text,
        rollouts={
            "group_idx": np.array([groups[u] for u in b.uid], np.int32),
            "prompt_idx": np.array([groups[u] for u in b.uid], np.int64),
            "prompt": list(b.prompts) if b.prompts is not None else [""] * B,
            "response": decode([row[m].tolist() for row, m in zip(ids, mask)]),
            "answer": list(b.answers) if b.answers is not None else [""] * B,
            "reward": scores.numpy().astype(np.float32),
            "correct": correct,
            "truncated": np.zeros(B, bool),
            "adv_raw": shaped.adv_raw.float().numpy(),
        },
    )
    metrics = metrics_from_rollouts(tables["rollouts"], tables["tokens"])
    metrics.update(alpha_pos=shaped.alpha_pos, alpha_neg=shaped.alpha_neg)
    return StepRecords(tables, metrics, shaped)


# ---------------------------------------------------------------- the store run
def remembered_run(ckpt_dir: str | None) -> str | None:
    """The run id a previous launch stored next to verl's checkpoints (``a3po_run.json``), if any."""
    f = Path(ckpt_dir) / RUN_FILE if ckpt_dir else None
    if f is None or not f.is_file():
        return None
    try:
        rid = json.loads(f.read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return rid if isinstance(rid, str) else None


def check_run_name(store, name: str | None, run_id: str | None, ckpt_dir: str | None) -> None:
    """Before Ray starts: a3po.run_name must be new, unless it is the run this checkpoint folder resumes."""
    if name is None or run_id is not None or name not in store.run_ids() or remembered_run(ckpt_dir) == name:
        return
    from engine.store.store import StoreError

    raise StoreError(
        f"run {name!r} already exists in {store.root} — pick another a3po.run_name or continue it with a3po.run_id={name}"
    )


class RunWriter:
    """Writes one verl training into one store run, and finds that run again after a resume.

    Why a file next to the checkpoints: verl resumes from ``trainer.default_local_dir``; the run id
    stored there (``a3po_run.json``) is the run to continue, so a resumed training appends to the run
    it started instead of opening a new one. ``a3po.run_id`` names the run explicitly instead."""

    def __init__(self, store, config: dict, resolved: dict, ckpt_dir: str | None, run_id: str | None = None):
        self.store, self.config, self.resolved = store, config, resolved
        self.ckpt_dir, self.wanted = ckpt_dir, run_id
        self.run_id: str | None = None
        self.last_step: int | None = None
        self.total_steps: int | None = None  # the trainer's own count (verl's total_training_steps), if known

    def _total(self) -> int:
        return int(self.total_steps or self.config["train"]["steps"])

    def _run_file(self) -> Path | None:
        return Path(self.ckpt_dir) / RUN_FILE if self.ckpt_dir else None

    def _remembered(self) -> str | None:
        rid = remembered_run(self.ckpt_dir)
        return rid if rid is not None and rid in self.store.run_ids() else None

    def open(self, step: int) -> str:
        """The run that ``step`` (verl's global step, 1-based) goes into; resumes drop later steps."""
        if self.run_id is not None:
            return self.run_id
        resumed = step > 1
        rid = self.wanted or (self._remembered() if resumed else None)
        if rid is not None and rid in self.store.run_ids():
            self.store.acquire_writer(rid)
            self.store.truncate_after(rid, step - 1)
            self.store.update_run(rid, status="running", last_step=step - 1, error=None, total_steps=self._total())
        else:
            rid = self.store.create_run(self.config, name=rid or self.config.get("name"), lease=True)
            self.store.update_run(rid, status="running", resolved=self.resolved, total_steps=self._total())
        self.run_id = rid
        f = self._run_file()
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps({"run_id": rid, "store": str(self.store.root)}))
        return rid

    def write(self, step: int, records: StepRecords) -> None:
        """Write one step (the tables' run_id column becomes the run's id; the store builds the steps row)."""
        rid = self.open(step)
        tables = {
            k: t.set_column(0, "run_id", pa.array([rid] * t.num_rows, pa.string())) for k, t in records.tables.items()
        }
        self.store.write_step(rid, step, tables, metrics=records.metrics)
        self.store.update_run(rid, last_step=step)
        self.last_step = step
        if step % int(self.config["train"]["compact_every"]) == 0:  # one file per table, not one per step
            self.store.compact(rid, step)

    def finish(self, error: BaseException | None = None) -> None:
        """Mark the run finished (or failed/killed) and release the writer lease."""
        if self.run_id is None:
            return
        if self.last_step is not None:
            self.store.compact(self.run_id, self.last_step)
        if error is None:
            self.store.update_run(self.run_id, status="finished")
        else:
            status = "failed" if isinstance(error, Exception) else "killed"
            self.store.update_run(self.run_id, status=status, error=f"{type(error).__name__}: {error}")
        self.store.release_writer(self.run_id)
