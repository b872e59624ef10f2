"""Check that a published folder is the trained model: reload it the way users will and compare logits.

`check_transformers` reloads the folder with plain `AutoTokenizer`/`AutoModelForCausalLM` and compares its
logits with the trained model's on a few texts (prose, code, a chat-template conversation).
`check_vllm` scores the same token ids with vLLM (in a child process) and compares its prompt
log-probabilities with the trained model's log-softmax. Either raises ArtifactError on a mismatch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from core.artifacts import ArtifactError

VERIFY_TEXTS = [
    "Knowledge distillation trains a small student model to imitate a larger teacher model.",
    "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))\n",
    "Natalia sold 48 clips in April and half as many in May, so she sold 48 + 24 = 72 clips.",
]
VERIFY_CHAT = [{"role": "user", "content": "What is the capital of France?"},
               {"role": "assistant", "content": "The capital of France is Paris."}]
TRANSFORMERS_TOLERANCE = 1e-4  # max |Δ logit|: same fp32 weights, same kernels; anything above is a real change
VLLM_TOLERANCE = 2e-3  # max |Δ log-prob|: other kernels (fused attention, other summation orders)


def verification_sequences(tokenizer: Any) -> list[list[int]]:
    """Token ids of the verification texts, plus a chat conversation when the tokenizer has a template."""
    texts = list(VERIFY_TEXTS)
    if getattr(tokenizer, "chat_template", None):
        texts.append(tokenizer.apply_chat_template(VERIFY_CHAT, tokenize=False))
    return [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]


@torch.no_grad()
def sequence_logits(model: Any, sequences: list[list[int]]) -> list[torch.Tensor]:
    """fp32 logits `[L, V]` of each sequence, run one at a time (no padding to get wrong)."""
    device = next(model.parameters()).device
    return [model(input_ids=torch.tensor([s], device=device)).logits[0].float().cpu() for s in sequences]


def check_transformers(folder: Path, reference: Any, reference_tokenizer: Any) -> dict[str, Any]:
    """Reload `folder` with plain transformers; its tokenizer must encode like `reference_tokenizer` and its
    logits must match `reference`'s within TRANSFORMERS_TOLERANCE. Returns the measured figures."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    sequences = verification_sequences(reference_tokenizer)
    if verification_sequences(tokenizer) != sequences:
        raise ArtifactError(f"{folder}: the published tokenizer encodes the verification texts differently "
                            "from the trained model's tokenizer")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    got = sequence_logits(model, sequences)
    want = sequence_logits(reference, sequences)
    diff = max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True))
    if not diff <= TRANSFORMERS_TOLERANCE:
        raise ArtifactError(f"{folder}: reloaded with transformers, logits differ from the trained model by "
                            f"{diff:.3g} (tolerance {TRANSFORMERS_TOLERANCE})")
    return {"max_abs_logit_diff": diff, "sequences": len(sequences), "tokens": sum(map(len, sequences))}


def vllm_prompt_logprobs(folder: Path, sequences: list[list[int]], k: int,
                         timeout_s: float = 900) -> list[list[dict[int, float] | None]]:
    """vLLM's prompt log-probabilities (top-k plus the actual token) of each sequence, from a child process."""
    with tempfile.TemporaryDirectory(prefix="vllm_verify_") as tmp:
        inputs, outputs = Path(tmp) / "in.json", Path(tmp) / "out.json"
        inputs.write_text(json.dumps(sequences))
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        proc = subprocess.run(
            [sys.executable, "-m", "students.vllm_logprobs", str(folder), str(inputs), str(outputs), "--k", str(k)],
            capture_output=True, text=True, timeout=timeout_s, env=env,
            cwd=Path(__file__).resolve().parent.parent,
        )
        if proc.returncode != 0 or not outputs.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise ArtifactError(f"{folder}: vLLM could not load or score the published folder:\n{tail}")
        raw = json.loads(outputs.read_text())
    return [[None if pos is None else {int(t): lp for t, lp in pos.items()} for pos in seq] for seq in raw]


def compare_logprobs(vllm: list[list[dict[int, float] | None]], reference_logits: list[torch.Tensor],
                     k: int) -> dict[str, Any]:
    """Compare vLLM's prompt log-probs with log_softmax of the reference logits (`[L, V]` per sequence).

    Position i of vLLM scores token i from tokens < i, i.e. the reference's logits at row i − 1. Every
    token vLLM returns must have (nearly) the reference's log-prob, and every token the reference ranks
    clearly above vLLM's k-th must be among vLLM's returned tokens.
    """
    max_diff, missing, positions = 0.0, 0, 0
    for seq, logits in zip(vllm, reference_logits, strict=True):
        logprobs = torch.log_softmax(logits.double(), dim=-1)  # [L, V]
        for i, entry in enumerate(seq):
            if entry is None:
                continue
            row = logprobs[i - 1]
            ids = torch.tensor(list(entry))
            got = torch.tensor(list(entry.values()), dtype=torch.float64)
            max_diff = max(max_diff, float((got - row[ids]).abs().max()))
            top = torch.topk(row, k)
            floor = float(got.min())
            missing += sum(int(t) not in entry and float(v) > floor + VLLM_TOLERANCE
                           for v, t in zip(top.values, top.indices, strict=True))
            positions += 1
    if not max_diff <= VLLM_TOLERANCE or missing:
        raise ArtifactError(f"vLLM's log-probs differ from the trained model's: max |Δ| {max_diff:.3g} "
                            f"(tolerance {VLLM_TOLERANCE}), {missing} top-{k} tokens missing")
    return {"max_abs_logprob_diff": max_diff, "positions": positions, "k": k}


def check_vllm(folder: Path, reference: Any, reference_tokenizer: Any, k: int = 8) -> dict[str, Any]:
    """Load `folder` in vLLM and compare its prompt log-probs with `reference`'s. Returns the figures."""
    sequences = verification_sequences(reference_tokenizer)
    figures = compare_logprobs(vllm_prompt_logprobs(folder, sequences, k), sequence_logits(reference, sequences), k)
    for dist in ("vllm", "vllm-cpu"):
        try:
            figures["vllm_version"] = f"{dist} {metadata.version(dist)}"
            break
        except metadata.PackageNotFoundError:
            continue
    return figures
