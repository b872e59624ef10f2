"""Turn a chat (list of messages) into SFT training ids with a loss mask on assistant tokens only.

The ids are exactly what the tokenizer's chat template produces. The mask is found by rendering the
conversation turn by turn: for assistant turn i, the template rendering of messages[:i] with the generation
prompt ends where the assistant's content starts, and the rendering of messages[:i+1] (minus trailing
whitespace) ends right after its end-of-turn token. Tokens overlapping that character span get mask 1, so
the model learns the answer and when to stop, never the prompt or the template's role headers.
"""

from __future__ import annotations

from typing import Any

from core.config import InputError


def _render(tokenizer: Any, messages: list[dict], *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def chat_to_training_ids(messages: list[dict], tokenizer: Any) -> tuple[list[int], list[int]]:
    """`messages` ([{"role", "content"}, ...]) → (token ids, loss mask) of equal length.

    Mask is 1 exactly on the tokens of every assistant message's content and its end-of-turn token
    (e.g. `<|im_end|>`), 0 elsewhere. Raises ValueError naming the problem when the conversation is
    malformed, the tokenizer has no chat template, or the template is not prefix-stable turn by turn.
    """
    if not messages:
        raise InputError("chat_to_training_ids: empty conversation")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str):
            raise InputError(f"chat_to_training_ids: messages[{i}] must be {{'role': str, 'content': str}}, got {m!r}")
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "?")
        raise InputError(f"chat_to_training_ids: tokenizer {name} has no chat template")
    text = _render(tokenizer, messages, generation_prompt=False)
    spans: list[tuple[int, int]] = []  # [start, end) character spans to train on
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], generation_prompt=False).rstrip()
        if not text.startswith(upto) or not upto.startswith(head):
            raise InputError(
                f"chat_to_training_ids: the chat template of {getattr(tokenizer, 'name_or_path', '?')} does not "
                f"render messages[{i}] as a prefix of the conversation; cannot locate the assistant tokens"
            )
        spans.append((len(head), len(upto)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = [0] * len(ids)
    for t, (start, end) in enumerate(enc["offset_mapping"]):
        if any(start < s_end and end > s_start for s_start, s_end in spans):
            mask[t] = 1
    return ids, mask
