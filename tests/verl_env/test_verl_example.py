"""The shipped multi-node example, exactly as shipped, against verl's real config and Ray's checks.

bash runs examples/verl_a3po_multinode.sh with a stand-in ``python3`` first on PATH: the stand-in
records the argv and environment of the ``python3 -m engine.integrations.verl_main`` call (and hands
any other ``python3`` call to the real interpreter), so every default, quote and expansion is bash's
own. The recorded arguments go through the entry point's own ``prepare`` (verl's Hydra config plus
the a3po.* keys), verl's ``validate_config``, and the ``runtime_env`` that main_ppo's ``run_ppo``
would give ``ray.init`` is checked by Ray's own validation. The entry point's error path runs for
real (it stops before Ray). No GPU, no Ray cluster.
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
if [ "$1" = "-m" ] && [ "$2" = "engine.integrations.verl_main" ]; then
  printf '%s\\0' "$@" > "$RECORD_ARGS"
  env -0 > "$RECORD_ENV"
  exit 0
fi
exec "$REAL_PYTHON" "$@"
"""


def run_example(tmp_path: Path, extra_env: dict | None = None, args: tuple = ()):
    """(argv after ``-m engine.integrations.verl_main``, environment) of the example's launch."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    stub = bindir / "python3"
    stub.write_text(STUB)
    stub.chmod(0o755)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("A3PO_") and k not in ("NNODES", "GPUS_PER_NODE", "STEPS", "STORE")
    }
    env.update(
        PATH=f"{bindir}:{env['PATH']}",
        REAL_PYTHON=sys.executable,
        RECORD_ARGS=str(tmp_path / "args"),
        RECORD_ENV=str(tmp_path / "env"),
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
        STORE=str(tmp_path / "runs"),
        **(extra_env or {}),
    )
    p = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    argv = (tmp_path / "args").read_bytes().decode().split("\0")[:-1]
    launched_env = dict(kv.split("=", 1) for kv in (tmp_path / "env").read_bytes().decode().split("\0") if "=" in kv)
    assert argv[:2] == ["-m", "engine.integrations.verl_main"]
    return argv[2:], launched_env


def prepare(argv: list[str]):
    from engine.integrations.verl_main import prepare as entry_prepare

    return entry_prepare(argv)


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
    tmp = tmp_path_factory.mktemp("shipped")
    argv, env = run_example(tmp)
    return argv, env, prepare(argv), tmp


def test_shipped_example_passes_verl_validate_config(shipped):
    _, _, cfg, _ = shipped
    validate(cfg)  # raises on anything verl would refuse before starting Ray
    assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == "a3po"  # set by the entry point
    assert cfg.trainer.nnodes * cfg.trainer.n_gpus_per_node == 16
    assert cfg.actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu == 1
    assert cfg.trainer.use_v1  # verl's default trainer


def test_shipped_lengths_fit_the_models_context(shipped):
    _, _, cfg, _ = shipped
    # Qwen2.5-Math-7B's config.json: max_position_embeddings = 4096.
    assert cfg.actor_rollout_ref.model.path == "Qwen/Qwen2.5-Math-7B"
    assert cfg.data.max_prompt_length + cfg.data.max_response_length <= 4096
    assert (cfg.data.max_prompt_length, cfg.data.max_response_length) == (1024, 3072)


def test_ray_accepts_the_runtime_env_and_it_carries_the_resolved_algorithm(shipped):
    from engine.integrations.verl_records import RESOLVED_ENV, resolved_from_env
    from engine.shaping.algorithms import ResolvedAlgorithm

    argv, env, cfg, _ = shipped
    assert not [k for k in env if k.startswith("A3PO_")]  # nothing travels through the shell
    runtime_env = ray_runtime_env(cfg)
    ray_accepts(runtime_env)
    env_vars = runtime_env["env_vars"]
    assert env_vars["VERL_USE_EXTERNAL_MODULES"] == "engine.integrations.verl"
    r = resolved_from_env(env_vars)  # what a worker does with it
    assert isinstance(r, ResolvedAlgorithm) and isinstance(env_vars[RESOLVED_ENV], str)
    # examples/verl_a3po.yaml, horizon = trainer.total_training_steps, clip from verl's overrides
    assert (r.name, r.ratio, r.alpha_pos, r.alpha_neg, r.decay) == ("a3po", 0.2, 2.0, 2.0, "linear")
    assert (r.decay_steps, r.clip_ratio_high) == (500, 0.28)


def test_store_run_settings_reach_the_task_runner(shipped):
    import json

    from engine.config import config_from_dict
    from engine.integrations.verl_main import SETTINGS_KEY

    _, _, cfg, tmp = shipped
    s = cfg[SETTINGS_KEY]
    assert s.store == str((tmp / "runs").resolve()) and (tmp / "runs").is_dir()
    engine_cfg = config_from_dict(json.loads(s.config))  # run.json's config, as the app reads it
    assert engine_cfg.model.path == "Qwen/Qwen2.5-Math-7B" and engine_cfg.rollout.n == 16
    assert engine_cfg.train.steps == 500 and engine_cfg.rollout.max_new_tokens == 3072


def test_extra_a3po_keys_override_the_file(tmp_path):
    from engine.integrations.verl_records import resolved_from_env

    argv, _ = run_example(tmp_path, {"NNODES": "1"}, args=("a3po.algorithm.alpha_pos=3", "trainer.use_v1=false"))
    cfg = prepare(argv)
    validate(cfg)
    runtime_env = ray_runtime_env(cfg)
    ray_accepts(runtime_env)
    assert resolved_from_env(runtime_env["env_vars"]).alpha_pos == 3.0
    assert cfg.trainer.nnodes == 1 and not cfg.trainer.use_v1


def test_unquoted_int_is_what_ray_rejects(shipped):
    """The check above can fail: an env var Hydra reads as an int is refused by Ray."""
    argv, _, _, _ = shipped
    cfg = prepare([*argv, "+ray_kwargs.ray_init.runtime_env.env_vars.SOME_FLAG=2"])
    with pytest.raises(TypeError, match="Dict\\[str, str\\]"):
        ray_accepts(ray_runtime_env(cfg))


MICRO = (
    "actor.ppo_micro_batch_size_per_gpu",
    "rollout.log_prob_micro_batch_size_per_gpu",
    "ref.log_prob_micro_batch_size_per_gpu",
)


def _launch(tmp_path: Path, *args: str, script: bool = True):
    """The launch for real (stand-in python3 only passes through); returns the CompletedProcess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("A3PO_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", STORE=str(tmp_path / "runs"))
    if script:
        bindir = tmp_path / "bin"
        bindir.mkdir(exist_ok=True)
        (bindir / "python3").write_text(f'#!/usr/bin/env bash\nexec "{sys.executable}" "$@"\n')
        (bindir / "python3").chmod(0o755)
        env["PATH"] = f"{bindir}:{env['PATH']}"
        cmd = ["bash", str(SCRIPT), *args]
    else:
        cmd = [sys.executable, "-m", "engine.integrations.verl_main", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)


def _one_error_line(p, *words):
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("a3po: error:")]
    assert len(errors) == 1 and " — " in errors[0], p.stderr[-2000:]
    for w in words:
        assert w in errors[0]
    assert "Traceback" not in p.stderr
    return errors[0]


def test_bad_coefficient_stops_the_shipped_launch_with_one_line(tmp_path):
    p = _launch(tmp_path, "a3po.algorithm.ratio=1.5")
    _one_error_line(p, "algorithm.ratio")
    assert "ray init" not in p.stdout  # stopped before run_ppo


@pytest.mark.parametrize(
    "args, words",
    [
        (("a3po.algorithm.alpha_neg=lots",), ("algorithm.alpha_neg",)),
        (("a3po.alpha_pos=2",), ("unknown key a3po.alpha_pos",)),
        (("a3po.config=missing.yaml",), ("config file not found",)),
        (("a3po.algorithm.name=dapo",), ("cannot run inside verl",)),
        (("a3po.algorithm.dynamic_sampling=true",), ("dynamic sampling",)),
        (("actor_rollout_ref.actor.policy_loss.loss_mode=vanilla",), ("loss_mode=vanilla",)),
        (("trainer.no_such_key=1",), ("verl config",)),
        ((), ("verl config", "ppo_micro_batch_size")),  # verl's own validate_config, on one line
    ],
)
def test_entry_point_user_mistakes_are_one_line(tmp_path, args, words):
    _one_error_line(_launch(tmp_path, "trainer.total_training_steps=5", *args, script=False), *words)


def test_existing_run_name_is_refused_before_ray(tmp_path):
    from engine.store.store import Store

    Store(tmp_path / "runs").create_run({"algorithm": {"name": "a3po"}}, name="taken")
    p = _launch(
        tmp_path,
        "trainer.total_training_steps=5",
        f"a3po.store={tmp_path / 'runs'}",
        "a3po.run_name=taken",
        script=False,
    )
    _one_error_line(p, "already exists", "a3po.run_id=taken")


def test_own_verl_config_folder_and_name(tmp_path, monkeypatch):
    """main_ppo's --config-path/--config-name: a recipe YAML on top of verl's ppo_trainer."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "recipe.yaml").write_text(
        "hydra:\n  searchpath:\n    - pkg://verl.trainer.config\n"
        "defaults:\n  - ppo_trainer\n  - _self_\n"
        "trainer:\n  total_training_steps: 7\n"
    )
    cfg = prepare(["--config-path", str(tmp_path / "conf"), "--config-name=recipe", "a3po.algorithm.ratio=0.3"])
    from engine.integrations.verl_records import resolved_from_env

    r = resolved_from_env(ray_runtime_env(cfg)["env_vars"])
    assert cfg.trainer.total_training_steps == 7 and (r.decay_steps, r.ratio) == (7, 0.3)
    assert (tmp_path / "runs").is_dir()  # a3po.store's default, relative to the launch folder


def test_unknown_config_name_is_one_line(tmp_path):
    _one_error_line(_launch(tmp_path, "--config-name=nope", script=False), "verl config")


def test_valid_launch_hands_verls_run_ppo_the_writing_task_runner(tmp_path, monkeypatch):
    import verl.trainer.main_ppo as main_ppo

    from engine.integrations import verl_main

    calls = []
    monkeypatch.setattr(main_ppo, "run_ppo", lambda cfg, task_runner_class: calls.append((cfg, task_runner_class)))
    monkeypatch.chdir(tmp_path)
    micro = [f"actor_rollout_ref.{k}=1" for k in MICRO]
    model = "actor_rollout_ref.model.path=Qwen/Qwen2.5-Math-7B"
    args = ["algorithm.adv_estimator=grpo", "trainer.total_training_steps=5", model, *micro, "a3po.run_name=ok"]
    assert verl_main.main(args) == 0
    ((cfg, runner),) = calls
    assert runner is verl_main.A3POTaskRunner and hasattr(runner, "remote")  # a Ray actor class
    assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == "a3po" and cfg.a3po_lab.store == str(tmp_path / "runs")
