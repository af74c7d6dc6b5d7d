import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# A run small enough for tests: 4 prompts x 4 rollouts, short evals.
TINY = [
    "train.prompts_per_step=4",
    "rollout.n=4",
    "eval.n_prompts=8",
    "eval.k=[1,2]",
    "train.eval_every=0",
    "train.save_final_model=false",
]


def a3po(*args, store=None, check=True, timeout=300, **kw):
    """Run the real console script (python -m engine.cli) and return the CompletedProcess."""
    cmd = [sys.executable, "-m", "engine.cli", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if store is not None:
        env["A3PO_STORE"] = str(store)
    p = subprocess.run(cmd, cwd=kw.get("cwd", ROOT), env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


@pytest.fixture
def tiny():
    return list(TINY)


def free_port() -> int:
    """A TCP port nobody listens on right now (for a Streamlit server under test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    """True when the Streamlit server at ``url`` answers its health endpoint."""
    try:
        return urllib.request.urlopen(url + "/_stcore/health", timeout=2).status == 200
    except OSError:
        return False
