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

The schema of each table is documented in README.md ("The store") and in ``SCHEMAS`` below.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

TABLES = ("steps", "rollouts", "tokens", "evals")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SEG = re.compile(r"^step_(\d{6,})$")
_CHUNK = re.compile(r"^(\w+)-(\d{6,})-(\d{6,})\.parquet$")

SCHEMAS: dict[str, pa.Schema] = {
    "rollouts": pa.schema([
        ("run_id", pa.string()), ("step", pa.int32()), ("rollout_idx", pa.int32()), ("group_idx", pa.int32()),
        ("prompt_idx", pa.int64()), ("prompt", pa.string()), ("response", pa.string()), ("answer", pa.string()),
        ("reward", pa.float32()), ("correct", pa.bool_()), ("polarity", pa.int8()), ("length", pa.int32()),
        ("truncated", pa.bool_()), ("adv_raw", pa.float32()), ("mean_logprob", pa.float32()),
        ("mean_entropy", pa.float32()), ("n_key", pa.int32()),
    ]),
    "tokens": pa.schema([
        ("run_id", pa.string()), ("step", pa.int32()), ("rollout_idx", pa.int32()), ("position", pa.int32()),
        ("token_id", pa.int32()), ("token_text", pa.string()), ("logprob", pa.float32()), ("entropy", pa.float32()),
        ("adv_raw", pa.float32()), ("adv_shaped", pa.float32()), ("is_key", pa.bool_()), ("polarity", pa.int8()),
    ]),
    "evals": pa.schema([
        ("run_id", pa.string()), ("step", pa.int32()), ("metric", pa.string()), ("k", pa.int32()),
        ("value", pa.float64()), ("n", pa.int32()),
    ]),
    # steps: run_id, step, then one float64 column per logged metric (see engine.trainer.STEP_METRICS)
}

RUN_COLUMNS = [("run_id", pa.string()), ("name", pa.string()), ("algorithm", pa.string()), ("status", pa.string()),
               ("study", pa.string()), ("created", pa.float64()), ("updated", pa.float64()), ("last_step", pa.int32()),
               ("total_steps", pa.int32()), ("final_accuracy", pa.float64()), ("error", pa.string()),
               ("config", pa.string())]


def step_tables(run_id: str, step: int, *, mask, token_ids, logprob, entropy, adv_tokens_raw, adv_shaped, is_key, polarity,
                rollouts: dict, token_text, with_tokens: bool = True) -> dict[str, pa.Table]:
    """One step's ``rollouts`` (and ``tokens``) rows in the store's schema, from padded tensors.

    Args:
        mask: ``(B, T)`` valid response tokens; token_ids, logprob, entropy, adv_tokens_raw, adv_shaped,
            is_key: ``(B, T)``; polarity: ``(B,)``.
        rollouts: the per-rollout columns only the caller knows (group_idx, prompt_idx, prompt,
            response, answer, reward, correct, truncated, adv_raw); rollout_idx, polarity, length,
            mean_logprob, mean_entropy and n_key are derived here.
        token_text: maps an int32 numpy array of token ids to their texts.
    Used by the trainer and by the TRL and verl integrations, so every writer produces one schema.
    """
    import numpy as np
    import torch

    m = mask.bool().cpu()
    B = m.shape[0]
    mf = m.float()
    n = mf.sum(1).clamp(min=1)
    lp, ent = logprob.detach().float().cpu(), entropy.detach().float().cpu()
    key = is_key.bool().cpu()
    pol = torch.as_tensor(polarity).cpu().numpy().astype(np.int8)
    cols = {"run_id": [run_id] * B, "step": np.full(B, step, np.int32), "rollout_idx": np.arange(B, dtype=np.int32),
            **rollouts, "polarity": pol, "length": m.sum(1).numpy().astype(np.int32),
            "mean_logprob": ((lp * mf).sum(1) / n).numpy(), "mean_entropy": ((ent * mf).sum(1) / n).numpy(),
            "n_key": key.sum(1).numpy().astype(np.int32)}
    out = {"rollouts": pa.table({k: cols[k] for k in SCHEMAS["rollouts"].names}, schema=SCHEMAS["rollouts"])}
    if with_tokens:
        rows, pos = m.nonzero(as_tuple=True)
        ids = token_ids.cpu()[rows, pos].numpy().astype(np.int32)
        out["tokens"] = pa.table({
            "run_id": [run_id] * len(ids), "step": np.full(len(ids), step, np.int32), "rollout_idx": rows.numpy().astype(np.int32),
            "position": pos.numpy().astype(np.int32), "token_id": ids, "token_text": token_text(ids),
            "logprob": lp[m].numpy(), "entropy": ent[m].numpy(), "adv_raw": adv_tokens_raw.detach().float().cpu()[m].numpy(),
            "adv_shaped": adv_shaped.detach().float().cpu()[m].numpy(), "is_key": key[m].numpy(), "polarity": pol[rows.numpy()],
        }, schema=SCHEMAS["tokens"])
    return out


class StoreError(ValueError):
    """Bad run id, missing run, or an unreadable store."""


def check_name(name: str, what: str = "run id") -> str:
    """Refuse names that could escape the store folder (``..``, ``/``, empty, odd characters)."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise StoreError(f"invalid {what} {name!r}: use letters, digits, '.', '_' or '-' (max 128)")
    return name


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    """A folder of runs. Cheap to construct; holds no open handles."""

    def __init__(self, root: str | os.PathLike = "runs"):
        self.root = Path(root).expanduser().resolve()

    # ---------------------------------------------------------------- runs
    def run_dir(self, run_id: str) -> Path:
        d = (self.root / check_name(run_id)).resolve()
        if d.parent != self.root:
            raise StoreError(f"run id {run_id!r} escapes the store")
        return d

    def run_ids(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "run.json").exists())

    def read_run(self, run_id: str) -> dict:
        path = self.run_dir(run_id) / "run.json"
        if not path.exists():
            raise StoreError(f"no run {run_id!r} in {self.root}")
        meta = json.loads(path.read_text())
        if meta.get("status") == "running" and meta.get("host") == socket.gethostname() and not _pid_alive(int(meta.get("pid", 0))):
            meta["status"] = "killed"  # the writer died without saying so
        return meta

    def create_run(self, config: dict, *, name: str | None = None, study: str | None = None) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        algo = str(config.get("algorithm", {}).get("name", "run"))
        base = name if name is not None else f"{time.strftime('%Y%m%d-%H%M%S')}-{algo}"
        check_name(base)
        run_id, i = base, 1
        while True:
            try:
                (self.root / run_id).mkdir()
                break
            except FileExistsError:
                if name is not None:
                    raise StoreError(f"run {name!r} already exists in {self.root}") from None
                i += 1
                run_id = f"{base}-{i}"
        meta = {"run_id": run_id, "name": name or run_id, "algorithm": algo, "status": "created", "study": study,
                "created": time.time(), "updated": time.time(), "last_step": 0,
                "total_steps": int(config.get("train", {}).get("steps", 0)), "final_accuracy": None, "error": None,
                "pid": os.getpid(), "host": socket.gethostname(), "config": config}
        _atomic_write_text(self.run_dir(run_id) / "run.json", json.dumps(meta, indent=1, default=str))
        return run_id

    def update_run(self, run_id: str, **fields) -> dict:
        path = self.run_dir(run_id) / "run.json"
        meta = json.loads(path.read_text())
        meta.update(fields)
        meta["updated"] = time.time()
        _atomic_write_text(path, json.dumps(meta, indent=1, default=str))
        return meta

    def delete_run(self, run_id: str) -> None:
        shutil.rmtree(self.run_dir(run_id))

    # ---------------------------------------------------------------- writing
    def begin_step(self, run_id: str, step: int) -> "StepSegment":
        """Start writing one step; nothing is visible until ``commit()``."""
        return StepSegment(self.run_dir(run_id) / "segments", step)

    def write_step(self, run_id: str, step: int, tables: dict[str, pa.Table]) -> None:
        """Write one completed step atomically (all its tables or none)."""
        seg = self.begin_step(run_id, step)
        for name, table in tables.items():
            seg.write(name, table)
        seg.commit()

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

        Coverage is tracked per table: a chunk is renamed into place before any segment is removed,
        and readers skip, table by table, the segments a chunk already covers. So a reader during
        compaction, or a compaction killed half-way and run again, sees every row exactly once.
        Returns the number of segments merged."""
        segs = [(s, p) for s, p in self._segments(run_id) if s <= upto_step]
        if not segs:
            return 0
        cov = self._covered(run_id)
        cdir = self.run_dir(run_id) / "chunks"
        cdir.mkdir(exist_ok=True)
        for table in TABLES:
            todo = [(s, p / f"{table}.parquet") for s, p in segs if s > cov[table] and (p / f"{table}.parquet").exists()]
            if not todo:
                continue
            merged = pa.concat_tables([pq.read_table(f) for _, f in todo], promote_options="default")
            tmp = cdir / f".tmp-{table}-{os.getpid()}.parquet"
            pq.write_table(merged, tmp, compression="zstd", row_group_size=256_000)
            # named after the step range this compaction covers for the table (even steps without rows)
            first = min(s for s, _ in segs if s > cov[table])
            os.replace(tmp, cdir / f"{table}-{first:06d}-{segs[-1][0]:06d}.parquet")
        for _, p in segs:
            shutil.rmtree(p, ignore_errors=True)
        return len(segs)

    def truncate_after(self, run_id: str, step: int) -> int:
        """Remove stored steps after ``step`` (used by resume: they are recomputed)."""
        removed = 0
        for s, p in self._segments(run_id):
            if s > step:
                shutil.rmtree(p, ignore_errors=True)
                removed += 1
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
        for rid in (self.run_ids() if run_ids is None else run_ids):
            chunks = [c for c in self._chunks(rid) if c[0] == table]
            covered = max((b for _, _, b, _ in chunks), default=-1)
            out += [str(p) for _, _, _, p in chunks]
            out += [str(p / f"{table}.parquet") for s, p in self._segments(rid)
                    if s > covered and (p / f"{table}.parquet").exists()]
        return out

    def runs_table(self) -> pa.Table:
        rows = []
        for rid in self.run_ids():
            try:
                m = self.read_run(rid)
            except (json.JSONDecodeError, OSError):
                continue
            rows.append({k: (json.dumps(m.get(k)) if k == "config" else m.get(k)) for k, _ in RUN_COLUMNS})
        return pa.Table.from_pylist(rows, schema=pa.schema(RUN_COLUMNS))

    def connect(self, run_ids: Iterable[str] | None = None, retries: int = 3):
        """An in-memory DuckDB connection with views over the store's current files.

        Views: ``runs``, ``steps``, ``rollouts``, ``tokens``, ``evals``. Restrict to ``run_ids`` to
        read fewer files. Files are listed when this is called: reconnect to see new steps.
        """
        import duckdb

        ids = None if run_ids is None else [check_name(r) for r in run_ids]
        con = duckdb.connect()
        con.register("runs_arrow", self.runs_table())
        con.execute("CREATE VIEW runs AS SELECT * FROM runs_arrow")
        for table in TABLES:
            files = self.files(table, ids)
            if files:
                # DuckDB cannot bind parameters in a view definition: the list is our own file names,
                # quoted as SQL string literals.
                lst = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
                con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet([{lst}], union_by_name=true)")
            else:
                schema = SCHEMAS.get(table, pa.schema([("run_id", pa.string()), ("step", pa.int32())]))
                con.register(f"{table}_empty", schema.empty_table())
                con.execute(f"CREATE VIEW {table} AS SELECT * FROM {table}_empty")
        return con

    def query(self, sql: str, params: list | None = None, run_ids: Iterable[str] | None = None):
        """Run one parameterised query and return a pandas DataFrame; retries if compaction moved files."""
        last = None
        for _ in range(3):
            con = self.connect(run_ids)
            try:
                return con.execute(sql, params or []).df()
            except Exception as e:  # duckdb.IOException when a segment vanished mid-query
                if "No files found" in str(e) or "IO Error" in str(e) or "Cannot open" in str(e):
                    last = e
                    time.sleep(0.05)
                    continue
                raise
            finally:
                con.close()
        raise StoreError(f"store files kept changing while reading: {last}")

    @contextmanager
    def reading(self, run_ids: Iterable[str] | None = None):
        con = self.connect(run_ids)
        try:
            yield con
        finally:
            con.close()


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
            pq.write_table(table, self.tmp / f"{name}.parquet", compression="zstd", compression_level=1)

    def commit(self) -> None:
        if self.final.exists():  # a step recomputed after resume replaces the old copy
            shutil.rmtree(self.final)
        os.rename(self.tmp, self.final)
