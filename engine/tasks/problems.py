"""Tasks: the embedded synthetic tasks and loading of real prompt/answer datasets.

Two built-in tasks ship in data/ (``TASKS``), each with its own tiny model:

* ``countdown`` (the default): Countdown-lite. Three or four numbers and a target; the response combines two
  numbers per step and lists the numbers left, ``"10 8 9 7:117="`` ->
  ``"10+8=18(9 7 18);18*7=126(9 126);126-9=117(117)"``. Every step starts at a real choice point (which
  pair, which order, which operator), so sampled responses fork and both polarities occur in most
  groups. Scored by a step verifier (``engine.tasks.reward.countdown_correct``).
* ``arith``: the quick smoke task below. Almost every token is determined by the prompt, so
  it has little uncertainty for token-level shaping to act on.

The arith task is a three-operand expression ``a op b op c`` (operands 1..99, ops + and -)
whose reference response is a short worked solution, one line per partial result, then the
boxed answer:  prompt ``"37+48-12="`` -> response ``"37+48=85;85-12=73;\\boxed{73}"``.
That gives ~25 response tokens with a reasoning part whose tokens differ in probability and
entropy (copying digits is easy, carrying is not), and a final answer math-verify can check.

Real data: any local JSONL or Parquet file with a prompt and an answer column (the shape of
GSM8K / MATH / DAPO-Math-17k exports); column names are configurable.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.resources import data_dir

DATA_DIR = data_dir()  # data/ in a checkout, a3po_data in an installed wheel (engine.resources)
ARITH_DIR = DATA_DIR / "arith"


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or has a malformed row."""


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    solution: str | None = None  # reference worked solution, when the task has one


# --------------------------------------------------------------------------------------------
# Embedded synthetic task
# --------------------------------------------------------------------------------------------
def arith_problem(rng: random.Random) -> Problem:
    a, b, c = (rng.randint(1, 99) for _ in range(3))
    op1, op2 = rng.choice("+-"), rng.choice("+-")
    ab = a + b if op1 == "+" else a - b
    abc = ab + c if op2 == "+" else ab - c
    prompt = f"{a}{op1}{b}{op2}{c}="
    solution = f"{a}{op1}{b}={ab};{ab}{op2}{c}={abc};\\boxed{{{abc}}}"
    return Problem(prompt, str(abc), solution)


# --------------------------------------------------------------------------------------------
# Embedded reasoning task with real forks: Countdown-lite
# --------------------------------------------------------------------------------------------
COUNTDOWN_SIZES = (3, 4)  # numbers per problem, drawn uniformly: 3 is the easier half, 4 the longer one
COUNTDOWN_RANGE = (1, 12)  # each number is drawn from this range
COUNTDOWN_MAX = 200  # every intermediate result lies in 1..COUNTDOWN_MAX


def countdown_prompt(numbers: list[int], target: int) -> str:
    return " ".join(map(str, numbers)) + f":{target}="


def countdown_problem(rng: random.Random, n_numbers: int | None = None) -> Problem:
    """A random combination tree over ``n_numbers`` numbers, written as a step-by-step solution.

    Each step combines two numbers still in the pool with +, - or * (result in 1..200) and writes
    the numbers left; the last step leaves the target alone, e.g. prompt ``"10 8 9 7:117="`` ->
    ``"10+8=18(9 7 18);18*7=126(9 126);126-9=117(117)"``. ``n_numbers`` defaults to a uniform draw
    from ``COUNTDOWN_SIZES``.
    The pair, its order and the operator are drawn uniformly among the valid choices, so the
    reference solutions of one prompt differ in step order and operand order: the model learns that
    several continuations are valid at the start of each step (the choice points RL shapes).
    """
    lo, hi = COUNTDOWN_RANGE
    n_numbers = n_numbers or rng.choice(COUNTDOWN_SIZES)
    while True:
        numbers = [rng.randint(lo, hi) for _ in range(n_numbers)]
        pool, steps = list(numbers), []
        while len(pool) > 1:
            choices = []
            for i, a in enumerate(pool):
                for j, b in enumerate(pool):
                    if i == j:
                        continue
                    for op in "+-*":
                        r = apply_op(a, op, b)
                        if 1 <= r <= COUNTDOWN_MAX:
                            choices.append((i, j, op, r))
            if not choices:
                break
            i, j, op, r = rng.choice(choices)
            a, b = pool[i], pool[j]
            pool = [x for k, x in enumerate(pool) if k not in (i, j)] + [r]
            steps.append(f"{a}{op}{b}={r}({' '.join(map(str, pool))})")
        if len(pool) == 1 and len(steps) == n_numbers - 1:
            return Problem(countdown_prompt(numbers, pool[0]), str(pool[0]), ";".join(steps))


def apply_op(a: int, op: str, b: int) -> int:
    """``a op b`` for the Countdown operators + - * (shared by the generator and the step verifier)."""
    return a + b if op == "+" else a - b if op == "-" else a * b


def make_splits(
    make_problem, n_train: int = 20000, n_test: int = 500, seed: int = 0, name: str = "arith"
) -> tuple[list[Problem], list[Problem]]:
    """Disjoint train/test splits, deterministic in ``seed`` (test drawn first, train excludes its prompts)."""
    rng_test = random.Random(f"{name}-test-{seed}")
    test, seen = [], set()
    while len(test) < n_test:
        p = make_problem(rng_test)
        if p.prompt not in seen:
            seen.add(p.prompt)
            test.append(p)
    rng_train = random.Random(f"{name}-train-{seed}")
    train = []
    while len(train) < n_train:
        p = make_problem(rng_train)
        if p.prompt not in seen:
            seen.add(p.prompt)
            train.append(p)
    return train, test


def make_arith_splits(n_train: int = 20000, n_test: int = 500, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    return make_splits(arith_problem, n_train, n_test, seed, name="arith")


@dataclass(frozen=True)
class Task:
    """A built-in task: how its problems are drawn, where its splits live, which verifier scores it."""

    name: str
    make_problem: Callable[[random.Random], Problem]
    verifier: str  # a name in engine.tasks.reward.VERIFIERS
    model: str  # the built-in model trained on it
    doc: str

    @property
    def dir(self) -> Path:
        return DATA_DIR / self.name

    def splits(self, n_train: int = 20000, n_test: int = 500, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
        return make_splits(self.make_problem, n_train, n_test, seed, name=self.name)


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            "countdown",
            countdown_problem,
            "countdown",
            "builtin:tiny-countdown",
            "Countdown-lite: reach a target from 3-4 numbers (1-12) with + - *, one written step at a time; "
            "the default task (several valid continuations at every step).",
        ),
        Task(
            "arith",
            arith_problem,
            "math",
            "builtin:tiny",
            "a+-b+-c with a worked solution and a boxed answer; the quick smoke task (about two decisions per response).",
        ),
    ]
}
DEFAULT_TASK = "countdown"


def builtin_task(spec: str) -> Task | None:
    """The ``Task`` behind ``builtin:<name>``, None for a file path; unknown names raise ``DatasetError``."""
    if not spec.startswith("builtin:"):
        return None
    name = spec.split(":", 1)[1]
    if name not in TASKS:
        raise DatasetError(
            f"unknown builtin dataset {spec!r} — the embedded ones are " + ", ".join(f"'builtin:{n}'" for n in TASKS)
        )
    return TASKS[name]


def write_jsonl(problems: list[Problem], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for p in problems:
            row = {"prompt": p.prompt, "answer": p.answer}
            if p.solution is not None:
                row["solution"] = p.solution
            f.write(json.dumps(row) + "\n")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def resolve_data_path(spec: str, split: str) -> Path:
    """``builtin:<task>`` -> the shipped split file; anything else is a local path."""
    task = builtin_task(spec)
    return task.dir / f"{split}.jsonl" if task else Path(spec).expanduser()


def load_problems(
    spec: str, split: str = "train", *, prompt_key: str = "prompt", answer_key: str = "answer", limit: int | None = None
) -> list[Problem]:
    """Load a JSONL or Parquet file of prompt/answer rows.

    Raises ``DatasetError`` with a one-line message naming the file and row on any problem.
    """
    path = resolve_data_path(spec, split)
    if not path.exists():
        raise DatasetError(
            f"dataset file not found: {path} — pass builtin:countdown, builtin:arith or an existing "
            ".jsonl/.parquet file"
        )
    if path.is_dir():
        raise DatasetError(f"dataset path {path} is a folder — pass a .jsonl or .parquet file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            rows = _read_jsonl(path)
        elif suffix == ".parquet":
            rows = _read_parquet(path)
        else:
            raise DatasetError(f"{path}: unsupported dataset format {suffix!r} — use a .jsonl or .parquet file")
    except PermissionError:
        raise DatasetError(f"cannot read dataset {path}: permission denied — check the file's permissions") from None
    problems = []
    fix = f"fix the row or pick the columns with data.prompt_key/data.answer_key (now {prompt_key!r}/{answer_key!r})"
    for i, obj in enumerate(rows, 1):
        if prompt_key not in obj or answer_key not in obj:
            missing = prompt_key if prompt_key not in obj else answer_key
            raise DatasetError(f"{path}: row {i} has no {missing!r} field — {fix}")
        prompt, answer = obj[prompt_key], obj[answer_key]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DatasetError(f"{path}: row {i} has an empty or non-string {prompt_key!r} — {fix}")
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            raise DatasetError(f"{path}: row {i} has an empty {answer_key!r} — {fix}")
        sol = obj.get("solution")
        problems.append(Problem(prompt, str(answer), sol if isinstance(sol, str) else None))
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise DatasetError(f"{path}: no rows — the file must hold at least one prompt/answer row")
    return problems


def _read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file; a bad row is named by its line number."""
    rows = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DatasetError(f"{path}: row {i} is not UTF-8 text — save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}: row {i} is not valid JSON ({e.msg}) — fix or remove that line") from None
            if not isinstance(obj, dict):
                raise DatasetError(
                    f'{path}: row {i} is not a JSON object — each line must be {{"prompt": ..., "answer": ...}}'
                ) from None
            rows.append(obj)
    return rows


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except PermissionError:
        raise
    except Exception as e:  # pyarrow raises several types for corrupt files
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DatasetError(
            f"{path}: cannot read parquet ({type(e).__name__}: {first}) — check the file is a complete Parquet file"
        ) from None
