"""The gap report: how much of the teacher each student recovers, as JSON, Markdown and PNG charts.

Rules, for a metric with teacher value T and student value S:
- higher is better (accuracy, pass@1, agreement): `abs_gap = T − S`, `recovered_pct = 100 · S / T`
  (undefined when T = 0);
- lower is better (perplexity): `abs_gap = S − T`, `recovered_pct = 100 · T / S`, i.e. the ratio of
  perplexities — 50 % means the student is twice as perplexed as the teacher;
- KL(teacher‖student), in nats, is 0 for the teacher itself: `abs_gap = S − T` and
  `recovered_pct = 100 · exp(T − S)`. Since KL(T‖S) = CE(T, S) − H(T), exp(−KL) is the teacher's perplexity
  on its own next-token distribution divided by the student's perplexity on it: the perplexity rule
  applied to the teacher's distribution as the target.
So `abs_gap > 0` always means the student is behind, and 100 % means it matches the teacher.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

LOG_SPACE = {"kl_to_teacher"}  # metrics in nats: recovered = exp(T − S)


def gap_row(metric: str, teacher: float, student: float, higher_is_better: bool) -> dict[str, Any]:
    """One row of the gap table (see the module docstring for the rules)."""
    if higher_is_better:
        abs_gap = teacher - student
        recovered = 100.0 * student / teacher if teacher != 0 else None
    elif metric in LOG_SPACE:
        abs_gap = student - teacher
        recovered = 100.0 * math.exp(teacher - student)
    else:
        abs_gap = student - teacher
        recovered = 100.0 * teacher / student if student != 0 else None
    return {"metric": metric, "teacher": teacher, "student": student, "abs_gap": abs_gap,
            "recovered_pct": recovered, "higher_is_better": higher_is_better}


def compute_gaps(models: dict[str, dict[str, Any]], teacher: str,
                 directions: dict[str, bool]) -> dict[str, list[dict[str, Any]]]:
    """Gap rows of every non-teacher model for every metric both it and the teacher have."""
    t_metrics = models[teacher]["metrics"]
    gaps = {}
    for name, info in models.items():
        if name == teacher:
            continue
        gaps[name] = [gap_row(m, t_metrics[m], info["metrics"][m], directions.get(m, True))
                      for m in t_metrics if m in info["metrics"]]
    return gaps


# ---------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.4f}" if abs(value) < 1 else f"{value:.3f}"


def gap_table_markdown(report: dict[str, Any], student: str | None = None) -> str:
    """A Markdown table: one row per metric, the teacher's value, then for each student (or only
    `student`) its value, the absolute gap and the % of the teacher recovered."""
    students = [student] if student is not None else [
        n for n, m in report["models"].items() if m["role"] == "student"]
    for s in students:
        if s not in report["gap"]:
            raise KeyError(f"report has no gap for {s!r} (students: {', '.join(report['gap'])})")
    teacher = report["teacher"]
    header = ["metric", "better", f"teacher ({teacher})"]
    for s in students:
        header += [s, "gap", "recovered"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    metrics = [row["metric"] for row in report["gap"][students[0]]] if students else []
    by_student = {s: {row["metric"]: row for row in report["gap"][s]} for s in students}
    for metric in metrics:
        first = by_student[students[0]][metric]
        cells = [metric, "↑" if first["higher_is_better"] else "↓", _fmt(first["teacher"])]
        for s in students:
            row = by_student[s].get(metric)
            if row is None:
                cells += ["—", "—", "—"]
                continue
            pct = row["recovered_pct"]
            cells += [_fmt(row["student"]), _fmt(row["abs_gap"]), "—" if pct is None else f"{pct:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def throughput_markdown(report: dict[str, Any]) -> str:
    lines = ["| model | task | samples | seconds | CPU seconds | samples/s | cached |", "|---|---|---|---|---|---|---|"]
    for model, tasks in report.get("throughput", {}).items():
        for task, t in tasks.items():
            lines.append(f"| {model} | {task} | {t['samples']} {t['unit']} | {t['seconds']:.1f} | "
                         f"{t['cpu_seconds']:.1f} | {t['samples_per_s']:.2f} | {'yes' if t['cached'] else 'no'} |")
    return "\n".join(lines) + "\n"


def report_markdown(report: dict[str, Any]) -> str:
    """The whole report.md: the gap table, the gap over steps (if checkpoints were evaluated), errors,
    throughput."""
    parts = [f"# Gap report: students vs teacher `{report['teacher']}`\n",
             "`gap` > 0 means the student is behind; recovered = student/teacher for ↑ metrics, "
             "teacher/student for perplexity, exp(−KL) for KL.\n",
             gap_table_markdown(report)]
    steps = [(m["step"], n) for n, m in report["models"].items() if m["role"] == "checkpoint"]
    if steps:
        parts.append("\n## Gap over training steps (% of teacher recovered)\n")
        metrics = [r["metric"] for r in report["gap"][steps[0][1]]]
        lines = ["| checkpoint | step | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 2)]
        for step, name in sorted(steps):
            rows = {r["metric"]: r for r in report["gap"][name]}
            cells = [("—" if rows.get(m) is None or rows[m]["recovered_pct"] is None
                      else f"{rows[m]['recovered_pct']:.1f}%") for m in metrics]
            lines.append(f"| {name} | {step} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
    if report.get("errors"):
        parts.append("\n## Errors\n")
        parts += [f"- {m} / {t}: {e}\n" for m, errs in report["errors"].items() for t, e in errs.items()]
    parts.append("\n## Throughput\n")
    parts.append(throughput_markdown(report))
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------
# Charts
# ---------------------------------------------------------------------------------------------------------


def plot_gap_bars(report: dict[str, Any], path: Path) -> None:
    """Grouped horizontal bars: % of the teacher recovered per metric, one bar per student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = [n for n, m in report["models"].items() if m["role"] == "student"]
    metrics = [r["metric"] for r in report["gap"][students[0]]] if students else []
    fig, ax = plt.subplots(figsize=(8, 0.5 * max(3, len(metrics)) + 1.5))
    height = 0.8 / max(1, len(students))
    for k, s in enumerate(students):
        rows = {r["metric"]: r["recovered_pct"] for r in report["gap"][s]}
        values = [rows.get(m) for m in metrics]
        bars = ax.barh([i + k * height for i in range(len(metrics))], [v or 0.0 for v in values],
                       height=height, label=s)
        # "n/a": the teacher scores 0, so there is nothing to recover (the gap is still in the table).
        ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.0f}%" for v in values], fontsize=7, padding=2)
    ax.axvline(100, color="k", linestyle="--", linewidth=1)
    ax.set_yticks([i + height * (len(students) - 1) / 2 for i in range(len(metrics))], metrics)
    ax.invert_yaxis()
    ax.set_xlabel("% of teacher recovered (100 = teacher)")
    ax.set_title(f"Students vs teacher {report['teacher']}")
    if students:
        ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    _save(fig, path)


def plot_gap_over_steps(report: dict[str, Any], path: Path) -> bool:
    """Line chart of % recovered per metric against the checkpoint's training step; False if no checkpoints."""
    points = sorted((m["step"], n) for n, m in report["models"].items() if m["role"] == "checkpoint")
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [r["metric"] for r in report["gap"][points[0][1]]]
    fig, ax = plt.subplots(figsize=(8, 5))
    for metric in metrics:
        xs, ys = [], []
        for step, name in points:
            row = next((r for r in report["gap"][name] if r["metric"] == metric), None)
            if row is not None and row["recovered_pct"] is not None:
                xs.append(step)
                ys.append(row["recovered_pct"])
        ax.plot(xs, ys, marker="o", label=metric)
    ax.axhline(100, color="k", linestyle="--", linewidth=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("% of teacher recovered")
    ax.set_title("Gap closing over training")
    ax.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, path)
    return True


def _save(fig: Any, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    from distill.artifacts import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
