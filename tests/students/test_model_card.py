"""Model card rendering and licence planning, without models (fast)."""

from __future__ import annotations

import pytest
import yaml

from distill.config import ConfigError, PublishConfig, load_config
from students.card import CardInputs, render_card
from students.licensing import plan_license

TEACHER = {"id": "meta-llama/Meta-Llama-3-8B", "tokenizer_hash": "abc", "vocab_size": 128256}


def test_llama3_naming_and_built_with_line():
    plan = plan_license(PublishConfig(), TEACHER["id"], None, "prune-8l")
    assert plan.name == "Llama-3-8B-distilled-prune-8l" and plan.name_prefix == "Llama-3"
    assert plan.license == "llama3" and plan.built_with == "Built with Meta Llama 3"
    assert "Meta Llama 3 is licensed under the Meta Llama 3 Community License" in plan.notice
    assert any("no LICENSE file" in w for w in plan.warnings)
    with pytest.raises(ConfigError, match="starting with 'Llama-3'"):
        plan_license(PublishConfig(name="Llama-mini"), TEACHER["id"], None, "prune-8l")


def test_derived_llama_name_is_recased_or_prefixed():
    assert plan_license(PublishConfig(), "meta-llama/llama-3.2-1b", None, "x").name == "Llama-3.2-1b-distilled-x"
    # A meta-llama repo with no version in its name (and no model card to read it from) gets the strictest
    # rules, those of Llama 3: the prefix "Llama-3" is added.
    assert plan_license(PublishConfig(), "meta-llama/CodeLlama-7b", None, "x").name == "Llama-3-CodeLlama-7b-distilled-x"


def test_unknown_teacher_licence_is_other_with_a_warning():
    plan = plan_license(PublishConfig(), "someone/some-model", None, "x")
    assert plan.license == "other" and "publish.license" in plan.warnings[0]
    assert plan_license(PublishConfig(license="mit"), "someone/some-model", None, "x").license == "mit"


def test_card_with_annealing_and_llama_notices():
    cfg = load_config(None, ["anneal.enabled=true", "anneal.upsample={math: 3.0}", "train.loss=jsd",
                             "train.beta=0.3", "capture.top_k=32"])
    plan = plan_license(PublishConfig(), TEACHER["id"], None, "prune-8l")
    text = render_card(CardInputs(name=plan.name, cfg=cfg, license=plan, teacher=TEACHER, parameters=1_000_000,
                                  final_stage="anneal", gap_note="no eval yet",
                                  anneal_manifest={"num_steps": 5, "start_lr": 1e-4, "weights": {"math": 0.6, "general": 0.4},
                                                   "checkpoints": ["step-000004", "step-000005"]}))
    meta = yaml.safe_load(text.split("---", 2)[1])
    assert meta["base_model"] == TEACHER["id"] and meta["license"] == "llama3" and "llama-3" in meta["tags"]
    assert "datasets" not in meta  # builtin sources are not hub datasets
    assert "**Built with Meta Llama 3**" in text and "> no eval yet" in text
    assert "loss jsd (β = 0.3)" in text and "top-32" in text
    assert "annealing: last 20% of the token budget with upsampling math ×3.0; uniform average of 4 checkpoints" in text
    assert "ran 5 steps from lr 0.0001 to 0 with domain weights math 0.60, general 0.40; averaged: step-000004, step-000005" in text
    assert "published weights: `anneal/final`" in text
    assert "Meta Llama 3 is licensed under the Meta Llama 3 Community License" in text
