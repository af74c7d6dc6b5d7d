"""The wheel carries what the built-in default needs, and the code finds it through importlib.resources.

A regular install has no checkout around ``engine/``: the demo config, the tiny models, the task
splits, the seeded store and the app's pages must be inside the wheel (``make test-wheel`` then
installs it into a fresh venv and trains from an unrelated folder).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile

from conftest import ROOT


def test_wheel_carries_the_builtin_defaults(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (wheel,) = tmp_path.glob("a3po_lab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    must = {"a3po_configs/demo.yaml", "app/main.py", "engine/resources.py", "engine/model/csrc/cpu_kernels.c"}
    for model in ("tiny-countdown", "tiny-model"):
        must |= {f"a3po_data/{model}/{f}" for f in ("config.json", "model.safetensors", "tokenizer.json")}
    for task in ("countdown", "arith"):
        must |= {f"a3po_data/{task}/train.jsonl", f"a3po_data/{task}/test.jsonl"}
    must |= {f"app/pages/{p.name}" for p in (ROOT / "app" / "pages").glob("*.py")}
    must |= {f"a3po_data/store/{p.parent.name}/run.json" for p in (ROOT / "data" / "store").glob("*/run.json")}
    must |= {
        f"a3po_data/store/{p.relative_to(ROOT / 'data' / 'store')}"
        for p in (ROOT / "data" / "store").rglob("*.parquet")
    }
    assert len(must) > 20
    missing = sorted(must - names)
    assert not missing, f"the wheel lacks {missing}"
    assert not any(n.startswith(("tests/", "docs/", "bench/")) for n in names)


def test_resources_resolve_to_the_checkout_in_a_source_tree():
    from engine.resources import app_dir, configs_dir, data_dir, demo_config, in_checkout

    assert in_checkout()
    assert data_dir() == ROOT / "data" and configs_dir() == ROOT / "configs" and app_dir() == ROOT / "app"
    assert demo_config().is_file() and (data_dir() / "tiny-countdown" / "config.json").is_file()


def test_build_tiny_model_outside_a_checkout_needs_out(monkeypatch):
    """An installed package is never overwritten: without a checkout the build asks for --out."""
    import pytest

    import engine.resources as res
    from engine.config import ConfigError
    from engine.tasks.tiny_model import build_tiny_model

    monkeypatch.setattr(res, "in_checkout", lambda: False)
    with pytest.raises(ConfigError, match="needs --out"):
        build_tiny_model(task="countdown", steps=1)


def test_launched_jobs_run_in_the_store_not_the_package(tmp_path, monkeypatch):
    """The app's jobs start with the store's launch folder as working folder (a wheel has no checkout)."""
    import app.launcher as launcher
    from engine.store.store import Store

    seen = {}

    class FakePopen:
        def __init__(self, cmd, cwd=None, **kw):
            seen.update(cmd=cmd, cwd=cwd)

        def poll(self):
            return 0

    monkeypatch.setattr(launcher.subprocess, "Popen", FakePopen)
    L = launcher.Launcher.__new__(launcher.Launcher)  # no scheduler thread: call _start directly
    L.store, L.dir = Store(tmp_path / "runs"), tmp_path / "runs" / ".launch"
    L.dir.mkdir(parents=True)
    L._start(launcher.Job("j", L.dir / "j.yaml", L.dir / "j.log"))
    assert seen["cwd"] == str(L.dir) and seen["cmd"][1:4] == ["-m", "engine.cli", "train"]
