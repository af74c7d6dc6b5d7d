"""The run store: append-only Parquet segments per step, queried through DuckDB.

Why not one DuckDB file: while a process holds a read-write DuckDB connection no other process can
open that file, not even read-only. A training run writes every step while the app reads it, so
the writer never holds a database open. Each completed step is written as one *segment* (a folder
of Parquet files for the tables below), first under a temporary name and then renamed into place:
a step is visible completely or not at all, so a run killed at any moment keeps every completed
step. Periodically (after each checkpoint) segments are merged into larger *chunk* files so that a
long run does not leave thousands of small files. Readers open an in-memory DuckDB connection whose
views ``runs, steps, rollouts, tokens, evals`` read the current files; see ``Store.connect``.

Layout::

    <root>/<run_id>/run.json                      config, status, timestamps (atomic rewrite)
    <root>/<run_id>/segments/step_000012/*.parquet one folder per completed step
    <root>/<run_id>/chunks/tokens-000001-000025.parquet   merged segments
    <root>/<run_id>/checkpoint/                   last checkpoint (model, optimiser, RNG)

    <root>/<run_id>/writer.lock                   the writer's lease (JSON: host, pid, process start, since)

What the tables and run.json hold is defined in ``engine.store.schema`` (and README.md, "The store"); this
module only reads and writes them.

Concurrency and kills (why each rule exists):

* **One writer per run.** A run is written only by the holder of its lease, ``writer.lock``. The lease
  is published atomically (written to a temporary file, then hard-linked into place, which fails if a
  lease exists) while holding ``flock`` on the run folder, so two processes cannot both take it. A
  lease is *stale* when, on this host, its pid is gone or that pid now belongs to a process that
  started at another time (pid reuse); a stale lease is taken over. A lease from another host is
  trusted until the user removes the file. ``read_run``/``runs_table`` report a ``running`` run
  without a live lease as ``killed``. Writers that take the lease say so in run.json
  (``writer_lease: true``); for a run written without one (an older version, the TRL callback)
  run.json's pid and host are tested the same way instead.
* **Readers never see a missing file.** Compaction does not delete the segments it merged: it marks
  them retired (a ``.retired`` file inside the segment folder; readers skip covered segments anyway)
  and deletes retired segments only once they are older than ``grace_s`` seconds, at a later
  compaction or at the end of the run. A reader that listed files just before a compaction therefore
  still finds them. On top of that every read path (``connect``, ``query``, ``reading``, ``export``)
  re-lists the files and retries when DuckDB reports a file that vanished (resume truncation,
  deleted runs, a reader slower than the grace period).
* **Atomic run creation.** A new run is assembled under a hidden temporary folder (run.json and the
  lease inside) and renamed into place, so a kill leaves either nothing visible or a complete run.
  Resume removes the temporary files a killed writer left behind (``Store.clean_temp``).
* **Bad run.json never breaks readers.** A run.json that does not parse or whose values do not fit
  the ``runs`` columns is listed with status ``invalid`` and an ``error`` naming the problem.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from engine.store import schema
from engine.store.schema import RUN_COLUMNS, SCHEMAS, TABLES, step_tables  # noqa: F401  (step_tables: older importers)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SEG = re.compile(r"^step_(\d{6,})$")
_CHUNK = re.compile(r"^(\w+)-(\d{6,})-(\d{6,})\.parquet$")
LOCK = "writer.lock"
RETIRED = ".retired"
GRACE_S = 120.0  # how long merged segments stay readable after a compaction (A3PO_STORE_GRACE_S overrides)


class StoreError(ValueError):
    """Bad run id, missing run, a run another process writes, or an unusable store folder."""


def check_name(name: str, what: str = "run id") -> str:
    """Refuse names that could escape the store folder (``..``, ``/``, empty, odd characters)."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise StoreError(
            f"invalid {what} {name!r} — use letters, digits, '.', '_' or '-' (max 128, not starting with '.')"
        )
    return name


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True


def _proc_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux ``/proc``); None when unknown.

    Recorded in the lease so that a new process that got a dead writer's pid is not taken for it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


_HOST = socket.gethostname()


def _is_vanished_file(e: BaseException) -> bool:
    """True for the errors a read gets when a file it listed was removed in between."""
    if isinstance(e, FileNotFoundError):
        return True
    msg = str(e)
    return any(k in msg for k in ("No files found", "IO Error", "Cannot open", "No such file"))


class Store:
    """A folder of runs. Cheap to construct; holds no open handles.

    ``grace_s``: how long segments merged by a compaction stay on disk for readers that listed them
    before (default 120 s, or the ``A3PO_STORE_GRACE_S`` environment variable)."""

    def __init__(self, root: str | os.PathLike = "runs", grace_s: float | None = None):
        self.root = Path(root).expanduser().resolve()
        if grace_s is None:
            grace_s = float(os.environ.get("A3PO_STORE_GRACE_S", GRACE_S))
        self.grace_s = grace_s

    # ---------------------------------------------------------------- runs
    def run_dir(self, run_id: str) -> Path:
        d = (self.root / check_name(run_id)).resolve()
        if d.parent != self.root:
            raise StoreError(f"run id {run_id!r} escapes the store — use a plain name without '/' or '..'")
        return d

    def _check_root_readable(self) -> bool:
        """False when there is no store yet; StoreError when the path is not a folder."""
        if not self.root.exists():
            return False
        if not self.root.is_dir():
            raise StoreError(f"store path {self.root} is a file, not a folder — pass a folder with --store")
        return True

    def run_ids(self) -> list[str]:
        if not self._check_root_readable():
            return []
        return sorted(p.name for p in self.root.iterdir() if _NAME.match(p.name) and (p / "run.json").exists())

    def read_run(self, run_id: str) -> dict:
        path = self.run_dir(run_id) / "run.json"
        if not path.exists():
            raise StoreError(f"no run {run_id!r} in {self.root} — list the runs with `a3po runs --store {self.root}`")
        try:
            meta = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"run {run_id!r}: run.json is not valid JSON ({e}) — fix or delete {path}") from None
        if not isinstance(meta, dict):
            raise StoreError(f"run {run_id!r}: run.json is not a JSON object — fix or delete {path}")
        if meta.get("status") == "running" and not self._writer_alive(run_id, meta):
            meta["status"] = "killed"  # the writer died without saying so
        return meta

    def _writer_alive(self, run_id: str, meta: dict) -> bool:
        """The lease test. A run whose run.json lacks ``writer_lease`` comes from a writer that takes
        no lease (an older version, the TRL callback): its run.json pid/host stand in for the lease."""
        info = self._lease_info(run_id)
        if info is None and not meta.get("writer_lease"):
            info = {"host": meta.get("host"), "pid": meta.get("pid")}
        return self._lease_live(info)

    def create_run(
        self, config: dict, *, name: str | None = None, study: str | None = None, lease: bool = False
    ) -> str:
        """Create a run folder with its run.json, atomically: it appears complete or not at all.

        With ``lease=True`` the folder appears with this process already holding the writer lease, so
        no other process can write the run in between."""
        self._make_root()
        algo = str(config.get("algorithm", {}).get("name", "run"))
        base = name if name is not None else f"{time.strftime('%Y%m%d-%H%M%S')}-{algo}"
        check_name(base)
        self._clean_tmp_runs()
        run_id, i = base, 1
        while True:
            meta = schema.run_meta(
                run_id, config, name=name, study=study, pid=os.getpid(), host=_HOST, lease=lease, now=time.time()
            )
            if self._publish_run(run_id, meta, lease):
                return run_id
            if name is not None:
                raise StoreError(
                    f"run {name!r} already exists in {self.root} — pick another name or resume it with --resume {name}"
                )
            i += 1
            run_id = f"{base}-{i}"

    def _make_root(self) -> None:
        self._check_root_readable()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(
                f"cannot create the store folder {self.root}: {e.strerror} — pick a writable folder with --store"
            ) from None

    def _publish_run(self, run_id: str, meta: dict, lease: bool) -> bool:
        """Build the run under a hidden name and rename it into place; False when the name is taken.

        rename(2) replaces an *empty* folder, so an empty folder left by an older, killed writer is
        reused; a folder with content is never replaced."""
        final = self.run_dir(run_id)
        if (final / "run.json").exists():
            return False
        tmp = self.root / f".tmp-new-{run_id}-{os.getpid()}"
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            _atomic_write_text(tmp / "run.json", json.dumps(meta, indent=1, default=str))
            if lease:
                self._write_lease(tmp / LOCK)
            os.rename(tmp, final)
            return True
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return False
            raise StoreError(
                f"cannot create run {run_id!r} in {self.root}: {e.strerror} — pick a writable folder with --store"
            ) from None

    def _clean_tmp_runs(self) -> None:
        """Remove hidden half-created run folders whose creator (on this host) is gone."""
        for p in self.root.glob(".tmp-new-*"):
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)

    def update_run(self, run_id: str, **fields) -> dict:
        """Rewrite run.json with ``fields`` changed (atomically); the fields are checked against
        ``engine.store.schema.RUN_FIELDS`` first."""
        schema.check_run_fields(fields)
        path = self.run_dir(run_id) / "run.json"
        meta = json.loads(path.read_text())
        meta.update(fields)
        meta["updated"] = time.time()
        _atomic_write_text(path, json.dumps(meta, indent=1, default=str))
        return meta

    def delete_run(self, run_id: str) -> None:
        self._refuse_live_writer(run_id)
        shutil.rmtree(self.run_dir(run_id))

    # ---------------------------------------------------------------- writer lease
    def _write_lease(self, path: Path) -> dict:
        """Publish this process's lease at ``path``; FileExistsError when one is there."""
        info = {"host": _HOST, "pid": os.getpid(), "start": _proc_start(os.getpid()), "since": time.time()}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(info))
        try:
            os.link(tmp, path)  # atomic, and fails if a lease exists: readers never see half a lease
        finally:
            tmp.unlink(missing_ok=True)
        return info

    @contextmanager
    def _guard(self, run_id: str):
        """Serialise lease changes on one run (flock on the run folder; released if the process dies)."""
        d = self.run_dir(run_id)
        try:
            fd = os.open(d, os.O_RDONLY)
        except FileNotFoundError:
            raise StoreError(
                f"no run {run_id!r} in {self.root} — list the runs with `a3po runs --store {self.root}`"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield d
        finally:
            os.close(fd)

    def _lease_info(self, run_id: str) -> dict | None:
        try:
            info = json.loads((self.run_dir(run_id) / LOCK).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable lease: treated as stale
        return info if isinstance(info, dict) else {}

    @staticmethod
    def _lease_live(info: dict | None) -> bool:
        if not info:
            return False
        if info.get("host") != _HOST:
            return True  # another machine's writer: trusted until the user removes the lease
        try:
            pid = int(info.get("pid", 0))
        except (TypeError, ValueError):
            return False
        if not _pid_alive(pid):
            return False
        start = info.get("start")
        return start is None or _proc_start(pid) in (None, start)

    @staticmethod
    def _lease_mine(info: dict | None) -> bool:
        return (
            bool(info)
            and info.get("host") == _HOST
            and info.get("pid") == os.getpid()
            and info.get("start") == _proc_start(os.getpid())
        )

    def writer(self, run_id: str) -> dict | None:
        """The live writer lease of a run (host, pid, start, since), or None when nobody writes it."""
        info = self._lease_info(run_id)
        return info if self._lease_live(info) else None

    def _busy_error(self, run_id: str, info: dict) -> StoreError:
        since = time.strftime("%H:%M", time.localtime(float(info.get("since") or 0)))
        return StoreError(
            f"run {run_id!r} is being written by pid {info.get('pid')} on host {info.get('host')} since {since} "
            f"— wait for it to finish or stop it first"
        )

    def acquire_writer(self, run_id: str) -> dict:
        """Take the run's writer lease (re-entrant within this process); StoreError if another live process holds it.

        A stale lease (dead pid or reused pid on this host, unreadable file) is taken over."""
        with self._guard(run_id) as d:
            info = self._lease_info(run_id)
            if self._lease_mine(info):
                return info
            if self._lease_live(info):
                raise self._busy_error(run_id, info)
            (d / LOCK).unlink(missing_ok=True)
            try:
                return self._write_lease(d / LOCK)
            except OSError as e:
                raise StoreError(
                    f"cannot write the lease of run {run_id!r}: {e.strerror} — make {d} writable"
                ) from None

    def release_writer(self, run_id: str) -> None:
        """Give up the lease if this process holds it (a no-op otherwise)."""
        with self._guard(run_id) as d:
            if self._lease_mine(self._lease_info(run_id)):
                (d / LOCK).unlink(missing_ok=True)

    def _refuse_live_writer(self, run_id: str) -> None:
        info = self.writer(run_id)
        if info is not None and not self._lease_mine(info):
            raise self._busy_error(run_id, info)

    @contextmanager
    def _writing(self, run_id: str):
        """Run a maintenance write as the lease holder: use our lease, or take a free one for the duration."""
        if self._lease_mine(self._lease_info(run_id)):
            yield
            return
        self.acquire_writer(run_id)
        try:
            yield
        finally:
            self.release_writer(run_id)

    def clean_temp(self, run_id: str) -> int:
        """Remove the temporary files a killed writer left in the run (caller holds the lease)."""
        d = self.run_dir(run_id)
        junk = [
            *(d / "segments").glob(".tmp-*"),
            *(d / "chunks").glob(".tmp-*"),
            *d.glob(".run.json.*.tmp"),
            *d.glob(f".{LOCK}.*.tmp"),
            d / ".checkpoint-tmp",
        ]
        if (d / "checkpoint" / "trainer_state.pt").exists():
            junk.append(d / ".checkpoint-old")  # only a fallback while the new checkpoint is incomplete
        n = 0
        for p in junk:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                n += 1
            elif p.exists():
                p.unlink(missing_ok=True)
                n += 1
        return n

    # ---------------------------------------------------------------- writing
    def begin_step(self, run_id: str, step: int) -> StepSegment:
        """Start writing one step; nothing is visible until ``commit()``."""
        return StepSegment(self.run_dir(run_id) / "segments", step)

    def write_step(
        self, run_id: str, step: int, tables: dict[str, pa.Table | None], metrics: dict | None = None
    ) -> float:
        """Write one completed step atomically (all its tables or none); the one way a step is written.

        ``metrics``: the step's ``steps`` row as a dict of registered metrics (``engine.store.schema.steps_table``
        builds it, so every writer's steps rows have the same columns). The time spent writing the
        other tables is added to its ``t_store`` (and ``t_step`` when present) and ``time`` is set
        before the row is written into the same segment, so the store's timing is measured here
        alone. A ready ``steps`` table in ``tables`` is accepted too (checked the same way), but not
        together with ``metrics``. Returns the seconds the write took (commit included)."""
        if metrics is not None and tables.get("steps") is not None:
            raise schema.SchemaError("write_step got both a steps table and metrics — pass one of them")
        t0 = time.perf_counter()
        seg = self.begin_step(run_id, step)
        try:
            for name, table in tables.items():
                seg.write(name, table)
            if metrics is not None:
                done = schema.with_store_time(metrics, time.perf_counter() - t0, time.time())
                seg.write("steps", schema.steps_table(run_id, step, done))
            seg.commit()
        except BaseException:
            seg.abort()
            raise
        return time.perf_counter() - t0

    def _segments(self, run_id: str) -> list[tuple[int, Path]]:
        d = self.run_dir(run_id) / "segments"
        if not d.exists():
            return []
        out = []
        for p in d.iterdir():
            m = _SEG.match(p.name)
            if m:
                out.append((int(m.group(1)), p))
        return sorted(out)

    def _chunks(self, run_id: str) -> list[tuple[str, int, int, Path]]:
        d = self.run_dir(run_id) / "chunks"
        if not d.exists():
            return []
        out = []
        for p in d.iterdir():
            m = _CHUNK.match(p.name)
            if m:
                out.append((m.group(1), int(m.group(2)), int(m.group(3)), p))
        return sorted(out, key=lambda x: (x[0], x[1]))

    def _covered(self, run_id: str) -> dict[str, int]:
        """Per table, the last step merged into a chunk (-1 when none)."""
        cov = {t: -1 for t in TABLES}
        for table, _, last, _ in self._chunks(run_id):
            cov[table] = max(cov.get(table, -1), last)
        return cov

    def compact(self, run_id: str, upto_step: int) -> int:
        """Merge all segments with ``step <= upto_step`` into one chunk file per table.

        Only the run's writer may compact: the caller must hold the lease, or the lease must be free
        (then it is taken for the duration); a run another live process writes is refused.
        Coverage is tracked per table: a chunk is renamed into place before any segment is retired,
        and readers skip, table by table, the segments a chunk already covers. So a reader during
        compaction, or a compaction killed half-way and run again, sees every row exactly once.
        Merged segments are kept for ``grace_s`` seconds (see the module docstring).
        Returns the number of segments merged."""
        with self._writing(run_id):
            n = self._compact(run_id, upto_step)
            self.purge_retired(run_id)
        return n

    def _compact(self, run_id: str, upto_step: int) -> int:
        cov = self._covered(run_id)
        segs = [(s, p) for s, p in self._segments(run_id) if s <= upto_step and not (p / RETIRED).exists()]
        if not segs:
            return 0
        cdir = self.run_dir(run_id) / "chunks"
        cdir.mkdir(exist_ok=True)
        for table in TABLES:
            todo = [
                (s, p / f"{table}.parquet") for s, p in segs if s > cov[table] and (p / f"{table}.parquet").exists()
            ]
            if not todo:
                continue
            merged = pa.concat_tables([pq.read_table(f) for _, f in todo], promote_options="default")
            tmp = cdir / f".tmp-{table}-{os.getpid()}.parquet"
            pq.write_table(merged, tmp, compression="zstd", row_group_size=256_000)
            # named after the step range this compaction covers for the table (even steps without rows)
            first = min(s for s, _ in segs if s > cov[table])
            os.replace(tmp, cdir / f"{table}-{first:06d}-{segs[-1][0]:06d}.parquet")
        for _, p in segs:
            (p / RETIRED).touch()  # readers already skip it (covered); deleted after the grace period
        return len(segs)

    def purge_retired(self, run_id: str, older_than: float | None = None) -> int:
        """Delete merged segments retired more than ``older_than`` (default ``grace_s``) seconds ago."""
        limit = time.time() - (self.grace_s if older_than is None else older_than)
        n = 0
        for _, p in self._segments(run_id):
            try:
                old = (p / RETIRED).stat().st_mtime <= limit  # marked only once chunks hold all its rows
            except FileNotFoundError:
                continue
            if old:
                shutil.rmtree(p, ignore_errors=True)
                n += 1
        return n

    def truncate_after(self, run_id: str, step: int) -> int:
        """Remove stored steps after ``step`` (used by resume: they are recomputed)."""
        removed = 0
        for s, p in self._segments(run_id):
            if s > step:
                removed += not (p / RETIRED).exists()  # retired copies are not steps lost
                shutil.rmtree(p, ignore_errors=True)
        for table, a, b, p in self._chunks(run_id):
            if a > step:
                p.unlink(missing_ok=True)
            elif b > step:  # never produced by the trainer (chunks end at a checkpoint); handled anyway
                t = pq.read_table(p)
                import pyarrow.compute as pc

                t = t.filter(pc.less_equal(t["step"], step))
                tmp = p.with_name(f".tmp-{p.name}")
                pq.write_table(t, tmp, compression="zstd")
                os.replace(tmp, p.with_name(f"{table}-{a:06d}-{step:06d}.parquet"))
                p.unlink(missing_ok=True)
        for d in (self.run_dir(run_id) / "segments").glob(".tmp-*"):
            shutil.rmtree(d, ignore_errors=True)
        return removed

    # ---------------------------------------------------------------- reading
    def files(self, table: str, run_ids: Iterable[str] | None = None) -> list[str]:
        """Current Parquet files of ``table`` (chunks, plus segments no chunk covers)."""
        out = []
        for rid in self.run_ids() if run_ids is None else run_ids:
            chunks = [c for c in self._chunks(rid) if c[0] == table]
            covered = max((b for _, _, b, _ in chunks), default=-1)
            out += [str(p) for _, _, _, p in chunks]
            out += [
                str(p / f"{table}.parquet")
                for s, p in self._segments(rid)
                if s > covered and (p / f"{table}.parquet").exists()
            ]
        return out

    def runs_table(self) -> pa.Table:
        """One row per run; a run.json that does not parse or fit the columns is listed as ``invalid``."""
        rows = []
        for rid in self.run_ids():
            try:
                rows.append(self._run_row(rid))
            except FileNotFoundError:
                continue  # deleted while listing
        return pa.Table.from_pylist(rows, schema=schema.RUNS_SCHEMA)

    def _run_row(self, rid: str) -> dict:
        try:
            m = self.read_run(rid)
        except FileNotFoundError:
            raise
        except OSError as e:
            return {
                **{k: None for k, _ in RUN_COLUMNS},
                "run_id": rid,
                "status": "invalid",
                "error": f"run.json: cannot read ({e.strerror})",
            }
        except StoreError as e:
            if not (self.run_dir(rid) / "run.json").exists():
                raise FileNotFoundError(rid) from None
            msg = str(e).split(" — ")[0].replace(f"run {rid!r}: ", "")
            return {**{k: None for k, _ in RUN_COLUMNS}, "run_id": rid, "status": "invalid", "error": msg}
        row, problems = schema.run_row(m)
        row["run_id"] = rid
        if problems:
            row["status"] = "invalid"
            row["error"] = "run.json: " + "; ".join(problems)
        return row

    def connect(self, run_ids: Iterable[str] | None = None, retries: int = 20):
        """An in-memory DuckDB connection with views over the store's current files.

        Views: ``runs``, ``steps``, ``rollouts``, ``tokens``, ``evals``. Restrict to ``run_ids`` to
        read fewer files. Files are listed when this is called: reconnect to see new steps. Creating
        a view opens the files; when one vanished in between (compaction, resume), the files are
        listed again (up to ``retries`` times).
        """
        import duckdb

        ids = None if run_ids is None else [check_name(r) for r in run_ids]
        con = duckdb.connect()
        try:
            _retry(lambda: self._create_views(con, ids), retries)
        except BaseException:
            con.close()
            raise
        return con

    def _create_views(self, con, ids) -> None:
        con.register("runs_arrow", self.runs_table())
        con.execute("CREATE OR REPLACE VIEW runs AS SELECT * FROM runs_arrow")
        for table in TABLES:
            files = self.files(table, ids)
            if files:
                # DuckDB cannot bind parameters in a view definition: the list is our own file names,
                # quoted as SQL string literals.
                lst = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
                con.execute(
                    f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM read_parquet([{lst}], union_by_name=true)"
                )
            else:
                con.register(f"{table}_empty", SCHEMAS[table].empty_table())
                con.execute(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM {table}_empty")

    def query(self, sql: str, params: list | None = None, run_ids: Iterable[str] | None = None, retries: int = 20):
        """Run one parameterised query and return a pandas DataFrame; retries if compaction moved files."""
        with self.reading(run_ids, retries=retries) as con:
            return con.execute(sql, params or []).df()

    @contextmanager
    def reading(self, run_ids: Iterable[str] | None = None, retries: int = 20):
        """A read connection for several queries. Its ``execute`` re-lists the files and retries when
        one it read vanished, so queries see a consistent, complete store even across compactions."""
        con = _ReadConnection(self, None if run_ids is None else list(run_ids), retries)
        try:
            yield con
        finally:
            con.close()

    def export(self, run_id: str, out_dir: str | os.PathLike, fmt: str = "parquet", force: bool = False) -> list[Path]:
        """Write one run's tables to ``out_dir``: ``{runs,steps,rollouts,tokens,evals}.parquet`` or ``<run>.duckdb``.

        Existing targets are refused unless ``force``. Everything is written under temporary names
        and renamed into place at the end, so a failed export leaves no half-written file."""
        self.read_run(check_name(run_id))
        if fmt not in ("parquet", "duckdb"):
            raise StoreError(f"unknown export format {fmt!r} — use parquet or duckdb")
        out = Path(out_dir).expanduser().resolve()
        names = [f"{t}.parquet" for t in ("runs",) + TABLES] if fmt == "parquet" else [f"{run_id}.duckdb"]
        targets = [out / n for n in names]
        for t in targets:
            _sql_path(t)
            if t.exists() and not force:
                raise StoreError(f"{t} exists — remove it, pick another folder or pass --force (force=True)")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the export folder {out}: {e.strerror} — pick a writable folder") from None
        tmps = [out / f".tmp-export-{os.getpid()}-{n}" for n in names]
        try:
            _retry(lambda: self._export_to(run_id, fmt, tmps), 20)
            for tmp, t in zip(tmps, targets):
                os.replace(tmp, t)
        finally:
            for tmp in tmps:
                tmp.unlink(missing_ok=True)
        return targets

    def _export_to(self, run_id: str, fmt: str, tmps: list[Path]) -> None:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        con = self.connect([run_id], retries=0)
        try:
            if fmt == "parquet":
                for t, tmp in zip(("runs",) + TABLES, tmps):
                    con.execute(
                        f"COPY (SELECT * FROM {t} WHERE run_id = ?) TO '{_sql_path(tmp)}' (FORMAT parquet)", [run_id]
                    )
            else:
                con.execute(f"ATTACH '{_sql_path(tmps[0])}' AS dst")
                try:
                    for t in ("runs",) + TABLES:
                        con.execute(f"CREATE TABLE dst.{t} AS SELECT * FROM {t} WHERE run_id = ?", [run_id])
                finally:
                    con.execute("DETACH dst")
        finally:
            con.close()


def _sql_path(p: Path) -> str:
    s = str(Path(p).resolve())
    if "'" in s:
        raise StoreError(f"export path may not contain a quote: {s} — pick a folder without quotes")
    return s


def _retry(fn, retries: int):
    """Call ``fn``; when it fails because a listed file vanished, call it again (with a short backoff)."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:
            if not _is_vanished_file(e) or attempt == retries:
                if _is_vanished_file(e):
                    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    raise StoreError(f"store files kept changing while reading ({first}) — try again") from None
                raise
            time.sleep(min(0.01 * (attempt + 1), 0.2))


class _ReadConnection:
    """A DuckDB connection over the store whose ``execute`` survives files vanishing under it.

    On a vanished-file error the views are rebuilt from a fresh file listing and the statement is
    run again. Anything else is passed through to the DuckDB connection."""

    def __init__(self, store: Store, run_ids: list[str] | None, retries: int):
        self._store, self._ids, self._retries = store, run_ids, retries
        self._con = store.connect(run_ids, retries)

    def execute(self, sql: str, params=None):
        def once():
            try:
                return self._con.execute(sql, params or [])
            except Exception as e:
                if _is_vanished_file(e):
                    self._store._create_views(
                        self._con, None if self._ids is None else [check_name(r) for r in self._ids]
                    )
                raise

        return _retry(once, self._retries)

    def sql(self, sql: str):
        return self.execute(sql)

    def close(self) -> None:
        self._con.close()

    def __getattr__(self, name):
        return getattr(self._con, name)


class StepSegment:
    """One step's Parquet files, written under a temporary folder and renamed into place on commit."""

    def __init__(self, seg_root: Path, step: int):
        seg_root.mkdir(exist_ok=True)
        self.final = seg_root / f"step_{step:06d}"
        self.tmp = seg_root / f".tmp-step_{step:06d}-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()

    def write(self, name: str, table: pa.Table | None) -> None:
        if name not in TABLES:
            raise StoreError(f"unknown table {name!r}")
        if table is not None and table.num_rows:
            if name == "steps":  # every writer's steps rows get the registered columns, or fail here
                table = schema.conform_steps(table)
            pq.write_table(table, self.tmp / f"{name}.parquet", compression="zstd", compression_level=1)

    def abort(self) -> None:
        """Drop the unpublished step (a failed write leaves nothing behind)."""
        shutil.rmtree(self.tmp, ignore_errors=True)

    def commit(self) -> None:
        if self.final.exists():  # a step recomputed after resume replaces the old copy
            shutil.rmtree(self.final)
        os.rename(self.tmp, self.final)
