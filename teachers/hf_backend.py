"""The `transformers` teacher backend: a batched in-process forward pass, reduced to top-k in chunks.

Full-vocabulary float32 logits for a whole batch (B × L × V × 4 bytes: 1.6 GB for 8 rows of 1024 tokens at
V = 49152, far more for long rows or big vocabularies) are never held at once: the model body runs to hidden
states, then the lm_head, log_softmax and top-k run on `teacher.topk_chunk_size` positions at a time
(1024 × 49152 × 4 bytes = 200 MB by default; smaller chunks trade a little speed for memory).
"""

from __future__ import annotations

from pathlib import Path

import torch

from core.config import InputError, TeacherConfig
from core.packing import document_attention, document_spans
from core.records import TopK, eos_ids_of
from teachers.resolve import load_model, load_tokenizer
from teachers.topk import TAIL_LOGMASS_FLOOR, cut_at_eos

SAFE_EXP_MAX = 60.0  # |logit| below which exp(logit) summed over any vocabulary stays finite in float32


def chunked_topk(hidden: torch.Tensor, head: torch.nn.Module, k: int, chunk_size: int,
                 softcap: float | None = None, workspace: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`[N, H]` hidden states → top-k ids int64 [N, k], logprobs float32 [N, k], tail log-mass float32 [N].

    The head runs on `chunk_size` rows at a time; logits are upcast to float32 before the softmax. The tail
    is exact: the sum of exp over the logits outside the top-k, taken directly rather than as 1 - sum(top-k)
    (which cancels to 0 for peaked distributions). One exp pass and one sum over the chunk serve both the
    tail and the normaliser (= tail sum + the k top-k terms).

    `workspace`: a float32 `[chunk_size, V]` buffer, for a float32 `nn.Linear` head, that the logits are
    written into. Kept across calls it saves a fresh allocation per chunk (200 MB per 1024 positions at
    V = 49152), whose page faults are a sizeable share of the head's matmul time on a CPU
    (benchmarks/capture_overhead.py measures it).
    """
    ids_out, lp_out, tail_out = [], [], []
    for start in range(0, hidden.shape[0], chunk_size):
        rows = hidden[start:start + chunk_size]
        if workspace is not None:
            logits = torch.mm(rows, head.weight.t(), out=workspace[:rows.shape[0]])
            if head.bias is not None:
                logits += head.bias
        else:
            logits = head(rows).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        values, ids = blockwise_topk(logits, k)
        # exp needs logits shifted near 0 to stay inside float32 (|x| < 88). Shifting by each row's max is
        # safe but costs a full pass over the chunk; when every row's max already lies within ±SAFE_EXP_MAX
        # no shift is needed (the top entries keep full precision and the total cannot overflow).
        needs_shift = bool(values[:, 0].abs().max() > SAFE_EXP_MAX)
        shift = values[:, :1] if needs_shift else torch.zeros_like(values[:, :1])
        weights = (logits.sub_(shift) if needs_shift else logits).exp_()  # in place: logits are done with
        outside = weights.scatter_(-1, ids, 0.0).sum(-1)
        total = outside + (values - shift).exp().sum(-1)
        log_z = shift[:, 0] + torch.log(total)
        ids_out.append(ids)
        lp_out.append(values - log_z[:, None])
        tail_out.append((torch.log(outside) - torch.log(total)).clamp(min=TAIL_LOGMASS_FLOOR))
    return torch.cat(ids_out), torch.cat(lp_out), torch.cat(tail_out)


def blockwise_topk(logits: torch.Tensor, k: int, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact `torch.topk(logits, k)` over the last dim of `[N, V]`, sorted, in about 2/3 of its time on CPU for
    LLM vocabularies: values [N, k] and their ids int64 [N, k].

    Why it is exact: cut each row into blocks of `block` columns. If a block holding one of the k largest
    values were not among the k blocks with the largest maxima, those k maxima (k different entries, each at
    least as large) would push that value out of the top k. So one cheap max-reduction picks k·block
    candidates, and the top k of those is the top k of the row. Among tied values the ids kept may differ
    from `torch.topk`'s.
    Falls back to `torch.topk` when the row is too short for the two-step search to pay off.
    """
    length = logits.shape[-1]
    blocks = length // block
    if blocks < 4 * k:
        return torch.topk(logits, k, dim=-1)
    whole = blocks * block
    block_max = logits[:, :whole].unflatten(-1, (blocks, block)).amax(-1)
    best_blocks = torch.topk(block_max, k, dim=-1, sorted=False).indices
    offsets = torch.arange(block, device=logits.device)
    candidates = (best_blocks[..., None] * block + offsets).flatten(1)
    if whole < length:  # the last, partial block is always a candidate
        rest = torch.arange(whole, length, device=logits.device).expand(logits.shape[0], -1)
        candidates = torch.cat([candidates, rest], dim=-1)
    values, picked = torch.topk(logits.gather(-1, candidates), k, dim=-1)
    return values, candidates.gather(-1, picked)


class TransformersBackend:
    """Teacher on transformers: `score` attends within each packed document (`core.packing.document_attention`),
    `generate` samples with `model.generate`."""

    def __init__(self, cfg: TeacherConfig, model_dir: Path):
        self.cfg = cfg
        self.model = load_model(model_dir, cfg.dtype, cfg.device)
        self.tokenizer = load_tokenizer(model_dir)
        self.device = next(self.model.parameters()).device
        self.vocab_size = int(self.model.config.vocab_size)
        self._workspace: torch.Tensor | None = None

    @torch.inference_mode()
    def score(self, input_ids: torch.Tensor, position_ids: torch.Tensor, k: int) -> list[TopK]:
        """`input_ids`, `position_ids` int [B, L] → one TopK per row (see TeacherBackend.score)."""
        if not 0 < k <= self.vocab_size:
            raise InputError(f"capture.top_k: must be in [1, vocab_size={self.vocab_size}], got {k}")
        input_ids = input_ids.to(self.device, torch.long)
        position_ids = position_ids.to(self.device, torch.long)
        batch, length = input_ids.shape
        # Documents packed in a row are kept apart by attending document by document rather than through a
        # [B, 1, L, L] mask: the forward then costs what a plain causal forward over the same tokens costs.
        with document_attention(self.model):
            spans = [document_spans(row) for row in position_ids]
            hidden = self.model.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                              packed_spans=spans).last_hidden_state
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        head = self.model.get_output_embeddings()
        ids, lps, tail = chunked_topk(hidden.reshape(batch * length, -1), head, k, self.cfg.topk_chunk_size,
                                      softcap, self._logits_workspace(head))
        ids, lps = ids.view(batch, length, k).cpu(), lps.view(batch, length, k).cpu()
        tail = tail.view(batch, length).cpu()
        return [TopK(ids=ids[b], logprobs=lps[b], tail_logmass=tail[b]) for b in range(batch)]

    def _logits_workspace(self, head: torch.nn.Module) -> torch.Tensor | None:
        """The float32 `[teacher.topk_chunk_size, V]` buffer `chunked_topk` writes logits into, allocated once
        and kept (200 MB at the defaults); None when the head is not a float32 `nn.Linear`."""
        if not (isinstance(head, torch.nn.Linear) and head.weight.dtype == torch.float32):
            return None
        if self._workspace is None:
            self._workspace = torch.empty(self.cfg.topk_chunk_size, head.out_features, device=head.weight.device)
        return self._workspace

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int) -> list[list[list[int]]]:
        """n completions per prompt, sampled (or greedy at temperature 0), prompts batched with left padding
        `teacher.batch_size` at a time; completions exclude the prompt and stop before the first EOS."""
        eos = self.model.generation_config.eos_token_id
        eos_ids = eos_ids_of(self.tokenizer.eos_token_id if eos is None else eos, "teacher")
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
        self._workspace = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

