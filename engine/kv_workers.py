"""Rollout worker processes for the ``kv`` engine on CPU (``rollout.workers``).

Why: decoding a small model on a CPU is a long chain of small kernels, one token at a time. Two
threads inside one process barely speed those kernels up (each is too small to split well), and the
Python between them runs on one core. Splitting the prompts between ``k`` processes of
``train.threads / k`` threads each keeps every core busy with a whole decode loop of its own. On the
embedded workload (16 prompts x 8 samples, 2 cores) two processes of one thread generate in 0.88x the
time one process of two threads takes (95% interval [0.78, 0.99], README "Rollout workers"), and the
two-thread process swings more from run to run.

How:

* The policy's parameters are moved to shared memory once (``model.share_memory()``, in place: the
  optimizer keeps updating the same tensors) and each helper process receives the module through
  ``torch.multiprocessing``, so its parameters are the trainer's own storage. Nothing is copied after
  an update; a helper only runs while ``generate`` waits for it, never during an optimizer step.
* ``generate`` gives each process a contiguous share of the prompts (whole groups), runs the first
  share itself with ``threads`` threads, and concatenates the results in prompt order.
* Share ``j`` samples with the seed ``chunk_seed(seed, j)`` (share 0 keeps ``seed``): rollouts are
  reproducible for a given number of workers, and are a different (equally distributed) draw than
  with one worker. Greedy decoding gives the same tokens whatever the split.
* A helper that dies or fails is one clear error in the trainer; a helper whose trainer dies sees its
  pipe close and exits. Helpers are daemons, started with ``spawn`` (no fork of a threaded process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from types import SimpleNamespace

import torch
import torch.multiprocessing as mp

from engine.rollout import Rollouts, SamplingParams


class WorkerError(RuntimeError):
    """A rollout worker process died or failed (the CLI reports it in one line; the run can be resumed)."""


def chunk_seed(seed: int, j: int) -> int:
    """The sampling seed of prompt share ``j`` (share 0 keeps ``seed``)."""
    return seed if j == 0 else (int(seed) + j * 0x9E3779B97F4A7C15) % (2**63 - 1)


def split(count: int, parts: int) -> list[slice]:
    """``count`` prompts in at most ``parts`` contiguous shares, sizes differing by at most one."""
    parts = max(1, min(parts, count))
    base, extra = divmod(count, parts)
    out, start = [], 0
    for j in range(parts):
        size = base + (j < extra)
        out.append(slice(start, start + size))
        start += size
    return out


@contextlib.contextmanager
def _main_hidden():
    """Start ``spawn`` children without re-running the caller's ``__main__``.

    ``spawn`` normally imports the parent's main script in the child (as ``__mp_main__``), which runs
    any unguarded top-level code of a user's script again, training included. The helper needs nothing
    from it (its target and arguments live in importable modules), so the main module's file and spec
    are hidden while the child's start-up data is taken."""
    main = sys.modules["__main__"]
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    try:
        main.__dict__.pop("__file__", None)
        main.__dict__["__spec__"] = None
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def _serve(conn, model, ids, fast: bool, threads: int) -> None:
    """A helper process: generate for each ``(prompts, params)`` received until the pipe closes."""
    from engine.kv_engine import KVEngine

    torch.set_num_threads(threads)
    engine = KVEngine(model, ids, fast=fast)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        prompts, params = msg
        try:
            ro = engine.generate(prompts, params)
            conn.send(("ok", [None if x is None else x.numpy() for x in ro._tensors()]))
        except Exception as e:  # reported to the trainer, which raises it
            conn.send(("error", f"{type(e).__name__}: {e}"))


class WorkerPool:
    """``workers - 1`` helper processes that generate next to the calling process.

    ``local(prompts, params)`` generates one share in the calling process (the engine's own loop).
    """

    def __init__(self, model, tokenizer, fast: bool, workers: int, threads: int):
        if workers < 2:
            raise ValueError(f"a worker pool needs at least 2 workers, got {workers}")
        self.workers, self.threads = workers, threads
        self.pad_id = tokenizer.pad_token_id
        model.share_memory()
        ids = SimpleNamespace(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for j in range(1, workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_serve, args=(child, model, ids, fast, threads), name=f"a3po-kv-worker-{j}", daemon=True
            )
            with _main_hidden():
                proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def generate(self, prompts: list[list[int]], params: SamplingParams, local) -> Rollouts:
        shares = split(len(prompts), self.workers)
        sent = []
        for j, (share, conn) in enumerate(zip(shares[1:], self.conns), start=1):
            try:
                conn.send((prompts[share], dataclasses.replace(params, seed=chunk_seed(params.seed, j))))
            except OSError:  # BrokenPipeError: the helper is gone
                for k, c in sent:  # collect what the others were given, then report
                    self._receive(k, c)
                raise WorkerError(self._gone(j)) from None
            sent.append((j, conn))
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            mine = local(prompts[shares[0]], params)
        finally:
            torch.set_num_threads(before)
            # always drain the helpers, so that a failure here leaves no answer queued for the next call
            theirs = [self._receive(j, conn) for j, conn in sent]
        return Rollouts.concat([mine, *theirs], self.pad_id)

    def _gone(self, j: int) -> str:
        proc = self.procs[j - 1]
        proc.join(timeout=1)
        return f"rollout worker {j} died (exit code {proc.exitcode}) — resume the run, or set rollout.workers=1"

    def _receive(self, j: int, conn) -> Rollouts:
        proc = self.procs[j - 1]
        while not conn.poll(1.0):
            if not proc.is_alive():
                raise WorkerError(self._gone(j))
        try:
            status, payload = conn.recv()
        except (EOFError, OSError):
            raise WorkerError(self._gone(j)) from None
        if status != "ok":
            raise WorkerError(f"rollout worker {j} failed: {payload}")
        return Rollouts(*(None if x is None else torch.from_numpy(x) for x in payload))

    def close(self) -> None:
        """Stop the helpers (they also stop on their own when this process exits)."""
        for conn in self.conns:
            try:
                conn.send(None)
                conn.close()
            except OSError:
                pass
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        self.conns, self.procs = [], []
