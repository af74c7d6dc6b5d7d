"""Tasks: the embedded synthetic arithmetic task and loading of real prompt/answer datasets.

The embedded task is a three-operand expression ``a op b op c`` (operands 1..99, ops + and -)
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
from dataclasses import dataclass
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = PACKAGE_ROOT / "data"
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


def make_arith_splits(n_train: int = 20000, n_test: int = 500, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """Disjoint train/test splits, deterministic in ``seed`` (test drawn first, train excludes it)."""
    rng_test = random.Random(f"arith-test-{seed}")
    test, seen = [], set()
    while len(test) < n_test:
        p = arith_problem(rng_test)
        if p.prompt not in seen:
            seen.add(p.prompt)
            test.append(p)
    rng_train = random.Random(f"arith-train-{seed}")
    train = []
    while len(train) < n_train:
        p = arith_problem(rng_train)
        if p.prompt not in seen:
            seen.add(p.prompt)
            train.append(p)
    return train, test


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
    """``builtin:arith`` -> the shipped split file; anything else is a local path."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name != "arith":
            raise DatasetError(f"unknown builtin dataset {spec!r}; the embedded one is 'builtin:arith'")
        return ARITH_DIR / f"{split}.jsonl"
    return Path(spec).expanduser()


def load_problems(spec: str, split: str = "train", *, prompt_key: str = "prompt", answer_key: str = "answer",
                  limit: int | None = None) -> list[Problem]:
    """Load a JSONL or Parquet file of prompt/answer rows.

    Raises ``DatasetError`` with a one-line message naming the file and row on any problem.
    """
    path = resolve_data_path(spec, split)
    if not path.exists():
        raise DatasetError(f"dataset file not found: {path}")
    rows: list[dict] = []
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with open(path) as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}: row {i} is not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise DatasetError(f"{path}: row {i} is not a JSON object")
                rows.append(obj)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DatasetError(f"{path}: cannot read parquet ({type(e).__name__}: {e})") from None
    else:
        raise DatasetError(f"{path}: unsupported dataset format {suffix!r} (use .jsonl or .parquet)")
    problems = []
    for i, obj in enumerate(rows, 1):
        if prompt_key not in obj or answer_key not in obj:
            missing = prompt_key if prompt_key not in obj else answer_key
            raise DatasetError(f"{path}: row {i} has no {missing!r} field")
        prompt, answer = obj[prompt_key], obj[answer_key]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DatasetError(f"{path}: row {i} has an empty or non-string {prompt_key!r}")
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            raise DatasetError(f"{path}: row {i} has an empty {answer_key!r}")
        sol = obj.get("solution")
        problems.append(Problem(prompt, str(answer), sol if isinstance(sol, str) else None))
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise DatasetError(f"{path}: no rows")
    return problems
