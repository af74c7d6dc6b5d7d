"""Unit tests for engine.tasks.problems: the synthetic arithmetic task and dataset loading."""

import json
import os
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.tasks.problems import (
    ARITH_DIR,
    TASKS,
    DatasetError,
    Problem,
    arith_problem,
    builtin_task,
    countdown_problem,
    load_problems,
    make_arith_splits,
    resolve_data_path,
    write_jsonl,
)
from engine.tasks.reward import is_correct, last_boxed

PROMPT_RE = re.compile(r"^([1-9][0-9]?)([+-])([1-9][0-9]?)([+-])([1-9][0-9]?)=$")


@pytest.fixture(scope="module")
def splits():
    return make_arith_splits(n_train=2000, n_test=200, seed=0)


# ------------------------------------------------------------------------------------ synthetic task
def test_splits_sizes_and_determinism(splits):
    train, test = splits
    assert len(train) == 2000 and len(test) == 200
    train2, test2 = make_arith_splits(n_train=2000, n_test=200, seed=0)
    assert train2 == train and test2 == test


def test_other_seed_differs(splits):
    train, test = splits
    train1, test1 = make_arith_splits(n_train=2000, n_test=200, seed=1)
    assert [p.prompt for p in test1] != [p.prompt for p in test]
    assert [p.prompt for p in train1] != [p.prompt for p in train]


def test_splits_disjoint_and_unique(splits):
    train, test = splits
    tr, te = [p.prompt for p in train], [p.prompt for p in test]
    assert len(set(tr)) == len(tr)
    assert len(set(te)) == len(te)
    assert set(tr).isdisjoint(te)


def test_test_split_independent_of_train_size(splits):
    _, test = splits
    _, test_small = make_arith_splits(n_train=10, n_test=200, seed=0)
    assert test_small == test


def test_answers_and_solutions_are_right(splits):
    train, test = splits
    for p in train + test:
        m = PROMPT_RE.match(p.prompt)
        assert m, p.prompt
        a, op1, b, op2, c = int(m[1]), m[2], int(m[3]), m[4], int(m[5])
        ab = a + b if op1 == "+" else a - b
        value = ab + c if op2 == "+" else ab - c
        assert eval(p.prompt[:-1]) == value  # noqa: S307 - prompts are digits and +/- only
        assert p.answer == str(value)
        assert last_boxed(p.solution) == p.answer
        # the worked solution: one line per partial result, then the box
        assert p.solution == f"{a}{op1}{b}={ab};{ab}{op2}{c}={value};\\boxed{{{value}}}"
        assert is_correct(p.solution, p.answer)


def test_solution_length(splits):
    train, test = splits
    lengths = [len(p.solution) for p in train + test]
    assert sum(lengths) / len(lengths) >= 10
    assert min(lengths) >= len("1+1=2;2+1=3;\\boxed{3}")


def test_arith_problem_hand_example():
    # a seeded draw is reproducible and self-consistent
    p1 = arith_problem(random.Random(42))
    p2 = arith_problem(random.Random(42))
    assert p1 == p2
    assert p1.solution.endswith(f"\\boxed{{{p1.answer}}}")
    assert int(p1.answer) == eval(p1.prompt.rstrip("="))  # noqa: S307


def test_both_operators_and_negative_answers_occur(splits):
    train, _ = splits
    assert any("+" in p.prompt for p in train)
    assert any("-" in p.prompt for p in train)
    assert any(int(p.answer) < 0 for p in train)


# ------------------------------------------------------------------------------------ loading
def _one_line(e: DatasetError) -> str:
    msg = str(e)
    assert "\n" not in msg, msg
    return msg


def test_load_jsonl_custom_keys(tmp_path):
    path = tmp_path / "gsm.jsonl"
    rows = [
        {"question": "What is 2+2?", "final": "4", "solution": "2+2=4 \\boxed{4}"},
        {"question": "What is 10/4?", "final": 2.5},
        {"question": "Ten minus three?", "final": 7, "solution": 123},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    probs = load_problems(str(path), prompt_key="question", answer_key="final")
    assert probs == [
        Problem("What is 2+2?", "4", "2+2=4 \\boxed{4}"),
        Problem("What is 10/4?", "2.5", None),
        Problem("Ten minus three?", "7", None),
    ]  # non-string solution dropped


def test_load_jsonl_limit(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": str(i)}) + "\n" for i in range(10)))
    probs = load_problems(str(path), limit=3)
    assert [p.prompt for p in probs] == ["p0", "p1", "p2"]


def test_load_parquet_custom_keys(tmp_path):
    path = tmp_path / "math.parquet"
    pq.write_table(
        pa.table({"problem": ["1+1", "2*3", "x?"], "gold": ["2", "6", "\\frac{1}{2}"], "extra": [1, 2, 3]}), path
    )
    probs = load_problems(str(path), prompt_key="problem", answer_key="gold")
    assert [(p.prompt, p.answer, p.solution) for p in probs] == [
        ("1+1", "2", None),
        ("2*3", "6", None),
        ("x?", "\\frac{1}{2}", None),
    ]


def test_write_jsonl_round_trip(tmp_path, splits):
    _, test = splits
    path = tmp_path / "sub" / "t.jsonl"
    write_jsonl(test[:20], path)
    assert load_problems(str(path)) == test[:20]


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DatasetError) as ei:
        load_problems(str(path))
    msg = _one_line(ei.value)
    assert "nope.jsonl" in msg and "not found" in msg


def test_bad_json_line_names_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": "2"}\n{"prompt": "c", answer: 3}\n')
    with pytest.raises(DatasetError) as ei:
        load_problems(str(path))
    msg = _one_line(ei.value)
    assert "bad.jsonl" in msg and "row 3" in msg


def test_non_object_json_line(tmp_path):
    path = tmp_path / "arr.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n[1, 2]\n')
    with pytest.raises(DatasetError) as ei:
        load_problems(str(path))
    msg = _one_line(ei.value)
    assert "arr.jsonl" in msg and "row 2" in msg


def test_missing_answer_field(tmp_path):
    path = tmp_path / "noans.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "gold": "2"}\n')
    with pytest.raises(DatasetError) as ei:
        load_problems(str(path))
    msg = _one_line(ei.value)
    assert "noans.jsonl" in msg and "row 2" in msg and "'answer'" in msg


def test_missing_custom_prompt_field(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n')
    with pytest.raises(DatasetError) as ei:
        load_problems(str(path), prompt_key="question")
    msg = _one_line(ei.value)
    assert "row 1" in msg and "'question'" in msg


@pytest.mark.parametrize("prompt", ["", "   ", None, 5])
def test_empty_or_non_string_prompt(tmp_path, prompt):
    path = tmp_path / "empty.jsonl"
    path.write_text(
        json.dumps({"prompt": "ok", "answer": "1"}) + "\n" + json.dumps({"prompt": prompt, "answer": "2"}) + "\n"
    )
    with pytest.raises(DatasetError) as ei:
        load_problems(str(path))
    msg = _one_line(ei.value)
    assert "empty.jsonl" in msg and "row 2" in msg


@pytest.mark.parametrize("answer", ["", "  ", None])
def test_empty_answer(tmp_path, answer):
    path = tmp_path / "ea.jsonl"
    path.write_text(json.dumps({"prompt": "q", "answer": answer}) + "\n")
    with pytest.raises(DatasetError) as ei:
        load_problems(str(path))
    msg = _one_line(ei.value)
    assert "ea.jsonl" in msg and "row 1" in msg


def test_parquet_missing_answer_names_row(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": ["1", None]}), path)
    with pytest.raises(DatasetError) as ei:
        load_problems(str(path))
    msg = _one_line(ei.value)
    assert "p.parquet" in msg and "row 2" in msg


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,answer\n1+1,2\n")
    with pytest.raises(DatasetError) as ei:
        load_problems(str(path))
    msg = _one_line(ei.value)
    assert "data.csv" in msg and ".csv" in msg


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(os.urandom(64) + b"not parquet at all" + bytes(range(256)))
    with pytest.raises(DatasetError) as ei:
        load_problems(str(path))
    msg = _one_line(ei.value)
    assert "broken.parquet" in msg


def test_empty_file(tmp_path):
    path = tmp_path / "none.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DatasetError) as ei:
        load_problems(str(path))
    assert "none.jsonl" in _one_line(ei.value)


def test_unknown_builtin():
    with pytest.raises(DatasetError) as ei:
        load_problems("builtin:nope")
    msg = _one_line(ei.value)
    assert "builtin:nope" in msg


def test_builtin_arith_test_split():
    assert resolve_data_path("builtin:arith", "test") == ARITH_DIR / "test.jsonl"
    assert (ARITH_DIR / "test.jsonl").exists()
    probs = load_problems("builtin:arith", "test")
    assert len(probs) == 500
    for p in probs:
        assert PROMPT_RE.match(p.prompt), p.prompt
        assert p.answer == str(eval(p.prompt[:-1]))  # noqa: S307
        assert p.solution is not None and last_boxed(p.solution) == p.answer
    assert len(load_problems("builtin:arith", "test", limit=7)) == 7


def test_dataset_error_is_value_error():
    assert issubclass(DatasetError, ValueError)


def test_shipped_test_split_matches_generator():
    _, test = make_arith_splits(n_train=0, n_test=500, seed=0)
    assert load_problems("builtin:arith", "test") == test


# ------------------------------------------------------------------------------------ countdown task
from engine.tasks.reward import countdown_correct, parse_countdown_prompt  # noqa: E402

CD_STEP = re.compile(r"^(\d+)([+\-*])(\d+)=(\d+)\(([\d ]+)\)$")


@pytest.fixture(scope="module")
def cd_splits():
    return TASKS["countdown"].splits(n_train=1500, n_test=200, seed=0)


def test_countdown_splits_deterministic_disjoint(cd_splits):
    train, test = cd_splits
    assert len(train) == 1500 and len(test) == 200
    assert TASKS["countdown"].splits(n_train=1500, n_test=200, seed=0) == cd_splits
    tr, te = [p.prompt for p in train], [p.prompt for p in test]
    assert len(set(tr)) == len(tr) and len(set(te)) == len(te) and set(tr).isdisjoint(te)


def test_countdown_solutions_follow_the_rules(cd_splits):
    train, test = cd_splits
    for p in train + test:
        numbers, target = parse_countdown_prompt(p.prompt)
        assert len(numbers) in (3, 4) and all(1 <= x <= 12 for x in numbers)
        assert p.answer == str(target)
        steps = p.solution.split(";")
        assert len(steps) == len(numbers) - 1
        pool = list(numbers)
        for s in steps:
            a, op, b, r, left = CD_STEP.match(s).groups()
            a, b, r = int(a), int(b), int(r)
            assert 1 <= r <= 200 and r == {"+": a + b, "-": a - b, "*": a * b}[op]
            pool.remove(a)
            pool.remove(b)
            pool.append(r)
            left = [int(x) for x in left.split()]  # the numbers left: unused numbers, then the new result
            assert sorted(left) == sorted(pool) and left[-1] == r
        assert pool == [target]
        assert countdown_correct(p.solution, p.prompt)


def test_countdown_solutions_vary_order(cd_splits):
    # operand order and step order are random: both orders of + and * occur, so the first token of a step forks
    train, _ = cd_splits
    first_bigger = sum(
        int(CD_STEP.match(s).group(1)) > int(CD_STEP.match(s).group(3))
        for p in train
        for s in p.solution.split(";")
        if CD_STEP.match(s).group(2) in "+*"
    )
    first_smaller = sum(
        int(CD_STEP.match(s).group(1)) < int(CD_STEP.match(s).group(3))
        for p in train
        for s in p.solution.split(";")
        if CD_STEP.match(s).group(2) in "+*"
    )
    assert first_bigger > 0.3 * (first_bigger + first_smaller) and first_smaller > 0.3 * (first_bigger + first_smaller)
    ops = [s.split("=")[0] for p in train for s in p.solution.split(";")]
    assert all(any(o in x for x in ops) for o in "+-*")


def test_countdown_sizes_mixed_and_responses_long_enough(cd_splits):
    train, _ = cd_splits
    sizes = [len(parse_countdown_prompt(p.prompt)[0]) for p in train]
    assert 0.45 < sizes.count(3) / len(sizes) < 0.55
    assert sum(len(p.solution) for p in train) / len(train) >= 30


def test_builtin_tasks_resolve():
    assert builtin_task("builtin:countdown") is TASKS["countdown"]
    assert builtin_task("data/x.jsonl") is None
    with pytest.raises(DatasetError, match="builtin:countdown"):
        builtin_task("builtin:chess")
    assert resolve_data_path("builtin:countdown", "test") == TASKS["countdown"].dir / "test.jsonl"


def test_shipped_countdown_split_matches_generator():
    _, test = TASKS["countdown"].splits(n_train=0, n_test=500, seed=0)
    assert load_problems("builtin:countdown", "test") == test


def test_countdown_problem_is_deterministic():
    a = [countdown_problem(random.Random(5)) for _ in range(3)]
    b = [countdown_problem(random.Random(5)) for _ in range(3)]
    assert a == b
