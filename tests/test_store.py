"""Unit tests for engine.store.store: run metadata, atomic step segments, compaction, truncation, views."""

import json
import os
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.store import schema
from engine.store.store import SCHEMAS, TABLES, Store, StoreError, check_name

CONFIG = {"algorithm": {"name": "grpo"}, "train": {"steps": 10}}


def tokens_table(run_id: str, step: int, n: int = 3) -> pa.Table:
    rows = [
        {
            "run_id": run_id,
            "step": step,
            "rollout_idx": i // 2,
            "position": i,
            "token_id": 100 * step + i,
            "token_text": f"t{step}.{i}",
            "logprob": -0.5,
            "entropy": 1.0,
            "adv_raw": 1.0,
            "adv_shaped": 2.0,
            "is_key": i == 0,
            "polarity": 1,
        }
        for i in range(n)
    ]
    return pa.Table.from_pylist(rows, schema=SCHEMAS["tokens"])


def steps_table(run_id: str, step: int) -> pa.Table:
    return schema.steps_table(run_id, step, {"reward": step / 10, "acc": 0.5, "entropy": 1.0, "length": 3.0})


def evals_table(run_id: str, step: int) -> pa.Table:
    return pa.Table.from_pylist(
        [{"run_id": run_id, "step": step, "metric": "pass@k", "k": 1, "value": 0.5, "n": 4}], schema=SCHEMAS["evals"]
    )


def write(store: Store, rid: str, step: int, n_tokens: int = 3) -> None:
    store.write_step(rid, step, {"tokens": tokens_table(rid, step, n_tokens), "steps": steps_table(rid, step)})


def token_keys(store: Store, rid: str | None = None):
    if rid is None:
        df = store.query("select step, position from tokens order by step, position")
    else:
        df = store.query("select step, position from tokens where run_id = ? order by step, position", [rid])
    return [(int(s), int(p)) for s, p in zip(df["step"], df["position"])]


def expected_keys(steps, n=3):
    return [(s, p) for s in steps for p in range(n)]


@pytest.fixture
def store(tmp_path):
    # grace 0: compaction deletes merged segments at once (the grace period has its own tests)
    return Store(tmp_path / "runs", grace_s=0)


# ------------------------------------------------------------------------------------ runs
def test_create_read_update_run(store):
    rid = store.create_run(CONFIG, name="exp1", study="polarity")
    assert rid == "exp1"
    assert (store.root / "exp1" / "run.json").exists()
    meta = store.read_run(rid)
    assert meta["run_id"] == "exp1" and meta["name"] == "exp1"
    assert meta["algorithm"] == "grpo"
    assert meta["status"] == "created"
    assert meta["study"] == "polarity"
    assert meta["total_steps"] == 10
    assert meta["last_step"] == 0
    assert meta["config"] == CONFIG
    assert meta["pid"] == os.getpid()

    before = meta["updated"]
    store.acquire_writer(rid)
    new = store.update_run(rid, status="running", last_step=4)
    assert new["status"] == "running" and new["last_step"] == 4
    meta2 = store.read_run(rid)
    assert meta2["status"] == "running"  # we hold the lease
    store.release_writer(rid)
    assert not (store.root / rid / "writer.lock").exists()
    assert meta2["last_step"] == 4
    assert meta2["updated"] >= before
    assert meta2["config"] == CONFIG
    assert store.run_ids() == ["exp1"]
    # no temporary files left next to run.json
    assert sorted(p.name for p in (store.root / "exp1").iterdir()) == ["run.json"]


def test_create_run_generated_names_are_unique(store):
    a = store.create_run(CONFIG)
    b = store.create_run(CONFIG)
    assert a != b
    assert a.endswith("grpo")
    assert b.startswith(a)  # second one gets a -N suffix (same second) or a later timestamp
    check_name(a), check_name(b)
    assert sorted(store.run_ids()) == sorted([a, b])


def test_duplicate_explicit_name_raises(store):
    store.create_run(CONFIG, name="same")
    with pytest.raises(StoreError) as ei:
        store.create_run(CONFIG, name="same")
    assert "same" in str(ei.value)
    assert store.run_ids() == ["same"]


@pytest.mark.parametrize("bad", ["../evil", "a/b", "..", "", ".hidden", "a..b", "/abs", "with space", "x" * 129])
def test_bad_run_names_raise(store, bad):
    with pytest.raises(StoreError):
        check_name(bad)
    with pytest.raises(StoreError):
        store.run_dir(bad)
    with pytest.raises(StoreError):
        store.read_run(bad)


@pytest.mark.parametrize("bad", ["../evil", "a/b", "..", ".hidden", "a..b"])
def test_create_run_with_escaping_name_raises(store, tmp_path, bad):
    with pytest.raises(StoreError):
        store.create_run(CONFIG, name=bad)
    assert not (tmp_path / "evil").exists()
    assert store.run_ids() == []


def test_create_run_with_empty_name_raises(store):
    # an explicit empty name is invalid (check_name refuses it), not "no name"
    with pytest.raises(StoreError):
        store.create_run(CONFIG, name="")


def test_good_names_accepted():
    for good in ["a", "run-1", "run_1.v2", "A" * 128, "2024.01.01"]:
        assert check_name(good) == good


def test_read_missing_run_raises(store):
    with pytest.raises(StoreError):
        store.read_run("ghost")


def test_dead_writer_is_reported_killed(store):
    rid = store.create_run(CONFIG, name="crashed")
    path = store.root / rid / "run.json"
    meta = json.loads(path.read_text())
    # pid_max on Linux is at most 2**22, so this pid cannot exist
    meta.update(status="running", pid=2**22 + 12345, host=socket.gethostname())
    path.write_text(json.dumps(meta))
    assert store.read_run(rid)["status"] == "killed"
    assert json.loads(path.read_text())["status"] == "running"  # reading does not rewrite the file
    assert store.query("select status from runs where run_id = ?", [rid])["status"].tolist() == ["killed"]


def test_running_run_on_other_host_is_not_killed(store):
    rid = store.create_run(CONFIG, name="remote")
    path = store.root / rid / "run.json"
    meta = json.loads(path.read_text())
    meta.update(status="running", pid=2**22 + 12345, host=socket.gethostname() + "-elsewhere")
    path.write_text(json.dumps(meta))
    lease = {"host": socket.gethostname() + "-elsewhere", "pid": 2**22 + 12345, "start": 1, "since": 0}
    (store.root / rid / "writer.lock").write_text(json.dumps(lease))
    assert store.read_run(rid)["status"] == "running"


def test_finished_run_with_dead_pid_keeps_status(store):
    rid = store.create_run(CONFIG, name="done")
    store.update_run(rid, status="finished", pid=2**22 + 12345)
    assert store.read_run(rid)["status"] == "finished"


# ------------------------------------------------------------------------------------ writing / reading
def test_write_steps_then_query(store):
    rid = store.create_run(CONFIG, name="r")
    for s in (1, 2, 3):
        write(store, rid, s)
    assert token_keys(store, rid) == expected_keys([1, 2, 3])
    df = store.query("select step, reward from steps order by step")
    assert df["step"].tolist() == [1, 2, 3]
    assert df["reward"].tolist() == pytest.approx([0.1, 0.2, 0.3])
    seg = store.root / rid / "segments"
    assert sorted(p.name for p in seg.iterdir()) == ["step_000001", "step_000002", "step_000003"]
    # nothing for tables not written
    assert int(store.query("select count(*) as n from evals")["n"][0]) == 0


def test_tmp_segment_is_never_read(store):
    rid = store.create_run(CONFIG, name="r")
    for s in (1, 2, 3):
        write(store, rid, s)
    crashed = store.root / rid / "segments" / ".tmp-step_000004-123"
    crashed.mkdir()
    pq.write_table(tokens_table(rid, 4), crashed / "tokens.parquet")
    assert token_keys(store, rid) == expected_keys([1, 2, 3])
    files = store.files("tokens")
    assert len(files) == 3
    assert all(".tmp-" not in f for f in files)
    with store.reading() as con:
        assert con.execute("select max(step) from tokens").fetchone()[0] == 3


def test_write_step_rewrite_replaces(store):
    rid = store.create_run(CONFIG, name="r")
    write(store, rid, 1, n_tokens=3)
    write(store, rid, 1, n_tokens=5)  # the step is recomputed after a resume
    assert token_keys(store, rid) == expected_keys([1], n=5)
    assert not [p for p in (store.root / rid / "segments").iterdir() if p.name.startswith(".tmp")]


def test_write_step_unknown_table_raises_and_publishes_nothing(store):
    rid = store.create_run(CONFIG, name="r")
    with pytest.raises(StoreError):
        store.write_step(rid, 1, {"tokens": tokens_table(rid, 1), "bogus": tokens_table(rid, 1)})
    assert not (store.root / rid / "segments" / "step_000001").exists()
    assert not list((store.root / rid / "segments").glob(".tmp-*"))  # the half-written step is dropped
    assert token_keys(store, rid) == []


def test_empty_tables_are_skipped(store):
    rid = store.create_run(CONFIG, name="r")
    store.write_step(rid, 1, {"tokens": tokens_table(rid, 1, n=0), "steps": steps_table(rid, 1), "evals": None})
    seg = store.root / rid / "segments" / "step_000001"
    assert sorted(p.name for p in seg.iterdir()) == ["steps.parquet"]
    assert int(store.query("select count(*) as n from tokens")["n"][0]) == 0
    assert int(store.query("select count(*) as n from steps")["n"][0]) == 1


def test_connect_holds_no_lock(store):
    rid = store.create_run(CONFIG, name="r")
    write(store, rid, 1)
    con = store.connect()
    assert con.execute("select count(*) from tokens").fetchone()[0] == 3
    write(store, rid, 2)  # a writer proceeds while a reader is open
    con2 = store.connect()
    assert con2.execute("select count(*) from tokens").fetchone()[0] == 6
    assert con.execute("select count(*) from tokens").fetchone()[0] == 3  # files listed at connect time
    con.close()
    con2.close()


def test_parameterised_query(store):
    a = store.create_run(CONFIG, name="a")
    b = store.create_run(CONFIG, name="b")
    write(store, a, 1, n_tokens=2)
    write(store, a, 2, n_tokens=2)
    write(store, b, 1, n_tokens=7)
    sql = "select count(*) as n from tokens where run_id = ?"
    assert int(store.query(sql, [a])["n"][0]) == 4
    assert int(store.query(sql, [b])["n"][0]) == 7
    assert int(store.query(sql, ["a' or '1'='1"])["n"][0]) == 0
    # restricting the connection to one run
    assert int(store.query("select count(*) as n from tokens", run_ids=[b])["n"][0]) == 7
    with pytest.raises(StoreError):
        store.connect(run_ids=["../a"])


def test_runs_view(store):
    store.create_run(CONFIG, name="a", study="s1")
    store.create_run({"algorithm": {"name": "dapo"}}, name="b")
    df = store.query("select run_id, algorithm, study, status, config from runs order by run_id")
    assert df["run_id"].tolist() == ["a", "b"]
    assert df["algorithm"].tolist() == ["grpo", "dapo"]
    assert df["study"].tolist()[0] == "s1"
    assert df["status"].tolist() == ["created", "created"]
    assert json.loads(df["config"][0]) == CONFIG


def test_empty_store(tmp_path):
    store = Store(tmp_path / "does-not-exist-yet")
    assert store.run_ids() == []
    con = store.connect()
    try:
        for view in ("runs",) + TABLES:
            assert con.execute(f"select count(*) from {view}").fetchone()[0] == 0, view
        # empty views still have the documented columns
        cols = [r[0] for r in con.execute("describe tokens").fetchall()]
        assert cols == SCHEMAS["tokens"].names
    finally:
        con.close()


def test_run_without_steps(store):
    store.create_run(CONFIG, name="r")
    for view in ("steps", "rollouts", "tokens", "evals"):
        assert int(store.query(f"select count(*) as n from {view}")["n"][0]) == 0
    assert int(store.query("select count(*) as n from runs")["n"][0]) == 1


# ------------------------------------------------------------------------------------ compaction
def test_compact_merges_and_keeps_rows(store):
    rid = store.create_run(CONFIG, name="r")
    for s in range(1, 6):
        tables = {"tokens": tokens_table(rid, s), "steps": steps_table(rid, s)}
        if s == 2:
            tables["evals"] = evals_table(rid, s)
        store.write_step(rid, s, tables)
    assert store.compact(rid, 3) == 3
    seg = store.root / rid / "segments"
    assert sorted(p.name for p in seg.iterdir()) == ["step_000004", "step_000005"]
    chunks = sorted(p.name for p in (store.root / rid / "chunks").iterdir())
    # a chunk is named after the merged step range, even for a table present in only some steps
    assert chunks == ["evals-000001-000003.parquet", "steps-000001-000003.parquet", "tokens-000001-000003.parquet"]
    assert token_keys(store, rid) == expected_keys([1, 2, 3, 4, 5])
    assert store.query("select step from steps order by step")["step"].tolist() == [1, 2, 3, 4, 5]
    assert store.query("select step from evals")["step"].tolist() == [2]
    # no duplicates
    assert int(store.query("select count(*) as n from tokens")["n"][0]) == 15


def test_compact_twice_and_nothing_to_do(store):
    rid = store.create_run(CONFIG, name="r")
    for s in range(1, 7):
        write(store, rid, s)
    assert store.compact(rid, 2) == 2
    assert store.compact(rid, 2) == 0
    assert store.compact(rid, 5) == 3
    assert sorted(p.name for p in (store.root / rid / "segments").iterdir()) == ["step_000006"]
    tok_chunks = sorted(p.name for p in (store.root / rid / "chunks").iterdir() if p.name.startswith("tokens"))
    assert tok_chunks == ["tokens-000001-000002.parquet", "tokens-000003-000005.parquet"]
    assert token_keys(store, rid) == expected_keys(range(1, 7))
    write(store, rid, 7)
    assert token_keys(store, rid) == expected_keys(range(1, 8))


def test_compact_one_run_does_not_hide_another(store):
    a = store.create_run(CONFIG, name="a")
    b = store.create_run(CONFIG, name="b")
    for s in (1, 2, 3):
        write(store, a, s)
        write(store, b, s)
    store.compact(a, 3)
    assert token_keys(store, a) == expected_keys([1, 2, 3])
    assert token_keys(store, b) == expected_keys([1, 2, 3])


# ------------------------------------------------------------------------------------ truncation
def test_truncate_after_removes_later_segments(store):
    rid = store.create_run(CONFIG, name="r")
    for s in range(1, 6):
        write(store, rid, s)
    crashed = store.root / rid / "segments" / ".tmp-step_000006-999"
    crashed.mkdir()
    assert store.truncate_after(rid, 3) == 2
    assert sorted(p.name for p in (store.root / rid / "segments").iterdir()) == [
        "step_000001",
        "step_000002",
        "step_000003",
    ]
    assert token_keys(store, rid) == expected_keys([1, 2, 3])
    # resume: steps 4.. are written again
    write(store, rid, 4, n_tokens=2)
    assert token_keys(store, rid) == expected_keys([1, 2, 3]) + [(4, 0), (4, 1)]


def test_truncate_after_cuts_chunks(store):
    rid = store.create_run(CONFIG, name="r")
    for s in range(1, 9):
        write(store, rid, s)
    store.compact(rid, 4)
    store.compact(rid, 6)
    # chunks 1-4 and 5-6, segments 7-8
    assert store.truncate_after(rid, 5) == 2
    assert token_keys(store, rid) == expected_keys([1, 2, 3, 4, 5])
    assert store.query("select step from steps order by step")["step"].tolist() == [1, 2, 3, 4, 5]
    tok_chunks = sorted(p.name for p in (store.root / rid / "chunks").iterdir() if p.name.startswith("tokens"))
    assert tok_chunks == ["tokens-000001-000004.parquet", "tokens-000005-000005.parquet"]
    # the resumed run writes step 6 again and it is visible
    write(store, rid, 6)
    assert token_keys(store, rid) == expected_keys([1, 2, 3, 4, 5, 6])


def test_truncate_after_drops_whole_later_chunk(store):
    rid = store.create_run(CONFIG, name="r")
    for s in range(1, 7):
        write(store, rid, s)
    store.compact(rid, 3)
    store.compact(rid, 6)
    store.truncate_after(rid, 3)
    tok_chunks = sorted(p.name for p in (store.root / rid / "chunks").iterdir() if p.name.startswith("tokens"))
    assert tok_chunks == ["tokens-000001-000003.parquet"]
    assert token_keys(store, rid) == expected_keys([1, 2, 3])
    write(store, rid, 4)
    assert token_keys(store, rid) == expected_keys([1, 2, 3, 4])


def test_delete_run(store):
    rid = store.create_run(CONFIG, name="r")
    write(store, rid, 1)
    store.delete_run(rid)
    assert store.run_ids() == []
    assert not (store.root / rid).exists()
    assert int(store.query("select count(*) as n from tokens")["n"][0]) == 0


def _simulate_compaction_killed_after_first_chunk(store: Store, rid: str, upto: int) -> None:
    """The state ``compact`` leaves when killed after renaming its first chunk (``steps``) into
    place and before writing the others or removing any segment."""
    segs = sorted(p for p in (store.root / rid / "segments").iterdir() if p.name.startswith("step_"))
    segs = [p for p in segs if int(p.name.split("_")[1]) <= upto]
    first, last = int(segs[0].name.split("_")[1]), int(segs[-1].name.split("_")[1])
    cdir = store.root / rid / "chunks"
    cdir.mkdir(exist_ok=True)
    merged = pa.concat_tables([pq.read_table(p / "steps.parquet") for p in segs])
    pq.write_table(merged, cdir / f"steps-{first:06d}-{last:06d}.parquet")


def test_compaction_killed_midway_loses_no_rows(store):
    rid = store.create_run(CONFIG, name="r")
    for s in (1, 2, 3):
        write(store, rid, s)
    _simulate_compaction_killed_after_first_chunk(store, rid, 3)
    # every completed step stays visible exactly once, in every table
    assert store.query("select step from steps order by step")["step"].tolist() == [1, 2, 3]
    assert token_keys(store, rid) == expected_keys([1, 2, 3])


def test_compaction_rerun_after_kill_has_no_duplicates(store):
    rid = store.create_run(CONFIG, name="r")
    for s in (1, 2, 3):
        write(store, rid, s)
    _simulate_compaction_killed_after_first_chunk(store, rid, 3)
    # the resumed run writes more steps and compacts again
    for s in (4, 5):
        write(store, rid, s)
    store.compact(rid, 5)
    assert store.query("select step from steps order by step")["step"].tolist() == [1, 2, 3, 4, 5]
    assert token_keys(store, rid) == expected_keys([1, 2, 3, 4, 5])


# ------------------------------------------------------------------------------------ writer lease
@pytest.fixture
def other_process():
    """A live process that is not us (its pid stands in for another writer)."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield p
    p.kill()
    p.wait()


def lease_of(pid: int, **kw) -> str:
    from engine.store.store import _proc_start

    return json.dumps({"host": socket.gethostname(), "pid": pid, "start": _proc_start(pid), "since": 0, **kw})


def test_lease_is_taken_and_released(store):
    rid = store.create_run(CONFIG, name="r")
    assert store.writer(rid) is None
    info = store.acquire_writer(rid)
    on_disk = json.loads((store.root / rid / "writer.lock").read_text())
    assert on_disk["pid"] == os.getpid() and on_disk["host"] == socket.gethostname() and on_disk == info
    assert store.writer(rid)["pid"] == os.getpid()
    assert store.acquire_writer(rid) == info  # re-entrant in the holder
    store.release_writer(rid)
    assert not (store.root / rid / "writer.lock").exists()
    assert store.writer(rid) is None


def test_lease_held_by_live_process_is_refused(store, other_process):
    rid = store.create_run(CONFIG, name="r")
    (store.root / rid / "writer.lock").write_text(lease_of(other_process.pid))
    with pytest.raises(StoreError) as ei:
        store.acquire_writer(rid)
    msg = str(ei.value)
    assert f"pid {other_process.pid}" in msg and socket.gethostname() in msg and " — " in msg and "\n" not in msg
    store.release_writer(rid)  # not ours: must not remove it
    assert json.loads((store.root / rid / "writer.lock").read_text())["pid"] == other_process.pid
    store.update_run(rid, status="running")
    assert store.read_run(rid)["status"] == "running"


def test_stale_lease_is_taken_over(store, other_process):
    rid = store.create_run(CONFIG, name="r")
    lock = store.root / rid / "writer.lock"
    store.update_run(rid, status="running")
    lock.write_text(lease_of(2**22 + 12345))  # a pid that cannot exist
    assert store.read_run(rid)["status"] == "killed"
    assert store.acquire_writer(rid)["pid"] == os.getpid()
    store.release_writer(rid)
    # pid reuse: the pid is alive but started at another time than the lease's writer
    lock.write_text(lease_of(other_process.pid, start=1))
    assert store.writer(rid) is None
    assert store.acquire_writer(rid)["pid"] == os.getpid()
    store.release_writer(rid)
    lock.write_text("{half a lea")  # unreadable: stale
    assert store.acquire_writer(rid)["pid"] == os.getpid()


def test_lease_from_another_host_is_trusted(store):
    rid = store.create_run(CONFIG, name="r")
    (store.root / rid / "writer.lock").write_text(json.dumps({"host": "elsewhere", "pid": 2**22 + 1, "since": 0}))
    with pytest.raises(StoreError, match="on host elsewhere"):
        store.acquire_writer(rid)


def test_compact_by_non_holder_is_refused(store, other_process):
    rid = store.create_run(CONFIG, name="r")
    for s in (1, 2, 3):
        write(store, rid, s)
    (store.root / rid / "writer.lock").write_text(lease_of(other_process.pid))
    with pytest.raises(StoreError, match=f"pid {other_process.pid}"):
        store.compact(rid, 3)
    assert not (store.root / rid / "chunks").exists()
    assert len(list((store.root / rid / "segments").iterdir())) == 3
    with pytest.raises(StoreError):
        store.delete_run(rid)
    # with the lease free, compact takes it for the duration and gives it back
    (store.root / rid / "writer.lock").unlink()
    assert store.compact(rid, 3) == 3
    assert not (store.root / rid / "writer.lock").exists()


def test_fit_releases_the_lease_on_interrupt_and_finish(store, monkeypatch):
    from engine.train.trainer import Trainer

    rid = store.create_run(CONFIG, name="r", lease=True)
    assert store.writer(rid)["pid"] == os.getpid()  # the run appears already leased
    t = Trainer.__new__(Trainer)  # only the lifecycle wrapper: no model needed
    t.store, t.run_id = store, rid

    def interrupted(progress):
        assert store.writer(rid)["pid"] == os.getpid()
        raise KeyboardInterrupt

    monkeypatch.setattr(t, "_fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        t.fit(progress=False)
    assert store.writer(rid) is None
    monkeypatch.setattr(t, "_fit", lambda progress: {"run_id": rid})
    store.acquire_writer(rid)
    assert t.fit(progress=False) == {"run_id": rid}
    assert store.writer(rid) is None


def test_resume_of_finished_or_live_run_is_one_line(store, other_process):
    from engine.train.trainer import resume

    rid = store.create_run(CONFIG, name="done")
    store.update_run(rid, status="finished", last_step=10)
    with pytest.raises(StoreError, match=r"already finished .* — start a new run"):
        resume(rid, store)
    live = store.create_run(CONFIG, name="live")
    store.update_run(live, status="running")
    (store.root / live / "writer.lock").write_text(lease_of(other_process.pid))
    with pytest.raises(StoreError, match=f"'live' is being written by pid {other_process.pid}"):
        resume(live, store)


# ------------------------------------------------------------------------------------ creation and cleanup
def test_half_created_run_is_invisible_and_name_reusable(store):
    store.create_run(CONFIG, name="other")
    # a kill while assembling the hidden folder: invisible, and removed by the next creation
    ghost = store.root / f".tmp-new-x-{2**22 + 99}"
    ghost.mkdir()
    (ghost / "run.json").write_text("{}")
    # an older writer killed between mkdir and run.json: an empty folder under the name
    (store.root / "x").mkdir()
    assert store.run_ids() == ["other"]
    assert store.create_run(CONFIG, name="x") == "x"
    assert store.read_run("x")["status"] == "created"
    assert not ghost.exists()
    assert sorted(p.name for p in store.root.iterdir()) == ["other", "x"]


def test_create_run_in_a_file_or_unwritable_store_is_one_line(tmp_path, monkeypatch):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(StoreError, match="is a file, not a folder — pass a folder"):
        Store(f).create_run(CONFIG, name="r")
    with pytest.raises(StoreError, match="is a file"):
        Store(f).runs_table()
    assert Store(tmp_path / "missing").runs_table().num_rows == 0  # no store yet: no runs

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    store = Store(tmp_path / "ro")
    store.root.mkdir()
    monkeypatch.setattr(os, "mkdir", denied)  # what a read-only folder does (chmod does not stop root)
    with pytest.raises(StoreError, match="Permission denied — pick a writable folder"):
        store.create_run(CONFIG, name="r")
    monkeypatch.undo()
    assert list(store.root.iterdir()) == []


def test_clean_temp_removes_only_leftovers(store):
    rid = store.create_run(CONFIG, name="r")
    write(store, rid, 1)
    store.compact(rid, 1)
    write(store, rid, 2)
    d = store.root / rid
    (d / "segments" / ".tmp-step_000003-999").mkdir()
    (d / "chunks" / ".tmp-tokens-999.parquet").write_text("x")
    (d / ".run.json.999.tmp").write_text("x")
    (d / ".checkpoint-tmp").mkdir()
    (d / "checkpoint").mkdir()
    (d / "checkpoint" / "trainer_state.pt").write_text("x")
    (d / ".checkpoint-old").mkdir()
    assert store.clean_temp(rid) == 5
    assert sorted(p.name for p in d.iterdir()) == ["checkpoint", "chunks", "run.json", "segments"]
    assert sorted(p.name for p in (d / "segments").iterdir()) == ["step_000002"]
    assert store.query("select step from steps order by step")["step"].tolist() == [1, 2]


def test_checkpoint_fallback_survives_clean_temp(store):
    rid = store.create_run(CONFIG, name="r")
    d = store.root / rid
    (d / ".checkpoint-old").mkdir()  # killed between renaming the old checkpoint away and the new one in
    store.clean_temp(rid)
    assert (d / ".checkpoint-old").exists()


# ------------------------------------------------------------------------------------ bad run.json
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("last_step", 99999999999, "run.json: last_step 99999999999 out of range"),
        ("total_steps", "10", "run.json: total_steps '10' is not an integer"),
        ("created", "yesterday", "run.json: created 'yesterday' is not a number"),
        ("config", [1, 2], "run.json: config is a list, not an object"),
    ],
)
def test_runs_table_lists_bad_values_as_invalid(store, field, value, message):
    good = store.create_run(CONFIG, name="good")
    write(store, good, 1)
    bad = store.create_run(CONFIG, name="bad")
    path = store.root / bad / "run.json"
    meta = json.loads(path.read_text())
    meta[field] = value
    path.write_text(json.dumps(meta))
    rows = {r["run_id"]: r for r in store.runs_table().to_pylist()}
    assert rows["good"]["status"] == "created" and rows["good"]["error"] is None
    assert rows["bad"]["status"] == "invalid" and rows["bad"]["error"] == message
    assert rows["bad"][field] is None and rows["bad"]["algorithm"] == "grpo"
    df = store.query("select run_id, status from runs order by run_id")
    assert df["status"].tolist() == ["invalid", "created"]
    assert store.query("select count(*) n from tokens")["n"][0] == 3


def test_runs_table_lists_corrupt_json_as_invalid(store):
    store.create_run(CONFIG, name="good")
    bad = store.create_run(CONFIG, name="bad")
    (store.root / bad / "run.json").write_text('{"run_id": "bad", ')
    rows = {r["run_id"]: r for r in store.runs_table().to_pylist()}
    assert rows["good"]["status"] == "created"
    assert rows["bad"]["status"] == "invalid" and rows["bad"]["error"].startswith("run.json is not valid JSON")
    with pytest.raises(StoreError, match="not valid JSON .* — fix or delete"):
        store.read_run("bad")


# ------------------------------------------------------------------------------------ readers vs compaction
def test_merged_segments_stay_readable_for_the_grace_period(tmp_path):
    store = Store(tmp_path, grace_s=3600)
    rid = store.create_run(CONFIG, name="r")
    for s in (1, 2, 3):
        write(store, rid, s)
    old_files = store.files("tokens", [rid])
    assert store.compact(rid, 3) == 3
    assert all(os.path.exists(f) for f in old_files)  # a reader that listed them still finds them
    assert store.files("tokens", [rid]) == [str(store.root / rid / "chunks" / "tokens-000001-000003.parquet")]
    assert token_keys(store, rid) == expected_keys([1, 2, 3])  # no duplicates from the kept copies
    assert store.compact(rid, 3) == 0  # retired segments are not merged again
    assert store.purge_retired(rid) == 0
    assert store.purge_retired(rid, older_than=0) == 3
    assert not any((store.root / rid / "segments").iterdir())
    assert token_keys(store, rid) == expected_keys([1, 2, 3])


def test_reading_survives_files_removed_under_it(store):
    rid = store.create_run(CONFIG, name="r")
    for s in (1, 2, 3):
        write(store, rid, s)
    with store.reading() as con:
        store.compact(rid, 3)  # grace 0: the segments the views point at are gone
        assert con.execute("select count(*) from tokens").fetchone()[0] == 9
        assert con.execute("select count(*) from steps where step > ?", [1]).fetchone()[0] == 2


def test_connect_relists_when_a_listed_file_vanished(store, monkeypatch):
    rid = store.create_run(CONFIG, name="r")
    write(store, rid, 1)
    real = Store.files
    calls = []

    def flaky(self, table, run_ids=None):
        calls.append(table)
        out = real(self, table, run_ids)
        return out + [str(store.root / rid / "segments" / "gone.parquet")] if len(calls) == 1 else out

    monkeypatch.setattr(Store, "files", flaky)
    assert store.query("select count(*) n from tokens")["n"][0] == 3
    assert len(calls) > len(TABLES)  # the first listing failed and was redone


# ------------------------------------------------------------------------------------ export
def test_export_refuses_existing_files_unless_forced(store, tmp_path):
    rid = store.create_run(CONFIG, name="r")
    write(store, rid, 1)
    write(store, rid, 2)
    out = tmp_path / "out"
    paths = store.export(rid, out)
    assert [p.name for p in paths] == [
        "runs.parquet",
        "steps.parquet",
        "rollouts.parquet",
        "tokens.parquet",
        "evals.parquet",
    ]
    assert pq.read_table(out / "tokens.parquet").num_rows == 6
    assert pq.read_table(out / "runs.parquet").num_rows == 1
    with pytest.raises(StoreError, match="runs.parquet exists — remove it"):
        store.export(rid, out)
    other = tmp_path / "other"
    other.mkdir()
    (other / "steps.parquet").write_text("old")
    with pytest.raises(StoreError, match="steps.parquet exists — remove it"):
        store.export(rid, other)
    assert [p.name for p in other.iterdir()] == ["steps.parquet"]  # refused before writing anything
    assert (other / "steps.parquet").read_text() == "old"
    store.export(rid, other, force=True)
    assert pq.read_table(other / "steps.parquet").num_rows == 2
    db = store.export(rid, out, fmt="duckdb")
    assert [p.name for p in db] == ["r.duckdb"]
    with pytest.raises(StoreError, match="r.duckdb exists"):
        store.export(rid, out, fmt="duckdb")
    store.export(rid, out, fmt="duckdb", force=True)
    import duckdb

    con = duckdb.connect(str(out / "r.duckdb"), read_only=True)
    assert con.execute("select count(*) from tokens").fetchone()[0] == 6
    con.close()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_failed_export_leaves_nothing(store, tmp_path, monkeypatch):
    rid = store.create_run(CONFIG, name="r")
    write(store, rid, 1)
    out = tmp_path / "out"

    def boom(*a):
        raise RuntimeError("disk trouble")

    monkeypatch.setattr(Store, "_export_to", boom)
    with pytest.raises(RuntimeError):
        store.export(rid, out)
    assert list(out.iterdir()) == []
    with pytest.raises(StoreError, match="quote"):
        store.export(rid, tmp_path / "it's")


def test_running_without_lease_file_depends_on_the_writer_kind(store):
    # a leasing writer (the trainer) that is gone: no lease file means nobody writes it, even though
    # run.json's pid (ours) is alive
    a = store.create_run(CONFIG, name="leased", lease=True)
    store.update_run(a, status="running")
    assert store.read_run(a)["status"] == "running"
    store.release_writer(a)
    assert store.read_run(a)["status"] == "killed"
    # a writer that takes no lease (the TRL callback): its live pid in run.json keeps it running
    b = store.create_run(CONFIG, name="plain")
    store.update_run(b, status="running")
    assert store.read_run(b)["status"] == "running"
    store.update_run(b, pid=2**22 + 12345)
    assert store.read_run(b)["status"] == "killed"
