"""verl 0.9.1's PPO trainer with A3PO's loss and the engine's store: ``python -m engine.integrations.verl_main``.

Why an entry point of its own: ``python -m verl.trainer.main_ppo`` can load our loss (verl's
external modules) but knows nothing of the engine's config or store. This module takes the same
Hydra overrides as main_ppo plus ``a3po.*`` keys, and then runs verl's own trainer (``trainer.use_v1``
picks the v1 trainer, the default, or the legacy ``RayPPOTrainer``)::

    python -m engine.integrations.verl_main algorithm.adv_estimator=grpo \\
        data.train_files=/data/train.parquet data.val_files=/data/test.parquet \\
        actor_rollout_ref.model.path=Qwen/Qwen2.5-Math-7B trainer.total_training_steps=500 ... \\
        a3po.config=examples/verl_a3po.yaml a3po.algorithm.alpha_pos=2 a3po.store=runs a3po.run_name=qwen-a3po

``--config-path DIR`` (absolute, or relative to the current folder) and ``--config-name NAME`` pick
another verl YAML, as with main_ppo. ``a3po.*`` keys:
  - ``a3po.config=FILE``: an engine config (YAML/JSON, the keys of configs/demo.yaml); its
    ``algorithm`` block defines the shaping. verl's own settings (model, lengths, rollout.n, lr,
    clip) are recorded in the run's engine config as verl runs them.
  - ``a3po.<section>.<key>=VALUE``: one engine config key, e.g. ``a3po.algorithm.decay_steps=500``.
  - ``a3po.store=DIR`` (default ``runs``), ``a3po.run_name=NAME``, ``a3po.run_id=ID`` (continue that run).
All are checked by the engine's config checks before Ray starts: a bad value ends with one line
``a3po: error: ...`` and exit code 2. The resolved algorithm travels to the workers as one JSON string
(``A3PO_RESOLVED``) in ``ray_kwargs.ray_init.runtime_env.env_vars``, next to
``VERL_USE_EXTERNAL_MODULES=engine.integrations.verl`` (registers the ``a3po`` loss in every worker);
``actor_rollout_ref.actor.policy_loss.loss_mode`` is set to ``a3po``.

The store writer runs on verl's driver (the TaskRunner actor), at the narrowest seam of each trainer:
  - legacy ``RayPPOTrainer.fit``: ``_update_actor(batch)`` receives the whole ``DataProto`` right after
    ``compute_advantage`` (responses, response_mask, old_log_probs, advantages, token_level_scores,
    prompts; ``uid`` in non_tensor_batch). ``fit`` pops the old-log-prob pass's ``entropys`` before
    that, so ``_compute_old_log_prob`` is overridden too, only to keep a copy of them. The writer
    writes after verl's update returns.
  - v1 ``PPOTrainer`` (sync and async modes): the batch only exists in TransferQueue, and the one
    method that sees it after the advantage step of every sub-batch is ``step()``; the override calls
    verl's step, then reads responses, response_mask, old_log_probs, ``entropy``, advantages,
    rm_scores, prompts and uid of the step's keys back from TransferQueue (before ``fit`` clears them),
    skipping padding rows.
Both subclasses are installed only in the TaskRunner process (``A3POTaskRunner``): the legacy runner
looks ``RayPPOTrainer`` up in ``verl.trainer.main_ppo_v0``, the v1 runner looks the trainer up in
verl's trainer registry, and the runner points those two names at the subclasses before it runs
verl's own TaskRunner code.

The step: verl's ``global_steps`` is the store's step; the shaping uses ``global_steps - 1`` finished
steps, the value the workers' loss records from ``update_weights`` (``engine.integrations.verl``), so
the stored shaped advantages are the ones trained on. Resume: verl's checkpoint resume restores
``global_steps``; the store run is found again through ``a3po_run.json`` in
``trainer.default_local_dir`` (or ``a3po.run_id``), steps after the resumed one are dropped and the
run continues. The store folder must be reachable from the node the TaskRunner runs on (on a
multi-node cluster: a shared filesystem, or a single-node Ray head).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import ray
import torch

from engine.config import ConfigError, resolved_from_dict
from engine.integrations.verl_records import (
    RESOLVED_ENV,
    RunWriter,
    VerlBatch,
    check_run_name,
    engine_config,
    parse_a3po_args,
    resolved_env,
    split_args,
    step_records,
)
from engine.store.store import Store, StoreError

LOSS_MODE_KEY = "actor_rollout_ref.actor.policy_loss.loss_mode"
EXTERNAL = "engine.integrations.verl"
SETTINGS_KEY = "a3po_lab"  # the node of verl's config that carries the writer's settings to the TaskRunner
ENV_PATH = "ray_kwargs.ray_init.runtime_env.env_vars"


# ---------------------------------------------------------------- driver: config
def hydra_options(argv: list[str]) -> tuple[dict, list[str]]:
    """(``--config-path``/``--config-name`` as main_ppo's ``@hydra.main`` takes them, the other arguments)."""
    opts, rest, i = {}, [], 0
    while i < len(argv):
        a = argv[i]
        name = next((n for n in ("--config-path", "--config-name") if a == n or a.startswith(n + "=")), None)
        if name is None:
            if a.startswith("-"):
                raise ConfigError(
                    f"option {a!r} is not supported — pass key=value overrides, --config-path or --config-name"
                )
            rest.append(a)
        elif a == name:
            if i + 1 >= len(argv):
                raise ConfigError(f"{name} needs a value — e.g. {name}=...")
            opts[name], i = argv[i + 1], i + 1
        else:
            opts[name] = a.split("=", 1)[1]
        i += 1
    return opts, rest


def compose_verl(overrides: list[str], config_path: str | None = None, config_name: str | None = None):
    """verl's config (``ppo_trainer`` unless named) with ``overrides``, composed by Hydra as main_ppo does."""
    import verl.trainer.main_ppo as main_ppo
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    config_dir = Path(config_path).resolve() if config_path else Path(main_ppo.__file__).parent / "config"
    if not config_dir.is_dir():
        raise ConfigError(f"--config-path {config_path} is not a folder — pass the folder of your verl YAML")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose(config_name=config_name or "ppo_trainer", overrides=overrides)


def verl_view(cfg) -> dict:
    """The verl settings the run's engine config records (see ``verl_records.engine_config``)."""
    ar, data = cfg.actor_rollout_ref, cfg.data
    files = data.train_files
    train_file = files if isinstance(files, str) else (list(files)[0] if files else None)
    return {
        "model_path": ar.model.path,
        "n": ar.rollout.n,
        "temperature": ar.rollout.temperature,
        "top_p": ar.rollout.top_p,
        "top_k": ar.rollout.top_k,
        "max_response_length": data.max_response_length,
        "max_prompt_length": data.max_prompt_length,
        "train_batch_size": data.train_batch_size,
        "total_training_steps": cfg.trainer.total_training_steps,
        "lr": ar.actor.optim.lr,
        "ppo_epochs": ar.actor.ppo_epochs,
        "seed": data.get("seed"),
        "train_file": train_file,
        "clip_ratio_low": ar.actor.clip_ratio_low,
        "clip_ratio_high": ar.actor.clip_ratio_high,
        "clip_ratio_c": ar.actor.clip_ratio_c,
        "loss_agg_mode": ar.actor.loss_agg_mode,
    }


def _check_loss_mode(verl_args: list[str]) -> None:
    for a in verl_args:
        key, _, value = a.partition("=")
        if key.lstrip("+~") == LOSS_MODE_KEY and value != "a3po":
            raise ConfigError(
                f"{LOSS_MODE_KEY}={value}: this entry point trains with the a3po loss — drop that override"
            )


def _store_root(path: str) -> str:
    root = Path(path).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise StoreError(f"store path {root} is a file — pass a folder with a3po.store=DIR")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(
            f"cannot create the store folder {root}: {e.strerror} — pass a writable a3po.store=DIR"
        ) from None
    return str(root)


def prepare(argv: list[str]):
    """argv -> verl's composed config with the loss, the workers' environment and the writer's settings.

    Everything that can be wrong in the a3po.* keys raises ConfigError/StoreError here, before Ray."""
    from omegaconf import OmegaConf, open_dict

    from engine.config import config_from_dict
    from engine.shaping.algorithms import resolve

    opts, argv = hydra_options(argv)
    ours, verl_args = split_args(argv)
    args = parse_a3po_args(ours)
    _check_loss_mode(verl_args)
    cfg = compose_verl(verl_args, opts.get("--config-path"), opts.get("--config-name"))
    engine_cfg = engine_config(args, verl_view(cfg))
    resolved = resolve(config_from_dict(engine_cfg))
    store = _store_root(args.store or "runs")
    check_run_name(Store(store), engine_cfg.get("name"), args.run_id, cfg.trainer.default_local_dir)
    with open_dict(cfg):
        OmegaConf.update(cfg, LOSS_MODE_KEY, "a3po")
        env = OmegaConf.select(cfg, ENV_PATH) or {}
        mods = [m for m in str(env.get("VERL_USE_EXTERNAL_MODULES", "") or "").split(",") if m]
        OmegaConf.update(cfg, f"{ENV_PATH}.VERL_USE_EXTERNAL_MODULES", ",".join(dict.fromkeys([*mods, EXTERNAL])))
        OmegaConf.update(cfg, f"{ENV_PATH}.{RESOLVED_ENV}", resolved_env(resolved))
        cfg[SETTINGS_KEY] = {
            "store": store,
            "run_id": args.run_id or None,
            "config": json.dumps(engine_cfg),
            "resolved": resolved_env(resolved),
        }
    return cfg


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.integrations.verl_main [--config-path DIR --config-name NAME] [verl overrides]
    [a3po.* keys]``: check everything, then train with verl's run_ppo and the writing TaskRunner."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = prepare(argv)
        _validate(cfg)
    except (ValueError, AssertionError) as e:  # ConfigError, StoreError and verl's own config checks
        print(f"a3po: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # Hydra's override errors (unknown key, bad syntax): user mistakes too
        if type(e).__module__.startswith(("hydra", "omegaconf")):
            print(f"a3po: error: verl config: {_one_line(e)} — fix that Hydra override", file=sys.stderr)
            return 2
        raise
    from verl.trainer.main_ppo import run_ppo

    run_ppo(cfg, task_runner_class=A3POTaskRunner)
    return 0


def _one_line(e: BaseException) -> str:
    """The exception's message on one line (Hydra's instantiation errors span three)."""
    return " ".join(s.strip() for s in str(e).splitlines() if s.strip()) or type(e).__name__


def _validate(cfg) -> None:
    """What main_ppo.main checks before it starts Ray."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    auto_set_device(cfg)
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))


# ---------------------------------------------------------------- driver: the writer
class StepWriter:
    """Turns one verl step's batch into store rows and writes them (the TaskRunner's end of the store)."""

    def __init__(self, settings, tokenizer, ckpt_dir: str | None):

        self.resolved = resolved_from_dict(json.loads(settings["resolved"]), where=RESOLVED_ENV)
        self.tokenizer = tokenizer
        self.run = RunWriter(
            Store(settings["store"]),
            json.loads(settings["config"]),
            self.resolved.to_dict(),
            ckpt_dir,
            settings.get("run_id"),
        )

    def token_text(self, ids) -> list[str]:
        tok = self.tokenizer
        toks = tok.convert_ids_to_tokens([int(i) for i in ids])
        return [tok.convert_tokens_to_string([t]) if t is not None else "" for t in toks]

    def decode(self, rows: list[list[int]]) -> list[str]:
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def write(self, step: int, batch: VerlBatch) -> int:
        """Write verl's step ``step`` (its global_steps); returns the number of token rows."""
        rec = step_records("pending", step, batch, self.resolved, self.token_text, self.decode)
        self.run.write(step, rec)
        return rec.tables["tokens"].num_rows


def _texts(tokenizer, ids: torch.Tensor, mask: torch.Tensor | None = None) -> list[str]:
    rows = [r[m.bool()].tolist() for r, m in zip(ids, mask)] if mask is not None else ids.tolist()
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def _answers(non_tensor: dict, n: int) -> list[str] | None:
    rm = non_tensor.get("reward_model")
    if rm is None:
        return None
    return [str(r.get("ground_truth", "")) if isinstance(r, dict) else "" for r in rm][:n]


def legacy_batch(batch, tokenizer=None, entropy: torch.Tensor | None = None) -> VerlBatch:
    """The legacy trainer's ``DataProto`` at ``_update_actor`` -> ``VerlBatch`` (CPU copies)."""
    t, nt = batch.batch, batch.non_tensor_batch
    keys = set(t.keys())
    B = len(t["responses"])
    ent = entropy if entropy is not None and tuple(entropy.shape) == tuple(t["responses"].shape) else None
    prompts = None
    if tokenizer is not None and "prompts" in keys:
        pm = t["attention_mask"][:, : t["prompts"].shape[1]] if "attention_mask" in keys else None
        prompts = _texts(tokenizer, t["prompts"].cpu(), pm.cpu() if pm is not None else None)
    acc = nt.get("acc")
    return VerlBatch(
        responses=t["responses"].cpu(),
        response_mask=t["response_mask"].cpu(),
        old_log_probs=t["old_log_probs"].float().cpu(),
        advantages=t["advantages"].float().cpu(),
        scores=t["token_level_scores"].float().sum(-1).cpu() if "token_level_scores" in keys else torch.zeros(B),
        uid=list(nt["uid"]) if "uid" in nt else list(range(B)),
        entropy=ent.float().cpu() if ent is not None else None,
        correct=np.asarray(acc, dtype=float) > 0 if acc is not None and len(acc) == B else None,
        prompts=prompts,
        answers=_answers(nt, B),
    )


V1_FIELDS = ["prompts", "responses", "response_mask", "old_log_probs", "advantages", "rm_scores", "uid"]


def v1_batch(meta, fetch, tokenizer=None, with_entropy: bool = True) -> VerlBatch:
    """The v1 trainer's step (a TransferQueue ``KVBatchMeta``) -> ``VerlBatch``.

    ``fetch`` is ``transfer_queue.kv_batch_get``. The fields are jagged (nested) tensors there, one
    row per trajectory, and the advantages were written back by ``_compute_advantage``; the entropy
    by ``_compute_old_log_prob`` (not in bypass mode). Padding rows (tag ``is_padding``) are dropped."""
    from verl.protocol import DataProto

    fields = V1_FIELDS + (["entropy"] if with_entropy else [])
    td = fetch(keys=meta.keys, partition_id=meta.partition_id, select_fields=fields)
    keep = np.array([not tag.get("is_padding", False) for tag in meta.tags], dtype=bool)
    uid = np.array(td.pop("uid").tolist(), dtype=object)[keep]
    prompt_lens = td["prompts"].offsets().diff()
    data = DataProto(batch=td.to_padded_tensor()).batch
    idx = torch.as_tensor(np.nonzero(keep)[0])
    mask = data["response_mask"][idx]
    prompts = None
    if tokenizer is not None:
        p = data["prompts"][idx]
        pm = torch.arange(p.shape[1]).unsqueeze(0) < prompt_lens[idx].unsqueeze(1)
        prompts = _texts(tokenizer, p, pm)
    return VerlBatch(
        responses=data["responses"][idx],
        response_mask=mask,
        old_log_probs=data["old_log_probs"][idx].float(),
        advantages=data["advantages"][idx].float(),
        scores=(data["rm_scores"][idx].float() * mask).sum(-1),
        uid=list(uid),
        entropy=data["entropy"][idx].float() if with_entropy else None,
        prompts=prompts,
    )


class _WriterMixin:
    """What both trainer subclasses share: the writer, built from the settings in verl's own config."""

    def _a3po_writer(self) -> StepWriter:
        if getattr(self, "_a3po_w", None) is None:
            self._a3po_w = StepWriter(self.config[SETTINGS_KEY], self.tokenizer, self.config.trainer.default_local_dir)
            self._a3po_w.run.total_steps = getattr(self, "total_training_steps", None)  # set by verl's trainer
        return self._a3po_w

    def fit(self, *args, **kwargs):
        try:
            out = super().fit(*args, **kwargs)
        except BaseException as e:
            if getattr(self, "_a3po_w", None) is not None:
                self._a3po_w.run.finish(e)
            raise
        if getattr(self, "_a3po_w", None) is not None:
            self._a3po_w.run.finish()
        return out


def legacy_trainer(base):
    """``RayPPOTrainer`` subclass that writes each step at ``_update_actor`` (see the module docstring)."""

    class A3POLegacyTrainer(_WriterMixin, base):
        def _compute_old_log_prob(self, batch):
            out, mfu = super()._compute_old_log_prob(batch)
            ent = out.batch["entropys"] if "entropys" in out.batch.keys() else None
            self._a3po_entropy = ent.detach().float().cpu().clone() if ent is not None else None
            return out, mfu

        def _update_actor(self, batch):
            rows = legacy_batch(batch, self.tokenizer, getattr(self, "_a3po_entropy", None))
            self._a3po_entropy = None
            out = super()._update_actor(batch)
            self._a3po_writer().write(self.global_steps, rows)
            return out

    return A3POLegacyTrainer


def v1_trainer(base):
    """v1 ``PPOTrainer`` subclass that writes each step after ``step()`` (see the module docstring)."""

    class A3POV1Trainer(_WriterMixin, base):
        def step(self, metrics, timing_raw):
            import transfer_queue as tq

            meta = super().step(metrics, timing_raw)
            rc = self.config.algorithm.get("rollout_correction", None)
            bypass = bool(rc and rc.get("bypass_mode", False))
            rows = v1_batch(meta, tq.kv_batch_get, self.tokenizer, with_entropy=not bypass)
            self._a3po_writer().write(self.global_steps, rows)
            return meta

    return A3POV1Trainer


def install_writers(config) -> None:
    """Point verl's trainer lookups in this process at the writing subclasses (idempotent)."""
    if config.trainer.use_v1:
        from verl.trainer.ppo.v1 import trainer_base

        mode = config.trainer.v1.trainer_mode
        base = trainer_base.get_trainer_cls(mode)
        if not getattr(base, "_a3po_writes", False):
            sub = v1_trainer(base)
            sub._a3po_writes = True
            trainer_base.TRAINER_REGISTRY[mode] = sub
    else:
        import verl.trainer.main_ppo_v0 as v0

        if not getattr(v0.RayPPOTrainer, "_a3po_writes", False):
            sub = legacy_trainer(v0.RayPPOTrainer)
            sub._a3po_writes = True
            v0.RayPPOTrainer = sub


def _plain_class(actor_cls):
    """The class a ``@ray.remote`` decorator wrapped (Ray keeps it as ``__ray_metadata__.modified_class``)."""
    return actor_cls.__ray_metadata__.modified_class


class _TaskRunner:
    """verl's TaskRunner (v1 or legacy, per ``trainer.use_v1``) with the store writer installed first."""

    def __init__(self):
        self.inner = None

    def run(self, config):
        install_writers(config)
        if config.trainer.use_v1:
            from verl.trainer.main_ppo import TaskRunnerV1 as runner
        else:
            from verl.trainer.main_ppo_v0 import TaskRunner as runner
        self.inner = _plain_class(runner)()
        return self.inner.run(config)


# Ray pickles the class by reference: the TaskRunner process imports this module (and so verl).
A3POTaskRunner = ray.remote(_TaskRunner)


if __name__ == "__main__":
    sys.exit(main())
