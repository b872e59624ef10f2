"""Duplicate filters, decontamination against the shipped evaluation sets, and the crash-safe JSONL log."""

from __future__ import annotations

import pytest

from synth_data.decontam import Decontaminator, eval_texts, ngrams
from synth_data.filters import exact_duplicates, near_duplicates, shingles
from synth_data.generate import JsonlLog

BASE = ("Maria buys four notebooks for three dollars each and two pens for one dollar each, then pays "
        "with a twenty dollar bill and asks the cashier how much change she should get back today")


def test_exact_duplicates_normalise_case_and_space():
    flags = exact_duplicates(["Hello  World", "hello world", "hello there", "HELLO WORLD\n"])
    assert flags == [False, True, False, True]


def test_near_duplicates_catch_small_edits_only():
    edited = BASE.replace("today", "now")
    unrelated = "Write a function that reverses a linked list in place and returns the new head node of the list"
    flags = near_duplicates([BASE, edited, unrelated, BASE.upper()], threshold=0.8)
    assert flags == [False, True, False, True]
    assert near_duplicates([BASE, edited], threshold=1.0) == [False, False]
    # The threshold is a real Jaccard bound: a half-rewritten text is kept at 0.8.
    half = " ".join(BASE.split()[:16]) + " and then walks to the park to feed the ducks with some old bread crumbs"
    assert near_duplicates([BASE, half], threshold=0.8) == [False, False]
    assert len(shingles("")) == 1


@pytest.fixture(scope="module")
def decontam():
    return Decontaminator(["gsm8k", "humaneval", "mbpp", "arc"], n=13)


def test_decontaminator_finds_each_eval_set(decontam):
    assert decontam.items["gsm8k"] == 1319 and decontam.items["humaneval"] == 164 and decontam.items["mbpp"] == 500
    for name in ("gsm8k", "humaneval", "mbpp", "arc"):
        texts = [t for t in eval_texts(name) if len(ngrams(t, 13)) > 0]
        # Embedded in other text, with different case and punctuation, an eval item is still found.
        sample = "Some preamble. " + texts[7].upper().replace(",", " ,") + " and a trailing remark."
        assert decontam.match(sample) == name
    assert decontam.match(BASE) is None
    assert decontam.match("") is None


def test_decontaminator_rejects_bad_n():
    with pytest.raises(ValueError, match="decontam_ngram"):
        Decontaminator([], n=0)
    with pytest.raises(ValueError, match="unknown evaluation set"):
        Decontaminator(["mmlu"], n=13)


def test_jsonl_log_repairs_torn_tail_and_dedupes(tmp_path):
    log = JsonlLog(tmp_path / "log.jsonl")
    assert log.load() == {}
    log.append([{"prompt_id": "a", "v": 1}, {"prompt_id": "b", "v": 2}])
    log.append([{"prompt_id": "a", "v": 99}])  # a duplicate key: the first record wins
    with open(log.path, "ab") as f:
        f.write(b'{"prompt_id": "c", "v"')  # a crash in the middle of a write
    recs = log.load()
    assert {k: v["v"] for k, v in recs.items()} == {"a": 1, "b": 2}
    assert log.path.read_bytes().endswith(b"\n")
    log.append([{"prompt_id": "c", "v": 3}])
    assert set(log.load()) == {"a", "b", "c"}
    log.path.write_text('{"prompt_id": "x"}\nnot json\n')
    with pytest.raises(ValueError, match=r"log.jsonl:2"):
        log.load()
