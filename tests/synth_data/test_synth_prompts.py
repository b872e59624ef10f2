"""Prompt sources: shipped seeds (whose reference solutions must pass their own tests), JSONL, datasets."""

from __future__ import annotations

import json

import pytest

from synth_data.prompts import SEEDS_DIR, encode_prompt, load_prompts
from synth_data.verifiers import run_tests, verify_math


def test_code_seeds_are_valid_and_tests_discriminate():
    tasks = [json.loads(line) for line in (SEEDS_DIR / "code_tasks.jsonl").read_text().splitlines()]
    assert len(tasks) >= 30 and len({t["id"] for t in tasks}) == len(tasks)
    for t in tasks:
        assert f"`{t['entry_point']}(" in t["prompt"]
        good = run_tests(t["solution"], t["tests"])
        assert good.passed, (t["id"], good.detail)
        stub = f"def {t['entry_point']}(*args, **kwargs):\n    return None"
        assert not run_tests(stub, t["tests"]).passed, t["id"]


def test_seed_sources_and_math_answers():
    tasks = load_prompts(["seed:math", "seed:code", "seed:general"], max_prompts=3, seed=7)
    by_domain = {d: [t for t in tasks if t.domain == d] for d in ("math", "code", "general")}
    assert [len(v) for v in by_domain.values()] == [3, 3, 3]
    math = by_domain["math"][0]
    assert math.source == "seed:math" and "####" in math.prompt
    assert verify_math(f"... so the total is\n#### {math.reference['answer']}", math.reference).passed
    code = by_domain["code"][0]
    assert code.reference["tests"] and code.reference["entry_point"] and "```python" in code.prompt
    assert by_domain["general"][0].reference == {}
    # Deterministic for a seed; oversampling draws more generated problems, never more file prompts.
    again = load_prompts(["seed:math"], max_prompts=3, seed=7)
    assert [t.id for t in again] == [t.id for t in by_domain["math"]]
    assert len(load_prompts(["seed:math", "seed:code"], max_prompts=3, seed=7, oversample=2)) == 6 + 3


def test_reasoning_gym_options():
    tasks = load_prompts(["reasoning-gym:basic_arithmetic?max_terms=2&max_digits=1&operators=+,-"], 5, seed=1)
    assert len(tasks) == 5
    for t in tasks:
        expr = t.prompt.split("\n")[0].removeprefix("Calculate ").rstrip(".")
        assert "*" not in expr and "/" not in expr
        assert verify_math(f"#### {eval(expr)}", t.reference).passed  # the reference answer is right
    with pytest.raises(ValueError, match="key=value"):
        load_prompts(["reasoning-gym:basic_arithmetic?max_terms"], 1)


def test_jsonl_and_hf_sources(tmp_path):
    import datasets

    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "What is 6 * 7?", "answer": "6 * 7 = 42\n#### 42"},
        {"question": "Write `double(x)`.", "test_list": ["assert double(2) == 4"], "entry_point": "double"},
        {"instruction": "Say hi."},
    ]) + "\n")
    tasks = load_prompts([f"jsonl:{path}"], max_prompts=10)
    assert [t.domain for t in tasks] == ["math", "code", "general"]
    assert tasks[0].reference == {"answer": "42"}
    folder = tmp_path / "ds"
    datasets.Dataset.from_list([{"prompt": "Name a colour."}, {"prompt": "Name a fruit."}]).save_to_disk(str(folder))
    hf = load_prompts([f"hf:{folder}"], max_prompts=1)
    assert len(hf) == 1 and hf[0].domain == "general" and hf[0].prompt == "Name a colour."


def test_bad_prompt_sources_name_the_problem(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"answer": "1"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: needs a non-empty 'prompt'"):
        load_prompts([f"jsonl:{bad}"], 10)
    bad.write_text('{"prompt": "x", "domain": "poetry"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: domain 'poetry'"):
        load_prompts([f"jsonl:{bad}"], 10)
    with pytest.raises(ValueError, match="unknown source"):
        load_prompts(["seed:chess"], 10)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts([f"jsonl:{tmp_path / 'missing.jsonl'}"], 10)


def test_encode_prompt_uses_chat_template(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    task = load_prompts(["seed:general"], 1)[0]
    ids = encode_prompt(task, tok)
    text = tok.decode(ids)
    assert task.prompt in text and text.endswith("<|im_start|>assistant\n")
