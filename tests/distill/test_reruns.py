"""Runs that never lie, through the CLI on a real tiny run: a changed setting reruns exactly its stage and
what depends on it (`--dry-run` says so and changes nothing), an expensive artifact is never discarded
without `--rerun`, RUN/config.yaml says which outputs it describes, `distill verify` gives one verdict per
stage and its advice repairs, overrides go anywhere, internal errors keep their traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.artifacts import read_manifest
from distill import cli, pipeline

ROOT = Path(__file__).resolve().parents[2]
STAGE_FOLDERS = {"data": "data", "capture": "logits", "student": "student_init", "train": "train",
                 "anneal": "anneal", "eval": "eval", "publish": "publish"}


def distill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


def created(run: Path) -> dict[str, str]:
    """Each stage's manifest creation stamp: what tells a rerun stage from a kept one."""
    return {s: read_manifest(run / f, s)["created"] for s, f in STAGE_FOLDERS.items()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_teacher_dir) -> tuple[Path, list[str]]:
    run = tmp_path_factory.mktemp("reruns") / "run"
    base = ["configs/tiny.yaml", f"teacher.model={tiny_teacher_dir}", "eval.tasks=[intrinsic]", "train.lr=1e-3"]
    done = distill("run", *base, "-o", str(run))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run, base


def test_a_changed_setting_reruns_its_stage_and_downstream_only(finished_run):
    run, base = finished_run
    config_before = (run / "config.yaml").read_text()
    before = created(run)
    # --dry-run: the plan, with the override after --output-dir, and nothing changes.
    dry = distill("run", *base, "-o", str(run), "--dry-run", "train.lr=2e-3")
    assert dry.returncode == 0, dry.stderr
    assert "train: train.lr 0.001 → 0.002 — reruns train, anneal, eval, publish" in dry.stdout
    assert "data: up to date" in dry.stdout and "capture: up to date" in dry.stdout
    assert created(run) == before and (run / "config.yaml").read_text() == config_before

    done = distill("run", *base, "-o", str(run), "train.lr=2e-3")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    after = created(run)
    assert [s for s in STAGE_FOLDERS if after[s] != before[s]] == ["train", "anneal", "eval", "publish"]
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["train"]["lr"] == 0.002
    assert "Outputs made with it: data, capture, student, train, anneal, eval, publish." in (
        run / "config.yaml").read_text()
    assert read_manifest(run / "train", "train")["fingerprint"]["reads"]["train.lr"] == 0.002
    again = distill("run", *base, "-o", str(run), "train.lr=2e-3", "--dry-run")
    assert all(line.endswith("up to date") for line in again.stdout.strip().splitlines()), again.stdout


def test_an_expensive_artifact_is_discarded_only_on_request(finished_run):
    run, base = finished_run
    before = created(run)
    refused = distill("run", *base, "-o", str(run), "train.lr=2e-3", "capture.top_k=4")
    assert refused.returncode == 2
    assert "capture: capture.top_k 8 → 4" in refused.stderr and "--rerun capture" in refused.stderr
    assert created(run) == before
    done = distill("run", *base, "train.lr=2e-3", "capture.top_k=4", "--rerun", "capture", "-o", str(run))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    after = created(run)
    assert [s for s in STAGE_FOLDERS if after[s] != before[s]] == ["capture", "train", "anneal", "eval", "publish"]
    assert read_manifest(run / "logits", "capture")["k"] == 4


def test_verify_gives_a_verdict_per_stage_and_its_advice_repairs(finished_run):
    run, _ = finished_run
    ok = distill("verify", str(run))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    lines = ok.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == list(STAGE_FOLDERS)
    assert all(": ok — " in line for line in lines), lines
    shard = run / "logits" / read_manifest(run / "logits", "capture")["store"]["shards"][0]["file"]
    shard.write_bytes(b"\0" * shard.stat().st_size)
    bad = distill("verify", str(run))
    assert bad.returncode == 1
    line = next(line for line in bad.stdout.splitlines() if line.startswith("capture:"))
    assert "BAD" in line and shard.name in line
    repair = line.split("`")[1]  # the command the error advises
    assert repair.startswith("distill capture ")
    fixed = distill(*repair.split()[1:])
    assert fixed.returncode == 0, fixed.stdout[-2000:] + fixed.stderr[-2000:]
    assert distill("verify", str(run)).returncode == 0


def test_unknown_field_names_the_closest(tmp_path):
    done = distill("run", "configs/tiny.yaml", "-o", str(tmp_path), "train.los=jsd")
    assert done.returncode == 2
    assert "unknown field train.los (did you mean train.loss?" in done.stderr


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, tmp_path, capsys):
    def bug(*args, **kwargs):
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(pipeline, "plan", bug)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["run", "configs/tiny.yaml", "-o", str(tmp_path)])
    assert cli.main(["run", "configs/tiny.yaml", "-o", str(tmp_path), "train.lr=fast"]) == 2
    assert "train.lr: expected a number" in capsys.readouterr().err


def test_plan_reads_its_fingerprints_from_manifests(finished_run):
    run, _ = finished_run
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    assert set(manifest["fingerprint"]) == {"reads", "inputs", "versions"}
    assert "data.num_proc" not in manifest["fingerprint"]["reads"]  # it does not change the rows
