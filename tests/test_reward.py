"""Unit tests for engine.tasks.reward: boxed-answer extraction, correctness and the overlong penalty."""

import random
import threading

import pytest

from engine.tasks.reward import is_correct, last_boxed, math_verify_correct, overlong_penalty


# ------------------------------------------------------------------------------------ last_boxed
def test_last_boxed_simple():
    assert last_boxed("37+48=85;85-12=73;\\boxed{73}") == "73"


def test_last_boxed_nested_braces():
    assert last_boxed("so \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{{a}{b{c}}}") == "{a}{b{c}}"


def test_last_boxed_takes_last_of_several():
    assert last_boxed("\\boxed{1} then \\boxed{2}; finally \\boxed{-3}") == "-3"


def test_last_boxed_strips_whitespace():
    assert last_boxed("\\boxed{  42 }") == "42"


def test_last_boxed_unbalanced_is_none():
    assert last_boxed("\\boxed{\\frac{1}{2}") is None
    assert last_boxed("\\boxed{") is None
    # the last box is unbalanced: no fallback to an earlier one
    assert last_boxed("\\boxed{1} and \\boxed{2") is None


def test_last_boxed_no_box_is_none():
    assert last_boxed("") is None
    assert last_boxed("the answer is 73") is None
    assert last_boxed("boxed{73}") is None  # no backslash


def test_last_boxed_empty_box():
    assert last_boxed("\\boxed{}") == ""


# ------------------------------------------------------------------------------------ is_correct
def test_is_correct_canonical_ints():
    assert is_correct("37+48=85;85-12=73;\\boxed{73}", "73") is True
    assert is_correct("x;\\boxed{-5}", "-5") is True
    assert is_correct("x;\\boxed{0}", "0") is True
    assert is_correct("x;\\boxed{73}", " 73 ") is True  # gold is stripped


def test_is_correct_wrong_answers():
    assert is_correct("x;\\boxed{72}", "73") is False
    assert is_correct("x;\\boxed{5}", "-5") is False
    assert is_correct("x;\\boxed{-5}", "5") is False
    assert is_correct("\\boxed{73} no wait \\boxed{74}", "73") is False  # the last box counts


def test_is_correct_non_canonical_int_goes_to_math_verify():
    # "073" is not canonical, so the fast path does not apply; math-verify reads it as 73
    assert is_correct("x;\\boxed{073}", "73") is True
    assert is_correct("x;\\boxed{073}", "74") is False


def test_is_correct_no_box_is_false():
    assert is_correct("the answer is 73", "73") is False
    assert is_correct("73", "73") is False
    assert is_correct("", "73") is False


@pytest.mark.parametrize(
    "response", ["\\boxed{", "\\boxed{}", "\\boxed{1/0}", "x;\\boxed{\\frac{}{}}", "\\boxed{)(}", "\\boxed{\\\\\\}"]
)
def test_is_correct_garbage_is_false_without_raising(response):
    assert is_correct(response, "1") is False
    assert math_verify_correct(response, "1") is False


def test_is_correct_garbage_gold_is_false_without_raising():
    assert is_correct("\\boxed{\\frac{1}{2}}", "\\frac{") is False
    assert math_verify_correct("\\boxed{2}", "") is False


def test_fast_path_agrees_with_math_verify():
    rng = random.Random(1234)
    pairs = []
    for _ in range(150):
        a = rng.randint(-300, 300)
        pairs.append((a, a))  # equal
    for _ in range(150):
        a, b = rng.randint(-300, 300), rng.randint(-300, 300)
        pairs.append((a, b))  # mostly unequal
    pairs += [(0, 0), (-0, 0), (1, -1), (-1, 1), (300, -300), (10, 100), (12, 21)]
    assert sum(a == b for a, b in pairs) >= 150 and sum(a != b for a, b in pairs) >= 140
    mismatches = []
    for a, b in pairs:
        resp = f"x;\\boxed{{{a}}}"
        fast = is_correct(resp, str(b))
        ref = math_verify_correct(resp, str(b))
        assert fast == (a == b)
        if fast != ref:
            mismatches.append((a, b, fast, ref))
    assert mismatches == []


def test_non_integer_answers_use_math_verify():
    assert is_correct("x;\\boxed{0.5}", "1/2") is True
    assert is_correct("x;\\boxed{\\frac{1}{2}}", "0.5") is True
    assert is_correct("x;\\boxed{\\frac{1}{3}}", "0.5") is False
    assert is_correct("x;\\boxed{0.5}", "1/3") is False


def test_math_verify_correct_plain_values():
    assert math_verify_correct("x;\\boxed{73}", "73") is True
    assert math_verify_correct("x;\\boxed{72}", "73") is False


def _run_in_thread(fn):
    out, err = [], []

    def target():
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - reported to the main thread
            err.append(e)

    t = threading.Thread(target=target)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive()
    assert err == []
    assert len(out) == 1
    return out[0]


def test_math_verify_correct_in_thread():
    # gold strings not used elsewhere, so the gold parse is not served from the cache
    verdicts = _run_in_thread(
        lambda: (
            math_verify_correct("x;\\boxed{\\frac{1}{4}}", "0.25"),
            math_verify_correct("x;\\boxed{\\frac{1}{5}}", "0.125"),
        )
    )
    assert verdicts == (True, False)


def test_is_correct_in_thread_non_integer():
    verdicts = _run_in_thread(
        lambda: (
            is_correct("x;\\boxed{0.75}", "3/4"),
            is_correct("x;\\boxed{0.7}", "7/8"),
            is_correct("x;\\boxed{0375}", "375"),  # non-canonical int -> math-verify
        )
    )
    assert verdicts == (True, False, True)


# ------------------------------------------------------------------------------------ overlong
@pytest.mark.parametrize(
    "length, expected",
    [
        (0, 0.0),
        (10, 0.0),
        (36, 0.0),  # up to max_len - buffer: no penalty
        (37, -1 / 12),
        (40, -1 / 3),
        (42, -0.5),
        (45, -0.75),
        (47, -11 / 12),
        (48, -1.0),
        (49, -1.0),
        (500, -1.0),
    ],
)
def test_overlong_penalty_hand_values(length, expected):
    assert overlong_penalty(length, 48, 12) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("length", [0, 10, 47, 48, 49, 1000])
def test_overlong_penalty_zero_buffer_disables(length):
    assert overlong_penalty(length, 48, 0) == 0.0


def test_overlong_penalty_buffer_equals_max_len():
    # linear from 0 at length 0 to -1 at length 10
    assert overlong_penalty(0, 10, 10) == 0.0
    assert overlong_penalty(5, 10, 10) == pytest.approx(-0.5)
    assert overlong_penalty(10, 10, 10) == -1.0


def test_overlong_penalty_monotone_and_bounded():
    vals = [overlong_penalty(n, 64, 16) for n in range(0, 80)]
    assert all(-1.0 <= v <= 0.0 for v in vals)
    assert all(b <= a for a, b in zip(vals, vals[1:]))


# ------------------------------------------------------------------------------------ countdown verifier
from engine.tasks.problems import Problem  # noqa: E402
from engine.tasks.reward import countdown_correct, parse_countdown_prompt, resolve_verifier  # noqa: E402

CD_PROMPT = "10 8 9 7:117="
CD_GOOD = "10+8=18(9 7 18);18*7=126(9 126);126-9=117(117)"


def test_countdown_prompt_parses():
    assert parse_countdown_prompt(CD_PROMPT) == ([10, 8, 9, 7], 117)
    with pytest.raises(ValueError, match="not a countdown prompt"):
        parse_countdown_prompt("37+48-12=")


def test_countdown_valid_derivations():
    assert countdown_correct(CD_GOOD, CD_PROMPT)
    # another order of steps and operands, and the numbers-left list in any order
    assert countdown_correct("8+10=18(18 9 7);7*18=126(126 9);126-9=117(117)", CD_PROMPT)
    assert countdown_correct("7*9=63(10 8 63);10+8=18(63 18);63+18=81(81)", "10 8 9 7:81=")
    # duplicates in the pool are a multiset; three numbers take two steps
    assert countdown_correct("3*3=9(2 9);9-2=7(7)", "3 3 2:7=")
    assert countdown_correct(" 3*3=9(2 9);9-2=7(7)\n", "3 3 2:7=")  # surrounding whitespace is ignored


@pytest.mark.parametrize(
    "response",
    [
        "10+8=18(9 7 18);18*7=126(9 126);126-9=117(116)",  # wrong final list
        "10+8=18(9 7 18);18*7=126(9 126);126-10=116(116)",  # 10 used twice, wrong value
        "10+8=19(9 7 19);19*7=133(9 133);133-16=117(117)",  # arithmetic error
        "10+8=18(9 7 18);18*7=126(9 126)",  # stops early: numbers left
        "10+8=18(9 7 18);18*7=126(9 126);126-9=117",  # the last step lists nothing
        "10+8=18(9 7);18*7=126(9 126);126-9=117(117)",  # wrong numbers-left list
        "10+8=18(9 7 18);18*7=126;126-9=117(117)",  # missing numbers-left list
        "10+10=20(8 9 7 20);20*7=140(9 140);140-23=117(117)",  # uses 10 twice
        "11+6=17(10 8 9 7 17);17*7=119(10 8 9 119);119-2=117(10 8 9 117)",  # numbers not in the prompt
        "10+8=18(9 7 18);18*7=126(9 126);126-9=117(117);",  # trailing separator
        "10+8=18(9 7 18);18*7=126(9 126);126-9=117(117);117+0=117(117)",  # one step too many
        "",
        "117",
        "\\boxed{117}",
        "10+8=18(9 7 18) ;18*7=126(9 126);126-9=117(117)",
    ],
)
def test_countdown_invalid_derivations(response):
    assert countdown_correct(response, CD_PROMPT) is False


def test_countdown_malformed_prompt_is_wrong_not_error():
    assert countdown_correct(CD_GOOD, "what is 117?") is False


def test_resolve_verifier_by_task_and_override():
    p = Problem(CD_PROMPT, "117")
    assert resolve_verifier("builtin:countdown")(CD_GOOD, p) is True
    assert resolve_verifier("builtin:arith")(CD_GOOD, p) is False  # math-verify wants a boxed answer
    assert resolve_verifier("some/file.jsonl")("x \\boxed{117}", p) is True
    assert resolve_verifier("some/file.jsonl", "countdown")(CD_GOOD, p) is True
    with pytest.raises(ValueError, match="unknown verifier"):
        resolve_verifier("some/file.jsonl", "chess")
