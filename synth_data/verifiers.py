"""Verifiers: decide whether a model's answer is right, per domain.

- math: extract the final answer (GSM8K "#### 42", "The answer is 42", \\boxed{42}, else the last number)
  and compare it with the reference after numeric normalisation (commas, currency, units-free decimals,
  fractions).
- code: pull the program out of the completion (a fenced block, else the raw text) and run it against the
  task's assert-style tests in the sandbox (`synth_data.sandbox.run_python`).

`VERIFIERS` maps a domain to a function `(completion, task) -> Verdict`; domains without one (open-ended
instructions) are scored by a reward model instead (`synth_data.scorers`).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from core.config import InputError
from synth_data.sandbox import run_python

_NUMBER = r"-?\$?\s?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_HASHES_RE = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:|=)\s*:?\s*(?:\*\*)?\s*(" + _NUMBER + r")", re.IGNORECASE)


@dataclass
class Verdict:
    """`passed`: the answer is right; `score` in [0, 1] (fraction of tests passed for code); `detail`: why."""

    passed: bool
    score: float
    detail: str


# --------------------------------------------------------------------------------------------------
# Math
# --------------------------------------------------------------------------------------------------


def _boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (braces may nest), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a math solution, or None when it states none.

    Priority: the last "#### X" line, the last \\boxed{X}, the last "the answer is X", else the last number.
    """
    if not text:
        return None
    hashes = _HASHES_RE.findall(text)
    if hashes:
        # "#### 42" is the answer; in "#### 5 + 7 = 12" it is the result, the last number of the line.
        line = hashes[-1].strip()
        numbers = _NUMBER_RE.findall(line)
        return numbers[-1].strip() if len(numbers) > 1 and "=" in line else line
    boxed = _boxed(text)
    if boxed is not None:
        return boxed
    stated = _ANSWER_IS_RE.findall(text)
    if stated:
        return stated[-1].strip()
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1].strip() if numbers else None


def _to_number(text: str) -> Fraction | None:
    """Parse "1,234", "$5.00", "3/4", "\\frac{3}{4}", "-2.50", "12 dollars" → an exact Fraction, else None."""
    s = text.strip().rstrip(".").replace(",", "").replace("$", "").replace("\\$", "").replace("\\!", "")
    s = re.sub(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}", r"\1/\2", s)
    s = s.replace("{", "").replace("}", "").replace("\\%", "").rstrip("%").strip()
    m = re.fullmatch(r"(-?\d*\.?\d+)\s*(?:/\s*(-?\d*\.?\d+))?(?:\s*[a-zA-Z ]*)?", s)
    if not m:
        return None
    try:
        value = Fraction(m.group(1))
        if m.group(2) is not None:
            denominator = Fraction(m.group(2))
            if denominator == 0:
                return None
            value /= denominator
    except (ValueError, ZeroDivisionError):
        return None
    return value


def answers_match(pred: str | None, ref: str) -> bool:
    """True when `pred` states the same answer as `ref`: numerically equal (exact for decimals and
    fractions, relative 1e-6 otherwise), else equal as whitespace/case-normalised strings."""
    if pred is None:
        return False
    a, b = _to_number(pred), _to_number(ref)
    if a is not None and b is not None:
        return a == b or abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))
    return _normalise_text(pred) == _normalise_text(ref)


def _normalise_text(s: str) -> str:
    return " ".join(s.strip().rstrip(".").lower().split())


def verify_math(completion: str, task: dict[str, Any]) -> Verdict:
    """Math verifier: `task["answer"]` is the reference final answer."""
    pred = extract_answer(completion)
    ok = answers_match(pred, str(task["answer"]))
    return Verdict(ok, float(ok), f"extracted {pred!r}, reference {task['answer']!r}")


# --------------------------------------------------------------------------------------------------
# Code
# --------------------------------------------------------------------------------------------------

_FENCE_RE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(completion: str, entry_point: str | None = None) -> str:
    """The program in a completion: the fenced block defining `entry_point` (else the longest fenced
    block); the raw text when there is no fence (an unterminated fence is cut at its start)."""
    blocks = _FENCE_RE.findall(completion)
    if not blocks:
        open_fence = re.search(r"```[ \t]*(?:python|py|python3)?[ \t]*\n", completion, re.IGNORECASE)
        return completion[open_fence.end():] if open_fence else completion
    if entry_point:
        defining = [b for b in blocks if re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", b)]
        if defining:
            return defining[-1]
    return max(blocks, key=len)


def _test_program(code: str, tests: list[str], setup: str, nonce: str) -> str:
    """Candidate code, then each test in its own try block; prints `nonce` + JSON counts at the end."""
    lines = [code, "", setup, "", "__results = []"]
    for test in tests:
        lines.append("try:")
        lines.extend("    " + line for line in test.splitlines() or ["pass"])
        lines.append("    __results.append(True)")
        lines.append("except BaseException:")
        lines.append("    __results.append(False)")
    lines.append(f"print({nonce!r} + __import__('json').dumps(__results))")
    return "\n".join(lines) + "\n"


def run_tests(code: str, tests: list[str], *, setup: str = "", timeout_s: float = 10.0,
              memory_mb: int = 512) -> Verdict:
    """Run `code` then each assert-style test (Python statements) in the sandbox.

    `passed` needs every test to pass and the program to exit 0 in time; `score` is the fraction passed.
    """
    if not tests:
        raise InputError("run_tests: a code task needs at least one test")
    nonce = f"@@results-{secrets.token_hex(8)}@@"
    res = run_python(_test_program(code, tests, setup, nonce), timeout_s=timeout_s, memory_mb=memory_mb)
    results: list[bool] = []
    for line in res.stdout.splitlines():
        if line.startswith(nonce):
            try:
                results = [bool(x) for x in json.loads(line[len(nonce):])]
            except json.JSONDecodeError:
                results = []
    if len(results) != len(tests):
        why = "timed out" if res.timed_out else f"exit {res.returncode}: {res.stderr.strip()[-300:]}"
        return Verdict(False, 0.0, f"did not finish the tests ({why})")
    score = sum(results) / len(tests)
    passed = res.ok and all(results)
    return Verdict(passed, score, f"{sum(results)}/{len(tests)} tests passed")


def verify_code(completion: str, task: dict[str, Any]) -> Verdict:
    """Code verifier: `task["tests"]` (list of assert statements), optional `task["test_setup"]`,
    `task["entry_point"]` (the function name the tests call) and `task["timeout_s"]` (sandbox limit)."""
    code = extract_code(completion, task.get("entry_point"))
    return run_tests(code, list(task["tests"]), setup=task.get("test_setup") or "",
                     timeout_s=float(task.get("timeout_s", 10.0)))


VERIFIERS: dict[str, Callable[[str, dict[str, Any]], Verdict]] = {"math": verify_math, "code": verify_code}
