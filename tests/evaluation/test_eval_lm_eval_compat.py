"""A student folder in the published layout loads in lm-evaluation-harness (`lm_eval --model hf`) and gets
the same log-likelihoods and greedy generations there as in our suite."""

from __future__ import annotations

import pytest

from evaluation.lm import EvalModel

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")


@pytest.fixture(scope="module")
def published_dir(tiny_teacher_dir, tmp_path_factory):
    from students.hf_folder import load_generation_config, save_hf_folder
    from teachers.resolve import load_model, load_tokenizer

    model = load_model(tiny_teacher_dir, device="cpu")
    out = tmp_path_factory.mktemp("published")
    save_hf_folder(model, load_tokenizer(tiny_teacher_dir), load_generation_config(tiny_teacher_dir, model.config), out)
    return out


def test_lm_eval_hf_loads_a_published_folder_and_agrees(published_dir):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(published_dir), device="cpu", batch_size=2, dtype="float32")
    pairs = [("Question: Which is a planet?\nAnswer:", " Mars"), ("def f(x):", "\n    return x + 1")]
    theirs = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    ours = EvalModel(published_dir).score(pairs, batch_size=2)
    for (lp, _), s in zip(theirs, ours, strict=True):
        assert lp == pytest.approx(s.logprob, abs=1e-3)

    prompt = "Question: what is 3 + 4?\nAnswer:"
    gen = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": ["\n\n"], "max_gen_toks": 8,
                                                                      "do_sample": False}), 0)])
    assert gen[0] == EvalModel(published_dir).generate([prompt], max_new_tokens=8, stop=["\n\n"])[0]
