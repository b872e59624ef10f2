"""The `student` stage: build the initial student as a Hugging Face folder in RUN/student_init/.

From scratch (random LLaMA of the named size) or from the teacher (Minitron / Llama 3.2 1B-3B style): keep a
subset of the teacher's layers and, for width-pruned sizes, its most important heads and MLP neurons,
measured on calibration text (RUN/data's first training rows when the data stage has run). The folder carries
the teacher's tokenizer, chat template and generation config, and a manifest recording the teacher, the
size, what was kept, the importance scores and the parameter count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from core.artifacts import atomic_dir, is_complete, write_manifest
from core.config import RunConfig, to_dict
from students.configs import StudentSizeError, count_parameters, student_llama_config
from students.hf_folder import load_generation_config, save_hf_folder
from students.importance import load_calibration, measure_importance
from students.pruning import PrunePlan, plan_widths, prune_teacher, select_layers
from teachers.resolve import load_model, load_tokenizer, pick_device, resolve_teacher, teacher_identity

STAGE = "student"


def init_student(cfg: RunConfig, run_dir: Path) -> Path:
    """Write RUN/student_init/ (returns at once when it is already complete) and return its path."""
    out = Path(run_dir) / "student_init"
    if is_complete(out, STAGE):
        return out
    from transformers import AutoConfig, LlamaForCausalLM

    teacher_dir = resolve_teacher(cfg.teacher.model, cfg.teacher.revision)
    tokenizer = load_tokenizer(teacher_dir)
    t_cfg = AutoConfig.from_pretrained(teacher_dir)
    identity = teacher_identity(cfg.teacher.model, cfg.teacher.revision, tokenizer, t_cfg.vocab_size)
    s_cfg = student_llama_config(cfg.student.size, t_cfg, init=cfg.student.init)
    record: dict[str, Any] = {}
    if cfg.student.init == "scratch":
        torch.manual_seed(cfg.student.seed)
        model = LlamaForCausalLM(s_cfg)
    else:
        if getattr(t_cfg, "model_type", None) != "llama":
            raise StudentSizeError(
                f"student.init=teacher: the teacher {identity['id']} is a {t_cfg.model_type!r} model; pruning "
                "copies LLaMA weights, so use a LLaMA teacher or student.init=scratch"
            )
        teacher = load_model(teacher_dir, "float32", pick_device(cfg.teacher.device))
        model, record = _prune(cfg, run_dir, teacher, t_cfg, s_cfg, tokenizer, identity)
        del teacher
    params = count_parameters(model)
    with atomic_dir(out) as tmp:
        save_hf_folder(model, tokenizer, load_generation_config(teacher_dir, s_cfg), tmp)
        write_manifest(
            tmp, STAGE, config=to_dict(cfg.student), teacher=identity,
            size=cfg.student.size, init=cfg.student.init, parameters=params,
            teacher_parameters=count_parameters(t_cfg),
            architecture={
                "layers": s_cfg.num_hidden_layers, "hidden_size": s_cfg.hidden_size,
                "heads": s_cfg.num_attention_heads, "kv_heads": s_cfg.num_key_value_heads,
                "head_dim": s_cfg.head_dim, "intermediate_size": s_cfg.intermediate_size,
                "tie_word_embeddings": s_cfg.tie_word_embeddings,
            },
            **record,
        )
    print(f"student {cfg.student.size} ({cfg.student.init} init): {params:,} parameters "
          f"({params / 1e6:.1f}M; teacher {count_parameters(t_cfg) / 1e6:.1f}M) → {out}", flush=True)
    return out


def _prune(cfg: RunConfig, run_dir: Path, teacher: Any, t_cfg: Any, s_cfg: Any, tokenizer: Any,
           identity: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Choose what to keep (measuring importance only when a choice depends on it) and slice the weights."""
    n_teacher = int(t_cfg.num_hidden_layers)
    depth_by_score = cfg.student.layer_selection == "importance" and not cfg.student.layers
    width_pruned = (s_cfg.num_attention_heads < t_cfg.num_attention_heads
                    or s_cfg.num_key_value_heads < t_cfg.num_key_value_heads
                    or s_cfg.intermediate_size < t_cfg.intermediate_size)
    importance = calibration = None
    if depth_by_score or width_pruned:
        calibration = load_calibration(run_dir, tokenizer, identity, cfg.student.calibration_sequences)
        importance = measure_importance(teacher, calibration, batch_size=cfg.teacher.batch_size)
    layers = select_layers(n_teacher, int(s_cfg.num_hidden_layers), cfg.student.layer_selection,
                           cfg.student.layers, importance)
    plan: PrunePlan = plan_widths(layers, t_cfg, s_cfg, importance)
    model = prune_teacher(teacher, s_cfg, plan)
    record: dict[str, Any] = {
        "kept_layers": plan.layers,
        "layer_selection": "explicit" if cfg.student.layers else cfg.student.layer_selection,
        "kept_heads": plan.heads,
        "kept_kv_heads": plan.kv_heads,
        "kept_neurons": [len(n) for n in plan.neurons],
    }
    if importance is not None and calibration is not None:
        record["calibration"] = {"source": calibration.source, "tokens": calibration.tokens}
        record["importance"] = {
            "layer_block_influence": [round(float(x), 6) for x in importance.layers],
            "head_output_norm": [[round(float(x), 5) for x in row] for row in importance.heads],
        }
    return model, record
