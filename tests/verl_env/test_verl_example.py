"""The shipped multi-node example, exactly as shipped, against verl's real config and Ray's checks.

bash runs examples/verl_a3po_multinode.sh with a stand-in ``python3`` first on PATH: the stand-in
records the argv and environment of the ``python3 -m verl.trainer.main_ppo`` call (and hands any
other ``python3`` call to the real interpreter), so every default, quote and expansion is bash's
own. The recorded overrides are composed with Hydra against verl's own config folder, checked by
verl's ``validate_config`` and the ``runtime_env`` that main_ppo would give ``ray.init`` is checked
by Ray's own validation. No GPU, no Ray cluster.
"""

import os
import re
import shlex
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
    env = {k: v for k, v in os.environ.items() if not k.startswith("A3PO_") and k not in ("NNODES", "GPUS_PER_NODE", "STEPS")}
    env.update(PATH=f"{bindir}:{env['PATH']}", REAL_PYTHON=sys.executable, RECORD_ARGS=str(tmp_path / "args"),
               RECORD_ENV=str(tmp_path / "env"), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(extra_env or {}))
    p = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    argv = (tmp_path / "args").read_bytes().decode().split("\0")[:-1]
    launched_env = dict(kv.split("=", 1) for kv in (tmp_path / "env").read_bytes().decode().split("\0") if "=" in kv)
    assert argv[:2] == ["-m", "verl.trainer.main_ppo"]
    return argv[2:], launched_env


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    import verl.trainer.main_ppo as main_ppo

    config_dir = Path(main_ppo.__file__).parent / "config"
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return hydra_compose(config_name="ppo_trainer", overrides=overrides)


def loss_env_names() -> set[str]:
    """Every A3PO_* name the integration module reads (from its source, so a new one cannot be missed)."""
    src = (ROOT / "engine" / "integrations" / "verl.py").read_text()
    return set(re.findall(r'"(A3PO_[A-Z_]+)"', src))
