"""Cut a student out of a LLaMA teacher: which layers, heads and neurons it keeps, and the sliced weights.

Depth pruning keeps a subset of the teacher's decoder layers (in their original order). Width pruning keeps,
in every kept layer, the most important KV groups, the most important query heads inside each kept group,
and the most important MLP neurons. Embeddings, the final norm, the LM head and every RMSNorm weight are
copied unchanged (the hidden size is never pruned). A student that keeps everything is the teacher, weight
for weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from students.configs import StudentSizeError, teacher_head_dim
from students.importance import Importance


@dataclass
class PrunePlan:
    """What the student keeps, as teacher indices (all sorted ascending).

    `layers[j]` is the teacher layer that becomes student layer j; `heads[j]` the teacher query heads and
    `kv_heads[j]` the teacher KV heads of that layer; `neurons[j]` the teacher MLP neurons.
    """

    layers: list[int]
    heads: list[list[int]]
    kv_heads: list[list[int]]
    neurons: list[list[int]]


def even_layers(num_teacher: int, num_student: int) -> list[int]:
    """`num_student` evenly spaced teacher layers including the first and the last (one layer: the first)."""
    if num_student == 1:
        return [0]
    return [round(i * (num_teacher - 1) / (num_student - 1)) for i in range(num_student)]


def select_layers(num_teacher: int, num_student: int, method: str, explicit: list[int],
                  importance: Importance | None) -> list[int]:
    """Teacher layers to keep: `explicit` when given, else evenly spaced or the highest block influence."""
    if explicit:
        if len(explicit) != num_student:
            raise StudentSizeError(f"student.layers: lists {len(explicit)} layers, but the size has {num_student}")
        if max(explicit) >= num_teacher:
            raise StudentSizeError(f"student.layers: index {max(explicit)} out of range (teacher has {num_teacher})")
        return sorted(explicit)
    if method == "even":
        return even_layers(num_teacher, num_student)
    if method == "importance":
        if importance is None:
            raise ValueError("layer_selection=importance needs importance scores")
        return sorted(torch.topk(importance.layers, num_student).indices.tolist())
    raise StudentSizeError(f"student.layer_selection: unknown method {method!r}")


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the `k` highest scores, ascending; all indices when k covers them (no scores needed)."""
    if k >= scores.numel():
        return list(range(scores.numel()))
    return sorted(torch.topk(scores, k).indices.tolist())


def plan_widths(layers: list[int], t_cfg: Any, s_cfg: Any, importance: Importance | None) -> PrunePlan:
    """Choose heads and neurons per kept layer. HF LLaMA maps query head h to KV head h // (heads / kv_heads),
    so heads are chosen by KV group: the groups whose query heads matter most in total, then inside each
    group its most important query heads; the student's groups stay contiguous in the same order."""
    t_heads, s_heads = int(t_cfg.num_attention_heads), int(s_cfg.num_attention_heads)
    t_kv, s_kv = int(t_cfg.num_key_value_heads), int(s_cfg.num_key_value_heads)
    t_group, s_group = t_heads // t_kv, s_heads // s_kv
    t_inter, s_inter = int(t_cfg.intermediate_size), int(s_cfg.intermediate_size)
    needs_scores = s_heads < t_heads or s_kv < t_kv or s_inter < t_inter
    if needs_scores and importance is None:
        raise ValueError("width pruning needs importance scores")
    plan = PrunePlan(list(layers), [], [], [])
    for t_layer in layers:
        head_scores = importance.heads[t_layer] if importance is not None else torch.zeros(t_heads)
        group_scores = head_scores.view(t_kv, t_group).sum(dim=1)
        groups = _top(group_scores, s_kv)
        heads: list[int] = []
        for g in groups:
            inside = _top(head_scores[g * t_group:(g + 1) * t_group], s_group)
            heads += [g * t_group + h for h in inside]
        neuron_scores = importance.neurons[t_layer] if importance is not None else torch.zeros(t_inter)
        plan.heads.append(heads)
        plan.kv_heads.append(groups)
        plan.neurons.append(_top(neuron_scores, s_inter))
    return plan


def _rows(heads: list[int], head_dim: int) -> torch.Tensor:
    """Row indices of a projection's output that belong to `heads` (each head owns head_dim rows)."""
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def pruned_state_dict(teacher_sd: dict[str, torch.Tensor], t_cfg: Any, student_keys: list[str],
                      plan: PrunePlan) -> dict[str, torch.Tensor]:
    """The student's weights, sliced from the teacher's state dict, for every name in `student_keys`."""
    head_dim = teacher_head_dim(t_cfg)
    out: dict[str, torch.Tensor] = {}
    for key in student_keys:
        if key == "lm_head.weight":
            out[key] = teacher_sd.get(key, teacher_sd["model.embed_tokens.weight"]).clone()
            continue
        if not key.startswith("model.layers."):
            out[key] = teacher_sd[key].clone()  # embeddings, final norm
            continue
        j_str, rest = key[len("model.layers."):].split(".", 1)
        j = int(j_str)
        src = teacher_sd[f"model.layers.{plan.layers[j]}.{rest}"]
        q_rows, kv_rows = _rows(plan.heads[j], head_dim), _rows(plan.kv_heads[j], head_dim)
        neurons = torch.tensor(plan.neurons[j])
        if rest.startswith("self_attn.q_proj."):
            src = src.index_select(0, q_rows)
        elif rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            src = src.index_select(0, kv_rows)
        elif rest == "self_attn.o_proj.weight":
            src = src.index_select(1, q_rows)
        elif rest.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
            src = src.index_select(0, neurons)
        elif rest == "mlp.down_proj.weight":
            src = src.index_select(1, neurons)
        out[key] = src.clone()
    return out


def prune_teacher(teacher: Any, s_cfg: Any, plan: PrunePlan) -> Any:
    """A `LlamaForCausalLM` with config `s_cfg` holding the teacher weights that `plan` keeps (fp32, CPU)."""
    from transformers import LlamaForCausalLM

    student = LlamaForCausalLM(s_cfg)
    teacher_sd = {k: v.detach().to("cpu", torch.float32) for k, v in teacher.state_dict().items()}
    keys = list(student.state_dict().keys())
    student.load_state_dict(pruned_state_dict(teacher_sd, teacher.config, keys, plan), strict=True)
    return student
