"""The store under a live writer: readers during compaction, a second writer refused, kills and disk errors.

The acceptance test runs a real training subprocess that checkpoints and compacts after every
step, while a second process queries the store in a loop (``query``, ``reading``, ``connect``) and
a third tries to ``--resume`` the same run. The other tests drive the trainer in-process with the
tiny model (about a second a run) to check what a kill or a full disk leaves behind.
"""

import errno
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT

from engine.config import load_config
from engine.store.store import StepSegment, Store
from engine.train.trainer import Trainer, resume

STEPS = 12
PROMPTS, N = 2, 2
LIVE = [
    f"train.steps={STEPS}",
    f"train.prompts_per_step={PROMPTS}",
    f"rollout.n={N}",
    "train.checkpoint_every=1",
    "train.compact_every=1",
    "train.eval_every=4",
    "eval.n_prompts=4",
    "eval.k=[1]",
    "train.threads=1",
    "train.save_final_model=false",
    "eval.at_start=false",
]

# Reads the store in a loop until told to stop and at least MIN queries ran; every query must
# succeed and see each (step, rollout) at most once. Prints a JSON summary as its last line.
READER = r"""
import json, os, sys, time
from engine.store.store import Store
root, stop, need = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = Store(root)
n = during = 0
errors = []
SQL = "select step, rollout_idx, count(*) c from rollouts group by all having c > 1"
while not (os.path.exists(stop) and n >= need):
    running = not os.path.exists(stop)
    try:
        kind = n % 3
        if kind == 0:
            dup = store.query(SQL)
            steps = store.query("select step from steps")["step"].tolist()
        elif kind == 1:
            with store.reading() as con:
                dup = con.execute(SQL).df()
                steps = [r[0] for r in con.execute("select step from steps").fetchall()]
        else:
            con = store.connect()
            try:
                dup = con.execute(SQL).df()
                steps = [r[0] for r in con.execute("select step from steps").fetchall()]
            finally:
                con.close()
        if len(dup) or len(steps) != len(set(steps)):
            errors.append(f"duplicate rows seen: {len(dup)} rollouts, steps {sorted(steps)}")
    except Exception as e:
        errors.append(f"{type(e).__name__}: {e}")
    n += 1
    during += running
print(json.dumps({"queries": n, "during": during, "errors": errors[:5], "n_errors": len(errors)}))
"""


def _env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def _wait(cond, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_readers_and_a_second_writer_during_a_live_run(tmp_path):
    """The acceptance test: no reader error during compactions, resume of the live run refused, every step once."""
    root, stop = tmp_path / "store", tmp_path / "stop"
    # a short grace period so that merged segments are also deleted while the reader runs
    env = _env(A3PO_STORE_GRACE_S="3")
    train = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "train", "--quiet", "--store", str(root), "name=live", *LIVE],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(root), str(stop), "500"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        store = Store(root)
        _wait(
            lambda: (root / "live" / "segments" / "step_000001").exists() or train.poll() is not None,
            120,
            "the first step",
        )
        second = subprocess.run(
            [sys.executable, "-m", "engine.cli", "train", "--quiet", "--resume", "live", "--store", str(root)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        live_during_resume = train.poll() is None
        out, err = train.communicate(timeout=180)
    finally:
        stop.touch()
        if train.poll() is None:
            train.kill()
    r_out, r_err = reader.communicate(timeout=120)
    assert train.returncode == 0, err[-3000:]
    assert live_during_resume, "the run ended before the second writer tried: make it longer"
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert lines[0].startswith("a3po: error: run 'live' is being written by pid ") and f"pid {train.pid} " in lines[0]
    assert " — wait for it to finish or stop it first" in lines[0]

    summary = json.loads(r_out.strip().splitlines()[-1]) if r_out.strip() else {"stderr": r_err[-3000:]}
    assert summary.get("n_errors") == 0, summary
    assert summary["queries"] >= 500
    assert summary["during"] >= 50, summary  # most of them while the run was writing and compacting

    meta = store.read_run("live")
    assert meta["status"] == "finished" and meta["last_step"] == STEPS and meta["final_accuracy"] is not None
    assert store.writer("live") is None and not (root / "live" / "writer.lock").exists()
    steps = store.query("select step, count(*) c from steps group by step order by step")
    assert steps["step"].tolist() == list(range(1, STEPS + 1)) and set(steps["c"]) == {1}
    per_step = store.query(
        "select step, count(*) c, count(distinct rollout_idx) d from rollouts group by step order by step"
    )
    assert per_step["step"].tolist() == list(range(1, STEPS + 1))
    assert set(per_step["c"]) == {PROMPTS * N} and set(per_step["d"]) == {PROMPTS * N}
    assert (
        store.query("select count(*) c from tokens")["c"][0]
        == store.query("select sum(length) s from rollouts")["s"][0]
    )
    chunks = [p.name for p in (root / "live" / "chunks").iterdir() if p.name.startswith("steps-")]
    assert len(chunks) == STEPS  # it really compacted after every step


# ------------------------------------------------------------------------------------ in-process runs
BASE = [
    "train.prompts_per_step=2",
    "rollout.n=2",
    "eval.n_prompts=4",
    "eval.k=[1,2]",
    "train.eval_every=0",
    "train.save_final_model=false",
    "train.steps=2",
    "train.threads=1",
    "train.checkpoint_every=1",
]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _trainer(tmp_path, name="t"):
    return Trainer(load_config(None, [*BASE, f"name={name}"]), Store(tmp_path, grace_s=0), log=lambda s: None)


def test_resume_after_kill_past_final_checkpoint_sets_final_accuracy(tmp_path):
    store = Store(tmp_path, grace_s=0)
    _trainer(tmp_path).fit(progress=False)
    final = store.query("select value from evals where step = 2 and metric = 'sampled_acc'")["value"].tolist()
    greedy = store.query("select value from evals where step = 2 and metric = 'greedy_acc'")["value"].tolist()
    assert len(final) == 1
    # the state a SIGKILL leaves after the final checkpoint: run.json still 'running', no final numbers,
    # a stale lease, a half-written segment and run.json temp file
    store.update_run("t", status="running", final_accuracy=None, final_greedy_accuracy=None)
    d = tmp_path / "t"
    (d / "writer.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": 2**22 + 7, "since": 0}))
    (d / "segments" / ".tmp-step_000003-77").mkdir(parents=True)
    (d / ".run.json.77.tmp").write_text("{")
    assert store.read_run("t")["status"] == "killed"
    res = resume("t", store, progress=False, log=lambda s: None)
    meta = store.read_run("t")
    assert meta["status"] == "finished" and meta["last_step"] == 2
    assert meta["final_accuracy"] == pytest.approx(final[0]) and meta["final_greedy_accuracy"] == pytest.approx(
        greedy[0]
    )
    assert res["final"]["sampled_acc"] == pytest.approx(final[0])
    assert not (d / "segments" / ".tmp-step_000003-77").exists() and not (d / ".run.json.77.tmp").exists()
    assert not (d / "writer.lock").exists()
    assert store.query("select step from steps order by step")["step"].tolist() == [1, 2]


def test_last_step_follows_every_step(tmp_path, monkeypatch):
    seen = []
    real = Store.update_run

    def spy(self, run_id, **fields):
        if "last_step" in fields:
            seen.append(fields["last_step"])
        return real(self, run_id, **fields)

    monkeypatch.setattr(Store, "update_run", spy)
    _trainer(tmp_path).fit(progress=False)
    assert seen == [0, 1, 2, 2]  # start, each step, finish


@pytest.mark.parametrize("record_fails", [False, True])
def test_disk_error_marks_the_run_failed(tmp_path, monkeypatch, record_fails):
    t = _trainer(tmp_path)
    real = StepSegment.commit

    def commit(self):
        if self.final.name == "step_000002":
            if record_fails:  # run.json cannot be written either
                monkeypatch.setattr(
                    Store,
                    "update_run",
                    lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")),
                )
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self)

    monkeypatch.setattr(StepSegment, "commit", commit)
    with pytest.raises(OSError) as ei:
        t.fit(progress=False)
    assert ei.value.errno == errno.ENOSPC  # the original error, never the one from recording it
    monkeypatch.undo()
    store = Store(tmp_path)
    meta = store.read_run("t")
    if record_fails:
        assert meta["status"] == "killed"  # 'running' in run.json, but its writer is gone
    else:
        assert meta["status"] == "failed" and "No space left on device" in meta["error"]
    assert store.writer("t") is None
