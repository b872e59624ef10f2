"""Importance scores of a teacher's layers, attention heads and MLP neurons, measured on calibration text.

Used to decide what a pruned student keeps (as in Minitron and ShortGPT):
- a layer's score is its block influence, 1 − mean cosine similarity between the hidden state entering and
  leaving it: a layer that barely changes the residual stream is the cheapest to drop;
- a head's score is the mean L2 norm of its attention output (the head's slice of `o_proj`'s input);
- an MLP neuron's score is the mean absolute value of its activation `silu(gate) * up` (its column of
  `down_proj`'s input).
Means are over every token of the calibration batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.artifacts import check_compatible, is_complete, read_manifest
from core.packed import PackedRows
from core.packing import document_causal_mask

# Used when the run has no data stage yet: a few varied sentences (prose, math, code, chat-like).
BUILTIN_CALIBRATION = [
    "The history of the printing press shows how a single invention can change the way knowledge spreads.",
    "If a train travels 120 kilometres in 1.5 hours, its average speed is 120 / 1.5 = 80 kilometres per hour.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "Photosynthesis converts light energy into chemical energy stored in glucose, releasing oxygen.",
    "Question: What is 12 times 7? Answer: 12 times 7 is 84, because 10 times 7 is 70 and 2 times 7 is 14.",
    "import json\nwith open('config.json') as f:\n    settings = json.load(f)\nprint(settings.get('name'))\n",
    "Rivers carve valleys over millions of years as water and sediment wear away the rock beneath them.",
    "To make a cup of tea, boil water, pour it over the leaves, wait three minutes and remove the leaves.",
]


@dataclass
class Calibration:
    """A calibration batch: `input_ids` and `position_ids`, int64 `[B, L]` (position ids restart at each
    document, as in the packed data format); `source` says where it came from."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    source: str

    @property
    def tokens(self) -> int:
        return int(self.input_ids.numel())


@dataclass
class Importance:
    """Per-component scores of a teacher (higher = more important).

    `layers` float `[num_layers]`, `heads` float `[num_layers, num_heads]`, `neurons` float
    `[num_layers, intermediate_size]`.
    """

    layers: torch.Tensor
    heads: torch.Tensor
    neurons: torch.Tensor


def load_calibration(run_dir: Path, tokenizer: Any, teacher: dict[str, Any], sequences: int) -> Calibration:
    """The first `sequences` training rows of RUN/data if the data stage has run (refused if it was made
    with another tokenizer), else the built-in sentences packed into one row."""
    data_dir = Path(run_dir) / "data"
    if is_complete(data_dir, "data"):
        manifest = read_manifest(data_dir, "data")
        check_compatible(manifest, tokenizer_hash=teacher["tokenizer_hash"], vocab_size=teacher["vocab_size"],
                         where=data_dir)
        rows = PackedRows(data_dir)
        arrays = rows.read(0, min(sequences, len(rows)))
        ids = torch.from_numpy(arrays["input_ids"].astype("int64"))
        pos = torch.from_numpy(arrays["position_ids"].astype("int64"))
        return Calibration(ids, pos, f"{data_dir} (first {ids.shape[0]} training rows)")
    ids: list[int] = []
    pos: list[int] = []
    for text in BUILTIN_CALIBRATION:
        doc = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids += doc
        pos += list(range(len(doc)))
    return Calibration(torch.tensor([ids]), torch.tensor([pos]), "built-in calibration sentences")


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _hidden_out(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def measure_importance(model: Any, calib: Calibration, batch_size: int = 4) -> Importance:
    """Score every layer, head and MLP neuron of a HF LLaMA `model` on `calib` (documents kept apart by
    the block-diagonal mask derived from the position ids)."""
    cfg = model.config
    layers = model.model.layers
    n_layers, n_heads = len(layers), int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    layer_sum = torch.zeros(n_layers, dtype=torch.float64)
    head_sum = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    neuron_sum = torch.zeros(n_layers, int(cfg.intermediate_size), dtype=torch.float64)
    inputs: dict[int, torch.Tensor] = {}
    hooks = []

    def on_layer_in(i):
        def hook(_module, args, kwargs):
            inputs[i] = _hidden_in(args, kwargs)
        return hook

    def on_layer_out(i):
        def hook(_module, args, kwargs, output):
            x, y = inputs.pop(i).float(), _hidden_out(output).float()  # [B, L, hidden]
            cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)  # [B, L]
            # An unchanged zero vector (e.g. a padding-token embedding) has no angle: count it as unchanged.
            cos = torch.where((x == y).all(dim=-1), torch.ones_like(cos), cos)
            layer_sum[i] += (1 - cos).sum().double().cpu()
        return hook

    def on_o_proj(i):
        def hook(_module, args):
            x = args[0].float()  # [B, L, heads * head_dim]: the heads' outputs side by side
            norms = x.view(*x.shape[:-1], n_heads, head_dim).norm(dim=-1)  # [B, L, heads]
            head_sum[i] += norms.sum(dim=(0, 1)).double().cpu()
        return hook

    def on_down_proj(i):
        def hook(_module, args):
            neuron_sum[i] += args[0].float().abs().sum(dim=(0, 1)).double().cpu()  # [intermediate]
        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(on_layer_in(i), with_kwargs=True))
        hooks.append(layer.register_forward_hook(on_layer_out(i), with_kwargs=True))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o_proj(i)))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(on_down_proj(i)))
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    try:
        for start in range(0, calib.input_ids.shape[0], batch_size):
            ids = calib.input_ids[start:start + batch_size].to(device)
            pos = calib.position_ids[start:start + batch_size].to(device)
            model(input_ids=ids, position_ids=pos, attention_mask=document_causal_mask(pos, dtype=dtype),
                  use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    tokens = calib.tokens
    return Importance((layer_sum / tokens).float(), (head_sum / tokens).float(), (neuron_sum / tokens).float())
