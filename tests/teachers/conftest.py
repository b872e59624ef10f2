"""Fixtures for the teacher tests (helpers that build test data live in teacher_testdata.py)."""

from __future__ import annotations

import pytest

from teachers.resolve import load_tokenizer


@pytest.fixture(scope="session")
def eos_id(tiny_teacher_dir) -> int:
    return int(load_tokenizer(tiny_teacher_dir).eos_token_id)
