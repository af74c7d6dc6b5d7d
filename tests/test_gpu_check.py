"""The GPU check script runs its legs on the CPU too (``--cpu``), so CI keeps it working.

bash scripts/gpu_check.sh --cpu
"""

import subprocess
import sys

from conftest import ROOT


def test_gpu_check_cpu_mode_passes():
    p = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OMP_NUM_THREADS": "2"},
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    assert "[ops] logprob" in out and "[ops] entropy" in out
    assert "mean reward, first 5 steps" in out and "gpu check: ok" in out


def test_ops_leg_rejects_an_error_beyond_bf16_rounding(monkeypatch):
    """The tolerance is half a bf16 ulp: an extra 1% error on the log-probs must fail the check."""
    import importlib.util

    import pytest

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    gc.chunked_vs_full("cpu", V=4096, N=64)  # the real functions pass
    real = gc.token_logprobs
    monkeypatch.setattr(gc, "token_logprobs", lambda *a, **k: real(*a, **k) * 1.01)
    with pytest.raises(AssertionError, match="bf16 rounding"):
        gc.chunked_vs_full("cpu", V=4096, N=64)
