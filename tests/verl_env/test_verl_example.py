"""The shipped multi-node example, exactly as shipped, against verl's real config and Ray's checks.

bash runs examples/verl_a3po_multinode.sh with a stand-in ``python3`` first on PATH: the stand-in
records the argv and environment of the ``python3 -m verl.trainer.main_ppo`` call (and hands any
other ``python3`` call to the real interpreter), so every default, quote and expansion is bash's
own. The recorded overrides are composed with Hydra against verl's own config folder, checked by
verl's ``validate_config`` and the ``runtime_env`` that main_ppo would give ``ray.init`` is checked
by Ray's own validation. No GPU, no Ray cluster.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("verl.trainer.ppo.core_algos")
pytest.importorskip("hydra")

from conftest import ROOT  # noqa: E402

SCRIPT = ROOT / "examples" / "verl_a3po_multinode.sh"
STUB = """#!/usr/bin/env bash
if [ "$1" = "-m" ] && [ "$2" = "verl.trainer.main_ppo" ]; then
  printf '%s\\0' "$@" > "$RECORD_ARGS"
  env -0 > "$RECORD_ENV"
  exit 0
fi
exec "$REAL_PYTHON" "$@"
"""


def run_example(tmp_path: Path, extra_env: dict | None = None, args: tuple = ()):
    """(argv after ``-m verl.trainer.main_ppo``, environment) of the example's launch."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    stub = bindir / "python3"
    stub.write_text(STUB)
    stub.chmod(0o755)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("A3PO_") and k not in ("NNODES", "GPUS_PER_NODE", "STEPS")
    }
    env.update(
        PATH=f"{bindir}:{env['PATH']}",
        REAL_PYTHON=sys.executable,
        RECORD_ARGS=str(tmp_path / "args"),
        RECORD_ENV=str(tmp_path / "env"),
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
        **(extra_env or {}),
    )
    p = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    argv = (tmp_path / "args").read_bytes().decode().split("\0")[:-1]
    launched_env = dict(kv.split("=", 1) for kv in (tmp_path / "env").read_bytes().decode().split("\0") if "=" in kv)
    assert argv[:2] == ["-m", "verl.trainer.main_ppo"]
    return argv[2:], launched_env


def compose(overrides: list[str]):
    import verl.trainer.main_ppo as main_ppo
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    config_dir = Path(main_ppo.__file__).parent / "config"
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return hydra_compose(config_name="ppo_trainer", overrides=overrides)


def validate(cfg):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))


def ray_runtime_env(cfg) -> dict:
    """What main_ppo.run_ppo hands ray.init as runtime_env: verl's defaults merged with ray_kwargs."""
    from omegaconf import OmegaConf
    from verl.trainer.constants_ppo import get_ppo_ray_runtime_env

    merged = OmegaConf.merge(get_ppo_ray_runtime_env(cfg), cfg.ray_kwargs.get("ray_init", {}).get("runtime_env", {}))
    return OmegaConf.to_container(merged)


def ray_accepts(runtime_env: dict) -> None:
    """The check ray.init runs on its runtime_env (JobConfig.set_runtime_env(..., validate=True))."""
    from ray.job_config import JobConfig

    JobConfig().set_runtime_env(runtime_env, validate=True)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    overrides, env = run_example(tmp_path_factory.mktemp("shipped"))
    return overrides, env, compose(overrides)


def test_shipped_example_passes_verl_validate_config(shipped):
    overrides, _, cfg = shipped
    validate(cfg)  # raises on anything verl would refuse before starting Ray
    assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == "a3po"
    assert cfg.trainer.nnodes * cfg.trainer.n_gpus_per_node == 16
    assert cfg.actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu == 1


def test_shipped_lengths_fit_the_models_context(shipped):
    _, _, cfg = shipped
    # Qwen2.5-Math-7B's config.json: max_position_embeddings = 4096.
    assert cfg.actor_rollout_ref.model.path == "Qwen/Qwen2.5-Math-7B"
    assert cfg.data.max_prompt_length + cfg.data.max_response_length <= 4096
    assert (cfg.data.max_prompt_length, cfg.data.max_response_length) == (1024, 3072)


def test_ray_accepts_the_runtime_env_and_every_a3po_variable_is_forwarded(shipped):
    from engine.integrations.verl import FORWARDED

    _, env, cfg = shipped
    runtime_env = ray_runtime_env(cfg)
    ray_accepts(runtime_env)
    env_vars = runtime_env["env_vars"]
    assert env_vars["VERL_USE_EXTERNAL_MODULES"] == "engine.integrations.verl"
    needed = set(FORWARDED) - {"A3PO_TOKEN_RULES"}  # token_weighted only; forwarded when set (next test)
    assert needed <= set(env_vars)
    for name in needed:  # the workers get exactly the launching shell's values, as strings
        assert env_vars[name] == env[name] and isinstance(env_vars[name], str)
    assert (env_vars["A3PO_ALPHA_POS"], env_vars["A3PO_RATIO"], env_vars["A3PO_DECAY"]) == ("2", "0.2", "linear")
    assert env_vars["A3PO_TOTAL_STEPS"] == "500"


def test_unquoted_int_is_what_ray_rejects(shipped):
    """The check above can fail: the old example's unquoted value reaches Ray as an int."""
    overrides, _, _ = shipped
    bad = [o for o in overrides if "A3PO_ALPHA_POS" not in o] + [
        "+ray_kwargs.ray_init.runtime_env.env_vars.A3PO_ALPHA_POS=2"
    ]
    with pytest.raises(TypeError, match="Dict\\[str, str\\]"):
        ray_accepts(ray_runtime_env(compose(bad)))


def test_fallback_calls_per_step_matches_the_config(shipped):
    """epochs x responses per step / (GPUs x micro-batch) = 1 x 512 x 16 / (16 x 1) = 512 loss calls per worker."""
    _, env, cfg = shipped
    a = cfg.actor_rollout_ref.actor
    world = cfg.trainer.nnodes * cfg.trainer.n_gpus_per_node
    calls = (
        a.ppo_epochs
        * cfg.data.train_batch_size
        * cfg.actor_rollout_ref.rollout.n
        // (world * a.ppo_micro_batch_size_per_gpu)
    )
    assert int(env["A3PO_CALLS_PER_STEP"]) == calls == 512


def test_token_rules_json_reaches_ray_intact(tmp_path):
    from engine.integrations.verl import settings

    rules = '[{"polarity": "positive", "metric": "prob", "end": "low", "ratio": 0.2, "scale": 2}]'
    overrides, env = run_example(
        tmp_path,
        {"A3PO_TOKEN_RULES": rules, "A3PO_ALPHA_POS": "3", "NNODES": "1"},
        args=("actor_rollout_ref.actor.policy_loss.loss_mode=token_weighted",),
    )
    cfg = compose(overrides)
    validate(cfg)
    runtime_env = ray_runtime_env(cfg)
    ray_accepts(runtime_env)
    assert runtime_env["env_vars"]["A3PO_TOKEN_RULES"] == rules
    assert runtime_env["env_vars"]["A3PO_ALPHA_POS"] == "3"
    assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == "token_weighted"
    assert settings(runtime_env["env_vars"])["token_rules"][0].scale == 2


def test_bad_a3po_value_stops_the_launch_with_one_line(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python3").write_text(STUB)
    (bindir / "python3").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("A3PO_")}
    env.update(
        PATH=f"{bindir}:{env['PATH']}",
        REAL_PYTHON=sys.executable,
        RECORD_ARGS=str(tmp_path / "args"),
        RECORD_ENV=str(tmp_path / "env"),
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
        A3PO_RATIO="1.5",
    )
    p = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    errors = [line for line in p.stderr.splitlines() if line.startswith("a3po: error:")]
    assert len(errors) == 1 and "A3PO_RATIO" in errors[0] and " — " in errors[0]
    assert not (tmp_path / "args").exists()  # main_ppo was never started
