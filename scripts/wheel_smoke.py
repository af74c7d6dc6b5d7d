"""Smoke test of an installed wheel, run from a folder outside the checkout (``make test-wheel``).

Why: the built-in model, task, demo config, seeded store and app pages must come from the installed
package, not from a checkout next to it. This trains one step of the built-in demo, lists the run,
and serves the app (stdin closed, no terminal) until its health endpoint and a page answer.

    /path/to/wheel-venv/bin/python /path/to/scripts/wheel_smoke.py
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def run(*args: str) -> str:
    p = subprocess.run([str(BIN / "a3po"), *args], capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        sys.exit(f"wheel smoke: a3po {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p.stdout


def serve_app(store: str, deadline_s: float = 120.0) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open("app.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "a3po"), "app", "--store", store, "--port", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        end = time.monotonic() + deadline_s
        while True:
            try:
                if urllib.request.urlopen(url + "/_stcore/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > end:
                sys.exit(f"wheel smoke: the app did not serve:\n{Path('app.log').read_text()[-3000:]}")
            time.sleep(0.2)  # polling interval
        assert urllib.request.urlopen(url + "/", timeout=10).status == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def main() -> None:
    here = Path.cwd().resolve()
    import engine

    pkg = Path(engine.__file__).resolve().parent.parent
    if (here / "engine").exists() or "site-packages" not in str(pkg):
        sys.exit(f"wheel smoke: run it from outside the checkout with an installed wheel (engine from {pkg})")
    run(
        "train",
        "--quiet",
        "--store",
        "runs",
        "name=wheel-smoke",
        "train.steps=1",
        "train.prompts_per_step=2",
        "rollout.n=2",
        "eval.n_prompts=2",
        "eval.k=[1]",
        "eval.at_start=false",
        "train.save_final_model=false",
    )
    listing = run("runs", "--store", "runs")
    print(listing, end="")
    if not any(line.startswith("wheel-smoke") and line.rstrip().endswith("finished") for line in listing.splitlines()):
        sys.exit("wheel smoke: the trained run is not listed as finished")
    # The built-in model and task data straight from the package, without a config.
    print(run("eval", "--model", "builtin:tiny-countdown", "--n-prompts", "4", "--k", "1"), end="")
    from engine.model import cpu_kernels

    if not cpu_kernels.SOURCE.exists():
        sys.exit(f"wheel smoke: the decode kernels' source is not in the package ({cpu_kernels.SOURCE})")
    print(cpu_kernels.status())
    serve_app("runs")
    print(f"wheel smoke: ok (package at {pkg})")


if __name__ == "__main__":
    main()
