"""The model card (README.md) of a published student: YAML metadata, gap table, recipe, licence notices.

Everything in it is read from the run: its config, the stage manifests (student_init, data, train, anneal),
the eval report and the publish-time verification figures. Nothing is typed in by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core.config import RunConfig
from evaluation.report import speculative_markdown
from students.licensing import LicensePlan

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id(value: str | None) -> str | None:
    """`value` if it looks like a hub repository id (owner/name) and is not a local path, else None."""
    if not value or not _HUB_ID.match(value) or Path(value).exists():
        return None
    return value


@dataclass
class CardInputs:
    """What the card is written from. Manifests are dicts as read from disk; absent stages are None."""

    name: str
    cfg: RunConfig
    license: LicensePlan
    teacher: dict[str, Any]
    parameters: int
    final_stage: str  # "train" or "anneal"
    student_manifest: dict[str, Any] | None = None
    data_manifest: dict[str, Any] | None = None
    train_manifest: dict[str, Any] | None = None
    anneal_manifest: dict[str, Any] | None = None
    gap_table: str | None = None  # Markdown, from evaluation.report.gap_table_markdown
    gap_note: str | None = None  # why there is no (current) gap table
    eval_report: dict[str, Any] | None = None  # RUN/eval/report.json, for the speculative-decoding section
    verification: dict[str, Any] = field(default_factory=dict)
    repo: str | None = None  # the hub repository it is pushed to, for the usage snippet


def card_metadata(inp: CardInputs) -> dict[str, Any]:
    """The YAML header: base model, datasets, licence, tags."""
    meta: dict[str, Any] = {}
    base = hub_id(inp.teacher.get("id"))
    if base:
        meta["base_model"] = base
    datasets = [s.path for s in inp.cfg.data.sources if s.kind == "hf" and hub_id(s.path)]
    if datasets:
        meta["datasets"] = datasets
    meta["license"] = inp.license.license
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    tags = ["distillation", "knowledge-distillation", "llama"]
    if inp.license.meta_llama_version:
        tags.append(f"llama-{inp.license.meta_llama_version.split('.')[0]}")
    meta["tags"] = tags
    return meta


def _student_section(inp: CardInputs) -> list[str]:
    s = inp.cfg.student
    origin = "from the teacher" if s.init == "teacher" else "from scratch"
    lines = ["## Student", "", f"- size: `{s.size}`, initialised {origin}",
             f"- parameters: {inp.parameters:,} ({inp.parameters / 1e6:.1f}M)"]
    m = inp.student_manifest or {}
    arch = m.get("architecture")
    if arch:
        lines.append(f"- LLaMA: {arch['layers']} layers, hidden {arch['hidden_size']}, {arch['heads']} heads / "
                     f"{arch['kv_heads']} KV heads (head_dim {arch['head_dim']}), MLP {arch['intermediate_size']}, "
                     f"{'tied' if arch['tie_word_embeddings'] else 'untied'} embeddings")
    if m.get("teacher_parameters"):
        lines.append(f"- teacher parameters: {m['teacher_parameters']:,}")
    if m.get("kept_layers") is not None:
        lines.append(f"- teacher layers kept ({m.get('layer_selection')}): {m['kept_layers']}")
    return lines + [""]


def _recipe_section(inp: CardInputs) -> list[str]:
    cfg = inp.cfg
    t = cfg.train
    lines = ["## Training recipe", ""]
    if t.objective == "kd":
        loss = t.loss + (f" (β = {t.beta})" if t.loss in ("jsd", "skew_kl") else "")
        targets = (f"teacher top-{cfg.capture.top_k} log-probs captured offline ({cfg.capture.logprob_bits}-bit), "
                   f"tail mass handled by `{t.tail}`" if t.teacher_source == "offline"
                   else "teacher logits computed online")
        lines += [f"- objective: knowledge distillation, loss {loss}, temperature {t.temperature}, "
                  f"CE weight {t.ce_weight}", f"- targets: {targets}"]
    else:
        lines.append("- objective: cross-entropy on the data (no teacher targets)")
    tm = inp.train_manifest or {}
    steps = tm.get("num_steps")
    world = tm.get("world_size", 1)
    global_batch = t.batch_size * t.grad_accum * world
    opt = (f"- optimisation: AdamW, lr {t.lr} ({t.schedule}, {t.warmup_steps} warm-up steps, min lr ratio "
           f"{t.min_lr_ratio}), weight decay {t.weight_decay}, global batch {global_batch} × {cfg.data.seq_len} tokens")
    if steps:
        opt += f", {steps} steps (≈ {steps * global_batch * cfg.data.seq_len:,} tokens)"
    lines.append(opt)
    a = cfg.anneal
    if a.enabled:
        up = ", ".join(f"{d} ×{w}" for d, w in a.upsample.items()) or "none"
        lines.append(f"- annealing: last {a.fraction:.0%} of the token budget with upsampling {up}; "
                     f"{'uniform average of' if a.average else 'last of'} {a.num_checkpoints} checkpoints"
                     + (f", EMA decay {a.ema_decay}" if a.ema_decay else ""))
        am = inp.anneal_manifest or {}
        if am.get("num_steps"):
            mix = ", ".join(f"{d} {w:.2f}" for d, w in am.get("weights", {}).items())
            lines.append(f"  - ran {am['num_steps']} steps from lr {am.get('start_lr')} to 0 "
                         f"with domain weights {mix}; "
                         f"averaged: {', '.join(am.get('checkpoints', [])) or 'none'}")
    else:
        lines.append("- annealing: none")
    lines.append(f"- published weights: `{inp.final_stage}/final`" + _final_choice(inp.anneal_manifest))
    lines += ["", "### Data mixture", "", "| source | kind | domain | weight | training tokens |",
              "|---|---|---|---|---|"]
    stats = {s["name"]: s for s in (inp.data_manifest or {}).get("sources", [])}
    seq_len = (inp.data_manifest or {}).get("seq_len", cfg.data.seq_len)
    for src in cfg.data.sources:
        rows = stats.get(src.name, {}).get("train_rows")
        tokens = f"{rows * seq_len:,}" if rows is not None else "—"
        kind = f"{src.kind} (`{src.path}`)" if src.path else src.kind
        lines.append(f"| {src.name} | {kind} | {src.domain} | {src.weight:g} | {tokens} |")
    mix = tm.get("weights")
    if mix:
        lines += ["", "Sampling weights by domain: " + ", ".join(f"{d} {w:.2f}" for d, w in mix.items())]
    return lines + [""]


def _final_choice(anneal_manifest: dict[str, Any] | None) -> str:
    """How final/ was chosen between the checkpoint average and the last checkpoint, if it was."""
    choice = (anneal_manifest or {}).get("final_choice") or {}
    if "loss" not in choice:
        return ""
    chosen, other = ("averaged", "last") if choice["chosen"] == "averaged" else ("last", "averaged")
    what = {"averaged": "the average of the annealing checkpoints", "last": "the last annealing checkpoint"}
    return (f" = {what[chosen]}, chosen on in-distribution held-out loss: {choice['loss'][chosen]:.4f} nats/token, "
            f"{abs(choice['delta']):.4f} lower than {what[other]} ({choice['loss'][other]:.4f})")


def _speculative_section(inp: CardInputs) -> list[str]:
    """Acceptance rate and expected speed-up when the student drafts for the teacher (from the eval report)."""

    report = inp.eval_report or {}
    names = list(report.get("speculative", {}))
    preferred = inp.cfg.publish.name or "student"
    table = speculative_markdown(report, preferred if preferred in names else names[0]) if names else ""
    if not table:
        return []
    return ["## As a draft model for speculative decoding", "",
            "α is the expected chance that the teacher accepts a token the student drafts, "
            "E_x[Σ_v min(p_T(v|x), p_S(v|x))] over held-out positions; drafting γ tokens then gives "
            "(1 − α^(γ+1)) / (1 − α) tokens per teacher forward pass (Leviathan et al., 2023).", "",
            table.rstrip(), ""]


def _verification_section(inp: CardInputs) -> list[str]:
    v = inp.verification
    lines = ["## Verification", ""]
    if "transformers" in v:
        f = v["transformers"]
        lines.append("- reloaded with `transformers`: max |Δ logit| vs the trained model "
                     f"{f['max_abs_logit_diff']:.2g} "
                     f"over {f['tokens']} tokens")
    if "vllm" in v:
        f = v["vllm"]
        lines.append(f"- served with {f.get('vllm_version', 'vLLM')}: max |Δ log-prob| {f['max_abs_logprob_diff']:.2g} "
                     f"over {f['positions']} positions (top-{f['k']})")
    return lines + [""]


def _license_section(inp: CardInputs) -> list[str]:
    lic = inp.license
    lines = ["## License", ""]
    if lic.meta_llama_version:
        lines += [f"This model is distilled from {inp.teacher.get('id')}, a Meta Llama {lic.meta_llama_version} "
                  f"model, and is distributed under the Llama {lic.meta_llama_version} Community License "
                  f"(`{lic.license}`). Use is subject to that licence and Meta's Acceptable Use Policy.", "",
                  f"{lic.notice}", ""]
        if lic.copy_files:
            lines.append("The licence files are included: " + ", ".join(f"`{p.name}`" for p in lic.copy_files) + ".")
    else:
        lines.append(f"`{lic.license}`, the licence of the teacher {inp.teacher.get('id')}.")
    return lines + [""]


def render_card(inp: CardInputs) -> str:
    """The full README.md text."""
    header = yaml.safe_dump(card_metadata(inp), sort_keys=False, allow_unicode=True)
    lines = ["---", header.rstrip(), "---", "", f"# {inp.name}", ""]
    if inp.license.built_with:
        lines += [f"**{inp.license.built_with}**", ""]
    teacher_id = inp.teacher.get("id")
    teacher_ref = f"[{teacher_id}](https://huggingface.co/{teacher_id})" if hub_id(teacher_id) else f"`{teacher_id}`"
    lines += [f"A {inp.parameters / 1e6:.1f}M-parameter LLaMA student distilled from {teacher_ref}. It uses the "
              f"teacher's tokenizer (hash `{inp.teacher.get('tokenizer_hash')}`, "
              f"vocab {inp.teacher.get('vocab_size')}) "
              "and chat template.", "", "## Gap to the teacher", ""]
    if inp.gap_table:
        lines += [inp.gap_table.rstrip(), ""]
    if inp.gap_note:
        lines += [f"> {inp.gap_note}", ""]
    lines += _speculative_section(inp) + _student_section(inp) + _recipe_section(inp) + _verification_section(inp)
    where = inp.repo or inp.name
    lines += ["## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'tok = AutoTokenizer.from_pretrained("{where}")',
              f'model = AutoModelForCausalLM.from_pretrained("{where}")',
              'messages = [{"role": "user", "content": "What is 12 times 7?"}]',
              "inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
              "return_dict=True)",
              "output = model.generate(**inputs, max_new_tokens=64)",
              'print(tok.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))', "```", ""]
    lines += _license_section(inp)
    return "\n".join(lines).rstrip() + "\n"
