"""The `synth` stage: prompts → n teacher samples each → verify/score → rejection sampling → filters → dataset.

`synthesize(cfg, run_dir)` writes `RUN/synth/`:
- `dataset/`      a `datasets` dataset (`save_to_disk`): `messages` (user prompt, teacher answer), `domain`,
                  `score`, `verdict`, `verdict_detail`, `pass_rate` (of the prompt), `prompt_id`,
                  `prompt_source`, `sample_index`, `teacher`, `sampling` (the sampling parameters);
- `synth.jsonl`, `synth.parquet`  the same rows as JSON lines and parquet;
- `summary.json`  counts per domain, pass rates, what each filter removed, throughput;
- `work/`         resumable state: `prompts.jsonl` (the fixed prompt list), `samples.jsonl` (generation log),
                  `scored.jsonl` (verdicts log);
- `manifest.json` (stage "synth"), written last.
Rerunning after a crash (even `kill -9`) continues where the logs end; a completed stage returns at once.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from core.artifacts import (
    ArtifactError,
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    is_complete,
    write_manifest,
)
from core.config import InputError, RunConfig, SynthConfig, to_dict
from core.records import model_vocab_size
from synth_data.decontam import Decontaminator
from synth_data.filters import exact_duplicates, near_duplicates
from synth_data.generate import GenerationStats, JsonlLog, generate_samples
from synth_data.prompts import PromptTask, encode_prompt, load_prompts
from synth_data.rejection import score_prompt, select
from synth_data.scorers import RewardModel
from teachers.backend import make_backend
from teachers.resolve import load_tokenizer, resolve_teacher, teacher_identity

log = logging.getLogger(__name__)
STAGE = "synth"
PROMPT_OVERSAMPLE = 4  # generated (reasoning-gym) prompts drawn per kept one, to replace contaminated ones


def synthesize(cfg: RunConfig, run_dir: Path) -> Path:
    """Run (or resume) the synth stage into `run_dir/synth` and return that folder."""
    out = Path(run_dir) / "synth"
    if is_complete(out, STAGE):
        return out

    scfg = cfg.synth
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_teacher(cfg.teacher.model, cfg.teacher.revision)
    tokenizer = load_tokenizer(model_dir)
    identity = teacher_identity(cfg.teacher.model, cfg.teacher.revision, tokenizer, model_vocab_size(model_dir))
    # The backend may change between resumes (e.g. restart a slow transformers run on vLLM): only what
    # decides the distribution of samples has to match.
    _check_resume_state(work, {"synth": to_dict(scfg), "teacher": identity})
    decontam = Decontaminator(scfg.decontam_sets, scfg.decontam_ngram) if scfg.decontam_ngram > 0 else None

    tasks, prompt_filter = _prompts(scfg, work, decontam)
    gen_stats = _generate(cfg, model_dir, tokenizer, tasks, work)
    scored = _score(cfg, tasks, work)
    rows, counts, per_domain = _select_and_filter(scfg, tasks, scored, decontam, identity)
    summary = _summary(scfg, tasks, scored, rows, counts, per_domain, prompt_filter, gen_stats, work)

    import datasets

    ds = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({k: [] for k in _COLUMNS})
    with atomic_dir(out / "dataset") as tmp:
        # An empty dataset needs one (empty) shard file, or `load_from_disk` cannot read it back.
        ds.save_to_disk(str(tmp), num_shards=1 if not rows else None)
    atomic_write_text(out / "synth.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    parquet = io.BytesIO()
    ds.to_parquet(parquet)
    atomic_write_bytes(out / "synth.parquet", parquet.getvalue())
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "report.md", render_report(summary))
    write_manifest(out, STAGE, config=to_dict(scfg), teacher=identity, rows=len(rows),
                   domains=sorted({r["domain"] for r in rows}), teacher_backend=cfg.teacher.backend,
                   summary=summary["counts"])
    if not rows:
        log.warning("synth: no sample passed verification and filters; %s holds an empty dataset (see report.md)", out)
    log.info("synth: %d rows written to %s", len(rows), out)
    return out


_COLUMNS = ("messages", "domain", "score", "verdict", "verdict_detail", "pass_rate", "prompt_id", "prompt_source",
            "sample_index", "teacher", "sampling")


def _check_resume_state(work: Path, state: dict[str, Any]) -> None:
    """Refuse to resume half-done work made with another synth config or teacher (the logs would mix)."""
    path = work / "state.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != json.loads(json.dumps(state, default=str)):
            changed = sorted(k for k in state if old.get(k) != json.loads(json.dumps(state[k], default=str)))
            raise ArtifactError(f"{work}: unfinished synth work was made with a different {', '.join(changed)}; "
                                f"delete {work} to start over with this config")
        return
    atomic_write_json(path, state)



def _prompts(scfg: SynthConfig, work: Path, decontam: Decontaminator | None) -> tuple[list[PromptTask], dict]:
    """The fixed prompt list: loaded and decontaminated once, then read back from work/prompts.jsonl so a
    resumed run samples exactly the same prompts."""
    path = work / "prompts.jsonl"
    if path.is_file():
        saved = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        meta = json.loads((work / "prompts_filter.json").read_text())
        return [PromptTask(**t) for t in saved], meta
    candidates = load_prompts(scfg.prompts, scfg.max_prompts, scfg.seed, oversample=PROMPT_OVERSAMPLE)
    kept: list[PromptTask] = []
    per_source: Counter[str] = Counter()
    contaminated: Counter[str] = Counter()
    for task in candidates:
        if per_source[task.source] >= scfg.max_prompts:
            continue
        hit = decontam.match(task.prompt) if decontam else None
        if hit:
            contaminated[hit] += 1
            continue
        per_source[task.source] += 1
        kept.append(task)
    if not kept:
        raise InputError(f"synth.prompts: no usable prompt in {scfg.prompts}")
    meta = {"prompts_contaminated": dict(contaminated), "prompts_per_source": dict(per_source)}
    atomic_write_json(work / "prompts_filter.json", meta)
    atomic_write_text(path, "".join(json.dumps(dataclasses.asdict(t)) + "\n" for t in kept))
    return kept, meta


def _generate(cfg: RunConfig, model_dir: Path, tokenizer: Any, tasks: list[PromptTask], work: Path) -> GenerationStats:
    samples_log = JsonlLog(work / "samples.jsonl")
    if all(t.id in samples_log.load() for t in tasks):
        return GenerationStats()

    scfg = cfg.synth
    prompt_ids = [encode_prompt(t, tokenizer) for t in tasks]
    backend = make_backend(cfg.teacher, model_dir)
    try:
        return generate_samples(tasks, prompt_ids, backend, tokenizer, samples_log, n=scfg.samples_per_prompt,
                                temperature=scfg.temperature, top_p=scfg.top_p, max_new_tokens=scfg.max_new_tokens,
                                seed=scfg.seed, batch_prompts=scfg.generation_batch)
    finally:
        backend.close()


def _score(cfg: RunConfig, tasks: list[PromptTask], work: Path) -> dict[str, list[dict[str, Any]]]:
    """Verdicts for every prompt's samples, logged per prompt (resumable: sandbox runs are not repeated)."""
    scfg = cfg.synth
    samples = JsonlLog(work / "samples.jsonl").load()
    scored_log = JsonlLog(work / "scored.jsonl")
    scored = {k: v["samples"] for k, v in scored_log.load().items()}
    pending = [t for t in tasks if t.id not in scored]
    reward_model = None
    if scfg.reward_model and any(t.domain == "general" for t in pending):
        reward_model = RewardModel(scfg.reward_model, cfg.teacher.device)
    for task in pending:
        result = score_prompt(task, samples[task.id], reward_model=reward_model, min_tokens=scfg.min_response_tokens,
                              drop_truncated=scfg.drop_truncated, code_timeout_s=scfg.code_timeout_s)
        scored_log.append([{"prompt_id": task.id, "samples": result}])
        scored[task.id] = result
    return scored


def _select_and_filter(scfg: SynthConfig, tasks: list[PromptTask], scored: dict[str, list[dict[str, Any]]],
                       decontam: Decontaminator | None, identity: dict[str, Any]):
    """Rejection sampling, then decontamination, exact and near-duplicate removal (in that order)."""
    sampling = {"n": scfg.samples_per_prompt, "temperature": scfg.temperature, "top_p": scfg.top_p,
                "max_new_tokens": scfg.max_new_tokens, "seed": scfg.seed}
    counts: Counter[str] = Counter()
    per_domain: dict[str, Counter[str]] = defaultdict(Counter)
    rows = []
    for task in tasks:
        samples = scored[task.id]
        chosen = select(samples, scfg.keep)
        counts["selected"] += len(chosen)
        counts["prompts_without_a_kept_sample"] += int(not chosen)
        counts["not_selected"] += sum(s["passed"] for s in samples) - len(chosen)
        pass_rate = sum(s["verdict"] == "pass" for s in samples) / len(samples)
        for i in chosen:
            s = samples[i]
            rows.append({
                "messages": [{"role": "user", "content": task.prompt}, {"role": "assistant", "content": s["text"]}],
                "domain": task.domain, "score": float(s["score"]), "verdict": s["verdict"],
                "verdict_detail": s["detail"], "pass_rate": pass_rate, "prompt_id": task.id,
                "prompt_source": task.source, "sample_index": i, "teacher": identity["id"], "sampling": sampling,
            })
    texts = [r["messages"][0]["content"] + "\n" + r["messages"][1]["content"] for r in rows]
    keep = [True] * len(rows)
    if decontam is not None:
        for i, text in enumerate(texts):
            hit = decontam.match(text)
            if hit:
                keep[i] = False
                counts[f"contaminated_{hit}"] += 1
    survivors = [i for i in range(len(rows)) if keep[i]]
    dup = exact_duplicates([texts[i] for i in survivors])
    counts["exact_duplicate"] = sum(dup)
    survivors = [i for i, d in zip(survivors, dup, strict=True) if not d]
    dup = near_duplicates([texts[i] for i in survivors], scfg.near_dup_threshold)
    counts["near_duplicate"] = sum(dup)
    survivors = [i for i, d in zip(survivors, dup, strict=True) if not d]
    final = [rows[i] for i in survivors]
    for r in final:
        per_domain[r["domain"]]["rows"] += 1
    counts["kept"] = len(final)
    return final, dict(counts), per_domain


def _summary(scfg: SynthConfig, tasks, scored, rows, counts, per_domain, prompt_filter, gen_stats, work) -> dict:
    """Counts, pass rates per domain, filter removals and throughput (generation figures cover all runs)."""
    samples_log = JsonlLog(work / "samples.jsonl").load()
    gen_seconds = sum(r["seconds"] for r in samples_log.values())
    gen_samples = sum(len(r["completions"]) for r in samples_log.values())
    gen_tokens = sum(sum(r["num_tokens"]) for r in samples_log.values())
    domains: dict[str, dict[str, Any]] = {}
    verdicts: Counter[str] = Counter()
    per_prompt: dict[str, float] = {}
    for task in tasks:
        d = domains.setdefault(task.domain, {"prompts": 0, "samples": 0, "passing_samples": 0,
                                             "prompts_with_a_pass": 0, "rows": 0})
        samples = scored[task.id]
        verdicts.update(s["verdict"] for s in samples)
        n_pass = sum(s["verdict"] == "pass" for s in samples)
        if task.domain in ("math", "code"):
            per_prompt[task.id] = n_pass / len(samples)
        d["prompts"] += 1
        d["samples"] += len(samples)
        d["passing_samples"] += n_pass
        d["prompts_with_a_pass"] += int(n_pass > 0)
    for name, d in domains.items():
        d["rows"] = per_domain.get(name, Counter())["rows"]
        if name in ("math", "code"):
            d["sample_pass_rate"] = d["passing_samples"] / max(1, d["samples"])
            d["prompt_pass_rate"] = d["prompts_with_a_pass"] / max(1, d["prompts"])
    return {
        "counts": {"prompts": len(tasks), "samples": gen_samples, "rows": len(rows), **counts},
        "verdicts": dict(verdicts),
        "domains": domains,
        "prompt_filter": prompt_filter,
        "generation": {"samples": gen_samples, "tokens": gen_tokens, "seconds": round(gen_seconds, 3),
                       "samples_per_s": gen_samples / gen_seconds if gen_seconds else None,
                       "tokens_per_s": gen_tokens / gen_seconds if gen_seconds else None,
                       "this_run": dataclasses.asdict(gen_stats)},
        "keep": scfg.keep,
        "prompt_pass_rates": per_prompt,
    }


def render_report(summary: dict[str, Any]) -> str:
    """summary.json as a short Markdown report (report.md)."""
    gen = summary["generation"]
    lines = ["# Synthetic SFT data", "", "| domain | prompts | samples | passing samples | sample pass rate | "
             "prompts with a pass | rows kept |", "|---|---|---|---|---|---|---|"]
    for name, d in summary["domains"].items():
        rate = f"{d['sample_pass_rate']:.1%}" if "sample_pass_rate" in d else "n/a (no verifier)"
        lines.append(f"| {name} | {d['prompts']} | {d['samples']} | {d['passing_samples']} | {rate} | "
                     f"{d['prompts_with_a_pass']} | {d['rows']} |")
    lines += ["", "## Verdicts", ""] + [f"- {k}: {v}" for k, v in sorted(summary["verdicts"].items())]
    lines += ["", "## Filters (in order)", ""]
    contaminated = summary["prompt_filter"]["prompts_contaminated"]
    lines.append(f"- prompts dropped before sampling as contaminated: {sum(contaminated.values())} {contaminated}")
    lines += [f"- {k}: {v}" for k, v in summary["counts"].items()]
    speed = f"{gen['samples_per_s']:.2f} samples/s, {gen['tokens_per_s']:.1f} tokens/s" if gen["seconds"] else "n/a"
    lines += ["", "## Generation", "", f"- {gen['samples']} samples, {gen['tokens']} tokens in {gen['seconds']} s "
              f"({speed})", ""]
    return "\n".join(lines)
