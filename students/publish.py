"""`distill publish RUN_DIR [OUT_DIR]`: the run's final student as a standard Hugging Face folder.

The folder holds safetensors weights, config, tokenizer with chat template, generation config, a model card
(README.md: YAML metadata, gap table, recipe, licence) and, for a Meta Llama teacher, the licence files and
attribution NOTICE. Before it is declared done the folder is reloaded with plain transformers (and, opt-in,
vLLM) and its logits are compared with the trained model's. The folder appears atomically, with a manifest
as its last file; publishing again with unchanged inputs returns at once. `push_to_hub` uploads the
finished folder with huggingface_hub.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from core.artifacts import (
    MANIFEST,
    ArtifactError,
    atomic_dir,
    atomic_write_text,
    check_compatible,
    final_student_dir,
    is_complete,
    manifest_hash,
    read_manifest,
    tokenizer_folder,
    tokenizer_hash,
    write_manifest,
)
from core.config import ConfigError, RunConfig, load_config, to_dict
from evaluation.report import gap_table_markdown
from students.card import CardInputs, render_card
from students.configs import count_parameters
from students.hf_folder import load_generation_config, save_hf_folder
from students.licensing import plan_license
from students.verify import check_transformers, check_vllm
from teachers.resolve import load_tokenizer, resolve_teacher

STAGE = "publish"


def publish_run(cfg: RunConfig, run_dir: Path) -> Path:
    """The `publish` stage of `distill run`: `publish` with the run's `publish` section."""
    return publish(run_dir, cfg=cfg, verify_vllm=cfg.publish.verify_vllm, push_to_hub=cfg.publish.push_to_hub)


def publish(run_dir: Path, out_dir: Path | None = None, *, cfg: RunConfig | None = None,
            push_to_hub: str | None = None, verify_vllm: bool = False) -> Path:
    """Publish RUN/{anneal,train}/final into `out_dir` (default RUN/publish) and return it.

    `cfg`: the config the run's outputs were made with (default: RUN/config.yaml, written by `distill run`).

    `verify_vllm` (or `publish.verify_vllm` in the run's config) also checks the folder in vLLM;
    `push_to_hub` (or `publish.push_to_hub`) uploads it to that hub repository afterwards.
    """
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / STAGE
    cfg = cfg or load_config(run_dir / "config.yaml")
    verify_vllm = verify_vllm or cfg.publish.verify_vllm
    repo = push_to_hub or cfg.publish.push_to_hub
    final = final_student_dir(run_dir)
    inputs = {"student": final.parent}
    if is_complete(run_dir / "eval", "eval"):
        inputs["eval"] = run_dir / "eval"
    _refuse_foreign_folder(out)
    if _up_to_date(out, inputs, verify_vllm, repo):
        print(f"publish: {out} is up to date")
    else:
        _build(cfg, run_dir, final, out, inputs, verify_vllm, repo)
    if repo:
        push_folder(out, repo)
    return out


def _refuse_foreign_folder(out: Path) -> None:
    """Publishing replaces `out` wholesale: never do that to a folder that is not an earlier publish."""
    if out.exists() and any(out.iterdir()) and not is_complete(out, STAGE):
        raise ArtifactError(f"{out}: exists and is not a published model folder (no complete publish manifest); "
                            "choose an empty or new OUT_DIR")


def _up_to_date(out: Path, inputs: dict[str, Path], verify_vllm: bool, repo: str | None) -> bool:
    if not is_complete(out, STAGE):
        return False
    manifest = read_manifest(out, STAGE)
    return (manifest.get("inputs") == {name: manifest_hash(p) for name, p in inputs.items()}
            and (not verify_vllm or "vllm" in manifest.get("verification", {}))
            and (repo is None or manifest.get("repo") == repo))


def _eval_report(run_dir: Path) -> dict[str, Any] | None:
    """RUN/eval/report.json of a completed eval stage (the card's speculative-decoding section), else None."""
    if not is_complete(run_dir / "eval", "eval"):
        return None
    return json.loads((run_dir / "eval" / "report.json").read_text())


def _optional_manifest(folder: Path, stage: str) -> dict[str, Any] | None:
    return read_manifest(folder, stage) if is_complete(folder, stage) else None


def _gap_table(cfg: RunConfig, run_dir: Path, final: Path) -> tuple[str | None, str | None]:
    """(Markdown gap table, note) from RUN/eval; the note says why the table is missing or stale."""
    eval_dir = run_dir / "eval"
    if not is_complete(eval_dir, "eval"):
        return None, ("The eval stage has not run for this model, so no measured gap to the teacher is shown "
                      "(run `distill eval` and publish again).")

    report = json.loads((eval_dir / "report.json").read_text())
    students = [n for n, m in report.get("models", {}).items() if m.get("role") == "student"]
    if not students:
        return None, f"{eval_dir / 'report.json'} has no student model, so no gap is shown."
    by_path = [n for n in students if Path(report["models"][n].get("path", "")).resolve() == final.resolve()]
    preferred = [n for n in students if n == (cfg.publish.name or "student")]
    student = (by_path or preferred or students)[0]
    table = gap_table_markdown(report, student=student)
    evaluated = read_manifest(eval_dir, "eval").get("inputs", {}).get("student")
    if evaluated != manifest_hash(final.parent):
        return table, ("This table was measured on an earlier version of the student (the eval stage ran before "
                       "the published weights were written); rerun `distill eval` for current figures.")
    limit = report.get("settings", {}).get("limit")
    note = f"Measured by `distill eval` with up to {limit} items per task." if limit else None
    return table, note


def _build(cfg: RunConfig, run_dir: Path, final: Path, out: Path, inputs: dict[str, Path], verify_vllm: bool,
           repo: str | None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stage_manifest = read_manifest(final.parent, final.parent.name)
    teacher = stage_manifest.get("teacher")
    if not teacher:
        raise ArtifactError(f"{final.parent / MANIFEST}: records no teacher; cannot write the model card")
    teacher_dir = resolve_teacher(cfg.teacher.model, cfg.teacher.revision)
    plan = plan_license(cfg.publish, teacher["id"], teacher_dir, cfg.student.size)
    if repo and plan.name_prefix and not repo.split("/")[-1].startswith(plan.name_prefix):
        raise ConfigError(f"publish.push_to_hub: {repo!r} — the Llama {plan.meta_llama_version} licence requires "
                          f"the model name to start with {plan.name_prefix!r}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(final, run_dir / "student_init"))
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = getattr(load_tokenizer(teacher_dir), "chat_template", None)
        if not tokenizer.chat_template:
            plan.warnings.append("neither the student nor the teacher has a chat template")
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    check_compatible(stage_manifest, tokenizer_hash=tokenizer_hash(tokenizer), vocab_size=model.config.vocab_size,
                     where=final)
    gap_table, gap_note = _gap_table(cfg, run_dir, final)
    if gap_table is None:
        plan.warnings.append(gap_note or "no gap table")
    with atomic_dir(out) as tmp:
        save_hf_folder(model, tokenizer, load_generation_config(final, model.config), tmp)
        verification = {"transformers": check_transformers(tmp, model, tokenizer)}
        if verify_vllm:
            verification["vllm"] = check_vllm(tmp, model, tokenizer)
        for src in plan.copy_files:
            shutil.copyfile(src, tmp / src.name)
        if plan.notice and not (tmp / "NOTICE").exists():
            atomic_write_text(tmp / "NOTICE", plan.notice + "\n")
        card = CardInputs(
            name=plan.name, cfg=cfg, license=plan, teacher=teacher, parameters=count_parameters(model),
            final_stage=final.parent.name, student_manifest=_optional_manifest(run_dir / "student_init", "student"),
            data_manifest=_optional_manifest(run_dir / "data", "data"),
            train_manifest=_optional_manifest(run_dir / "train", "train"),
            anneal_manifest=_optional_manifest(run_dir / "anneal", "anneal"),
            gap_table=gap_table, gap_note=gap_note, verification=verification, repo=repo,
            eval_report=_eval_report(run_dir),
        )
        atomic_write_text(tmp / "README.md", render_card(card))
        write_manifest(tmp, STAGE, config=to_dict(cfg.publish), teacher=teacher, inputs=inputs, name=plan.name,
                       license=plan.license, meta_llama_version=plan.meta_llama_version,
                       name_prefix=plan.name_prefix, parameters=card.parameters, source=str(final),
                       verification=verification, gap_table=gap_table is not None, repo=repo,
                       warnings=plan.warnings)
    for warning in plan.warnings:
        print(f"publish: warning: {warning}")
    summary = f"max |Δ logit| {verification['transformers']['max_abs_logit_diff']:.2g} (transformers)"
    if "vllm" in verification:
        summary += f", max |Δ log-prob| {verification['vllm']['max_abs_logprob_diff']:.2g} (vLLM)"
    print(f"publish: {plan.name} ({card.parameters / 1e6:.1f}M parameters, {plan.license}) → {out}; "
          f"verified: {summary}")


def push_folder(folder: Path, repo: str) -> str:
    """Upload a published folder to the hub repository `repo` (created if needed); returns the commit URL.

    The Llama naming rule recorded in the manifest applies to the repository name too. The manifest itself
    stays local (it records local paths)."""
    from huggingface_hub import HfApi

    manifest = read_manifest(folder, STAGE)
    prefix = manifest.get("name_prefix")
    if prefix and not repo.split("/")[-1].startswith(prefix):
        raise ConfigError(f"--push-to-hub: {repo!r} — the Llama {manifest.get('meta_llama_version')} licence "
                          f"requires the model name to start with {prefix!r}")
    api = HfApi()
    api.create_repo(repo_id=repo, repo_type="model", exist_ok=True)
    commit = api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                               commit_message=f"Upload {manifest.get('name')} (distill publish)",
                               ignore_patterns=[MANIFEST])
    url = str(getattr(commit, "commit_url", commit))
    print(f"publish: pushed {folder} → https://huggingface.co/{repo} ({url})")
    return url
