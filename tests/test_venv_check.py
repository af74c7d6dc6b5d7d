"""scripts/venv_check.py: a distribution whose RECORD names a file missing from disk is found."""

import importlib.util

from conftest import ROOT

spec = importlib.util.spec_from_file_location("venv_check", ROOT / "scripts" / "venv_check.py")
venv_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(venv_check)


def _dist(site, name, files, present):
    info = site / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    rows = [*files, f"{name}-1.0.dist-info/METADATA,,", f"{name}-1.0.dist-info/RECORD,,"]
    (info / "RECORD").write_text("\n".join(f if "," in f else f"{f},sha256=x,1" for f in rows) + "\n")
    for f in present:
        (site / f).parent.mkdir(parents=True, exist_ok=True)
        (site / f).write_text("")


def test_missing_installed_files_are_named_per_distribution(tmp_path):
    _dist(tmp_path, "whole", ["whole/__init__.py", "whole/core.so"], ["whole/__init__.py", "whole/core.so"])
    _dist(
        tmp_path, "broken", ["broken/__init__.py", "broken/core.so", "broken/__pycache__/x.pyc"], ["broken/__init__.py"]
    )
    assert venv_check.incomplete([str(tmp_path)]) == {"broken==1.0": ["broken/core.so"]}
