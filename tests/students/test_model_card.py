"""Model card rendering and licence planning, without models (fast)."""

from __future__ import annotations

import pytest
import yaml

from core.config import ConfigError, PublishConfig, load_config
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
    plan = plan_license(PublishConfig(), "meta-llama/CodeLlama-7b", None, "x")
    assert plan.name == "Llama-3-CodeLlama-7b-distilled-x"


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
                                  anneal_manifest={"num_steps": 5, "start_lr": 1e-4,
                                                   "weights": {"math": 0.6, "general": 0.4},
                                                   "checkpoints": ["step-000004", "step-000005"]}))
    meta = yaml.safe_load(text.split("---", 2)[1])
    assert meta["base_model"] == TEACHER["id"] and meta["license"] == "llama3" and "llama-3" in meta["tags"]
    assert "datasets" not in meta  # builtin sources are not hub datasets
    assert "**Built with Meta Llama 3**" in text and "> no eval yet" in text
    assert "loss jsd (β = 0.3)" in text and "top-32" in text
    assert "annealing: last 20% of the token budget with upsampling math ×3.0; uniform average of 4 checkpoints" in text
    assert ("ran 5 steps from lr 0.0001 to 0 with domain weights math 0.60, general 0.40; "
            "averaged: step-000004, step-000005") in text
    assert "published weights: `anneal/final`" in text
    assert "Meta Llama 3 is licensed under the Meta Llama 3 Community License" in text


def test_card_says_which_checkpoint_was_published_and_how_it_drafts():
    from evaluation.report import compute_gaps, speculative

    cfg = load_config(None, ["anneal.enabled=true", "publish.name=tiny"])
    plan = plan_license(PublishConfig(), "someone/some-model", None, "x")
    units = {"accept_math_ood": {"num": [30.0, 50.0], "den": [50.0, 50.0], "transform": "mean", "binomial": False}}
    teacher_units = {"accept_math_ood": {"num": [50.0, 50.0], "den": [50.0, 50.0], "transform": "mean"}}
    models = {"T": {"role": "teacher", "metrics": {"accept_math_ood": 1.0}, "units": teacher_units},
              "tiny": {"role": "student", "metrics": {"accept_math_ood": 0.8}, "units": units}}
    report = {"teacher": "T", "models": models, "gap": compute_gaps(models, "T", {"accept_math_ood": True})}
    report["speculative"] = {"tiny": speculative(report, "tiny")}
    choice = {"chosen": "last", "last": "step 12", "loss": {"averaged": 2.5, "last": 2.25}, "delta": 0.25}
    text = render_card(CardInputs(name="tiny", cfg=cfg, license=plan, teacher={"id": "someone/some-model"},
                                  parameters=1_000_000, final_stage="anneal", eval_report=report,
                                  anneal_manifest={"num_steps": 12, "final_choice": choice}))
    assert ("published weights: `anneal/final` = the last annealing checkpoint, chosen on in-distribution held-out "
            "loss: 2.2500 nats/token, 0.2500 lower than the average of the annealing checkpoints (2.5000)") in text
    assert "## As a draft model for speculative decoding" in text
    # α = 0.8: γ = 4 drafts give (1 − 0.8⁵) / 0.2 = 3.36 tokens per teacher forward
    assert "| out-of-distribution | math | 0.8000 ± " in text and "| 3.36 [" in text
    assert "draft model" not in render_card(CardInputs(name="tiny", cfg=cfg, license=plan, teacher={"id": "x/y"},
                                                       parameters=1, final_stage="train"))
