"""Helpers for the evaluation tests (not a conftest.py: a second one would shadow tests/conftest.py for
`from conftest import ...`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_heldout(folder: Path, *, rows: int = 2, length: int = 24, seed: int = 0) -> Path:
    """A packed held-out file in the data-stage format: each row holds two documents (position ids restart
    at 0 mid-row), the first two targets of row 0 are masked out, domains alternate general/math."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 49152, (rows, length), generator=gen, dtype=torch.int32)
    split = length // 3
    pos = torch.cat([torch.arange(split), torch.arange(length - split)]).repeat(rows, 1).int()
    mask = torch.ones(rows, length, dtype=torch.uint8)
    mask[0, :3] = 0
    domain = (torch.arange(rows) % 2).to(torch.int16)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": ids, "position_ids": pos, "loss_mask": mask, "domain": domain},
              str(folder / "heldout.safetensors"))
    (folder / "manifest.json").write_text(json.dumps({"stage": "data", "complete": True,
                                                      "domains": ["general", "math"]}))
    return folder / "heldout.safetensors"


def per_document_reference(student, teacher, heldout):
    """Per-domain NLL sums, KL sum, agreement count, token count and acceptance sums, computed the slow
    obvious way: every document run on its own through the full model, full-vocabulary float64 softmaxes."""
    nll, count, kl, agree, accept = {}, {}, 0.0, 0, {}
    for r in range(heldout.input_ids.shape[0]):
        ids, pos, mask = heldout.input_ids[r], heldout.position_ids[r], heldout.loss_mask[r]
        starts = (pos == 0).nonzero()[:, 0].tolist() + [ids.numel()]
        dom = heldout.domains[int(heldout.domain[r])]
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            doc = ids[a:b][None]
            lp_s = torch.log_softmax(student(doc).logits[0].double(), -1)
            lp_t = torch.log_softmax(teacher(doc).logits[0].double(), -1)
            for j in range(1, b - a):
                if not mask[a + j]:
                    continue
                nll[dom] = nll.get(dom, 0.0) - float(lp_s[j - 1, doc[0, j]])
                count[dom] = count.get(dom, 0) + 1
                kl += float((lp_t[j - 1].exp() * (lp_t[j - 1] - lp_s[j - 1])).sum())
                agree += int(lp_t[j - 1].argmax() == lp_s[j - 1].argmax())
                accept[dom] = accept.get(dom, 0.0) + float(torch.minimum(lp_t[j - 1].exp(), lp_s[j - 1].exp()).sum())
    return nll, count, kl, agree, accept
