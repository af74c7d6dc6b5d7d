"""Helper processes that share the policy's parameters: the CPU worker pool (``rollout.workers``).

Why: decoding a small model on a CPU is a long chain of small kernels, one token at a time. Two
threads inside one process barely speed those kernels up (each is too small to split well), and the
Python between them runs on one core. Splitting the prompts between ``k`` processes of
``train.threads / k`` threads each keeps every core busy with a whole decode loop of its own. On the
embedded workload (16 prompts x 8 samples, 2 cores) two processes of one thread generate in 0.88x the
time one process of two threads takes (95% interval [0.78, 0.99], README "Rollout workers"), and the
two-thread process swings more from run to run.

Why here, below both stages: the same helpers run the kv engine's sampling shares
(``engine/rollout/kv.py``) and the update's backward shares (``engine/update/shares.py``). The pool
knows neither: a job is an importable function and its arguments, run in a helper as
``fn(helper, *args)``, where ``Helper`` holds the shared model, a cache for per-process objects (the kv
engine) and the gradient buffer. So the rollout layer never imports the update, nor the reverse.

How:

* The policy's parameters are moved to shared memory once (``model.share_memory()``, in place: the
  optimizer keeps updating the same tensors) and each helper process receives the module through
  ``torch.multiprocessing``, so its parameters are the trainer's own storage. Nothing is copied after
  an update; a helper only runs while ``run`` waits for it, never during an optimizer step.
* ``run`` sends job ``j`` to helper ``j`` (``j >= 1``), runs job 0 in the calling process with
  ``threads`` threads, and returns the answers in job order. The kv engine gives each process a
  contiguous share of the prompts (whole groups, ``split``) and concatenates the results in prompt order.
* Share ``j`` samples with the seed ``chunk_seed(seed, j)`` (share 0 keeps ``seed``): rollouts are
  reproducible for a given number of workers, and are a different (equally distributed) draw than
  with one worker. Greedy decoding gives the same tokens whatever the split.
* An update share is back-propagated by the helper into its own ``.grad`` and copied into a
  shared-memory buffer made at start (``Helper.export_grads``), which the trainer adds to its
  gradients (``WorkerPool.add_grads``) before clipping and the optimizer step.
* Jobs and answers cross the pipes as numpy arrays pickled into the message (``to_arrays``), not as
  torch's shared-memory tensors, whose file-descriptor hand-over delayed the helper's start on an
  update share by about 10 ms. A job's function crosses as a reference (its module and name).
* A helper that dies or fails is one clear error in the trainer; a helper whose trainer dies sees its
  pipe close and exits. Helpers are daemons, started with ``spawn`` (no fork of a threaded process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys

import numpy as np
import torch
import torch.multiprocessing as mp


class WorkerError(RuntimeError):
    """A worker process died or failed (the CLI reports it in one line; the run can be resumed)."""


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


def _grad_views(params: list[torch.Tensor], buffer: torch.Tensor) -> list[torch.Tensor]:
    """Views of a flat ``buffer`` shaped like each of ``params`` (a model's trainable parameters, in order)."""
    views, at = [], 0
    for p in params:
        views.append(buffer[at : at + p.numel()].view_as(p))
        at += p.numel()
    return views


def _grad_buffer(model) -> torch.Tensor:
    """A zeroed shared-memory buffer for one copy of ``model``'s trainable gradients."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dtype = next(model.parameters()).dtype
    return torch.zeros(n, dtype=dtype).share_memory_()


def _each_tensor(x, leaf):
    """``x`` rebuilt with ``leaf`` applied to every value inside tuples, lists and dataclass instances."""
    if isinstance(x, (tuple, list)):
        return type(x)(_each_tensor(v, leaf) for v in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: _each_tensor(getattr(x, f.name), leaf) for f in dataclasses.fields(x)})
    return leaf(x)


def _as_array(x):
    if isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dtype != torch.bfloat16 and not x.requires_grad:
        return x.numpy()
    return x


def to_arrays(x):
    """``x`` with every CPU tensor in it (in tuples, lists and dataclasses too) as a numpy array.

    Why: a pipe pickles numpy arrays into the message itself, while torch's own pickling moves each
    tensor into a new shared-memory segment and hands its file descriptor over in round trips of its
    own: about 1 ms per tensor, some 10 ms before a helper could start on an update share (measured on
    the embedded workload). Tensors numpy cannot hold (bfloat16) go as they are."""
    return _each_tensor(x, _as_array)


def to_tensors(x):
    """The inverse of ``to_arrays``: every numpy array back to a tensor (sharing its memory)."""
    return _each_tensor(x, lambda v: torch.from_numpy(v) if isinstance(v, np.ndarray) else v)


class Helper:
    """What a job runs with inside a helper process (the first argument of every job function)."""

    def __init__(self, model, grads: torch.Tensor):
        self.model = model  # the trainer's module, its parameters in shared memory
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.cache: dict = {}  # per-process objects a job keeps between calls (the kv engine and its cache memory)
        self._views = _grad_views(self.params, grads)

    def export_grads(self) -> None:
        """Copy this process's ``.grad`` of every trainable parameter into the buffer shared with the caller."""
        for v, p in zip(self._views, self.params):
            v.zero_() if p.grad is None else v.copy_(p.grad)


def _serve(conn, model, threads: int, grads: torch.Tensor) -> None:
    """A helper process: run each job ``(fn, *args)`` received as ``fn(helper, *args)`` and send back its
    answer as arrays, until the pipe closes."""
    torch.set_num_threads(threads)
    helper = Helper(model, grads)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        try:
            fn, *args = to_tensors(msg)
            conn.send(("ok", to_arrays(fn(helper, *args))))
        except Exception as e:  # reported to the caller, which raises it
            conn.send(("error", f"{type(e).__name__}: {e}"))


class WorkerPool:
    """``workers - 1`` helper processes sharing ``model`` next to the calling process.

    Each ``run`` gives the helpers their jobs, runs the first job in the calling process (``local``,
    with ``threads`` threads) and then collects the helpers' answers.
    """

    def __init__(self, model, workers: int, threads: int):
        if workers < 2:
            raise ValueError(f"a worker pool needs at least 2 workers, got {workers}")
        self.workers, self.threads = workers, threads
        model.share_memory()
        ctx = mp.get_context("spawn")
        self.conns, self.procs, self.grads = [], [], []
        for j in range(1, workers):
            parent, child = ctx.Pipe()
            grads = _grad_buffer(model)
            proc = ctx.Process(
                target=_serve,
                args=(child, model, threads, grads),
                name=f"a3po-kv-worker-{j}",
                daemon=True,
            )
            with _main_hidden():
                proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
            self.grads.append(grads)

    def add_grads(self, params: list[torch.Tensor], helpers: int) -> None:
        """Add the gradients that helpers ``1..helpers`` exported (``Helper.export_grads``) to ``params``'
        (the model's trainable parameters, in order)."""
        for j in range(1, helpers + 1):
            for p, g in zip(params, _grad_views(params, self.grads[j - 1])):
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.add_(g)

    def run(self, jobs: list, local):
        """Send ``jobs[1:]`` (each ``(fn, *args)``) to helpers 1.., run ``local(jobs[0])`` here, collect the
        helpers' answers. Returns ``(local's answer, [the helpers' answers])``."""
        sent = []
        for j, (job, conn) in enumerate(zip(jobs[1:], self.conns), start=1):
            try:
                conn.send(to_arrays(job))
            except OSError:  # BrokenPipeError: the helper is gone
                for k, c in sent:  # collect what the others were given, then report
                    self._receive(k, c)
                raise WorkerError(self._gone(j)) from None
            sent.append((j, conn))
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            mine = local(jobs[0])
        finally:
            torch.set_num_threads(before)
            # always drain the helpers, so that a failure here leaves no answer queued for the next call
            theirs = [self._receive(j, conn) for j, conn in sent]
        return mine, theirs

    def _gone(self, j: int) -> str:
        proc = self.procs[j - 1]
        proc.join(timeout=1)
        return f"rollout worker {j} died (exit code {proc.exitcode}) — resume the run, or set rollout.workers=1"

    def _receive(self, j: int, conn):
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
        return to_tensors(payload)

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
        self.conns, self.procs, self.grads = [], [], []
