"""``a3po``: the command-line entry point.

    a3po train [--config FILE.yaml] [--store DIR] [key=value ...]
    a3po train --resume RUN_ID [--store DIR]
    a3po eval --model PATH [--task builtin:countdown] [--k 1,4,8]
    a3po runs [--store DIR]
    a3po export RUN_ID --format parquet|duckdb DIR [--store DIR]
    a3po build-tiny-model [--task countdown|arith] [--out DIR] [--steps N]
    a3po study [--preset quick|pilot|full] [--seeds N] [--steps S] [--out DIR]
    a3po app [--store DIR] [--port 8501] [--allow-launch]   # the Streamlit explorer, on localhost
    a3po config                      # every config key with its help text

Every user mistake (config, dataset, model folder, store path, CLI flag, file system state such as a
read-only folder, a full disk or an existing file) ends with exactly one stderr line
``a3po: error: <what> — <how to fix>`` and exit status 2, before anything is written where the
mistake can be seen up front. Genuine bugs keep their traceback (exit 1).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from engine.resources import app_dir, demo_config
from engine.tasks.problems import DEFAULT_TASK, TASKS
from engine.tasks.reward import VERIFIERS

DEFAULT_CONFIG = demo_config()


class UsageError(ValueError):
    """A malformed command line (argparse's complaints, made one line)."""


class _Parser(argparse.ArgumentParser):
    """argparse prints usage plus an error and exits; ours raises so ``main`` prints one line."""

    def error(self, message):
        raise UsageError(f"{message} — see '{self.prog} --help'")


def _user_errors():
    from engine.config import ConfigError
    from engine.model.policy import ModelError
    from engine.model.workers import WorkerError
    from engine.store.store import StoreError
    from engine.tasks.problems import DatasetError

    return (ConfigError, ModelError, StoreError, DatasetError, UsageError, WorkerError)


# File system states a user can fix (permissions, space, a path of the wrong kind); other OSErrors,
# such as a file vanishing under a running process, are bugs and keep their traceback.
_FS_FIXES = {
    errno.EACCES: "pick a folder you can write to, or fix its permissions",
    errno.EPERM: "pick a folder you can write to, or fix its permissions",
    errno.EROFS: "the file system is read-only: pick another folder (e.g. --store ./runs)",
    errno.ENOSPC: "free some disk space or point --store at a bigger disk, then resume the run",
    errno.EDQUOT: "free some disk space or point --store at a bigger disk, then resume the run",
    errno.EEXIST: "remove it or pick another path",
    errno.EISDIR: "that path is a folder: pass a file",
    errno.ENOTDIR: "a file stands where a folder is needed in that path: pick another path",
    errno.ENAMETOOLONG: "use a shorter path",
}


def _fs_error_line(e: OSError) -> str | None:
    fix = _FS_FIXES.get(e.errno)
    if fix is None:
        return None
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror or type(e).__name__}{where} — {fix}"


def _check_store(path: str, write: bool):
    """Fail fast (before a model loads) on a store path that cannot work; returns the Store."""
    from engine.store.store import Store, StoreError

    store = Store(path)
    root = store.root
    store._check_root_readable()  # the store's own "a file, not a folder" check
    if write:
        # the store folder, or the nearest folder above it that exists, must take a new file (a probe
        # file is created and removed at once: os.access says yes to root on a read-only mount)
        import tempfile

        probe = root if root.exists() else next((p for p in root.parents if p.exists()), None)
        if probe is not None and not probe.is_dir():
            raise StoreError(f"store path {root} lies under the file {probe} — pass a folder with --store")
        try:
            with tempfile.TemporaryFile(dir=probe, prefix=".a3po-probe-"):
                pass
        except OSError as e:
            raise StoreError(
                f"store folder {root} is not writable ({e.strerror}) — pick a folder you can write to with --store"
            ) from None
    return store


def cmd_train(a) -> int:
    from engine.config import load_config
    from engine.train import trainer

    store = _check_store(a.store, write=True)
    _sigterm_as_interrupt()
    if a.resume:
        if a.config or a.overrides:
            from engine.config import ConfigError

            raise ConfigError("--resume takes the run's stored config — drop --config and the key=value overrides")
        res = trainer.resume(a.resume, store, progress=not a.quiet)
    else:
        cfg = load_config(a.config or DEFAULT_CONFIG, a.overrides)
        res = trainer.train(cfg, store, progress=not a.quiet, study=a.study)
    f = res.get("final") or {}
    print(
        json.dumps(
            {
                "run_id": res["run_id"],
                "store": str(store.root),
                "greedy_acc": f.get("greedy_acc"),
                "sampled_acc": f.get("sampled_acc"),
                "pass@k": f.get("pass@k"),
            }
        )
    )
    return 0


def _sigterm_as_interrupt() -> None:
    """A stopped run (SIGTERM, e.g. the app's Stop button) is marked 'killed' like Ctrl-C."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():

        def handler(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, handler)


def cmd_eval(a) -> int:
    from engine.config import ConfigError, check_value

    ks = []
    for part in a.k.split(","):
        try:
            ks.append(int(part))
        except ValueError:
            raise ConfigError(f"--k must be comma-separated positive integers, got {a.k!r} — e.g. --k 1,4,8") from None
    check_value("eval.k", ks, "--k")
    check_value("eval.n_prompts", a.n_prompts, "--n-prompts")
    check_value("eval.temperature", a.temperature, "--temperature")
    check_value("rollout.max_new_tokens", a.max_new_tokens, "--max-new-tokens")
    check_value("seed", a.seed, "--seed")
    check_value("train.threads", a.threads, "--threads")
    check_value("model.device", a.device, "--device")
    for flag, v in (("--prompt-key", a.prompt_key), ("--answer-key", a.answer_key), ("--split", a.split)):
        if not v.strip():
            raise ConfigError(f"{flag} is empty — give a name, e.g. the defaults")
    import torch

    from engine.model.policy import load_policy
    from engine.rollout.registry import make_backend
    from engine.tasks.problems import load_problems
    from engine.tasks.reward import resolve_verifier
    from engine.train.evaluate import evaluate

    torch.set_num_threads(a.threads)
    probs = load_problems(a.task, a.split, prompt_key=a.prompt_key, answer_key=a.answer_key)
    model, tok, _ = load_policy(a.model, device=a.device)
    if a.n_prompts:
        probs = probs[: a.n_prompts]
    res = evaluate(
        make_backend("hf", model, tok),
        tok,
        probs,
        ks=ks,
        temperature=a.temperature,
        max_new_tokens=a.max_new_tokens,
        seed=a.seed,
        verify=resolve_verifier(a.task, a.verifier),
    )
    print(json.dumps(res))
    return 0


def cmd_runs(a) -> int:
    t = _check_store(a.store, write=False).runs_table().to_pylist()
    if a.json:
        print(json.dumps(t, default=str))
        return 0
    print(f"{'run_id':40s} {'algorithm':18s} {'steps':>11s} {'final_acc':>9s} status")
    for r in t:
        acc = "" if r["final_accuracy"] is None else f"{r['final_accuracy']:.3f}"
        status = f"{r['status']}: {r['error']}" if r["status"] == "invalid" else r["status"]
        print(
            f"{r['run_id']:40s} {r['algorithm'] or '':18s} {r['last_step'] or 0:>5d}/{r['total_steps'] or 0:<5d} {acc:>9s} "
            f"{status}"
        )
    return 0


def cmd_export(a) -> int:
    store = _check_store(a.store, write=False)
    for path in store.export(a.run, Path(a.dir), a.format, force=a.force):
        print(path)
    return 0


def cmd_build(a) -> int:
    from engine.config import check_value
    from engine.tasks.tiny_model import build_tiny_model

    if a.steps is not None:
        check_value("train.steps", a.steps, "--steps")
    check_value("seed", a.seed, "--seed")

    stats = build_tiny_model(Path(a.out) if a.out else None, task=a.task, seed=a.seed, steps=a.steps)
    print(json.dumps({k: v for k, v in stats.items() if k != "history"}))
    return 0


def cmd_study(a) -> int:
    from engine.config import MAX_STEPS
    from engine.store.store import Store
    from engine.study.design import SETTINGS
    from engine.study.runner import run_study

    for flag, v, lo, hi in (
        ("--seeds", a.seeds, 1, 1000),
        ("--secondary-seeds", a.secondary_seeds, 1, 1000),
        ("--steps", a.steps, 1, MAX_STEPS),
        ("--jobs", a.jobs, 1, 256),
    ):
        _in_range(flag, v, lo, hi)
    only = [x.strip() for x in (a.only or "").split(",") if x.strip()] or None
    unknown = [x for x in only or [] if x not in SETTINGS]
    if unknown:
        raise UsageError(f"--only: unknown setting(s) {', '.join(unknown)} — choose from {', '.join(SETTINGS)}")
    try:
        res = run_study(
            preset=a.preset,
            seeds=a.seeds,
            steps=a.steps,
            out=a.out,
            store=Store(a.store),
            study_id=a.id,
            jobs=a.jobs,
            only=only,
            extra=a.overrides,
            config=a.config,
            secondary_seeds=a.secondary_seeds,
            log=lambda s: print(s, file=sys.stderr, flush=True),
        )
    except ValueError as e:
        if isinstance(e, _user_errors()):
            raise
        from engine.config import ConfigError

        raise ConfigError(str(e)) from None
    print(
        json.dumps(
            {
                "study": res["study"],
                "html": res["html"],
                "markdown": res["markdown"],
                "verdicts": {c["claim"]: c["verdict"] for c in res["claims"]},
                "runs": res["runs"],
                "failed": [k for k, v in res["runs"].items() if v.startswith("failed")],
            }
        )
    )
    return 0


def _in_range(flag: str, value, lo: int, hi: int) -> None:
    if value is not None and not lo <= value <= hi:
        raise UsageError(f"{flag} must be between {lo} and {hi}, got {value} — pick a value in that range")


def cmd_app(a) -> int:
    """Serve the Streamlit app (localhost only unless --host says otherwise).

    The Launch page (which starts training jobs) is on only when the server binds a loopback address,
    or with --allow-launch; the decision reaches the app as A3PO_ALLOW_LAUNCH=1/0 and A3PO_HOST.

    It serves straight away with no terminal (Streamlit's first-run e-mail prompt is off), opens a
    browser only with --browser or when a terminal is attached (and not --headless), and the server
    stops with ``a3po app`` whatever signal stops it: on POSIX this process *becomes* the Streamlit
    server (exec), elsewhere it runs it as a child and passes SIGINT/SIGTERM on.
    """
    from engine.config import ConfigError

    if not 1 <= a.port <= 65535:
        raise ConfigError(f"--port must be between 1 and 65535, got {a.port} — pick a free port, e.g. --port 8501")
    from app.access import ENV_ALLOW, ENV_HOST, launch_allowed

    app = app_dir() / "main.py"
    # The Launch page starts training jobs: on only for a loopback address unless --allow-launch.
    allow = launch_allowed(a.host, a.allow_launch)
    env = dict(os.environ, A3PO_STORE=str(Path(a.store).expanduser().resolve()))
    env[ENV_ALLOW], env[ENV_HOST] = ("1" if allow else "0"), a.host
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    open_browser = a.browser or (tty and not a.headless)
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app),
        "--server.address",
        a.host,
        "--server.port",
        str(a.port),
        "--server.headless",
        "false" if open_browser else "true",
        "--server.showEmailPrompt",
        "false",
        "--browser.gatherUsageStats",
        "false",
    ]
    print(f"A3PO Lab app on http://{a.host}:{a.port} (store {env['A3PO_STORE']})", file=sys.stderr, flush=True)
    if not allow:
        print(
            f"Launch page off: {a.host} is reachable from other machines (add --allow-launch on a trusted network only)",
            file=sys.stderr,
            flush=True,
        )
    sys.stdout.flush()
    if os.name == "posix":
        os.execve(sys.executable, cmd, env)  # no return: the server is this very process
    import signal
    import subprocess

    proc = subprocess.Popen(cmd, env=env)

    def forward(signum, frame):
        proc.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:  # pragma: no cover - forwarded above; keep waiting for the child
            continue


def cmd_config(a) -> int:
    from engine.config import describe

    print(describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="a3po", description="A3PO Lab: RLVR training with per-token polarity data.")
    sub = p.add_subparsers(dest="cmd", required=True)
    store_default = os.environ.get("A3PO_STORE", "runs")

    t = sub.add_parser("train", help="run RLVR training")
    t.add_argument("--config", help="YAML config (default: the shipped configs/demo.yaml)")
    t.add_argument("--store", default=store_default, help="store folder (default ./runs)")
    t.add_argument("--resume", metavar="RUN", help="continue a killed run from its last checkpoint")
    t.add_argument("--study", help=argparse.SUPPRESS)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. algorithm.name=grpo")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="greedy accuracy and pass@k of a model")
    e.add_argument("--model", required=True, help="HF folder, HF id, builtin:tiny-countdown or builtin:tiny")
    e.add_argument(
        "--task", default="builtin:countdown", help="builtin:countdown, builtin:arith or a .jsonl/.parquet file"
    )
    e.add_argument("--verifier", choices=list(VERIFIERS), help="default: the built-in task's own, math for files")
    e.add_argument("--split", default="test")
    e.add_argument("--k", default="1,4,8")
    e.add_argument("--n-prompts", type=int, default=200)
    e.add_argument("--temperature", type=float, default=1.0)
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--prompt-key", default="prompt")
    e.add_argument("--answer-key", default="answer")
    e.add_argument("--device", default="auto")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=int, default=2)
    e.set_defaults(fn=cmd_eval)

    r = sub.add_parser("runs", help="list runs in the store")
    r.add_argument("--store", default=store_default)
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=cmd_runs)

    x = sub.add_parser("export", help="export a run's tables")
    x.add_argument("run")
    x.add_argument("dir")
    x.add_argument("--format", choices=["parquet", "duckdb"], default="parquet")
    x.add_argument("--store", default=store_default)
    x.add_argument("--force", action="store_true", help="overwrite existing export files in DIR")
    x.set_defaults(fn=cmd_export)

    b = sub.add_parser("build-tiny-model", help="rebuild an embedded tiny model and its task data from scratch")
    b.add_argument(
        "--task",
        choices=list(TASKS),
        default=DEFAULT_TASK,
        help="task (countdown -> data/tiny-countdown, arith -> data/tiny-model)",
    )
    b.add_argument("--out", help="output folder (default: the task's shipped model folder)")
    b.add_argument("--steps", type=int, default=None, help="SFT steps (default: the shipped model's)")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(fn=cmd_build)

    s = sub.add_parser("study", help="run the sample-polarity study grid and write its report")
    s.add_argument("--preset", choices=["quick", "pilot", "full"], default="quick")
    s.add_argument("--seeds", type=int, help="seeds per core setting (default: preset's)")
    s.add_argument("--secondary-seeds", type=int, help="seeds per secondary setting (full preset; default: preset's)")
    s.add_argument("--steps", type=int, help="training steps per run (default: preset's)")
    s.add_argument("--out", default="reports/study", help="report folder")
    s.add_argument("--store", default=store_default)
    s.add_argument("--id", help="study id (default study-<preset>); rerun with the same id to continue")
    s.add_argument("--jobs", type=int, help="runs in parallel (default: CPU cores, at most 4)")
    s.add_argument("--only", help="comma-separated subset of settings")
    s.add_argument("--config", help="base config for every run (default: the demo config)")
    s.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    s.set_defaults(fn=cmd_study)

    ap = sub.add_parser("app", help="open the Streamlit app on the store")
    ap.add_argument("--store", default=store_default)
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default localhost only)")
    ap.add_argument("--port", type=int, default=8501)
    ap.add_argument("--headless", action="store_true", help="never open a browser (the default without a terminal)")
    ap.add_argument("--browser", action="store_true", help="open a browser even without a terminal")
    ap.add_argument(
        "--allow-launch",
        action="store_true",
        help="enable the Launch page (starts training jobs) on a non-loopback --host: trusted networks only",
    )
    ap.set_defaults(fn=cmd_app)

    c = sub.add_parser("config", help="print every config key with its help")
    c.set_defaults(fn=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; user mistakes become one ``a3po: error: <what> — <how to fix>`` line, exit 2."""
    try:
        args = build_parser().parse_args(argv)
        return args.fn(args)
    except _user_errors() as e:
        return _fail(_with_fix(e))
    except OSError as e:
        line = _fs_error_line(e)
        if line is None:
            raise
        return _fail(line)
    except KeyboardInterrupt:
        print("a3po: interrupted", file=sys.stderr)
        return 130


def _with_fix(e: Exception) -> str:
    """The error's message, with a generic way out when the message does not name one itself."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if " — " in msg:
        return msg
    hints = {
        "StoreError": "`a3po runs --store DIR` lists the runs a store holds",
        "ConfigError": "`a3po config` lists every key with its type and range",
        "ModelError": "use builtin:tiny-countdown, a local Hugging Face folder or a model id",
        "DatasetError": "use builtin:countdown, builtin:arith or a .jsonl/.parquet file of prompt/answer rows",
    }
    return f"{msg} — {hints.get(type(e).__name__, 'see a3po --help')}"


def _fail(message: str) -> int:
    """Print the one error line (a multi-line message from a library is cut to its first line)."""
    lines = [x for x in message.strip().splitlines() if x.strip()] or ["unknown error"]
    print(f"a3po: error: {lines[0]}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
