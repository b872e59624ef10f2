"""The `transformers` teacher backend: a batched in-process forward pass, reduced to top-k in chunks.

Full-vocabulary float32 logits for a batch (B × L × 49152 × 4 bytes: 200 MB for 4 × 256 tokens, far more for
long rows or big vocabularies) are never held at once: the model body runs to hidden states, then the
lm_head, log_softmax and top-k run on `teacher.topk_chunk_size` positions at a time.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distill.config import TeacherConfig
from distill.packing import document_causal_mask
from teachers.backend import TAIL_LOGMASS_FLOOR, TopK, cut_at_eos
from teachers.resolve import load_model, load_tokenizer


def chunked_topk(hidden: torch.Tensor, head: torch.nn.Module, k: int, chunk_size: int,
                 softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`[N, H]` hidden states → top-k ids int64 [N, k], logprobs float32 [N, k], tail log-mass float32 [N].

    The head runs on `chunk_size` rows at a time; logits are upcast to float32 before the softmax. The tail
    is exact: the sum of exp over the logits outside the top-k, taken directly rather than as 1 - sum(top-k)
    (which cancels to 0 for peaked distributions). One exp pass over the chunk serves both sums.
    """
    ids_out, lp_out, tail_out = [], [], []
    for start in range(0, hidden.shape[0], chunk_size):
        logits = head(hidden[start:start + chunk_size]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        values, ids = torch.topk(logits, k, dim=-1)
        peak = values[:, :1]
        weights = logits.sub_(peak).exp_()  # in place: the chunk's logits are not needed after the top-k
        total = weights.sum(-1)
        outside = weights.scatter_(-1, ids, 0.0).sum(-1)
        log_z = peak[:, 0] + torch.log(total)
        ids_out.append(ids)
        lp_out.append(values - log_z[:, None])
        tail_out.append((torch.log(outside) - torch.log(total)).clamp(min=TAIL_LOGMASS_FLOOR))
    return torch.cat(ids_out), torch.cat(lp_out), torch.cat(tail_out)


class TransformersBackend:
    """Teacher on transformers: `score` with a block-diagonal causal mask over packed documents, `generate`
    with `model.generate` sampling."""

    def __init__(self, cfg: TeacherConfig, model_dir: Path):
        self.cfg = cfg
        self.model = load_model(model_dir, cfg.dtype, cfg.device)
        self.tokenizer = load_tokenizer(model_dir)
        self.device = next(self.model.parameters()).device
        self.vocab_size = int(self.model.config.vocab_size)

    @torch.inference_mode()
    def score(self, input_ids: torch.Tensor, position_ids: torch.Tensor, k: int) -> list[TopK]:
        """`input_ids`, `position_ids` int [B, L] → one TopK per row (see TeacherBackend.score)."""
        if not 0 < k <= self.vocab_size:
            raise ValueError(f"capture.top_k: must be in [1, vocab_size={self.vocab_size}], got {k}")
        input_ids = input_ids.to(self.device, torch.long)
        position_ids = position_ids.to(self.device, torch.long)
        batch, length = input_ids.shape
        # A batch of single-document rows needs only the plain causal mask, which attention kernels run
        # faster (no [B, 1, L, L] mask to read); any restart of the position ids needs the document mask.
        packed = bool((position_ids[:, 1:] == 0).any())
        mask = document_causal_mask(position_ids, dtype=self.model.dtype) if packed else None
        body = self.model.get_decoder()
        hidden = body(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        ids, lps, tail = chunked_topk(hidden.reshape(batch * length, -1), self.model.get_output_embeddings(), k,
                                      self.cfg.topk_chunk_size, softcap)
        ids, lps, tail = ids.view(batch, length, k).cpu(), lps.view(batch, length, k).cpu(), tail.view(batch, length).cpu()
        return [TopK(ids=ids[b], logprobs=lps[b], tail_logmass=tail[b]) for b in range(batch)]

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int) -> list[list[list[int]]]:
        """n completions per prompt, sampled (or greedy at temperature 0), prompts batched with left padding
        `teacher.batch_size` at a time; completions exclude the prompt and stop before the first EOS."""
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else next(iter(eos_ids))
        greedy = temperature <= 0.0
        results: list[list[list[int]]] = []
        for start in range(0, len(prompts), self.cfg.batch_size):
            group = prompts[start:start + self.cfg.batch_size]
            width = max(len(p) for p in group)
            ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in group], device=self.device)
            attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=self.device)
            # One seed per group of prompts: results do not depend on what else ran before in this process.
            torch.manual_seed(seed + start)
            # Greedy decoding gives one answer per prompt: decode once, repeat it n times.
            copies = 1 if greedy else n
            out = self.model.generate(
                input_ids=ids, attention_mask=attn, do_sample=not greedy, num_return_sequences=copies,
                temperature=temperature if not greedy else None, top_p=top_p if not greedy else None,
                top_k=None, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=list(eos_ids),
            )
            new = [cut_at_eos(seq, eos_ids) for seq in out[:, width:].tolist()]
            for i in range(len(group)):
                samples = new[i * copies:(i + 1) * copies]
                results.append(samples * n if greedy else samples)
        return results

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

