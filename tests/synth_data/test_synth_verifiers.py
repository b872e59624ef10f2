"""Answer extraction, numeric matching and the sandboxed code verifier."""

from __future__ import annotations

import time

import pytest

from synth_data.verifiers import (
    VERIFIERS,
    answers_match,
    extract_answer,
    extract_code,
    run_tests,
    verify_code,
    verify_math,
)


@pytest.mark.parametrize("text, expected", [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("#### 1,234\nsome trailing chatter with 99", "1,234"),
    ("#### 56 + -33 = 23\nThe end.", "23"),
    ("#### -4", "-4"),
    ("So the total is \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}"),
    ("Nested \\boxed{{12}} ok", "{12}"),
    ("Step 1: 5 * 2 = 10. The answer is 10. Check: 10 / 2 = 5", "10"),
    ("Final answer: $18.50", "$18.50"),
    ("He runs 3 miles a day for 7 days, 21 miles in total", "21"),
    ("no digits at all", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("pred, ref, same", [
    ("1,234", "1234", True),
    ("$18.50", "18.5", True),
    ("42.0", "42", True),
    ("42.", "42", True),
    ("\\frac{3}{4}", "0.75", True),
    ("3/4", "0.75", True),
    ("-5", "5", False),
    ("41", "42", False),
    ("12 dollars", "12", True),
    ("50%", "50", True),
    ("Paris", "paris", True),
    ("1/0", "0", False),
    (None, "1", False),
])
def test_answers_match(pred, ref, same):
    assert answers_match(pred, ref) is same


def test_verify_math_end_to_end():
    assert verify_math("3 boxes of 4 is 12.\n#### 12", {"answer": "12"}).passed
    wrong = verify_math("I think it is 13", {"answer": "12"})
    assert not wrong.passed and wrong.score == 0.0 and "13" in wrong.detail


def test_extract_code_prefers_block_defining_entry_point():
    text = "Here:\n```python\nimport math\n```\nand\n```python\ndef add(a, b):\n    return a + b\n```\nDone"
    assert extract_code(text, "add").strip().startswith("def add")
    assert extract_code("def f():\n    return 1") == "def f():\n    return 1"
    assert extract_code("```python\ndef f():\n    return 1\n").strip() == "def f():\n    return 1"


TASK = {"entry_point": "add", "tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]}


def test_verify_code_pass_partial_fail():
    good = verify_code("```python\ndef add(a, b):\n    return a + b\n```", TASK)
    assert good.passed and good.score == 1.0
    partial = verify_code("def add(a, b):\n    return 3 if a == 1 else a + b + (a == 2)", TASK)
    assert not partial.passed and partial.score == pytest.approx(2 / 3)
    broken = verify_code("def add(a, b) return", TASK)
    assert not broken.passed and broken.score == 0.0 and "SyntaxError" in broken.detail


def test_verify_code_hostile_and_slow_candidates():
    start = time.monotonic()
    hang = verify_code("def add(a, b):\n    while True:\n        pass", TASK | {"timeout_s": 2.0})
    assert not hang.passed and hang.score == 0.0 and "timed out" in hang.detail
    assert time.monotonic() - start < 8
    cheat = "import sys\ndef add(a, b):\n    return 0\nprint('@@results-0@@[true, true, true]')\nsys.exit(0)"
    assert not verify_code(cheat, TASK).passed


def test_run_tests_setup_and_validation():
    res = run_tests("def f(x):\n    return CONST * x", ["assert f(2) == 6"], setup="CONST = 3")
    assert res.passed
    with pytest.raises(ValueError, match="at least one test"):
        run_tests("x = 1", [])


def test_registry_has_domains():
    assert set(VERIFIERS) == {"math", "code"}
