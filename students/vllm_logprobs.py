"""Score token sequences with vLLM in a child process: `python -m students.vllm_logprobs MODEL IN OUT --k K`.

IN is a JSON list of token-id lists. OUT receives, for each sequence, a list as long as the sequence whose
entry i (i ≥ 1) maps token id → log-probability of that token at position i given tokens < i (vLLM's
`prompt_logprobs`: its top-k plus the actual token); entry 0 is null. vLLM runs in its own process because
its engine spawns workers (which re-import `__main__`) and holds memory until the process exits.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def score(model: str, sequences: list[list[int]], k: int) -> list[list[dict[int, float] | None]]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model, dtype="float32", max_logprobs=k, max_model_len=max(len(s) for s in sequences) + 1,
              enforce_eager=True, seed=0)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
    result = []
    for out in outputs:
        result.append([None if pos is None else {int(t): float(lp.logprob) for t, lp in pos.items()}
                       for pos in out.prompt_logprobs])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("inputs", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--k", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default probe fails on small CPU hosts
    sequences = json.loads(args.inputs.read_text())
    args.output.write_text(json.dumps(score(args.model, sequences, args.k)))


if __name__ == "__main__":
    main()
