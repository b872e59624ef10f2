"""The gap suite: evaluate a teacher and students on the same tasks, and report how much each recovers.

- `evaluate_models`: any HF folders → `report.json`, `report.md`, `gap.png` (+ `gap_steps.png` when training
  checkpoints are included) and per-item details; every (model, task) result is cached by model-folder hash
  and task key, so a re-run only loads what changed.
- `evaluate_run`: the pipeline's `eval` stage (teacher vs the run's final student, plus its checkpoints).
- `eval_cli`: `distill eval MODEL_DIR... --teacher T`.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evaluation.cache import load_result, model_hash, save_result
from evaluation.report import (
    compute_gaps,
    gap_table_markdown,
    plot_gap_bars,
    plot_gap_over_steps,
    report_markdown,
)
from evaluation.tasks import EvalContext, Task, get_task

if TYPE_CHECKING:
    from distill.config import RunConfig


class _Model:
    """A model to evaluate: loaded on first use, so fully cached models cost no load time."""

    def __init__(self, name: str, path: Path, role: str, tokenizer_path: Path, step: int | None = None) -> None:
        self.name, self.path, self.role, self.step = name, Path(path), role, step
        self.tokenizer_path = tokenizer_path
        self.hash = model_hash(self.path)
        self._loaded = None

    def get(self):
        if self._loaded is None:
            from evaluation.lm import EvalModel

            t0 = time.perf_counter()
            self._loaded = EvalModel(self.path, tokenizer_path=self.tokenizer_path)
            print(f"eval: loaded {self.name} ({self.path}) in {time.perf_counter() - t0:.1f}s")
        return self._loaded

    def release(self) -> None:
        self._loaded = None


def _run_task(task: Task, model: _Model, teacher: _Model, ctx: EvalContext) -> tuple[dict[str, Any], bool]:
    """The result of `task` on `model` (from the cache when present) and whether it came from the cache."""
    key = task.cache_key(ctx)
    cached = load_result(model.hash, key)
    if cached is not None:
        return cached, True
    loaded = model.get()
    if task.name == "intrinsic":
        ctx.teacher = teacher.get()
    t0, c0 = time.perf_counter(), time.process_time()
    res = task.run(loaded, ctx)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    # CPU seconds (all threads of this process) next to wall seconds: on a shared machine the wall time
    # measures the neighbours as much as the model.
    result = {"metrics": res.metrics, "samples": res.samples, "unit": res.unit, "seconds": seconds,
              "cpu_seconds": cpu_seconds, "details": res.details}
    save_result(model.hash, key, result)
    return result, False


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in name)


def evaluate_models(models: dict[str, Path], *, teacher: str, teacher_path: Path, tasks: list[str], limit: int,
                    out_dir: Path, heldout: Path | None = None, batch_size: int = 8, max_new_tokens: int = 256,
                    checkpoints: dict[str, tuple[Path, int]] | None = None,
                    checkpoint_tasks: list[str] | None = None) -> dict[str, Any]:
    """Evaluate the teacher and each student on `tasks`; write the report into `out_dir` and return it.

    `models`: student name → HF folder. `teacher`: the teacher's display name; `teacher_path` its folder.
    `limit`: items per task (0: all). `heldout`: a packed `heldout.safetensors` for the intrinsic task
    (default: the builtin corpora's held-out split in the teacher's tokenizer). `checkpoints`: name →
    (folder, training step), evaluated on `checkpoint_tasks` (default: `tasks`) for the gap-over-steps chart.
    Results are cached under `$DISTILL_CACHE/eval` by model-folder hash + task key (task, version, limit,
    generation length; for intrinsic: teacher hash and held-out file hash).
    """
    out_dir = Path(out_dir)
    task_objs = {name: get_task(name) for name in tasks}
    ckpt_task_names = list(checkpoint_tasks) if checkpoint_tasks is not None else list(tasks)
    for name in ckpt_task_names:
        task_objs.setdefault(name, get_task(name))
    if teacher in models:
        raise ValueError(f"a student is named like the teacher ({teacher!r}); give it another name")
    t_model = _Model(teacher, teacher_path, "teacher", teacher_path)
    entries = [(t_model, list(tasks))]
    entries += [(_Model(n, p, "student", teacher_path), list(tasks)) for n, p in models.items()]
    entries += [(_Model(n, p, "checkpoint", teacher_path, step), ckpt_task_names)
                for n, (p, step) in (checkpoints or {}).items()]
    if "intrinsic" in task_objs and heldout is None:
        from evaluation.heldout import default_heldout

        heldout = default_heldout(teacher_path)
    ctx = EvalContext(limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens,
                      teacher_hash=t_model.hash, heldout=heldout)

    report_models: dict[str, Any] = {}
    throughput: dict[str, Any] = {}
    errors: dict[str, dict[str, str]] = {}
    directions: dict[str, bool] = {}
    started = time.perf_counter()
    details_dir = out_dir / "details"
    for model, names in entries:
        metrics: dict[str, float] = {}
        throughput[model.name] = {}
        for name in names:
            task = task_objs[name]
            try:
                result, cached = _run_task(task, model, t_model, ctx)
            except Exception as err:  # one broken task (or incompatible model) must not sink the report
                errors.setdefault(model.name, {})[name] = f"{type(err).__name__}: {err}"
                print(f"eval: {model.name} / {name} failed:\n{traceback.format_exc()}")
                continue
            metrics.update(result["metrics"])
            directions.update({m: task.higher_is_better(m) for m in result["metrics"]})
            rate = result["samples"] / result["seconds"] if result["seconds"] > 0 else float("inf")
            throughput[model.name][name] = {"samples": result["samples"], "unit": result["unit"],
                                            "seconds": result["seconds"], "cpu_seconds": result["cpu_seconds"],
                                            "samples_per_s": rate, "cached": cached}
            print(f"eval: {model.name} / {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in result["metrics"].items())
                  + (" (cached)" if cached else f" [{result['samples']} {result['unit']}, {rate:.2f}/s]"))
            if result.get("details"):
                from distill.artifacts import atomic_write_json

                atomic_write_json(details_dir / f"{_safe_name(model.name)}__{name}.json", result["details"])
        if model is not t_model:  # the teacher stays loaded: the students' intrinsic task compares to it
            model.release()
        report_models[model.name] = {"path": str(model.path), "hash": model.hash, "role": model.role,
                                     "metrics": metrics}
        if model.step is not None:
            report_models[model.name]["step"] = model.step
    ctx.teacher_hidden.clear()
    t_model.release()

    report = {
        "teacher": teacher,
        "models": report_models,
        "gap": compute_gaps(report_models, teacher, directions),
        "throughput": throughput,
        "wall_seconds": time.perf_counter() - started,
        "settings": {"tasks": list(tasks), "checkpoint_tasks": ckpt_task_names, "limit": limit,
                     "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                     "heldout": str(heldout) if heldout else None},
        "errors": errors,
    }
    write_report(report, out_dir)
    return report


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """report.json, report.md, gap.png and (with checkpoints) gap_steps.png into `out_dir`."""
    from distill.artifacts import atomic_write_json, atomic_write_text

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
    from distill.checkpoint import checkpoint_step, list_checkpoints

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


def evaluate_run(cfg: RunConfig, run_dir: Path) -> Path:
    """The `eval` stage: teacher vs the run's final student (and its saved checkpoints) → RUN/eval/.

    Held-out text is the run's `data/heldout.safetensors`. Prints the Markdown gap table.
    """
    from distill.artifacts import ArtifactError, atomic_dir, final_student_dir, read_manifest, write_manifest
    from distill.config import to_dict
    from teachers.resolve import resolve_teacher, teacher_display_id

    run_dir = Path(run_dir)
    out = run_dir / "eval"
    try:
        # Done only if done with these settings: `distill eval CONFIG --tasks …` must not return an old report.
        if read_manifest(out, "eval").get("config") == to_dict(cfg.eval):
            return out
    except ArtifactError:
        pass
    teacher_path = resolve_teacher(cfg.teacher.model, cfg.teacher.revision)
    student_dir = final_student_dir(run_dir)
    heldout = run_dir / "data" / "heldout.safetensors"
    teacher_name = teacher_display_id(cfg.teacher.model).rstrip("/").split("/")[-1]
    student_name = cfg.publish.name or "student"
    checkpoints = _run_checkpoints(run_dir, cfg.eval.every_steps)
    with atomic_dir(out) as tmp:
        report = evaluate_models(
            {student_name: student_dir}, teacher=teacher_name, teacher_path=teacher_path, tasks=cfg.eval.tasks,
            limit=cfg.eval.limit, out_dir=tmp, heldout=heldout if heldout.is_file() else None,
            batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
            checkpoints=checkpoints, checkpoint_tasks=cfg.eval.checkpoint_tasks,
        )
        teacher_info = _teacher_identity(cfg, teacher_path)
        write_manifest(tmp, "eval", config=to_dict(cfg.eval), teacher=teacher_info,
                       inputs={"student": student_dir.parent} if (student_dir.parent / "manifest.json").is_file()
                       else None,
                       student=str(student_dir), wall_seconds=report["wall_seconds"])
    print(gap_table_markdown(report))
    print(f"eval: report → {out / 'report.md'}")
    return out


def _teacher_identity(cfg: RunConfig, teacher_path: Path) -> dict[str, Any]:
    from teachers.resolve import load_tokenizer, teacher_identity

    vocab = json.loads((teacher_path / "config.json").read_text()).get("vocab_size", -1)
    return teacher_identity(cfg.teacher.model, cfg.teacher.revision, load_tokenizer(teacher_path), vocab)


def eval_cli(model_dirs: list[str], teacher: str, tasks: list[str] | None, limit: int,
             output_dir: Path) -> dict[str, Any]:
    """`distill eval MODEL_DIR... --teacher T -o OUT`: the gap report of any HF folders against a teacher."""
    from distill.config import EvalConfig
    from teachers.resolve import resolve_teacher, teacher_display_id

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
                             tasks=tasks or defaults.tasks, limit=limit, out_dir=Path(output_dir),
                             batch_size=defaults.batch_size, max_new_tokens=defaults.max_new_tokens)
    print(gap_table_markdown(report))
    print(f"eval: report → {Path(output_dir) / 'report.md'}")
    return report
