"""Named student sizes and the LLaMA configs built from them.

A student is always a LLaMA (RMSNorm, SwiGLU MLP, RoPE, grouped-query attention) that shares the teacher's
tokenizer and vocabulary, so stored teacher token ids and logits mean the same thing to it. A size names the
shape; a width left as `None` is inherited from the teacher, which is what the pruned sizes need (their
weights are cut out of the teacher's). `student_llama_config(size, teacher_config)` turns a size into a
`transformers.LlamaConfig`; `count_parameters` counts a config analytically or a model's unique tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from core.config import EMBEDDED_TEACHER
from teachers.resolve import resolve_teacher


class StudentSizeError(ValueError):
    """A student size is malformed or does not fit the teacher; the message names the size and field."""


@dataclass(frozen=True)
class StudentSize:
    """The shape of a student. `None` means "the teacher's value" (needed when initialising from the teacher).

    `layers=None` keeps every teacher layer. `head_dim=None` means hidden_size // heads for a student with its
    own hidden size, and the teacher's head_dim otherwise.
    """

    description: str
    layers: int | None = None
    hidden_size: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    rope_theta: float | None = None
    tie_embeddings: bool | None = None
    init: str = "teacher"  # the init it is designed for: "teacher" (pruned) or "scratch"

    def validate(self, name: str) -> None:
        """Checks that need no teacher: positive integers and head divisibility."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("description", "init", "tie_embeddings") or value is None:
                continue
            if isinstance(value, bool) or value <= 0:
                raise StudentSizeError(f"student size {name!r}: {f.name} must be a positive number, got {value!r}")
        if self.init not in ("teacher", "scratch"):
            raise StudentSizeError(f"student size {name!r}: init must be 'teacher' or 'scratch', got {self.init!r}")
        if self.heads is not None and self.kv_heads is not None and self.heads % self.kv_heads:
            raise StudentSizeError(
                f"student size {name!r}: heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads}) "
                "for grouped-query attention"
            )
        if (self.init == "scratch" and self.hidden_size is not None and self.heads is not None
                and self.head_dim is None and self.hidden_size % self.heads):
            raise StudentSizeError(
                f"student size {name!r}: hidden_size ({self.hidden_size}) must be divisible by heads "
                f"({self.heads}) unless head_dim is given"
            )


# The default teacher, SmolLM2-135M-Instruct: 30 layers, hidden 576, 9 heads, 3 KV heads, head_dim 64,
# intermediate 1536, vocab 49152, rope theta 100000, tied embeddings. The pruned sizes inherit what they
# do not set, so they also work for other LLaMA teachers with at least as many layers/heads/neurons.
STUDENT_SIZES: dict[str, StudentSize] = {
    "teacher-full": StudentSize(
        "every teacher layer at teacher widths: a copy of the teacher (sanity check, self-distillation)"),
    "smollm2-prune-15l": StudentSize("15 of the teacher's layers, teacher widths", layers=15),
    "smollm2-prune-8l": StudentSize("8 of the teacher's layers, teacher widths (quickstart default)", layers=8),
    "smollm2-prune-4l": StudentSize("4 of the teacher's layers, teacher widths", layers=4),
    "smollm2-prune-12l-w": StudentSize(
        "12 layers, width-pruned: 6 of 9 query heads (2 of 3 KV groups), MLP 1536 → 768",
        layers=12, heads=6, kv_heads=2, intermediate_size=768),
    "smollm2-prune-8l-w": StudentSize(
        "8 layers, width-pruned: 6 of 9 query heads (2 of 3 KV groups), MLP 1536 → 768",
        layers=8, heads=6, kv_heads=2, intermediate_size=768),
    "tiny-2l": StudentSize(
        "from scratch: 2 layers, hidden 128, 4 heads / 2 KV, MLP 384 (tests, smoke runs)",
        layers=2, hidden_size=128, heads=4, kv_heads=2, head_dim=32, intermediate_size=384, init="scratch"),
    "small-6l": StudentSize(
        "from scratch: 6 layers, hidden 384, 6 heads / 2 KV, MLP 1024",
        layers=6, hidden_size=384, heads=6, kv_heads=2, head_dim=64, intermediate_size=1024, init="scratch"),
    "base-12l": StudentSize(
        "from scratch: 12 layers, hidden 576, 9 heads / 3 KV, MLP 1536",
        layers=12, hidden_size=576, heads=9, kv_heads=3, head_dim=64, intermediate_size=1536, init="scratch"),
}


def get_size(name: str) -> StudentSize:
    """Look up and validate a named size; an unknown name lists the known ones."""
    if name not in STUDENT_SIZES:
        raise StudentSizeError(f"student.size: unknown size {name!r} (known: {', '.join(STUDENT_SIZES)})")
    size = STUDENT_SIZES[name]
    size.validate(name)
    return size


def rope_theta_of(config: Any) -> float:
    """RoPE base of a HF config (transformers 5 keeps it in `rope_parameters`, 4.x as `rope_theta`)."""
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and rope.get("rope_theta") is not None:
        return float(rope["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def teacher_head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def student_llama_config(size: str, teacher_config: Any, init: str | None = None) -> Any:
    """The `LlamaConfig` of student `size` for a teacher with `teacher_config` (a HF `PretrainedConfig`).

    `init` is "teacher" (weights will be cut from the teacher: widths must fit inside the teacher's, hidden
    size, head_dim and RoPE theta must equal the teacher's) or "scratch" (any shape); default: the size's own.
    The vocabulary, special token ids, context length and norm epsilon always come from the teacher.
    """
    from transformers import LlamaConfig

    spec = get_size(size)
    init = init or spec.init
    t = getattr(teacher_config, "text_config", None) or teacher_config
    t_heads = int(t.num_attention_heads)
    t_kv = int(getattr(t, "num_key_value_heads", None) or t_heads)
    t_head_dim = teacher_head_dim(t)
    hidden = spec.hidden_size or int(t.hidden_size)
    heads = spec.heads or t_heads
    kv_heads = spec.kv_heads or (t_kv if spec.heads is None else min(t_kv, heads))
    if spec.head_dim is not None:
        head_dim = spec.head_dim
    elif spec.hidden_size is None:
        head_dim = t_head_dim
    else:
        head_dim = hidden // heads
    values = {
        "layers": spec.layers or int(t.num_hidden_layers),
        "hidden_size": hidden,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": spec.intermediate_size or int(t.intermediate_size),
        "rope_theta": spec.rope_theta or rope_theta_of(t),
        "tie_embeddings": bool(t.tie_word_embeddings if spec.tie_embeddings is None else spec.tie_embeddings),
    }
    if heads % kv_heads:
        raise StudentSizeError(f"student size {size!r}: heads ({heads}) must be divisible by kv_heads ({kv_heads})")
    if init == "teacher":
        _check_fits_teacher(size, values, t, t_heads, t_kv, t_head_dim)
    elif init != "scratch":
        raise StudentSizeError(f"student.init: must be 'teacher' or 'scratch', got {init!r}")
    return LlamaConfig(
        vocab_size=int(t.vocab_size),
        hidden_size=values["hidden_size"],
        intermediate_size=values["intermediate_size"],
        num_hidden_layers=values["layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=int(getattr(t, "max_position_embeddings", 2048)),
        rms_norm_eps=float(getattr(t, "rms_norm_eps", 1e-5)),
        rope_theta=values["rope_theta"],
        tie_word_embeddings=values["tie_embeddings"],
        attention_bias=bool(getattr(t, "attention_bias", False)) if init == "teacher" else False,
        mlp_bias=bool(getattr(t, "mlp_bias", False)) if init == "teacher" else False,
        bos_token_id=getattr(t, "bos_token_id", None),
        eos_token_id=getattr(t, "eos_token_id", None),
        pad_token_id=getattr(t, "pad_token_id", None),
    )


def _check_fits_teacher(size: str, v: dict[str, Any], t: Any, t_heads: int, t_kv: int, t_head_dim: int) -> None:
    """A pruned student's every tensor must be a slice of the teacher's."""
    where = f"student size {size!r} (student.init=teacher)"
    limits = {
        "layers": int(t.num_hidden_layers),
        "heads": t_heads,
        "kv_heads": t_kv,
        "intermediate_size": int(t.intermediate_size),
    }
    for name, limit in limits.items():
        if v[name] > limit:
            raise StudentSizeError(f"{where}: {name}={v[name]} exceeds the teacher's {limit}")
    equal = {"hidden_size": int(t.hidden_size), "head_dim": t_head_dim, "rope_theta": rope_theta_of(t)}
    for name, teacher_value in equal.items():
        if v[name] != teacher_value:
            raise StudentSizeError(
                f"{where}: {name}={v[name]} must equal the teacher's {teacher_value} to copy its weights "
                "(use student.init=scratch for a different shape)"
            )
    if v["heads"] // v["kv_heads"] > t_heads // t_kv:
        raise StudentSizeError(
            f"{where}: {v['heads']} heads over {v['kv_heads']} KV heads puts {v['heads'] // v['kv_heads']} query "
            f"heads in a KV group, but the teacher's groups hold {t_heads // t_kv}"
        )


def count_parameters(model_or_config: Any) -> int:
    """Number of parameters of a model (unique tensors, so tied embeddings count once) or of a LLaMA config
    (computed from its shape without building it)."""
    if hasattr(model_or_config, "parameters"):
        seen: set[int] = set()
        total = 0
        for p in model_or_config.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total
    c = model_or_config
    hidden, vocab = int(c.hidden_size), int(c.vocab_size)
    heads = int(c.num_attention_heads)
    kv = int(getattr(c, "num_key_value_heads", None) or heads)
    head_dim = teacher_head_dim(c)
    inter = int(c.intermediate_size)
    attn = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2
    if getattr(c, "attention_bias", False):
        attn += heads * head_dim + 2 * kv * head_dim + hidden
    mlp = 3 * hidden * inter + ((2 * inter + hidden) if getattr(c, "mlp_bias", False) else 0)
    per_layer = attn + mlp + 2 * hidden  # + input and post-attention RMSNorm weights
    embeddings = vocab * hidden * (1 if c.tie_word_embeddings else 2)
    return embeddings + int(c.num_hidden_layers) * per_layer + hidden  # + final norm


def sizes_table(teacher_config: Any) -> list[dict[str, Any]]:
    """One row per named size that fits `teacher_config`: its shape and parameter count."""
    rows = []
    for name, spec in STUDENT_SIZES.items():
        try:
            c = student_llama_config(name, teacher_config)
        except StudentSizeError as err:
            rows.append({"size": name, "init": spec.init, "error": str(err)})
            continue
        rows.append({
            "size": name, "init": spec.init, "layers": c.num_hidden_layers, "hidden": c.hidden_size,
            "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads, "head_dim": c.head_dim,
            "intermediate": c.intermediate_size, "params": count_parameters(c), "description": spec.description,
        })
    return rows


def print_sizes(teacher: str | None = None) -> None:
    """Print the named sizes with parameter counts for `teacher` (default: the embedded SmolLM2)."""
    from transformers import AutoConfig


    teacher = teacher or EMBEDDED_TEACHER
    t_cfg = AutoConfig.from_pretrained(resolve_teacher(teacher))
    print(f"teacher {teacher}: {count_parameters(t_cfg) / 1e6:.1f}M parameters")
    print(f"{'size':<22}{'init':<9}{'layers':>7}{'hidden':>8}{'heads':>7}{'kv':>4}{'head_dim':>9}"
          f"{'mlp':>6}{'params':>10}")
    for row in sizes_table(t_cfg):
        if "error" in row:
            print(f"{row['size']:<22}{row['init']:<9}  (does not fit this teacher: {row['error']})")
            continue
        print(f"{row['size']:<22}{row['init']:<9}{row['layers']:>7}{row['hidden']:>8}{row['heads']:>7}"
              f"{row['kv_heads']:>4}{row['head_dim']:>9}{row['intermediate']:>6}{row['params'] / 1e6:>9.1f}M")


# Validate every shipped size at import, so a malformed entry fails loudly rather than at training time.
for _name, _size in STUDENT_SIZES.items():
    _size.validate(_name)
