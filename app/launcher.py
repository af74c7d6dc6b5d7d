"""Background training runs for the app: a queue of real ``a3po train`` processes, one at a time.

Commands are argument lists (never shell strings); the config is written as a YAML file validated by
the engine first; run names are checked so nothing leaves the store folder. Jobs are refused unless
this server may launch them (``app.access``): the Launch page hides its form then, and the check
here holds even for a caller that skips the page.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from app.access import require_launch_allowed
from engine.config import config_from_dict
from engine.store.store import Store, check_name


@dataclass
class Job:
    run_id: str
    config_path: Path
    log_path: Path
    state: str = "queued"  # queued | running | finished | failed | stopped
    returncode: int | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)
    started: float | None = None

    def last_error(self) -> str:
        try:
            lines = [x for x in self.log_path.read_text().splitlines() if x.strip()]
        except OSError:
            return ""
        errs = [x for x in lines if x.startswith("a3po: error:") or "Error" in x]
        return (errs or lines or [""])[-1]


class Launcher:
    """Runs queued jobs one after another in a daemon thread."""

    def __init__(self, store: Store):
        self.store = store
        self.dir = store.root / ".launch"
        self.jobs: list[Job] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def submit(self, config: dict, run_id: str) -> Job:
        """Queue one run; raises ``LaunchDisabled`` where launching is off, ConfigError/ValueError on bad input."""
        require_launch_allowed()
        check_name(run_id)
        if (self.store.root / run_id).exists() or any(j.run_id == run_id for j in self.jobs):
            raise ValueError(f"run {run_id!r} already exists")
        config = {**config, "name": run_id}
        config_from_dict(config)  # raises ConfigError with one line on bad values
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.dir / f"{run_id}.yaml"
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        job = Job(run_id, cfg_path, self.dir / f"{run_id}.log")
        with self.lock:
            self.jobs.append(job)
        return job

    def _start(self, job: Job) -> None:
        cmd = [
            sys.executable,
            "-m",
            "engine.cli",
            "train",
            "--quiet",
            "--store",
            str(self.store.root),
            "--config",
            str(job.config_path),
        ]
        log = open(job.log_path, "w")
        job.proc = subprocess.Popen(cmd, cwd=str(self.dir), stdout=log, stderr=subprocess.STDOUT)
        job.state, job.started = "running", time.time()

    def _loop(self) -> None:
        while True:
            with self.lock:
                running = [j for j in self.jobs if j.state == "running"]
                for j in running:
                    rc = j.proc.poll()
                    if rc is not None:
                        j.returncode = rc
                        if j.state == "running":
                            j.state = "finished" if rc == 0 else "failed"
                if not any(j.state == "running" for j in self.jobs):
                    nxt = next((j for j in self.jobs if j.state == "queued"), None)
                    if nxt is not None:
                        self._start(nxt)
            time.sleep(0.2)

    def stop(self, run_id: str) -> None:
        with self.lock:
            for j in self.jobs:
                if j.run_id == run_id:
                    if j.state == "queued":
                        j.state = "stopped"
                    elif j.state == "running" and j.proc is not None:
                        j.proc.terminate()  # SIGTERM: the trainer marks the run 'killed'
                        j.state = "stopped"

    def wait(self, run_id: str, timeout: float = 600) -> Job:
        t0 = time.time()
        while time.time() - t0 < timeout:
            j = next(j for j in self.jobs if j.run_id == run_id)
            if j.state not in ("queued", "running") and (j.proc is None or j.proc.poll() is not None):
                return j
            time.sleep(0.2)
        raise TimeoutError(run_id)


def get_launcher(root: str) -> Launcher:
    """One launcher per store folder for the whole server process (shared by sessions and reruns)."""
    import streamlit as st

    @st.cache_resource
    def _make(root: str) -> Launcher:
        return Launcher(Store(root))

    return _make(root)
