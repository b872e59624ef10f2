"""The gap report: how much of the teacher each student recovers, as JSON, Markdown and PNG charts.

Rules, for a metric with teacher value T and student value S:
- higher is better (accuracy, pass@1, agreement, acceptance): `abs_gap = T − S`, `recovered_pct = 100 · S / T`
  (undefined when T = 0);
- lower is better (perplexity): `abs_gap = S − T`, `recovered_pct = 100 · T / S`, i.e. the ratio of
  perplexities — 50 % means the student is twice as perplexed as the teacher;
- KL(teacher‖student), in nats, is 0 for the teacher itself: `abs_gap = S − T` and
  `recovered_pct = 100 · exp(T − S)`. Since KL(T‖S) = CE(T, S) − H(T), exp(−KL) is the teacher's perplexity
  on its own next-token distribution divided by the student's perplexity on it: the perplexity rule
  applied to the teacher's distribution as the target.
So `abs_gap > 0` always means the student is behind, and 100 % means it matches the teacher.

Uncertainty (evaluation/stats.py): when a result carries its per-unit sums, each value gets a standard
error (binomial for accuracies, bootstrap over documents otherwise) and each gap a paired-bootstrap 95 %
interval for the gap and for "% recovered"; a gap whose interval contains 0 is marked within noise (≈).
Metrics ending in `_ood` are measured on out-of-distribution held-out text: they are the headline.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.plots import pyplot, save_png
from evaluation.stats import Units, paired_gap, standard_error

DRAFT_LENGTHS = (1, 2, 4, 8)  # γ: tokens the student drafts per teacher forward


def is_log_space(metric: str) -> bool:
    """KL metrics, in nats: recovered = exp(T − S)."""
    return metric.startswith("kl_to_teacher")


def _rule(metric: str, higher_is_better: bool) -> tuple[Callable, Callable]:
    """(gap(T, S), recovered(T, S)) of a metric, elementwise on floats or arrays."""
    if higher_is_better:
        return (lambda t, s: t - s), (lambda t, s: 100.0 * s / t)
    if is_log_space(metric):
        return (lambda t, s: s - t), (lambda t, s: 100.0 * np.exp(t - s))
    return (lambda t, s: s - t), (lambda t, s: 100.0 * t / s)


def gap_row(metric: str, teacher: float, student: float, higher_is_better: bool,
            teacher_units: dict | None = None, student_units: dict | None = None) -> dict[str, Any]:
    """One row of the gap table (see the module docstring for the rules); with both models' per-unit sums
    (`Units` JSON), also standard errors, the gap's and "% recovered"'s 95 % intervals and `within_noise`."""
    gap, recovered = _rule(metric, higher_is_better)
    undefined = (teacher == 0) if higher_is_better else (student == 0 and not is_log_space(metric))
    row = {"metric": metric, "teacher": teacher, "student": student, "abs_gap": float(gap(teacher, student)),
           "recovered_pct": None if undefined else float(recovered(teacher, student)),
           "higher_is_better": higher_is_better}
    if teacher_units is not None and student_units is not None:
        t, s = Units.from_json(teacher_units), Units.from_json(student_units)
        row.update(teacher_se=standard_error(t), student_se=standard_error(s), **paired_gap(t, s, gap, recovered))
        if undefined:
            row["recovered_ci"] = None
    return row


def compute_gaps(models: dict[str, dict[str, Any]], teacher: str,
                 directions: dict[str, bool]) -> dict[str, list[dict[str, Any]]]:
    """Gap rows of every non-teacher model for every metric both it and the teacher have (OOD metrics
    first); with per-unit sums under `models[name]["units"]`, rows carry their uncertainty."""
    t_metrics, t_units = models[teacher]["metrics"], models[teacher].get("units", {})
    order = sorted(t_metrics, key=lambda m: (not m.endswith("_ood"), list(t_metrics).index(m)))
    gaps = {}
    for name, info in models.items():
        if name == teacher:
            continue
        units = info.get("units", {})
        gaps[name] = [gap_row(m, t_metrics[m], info["metrics"][m], directions.get(m, True),
                              t_units.get(m), units.get(m) if m in t_units else None)
                      for m in order if m in info["metrics"]]
    return gaps


def tokens_per_forward(alpha: float, gamma: int) -> float:
    """Expected tokens produced per teacher forward when the student drafts `gamma` tokens and each is
    accepted with probability `alpha` (Leviathan et al., 2023, eq. 1): (1 − α^{γ+1}) / (1 − α)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"acceptance rate must be in [0, 1], got {alpha!r}")
    return float(gamma + 1) if alpha == 1.0 else (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def speculative(report: dict[str, Any], student: str) -> list[dict[str, Any]]:
    """Per domain and held-out kind: the acceptance rate α (± its standard error) and the expected tokens
    per teacher forward for each γ in `DRAFT_LENGTHS`, with the range α ± 1 SE maps to."""
    rows = []
    for row in report["gap"].get(student, []):
        metric = row["metric"]
        if not metric.startswith("accept_"):
            continue
        domain, kind = metric.removeprefix("accept_").removesuffix("_ood"), "ood" if metric.endswith("_ood") else "id"
        alpha, se = row["student"], row.get("student_se")
        entry = {"domain": domain, "kind": kind, "alpha": alpha, "alpha_se": se,
                 "tokens_per_forward": {str(g): tokens_per_forward(alpha, g) for g in DRAFT_LENGTHS}}
        if se is not None and math.isfinite(se):
            lo, hi = max(0.0, alpha - se), min(1.0, alpha + se)
            entry["tokens_range"] = {str(g): [tokens_per_forward(lo, g), tokens_per_forward(hi, g)]
                                     for g in DRAFT_LENGTHS}
        rows.append(entry)
    return rows


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


def _with_se(value: float | None, se: float | None) -> str:
    if se is None or value is None or not math.isfinite(se):
        return _fmt(value)
    return f"{_fmt(value)} ± {_fmt(se)}"


def _recovered_cell(row: dict[str, Any]) -> str:
    pct = row["recovered_pct"]
    if pct is None:
        return "—"
    ci = row.get("recovered_ci")
    return f"{pct:.1f}%" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")


def _gap_cell(row: dict[str, Any]) -> str:
    return _with_se(row["abs_gap"], row.get("gap_se")) + (" ≈" if row.get("within_noise") else "")


def gap_table_markdown(report: dict[str, Any], student: str | None = None) -> str:
    """A Markdown table: one row per metric, the teacher's value, then for each student (or only
    `student`) its value, the absolute gap and the % of the teacher recovered — with ± standard errors, the
    95 % interval of "% recovered" in brackets and ≈ on gaps within noise, where the report has them."""
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
        cells = [metric, "↑" if first["higher_is_better"] else "↓", _with_se(first["teacher"], first.get("teacher_se"))]
        for s in students:
            row = by_student[s].get(metric)
            if row is None:
                cells += ["—", "—", "—"]
                continue
            cells += [_with_se(row["student"], row.get("student_se")), _gap_cell(row), _recovered_cell(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def speculative_markdown(report: dict[str, Any], student: str) -> str:
    """A table of α and expected tokens per teacher forward per γ, for one student ("" if no α)."""
    rows = report.get("speculative", {}).get(student) or []
    if not rows:
        return ""
    lines = ["| held-out text | domain | α | " + " | ".join(f"tokens/forward γ={g}" for g in DRAFT_LENGTHS) + " |",
             "|" + "---|" * (3 + len(DRAFT_LENGTHS))]
    for r in sorted(rows, key=lambda r: (r["kind"] != "ood", r["domain"])):
        cells = [("out-of-distribution" if r["kind"] == "ood" else "in-distribution"), r["domain"],
                 _with_se(r["alpha"], r.get("alpha_se"))]
        for g in DRAFT_LENGTHS:
            span = r.get("tokens_range", {}).get(str(g))
            interval = f" [{span[0]:.2f}, {span[1]:.2f}]" if span else ""
            cells.append(f"{r['tokens_per_forward'][str(g)]:.2f}" + interval)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def throughput_markdown(report: dict[str, Any]) -> str:
    # A vLLM engine computes in its own process: "CPU seconds" then counts only the suite's own share.
    lines = ["| model | task | engine | samples | seconds | CPU seconds | samples/s | cached |",
             "|---|---|---|---|---|---|---|---|"]
    for model, tasks in report.get("throughput", {}).items():
        for task, t in tasks.items():
            lines.append(f"| {model} | {task} | {t.get('engine', 'transformers')} | {t['samples']} {t['unit']} | "
                         f"{t['seconds']:.1f} | {t['cpu_seconds']:.1f} | {t['samples_per_s']:.2f} | "
                         f"{'yes' if t['cached'] else 'no'} |")
    return "\n".join(lines) + "\n"


def _headline(report: dict[str, Any], student: str) -> str:
    """One line: "% recovered" on out-of-distribution text (the headline figures) for one student."""
    rows = [r for r in report["gap"].get(student, []) if r["metric"].endswith("_ood") and r["recovered_pct"] is not None
            and not r["metric"].startswith("ppl_all")]
    return f"- **{student}**: " + ", ".join(f"{r['metric'].removesuffix('_ood')} {_recovered_cell(r)}" for r in rows)


def _steps_markdown(report: dict[str, Any]) -> str:
    steps = sorted((m["step"], n) for n, m in report["models"].items() if m["role"] == "checkpoint")
    metrics = [r["metric"] for r in report["gap"][steps[0][1]]]
    lines = ["| checkpoint | step | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 2)]
    for step, name in steps:
        rows = {r["metric"]: r for r in report["gap"][name]}
        cells = ["—" if rows.get(m) is None else _recovered_cell(rows[m]) for m in metrics]
        lines.append(f"| {name} | {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report_markdown(report: dict[str, Any]) -> str:
    """The whole report.md: headline (OOD), held-out sources, the gap table, speculative decoding, the gap
    over steps (if checkpoints were evaluated), failed and skipped tasks, throughput."""
    students = [n for n, m in report["models"].items() if m["role"] == "student"]
    parts = [f"# Gap report: students vs teacher `{report['teacher']}`\n",
             "`gap` > 0 means the student is behind; recovered = student/teacher for ↑ metrics, "
             "teacher/student for perplexity, exp(−KL) for KL. `±`: standard error (binomial for accuracies, "
             "bootstrap over documents or items otherwise); `[lo, hi]`: 95 % paired-bootstrap interval of "
             "\"% recovered\"; `≈`: the gap is within noise (its 95 % interval contains 0).\n"]
    if any(r["metric"].endswith("_ood") for s in students for r in report["gap"].get(s, [])):
        parts += ["## Headline: % of the teacher recovered on out-of-distribution text\n",
                  "\n".join(_headline(report, s) for s in students) + "\n"]
    if report.get("heldout_sources"):
        sources = report["heldout_sources"].items()
        parts += ["## Held-out text\n", "\n".join(f"- {kind}: {text}" for kind, text in sources)
                  + "\n\nMetrics ending in `_ood` are measured on the out-of-distribution text, the others on the "
                  "in-distribution held-out rows.\n"]
    parts += ["## Gap table\n", gap_table_markdown(report)]
    for s in students:
        if spec := speculative_markdown(report, s):
            parts += [f"\n## Speculative decoding with {s} as the draft model\n",
                      "α = E_x[Σ_v min(p_T(v|x), p_S(v|x))] over held-out positions: the chance the teacher "
                      "accepts a drafted token; a draft of γ tokens yields (1 − α^(γ+1)) / (1 − α) tokens per "
                      "teacher forward (Leviathan et al., 2023, eq. 1; brackets: α ± 1 SE).\n", spec]
    if any(m["role"] == "checkpoint" for m in report["models"].values()):
        parts += ["\n## Gap over training steps (% of teacher recovered, 95 % interval)\n", _steps_markdown(report)]
    for title, key in (("Failed tasks", "errors"), ("Skipped tasks", "skipped")):
        if report.get(key):
            parts.append(f"\n## {title}\n")
            parts += [f"- {m} / {t}: {e}\n" for m, errs in report[key].items() for t, e in errs.items()]
    parts += ["\n## Throughput\n", throughput_markdown(report)]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------
# Charts
# ---------------------------------------------------------------------------------------------------------


def _error_bars(rows: list[dict[str, Any] | None]) -> np.ndarray:
    """`[2, n]` distances from each row's "% recovered" down and up to its interval (0 where unknown)."""
    err = np.zeros((2, len(rows)))
    for i, row in enumerate(rows):
        ci = row.get("recovered_ci") if row else None
        if ci and row["recovered_pct"] is not None:
            err[:, i] = [max(0.0, row["recovered_pct"] - ci[0]), max(0.0, ci[1] - row["recovered_pct"])]
    return err


def plot_gap_bars(report: dict[str, Any], path: Path) -> None:
    """Grouped horizontal bars: % of the teacher recovered per metric (in- and out-of-distribution held-out
    text and benchmarks), one bar per student, whiskers at the 95 % interval."""
    plt = pyplot()

    students = [n for n, m in report["models"].items() if m["role"] == "student"]
    metrics = [r["metric"] for r in report["gap"][students[0]]] if students else []
    fig, ax = plt.subplots(figsize=(8, 0.45 * max(3, len(metrics)) + 1.5))
    height = 0.8 / max(1, len(students))
    for k, s in enumerate(students):
        by_metric = {r["metric"]: r for r in report["gap"][s]}
        rows = [by_metric.get(m) for m in metrics]
        values = [r["recovered_pct"] if r else None for r in rows]
        bars = ax.barh([i + k * height for i in range(len(metrics))], [v or 0.0 for v in values],
                       height=height, label=s, xerr=_error_bars(rows), capsize=2, error_kw={"linewidth": 0.8})
        # "n/a": the teacher scores 0, so there is nothing to recover (the gap is still in the table).
        ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.0f}%" for v in values], fontsize=7, padding=2)
    ax.axvline(100, color="k", linestyle="--", linewidth=1)
    ax.set_yticks([i + height * (len(students) - 1) / 2 for i in range(len(metrics))], metrics)
    ax.invert_yaxis()
    ax.set_xlabel("% of teacher recovered (100 = teacher; whiskers: 95 % interval; _ood: out-of-distribution text)")
    ax.set_title(f"Students vs teacher {report['teacher']}")
    if students:
        ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    save_png(fig, path, dpi=100)


def plot_gap_over_steps(report: dict[str, Any], path: Path) -> bool:
    """% recovered per metric against the checkpoint's training step, with 95 % interval bars; False if
    no checkpoints."""
    points = sorted((m["step"], n) for n, m in report["models"].items() if m["role"] == "checkpoint")
    if not points:
        return False
    plt = pyplot()

    metrics = [r["metric"] for r in report["gap"][points[0][1]]]
    fig, ax = plt.subplots(figsize=(8, 5))
    for metric in metrics:
        xs, rows = [], []
        for step, name in points:
            row = next((r for r in report["gap"][name] if r["metric"] == metric), None)
            if row is not None and row["recovered_pct"] is not None:
                xs.append(step)
                rows.append(row)
        ax.errorbar(xs, [r["recovered_pct"] for r in rows], yerr=_error_bars(rows), marker="o", capsize=3,
                    label=metric)
    ax.axhline(100, color="k", linestyle="--", linewidth=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("% of teacher recovered (bars: 95 % interval)")
    ax.set_title("Gap closing over training")
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_png(fig, path, dpi=100)
    return True
