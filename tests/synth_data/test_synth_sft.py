"""chat_to_training_ids on the real SmolLM2 chat template."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _masked_runs(ids, mask, tokenizer) -> list[str]:
    runs, cur = [], []
    for tok, m in zip(ids, mask, strict=True):
        if m:
            cur.append(tok)
        elif cur:
            runs.append(tokenizer.decode(cur))
            cur = []
    if cur:
        runs.append(tokenizer.decode(cur))
    return runs


def test_ids_match_template_and_mask_covers_assistant_content(tokenizer):
    messages = [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5.\n#### 5"},
        {"role": "user", "content": "And times 4?"},
        {"role": "assistant", "content": "5 * 4 = 20"},
    ]
    from synth_data.sft import chat_to_training_ids

    ids, mask = chat_to_training_ids(messages, tokenizer)
    expected = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False, return_dict=False)
    assert ids == list(expected)
    assert len(mask) == len(ids)
    assert _masked_runs(ids, mask, tokenizer) == ["2 + 3 = 5.\n#### 5<|im_end|>", "5 * 4 = 20<|im_end|>"]
    # Nothing of the prompt, the system header or the role names is trained on.
    assert "user" not in tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])


def test_system_message_and_errors(tokenizer):
    from synth_data.sft import chat_to_training_ids

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}]
    ids, mask = chat_to_training_ids(messages, tokenizer)
    assert _masked_runs(ids, mask, tokenizer) == ["Hello!<|im_end|>"]
    with pytest.raises(ValueError, match="empty"):
        chat_to_training_ids([], tokenizer)
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        chat_to_training_ids([{"role": "user"}], tokenizer)
