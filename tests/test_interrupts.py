"""`kill -9` in every stage: a tiny pipeline with synthetic data is killed once inside each of synth, data,
capture, student, train, anneal, eval and publish (at a random point of the stage, from a seeded RNG),
rerun each time, and every artifact is then compared with an uninterrupted run: identical bytes for data,
the logit store and every set of weights, identical samples and rows for synth, identical scores for eval.
(The random tiny teacher's samples all fail the math verifier: synth keeps none, but samples and scores
them all, which is the work a kill interrupts.)"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["synth", "data", "capture", "student", "train", "anneal", "eval", "publish"]


def _args(tiny_teacher_dir: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "distill.cli", "run", "configs/tiny.yaml", f"teacher.model={tiny_teacher_dir}",
            "synth.enabled=true", "synth.prompts=[seed:math]", "synth.max_prompts=4", "synth.samples_per_prompt=2",
            "synth.max_new_tokens=24", "synth.generation_batch=2", "synth.keep=all_passing",
            "synth.drop_truncated=false", "synth.min_response_tokens=1",
            "eval.tasks=[intrinsic]", "--output-dir", str(run)]


class Run:
    """`distill run` in the background, its output lines collected as they come."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, text: str, timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            if any(text in line for line in list(self.lines)):
                return True
            time.sleep(0.01)
        return any(text in line for line in list(self.lines))

    def kill(self) -> None:
        """SIGKILL the whole process tree (vLLM or tokenizer workers included)."""
        try:
            root = psutil.Process(self.proc.pid)
            for proc in [*root.children(recursive=True), root]:
                proc.kill()
        except psutil.NoSuchProcess:
            pass
        self.proc.wait()
        self.reader.join(timeout=10)


def _stage_seconds(lines: list[str]) -> dict[str, float]:
    out = {}
    for line in lines:
        if line.startswith("=== ") and " done in " in line:
            name, rest = line[4:].split(" done in ", 1)
            out[name] = max(float(rest.split("s")[0]), 1.0)
    return out


def _artifacts(run: Path) -> dict[str, object]:
    """What must not differ between an interrupted and an uninterrupted run."""
    files = {}
    for pattern in ("data/train/*.safetensors", "data/heldout.safetensors", "logits/shard-*.safetensors",
                    "student_init/model.safetensors", "train/final/model.safetensors",
                    "anneal/final/model.safetensors", "publish/model.safetensors"):
        for path in sorted(run.glob(pattern)):
            files[str(path.relative_to(run))] = path.read_bytes()
    report = json.loads((run / "eval" / "report.json").read_text())
    files["eval"] = {name: model["metrics"] for name, model in report["models"].items()}
    files["synth rows"] = (run / "synth" / "synth.jsonl").read_text()
    samples = [json.loads(line) for line in (run / "synth" / "work" / "samples.jsonl").read_text().splitlines()]
    files["synth samples"] = [{k: v for k, v in s.items() if k != "seconds"} for s in samples]  # kept or not
    files["synth counts"] = json.loads((run / "synth" / "summary.json").read_text())["counts"]
    return files


@pytest.mark.slow
def test_kill_in_every_stage_then_rerun_equals_an_uninterrupted_run(tmp_path, tiny_teacher_dir):
    straight = Run(_args(tiny_teacher_dir, tmp_path / "straight"))
    assert straight.proc.wait(timeout=900) == 0, "".join(straight.lines)[-3000:]
    straight.reader.join(timeout=10)
    seconds = _stage_seconds(straight.lines)
    assert set(seconds) == set(STAGES)

    rng = random.Random(0)
    killed_in = []
    for stage in STAGES:
        run = Run(_args(tiny_teacher_dir, tmp_path / "killed"))
        assert run.wait_for(f"=== {stage} ===", timeout=600), "".join(run.lines)[-3000:]
        time.sleep(rng.uniform(0.0, 0.8) * seconds[stage])
        if not any(f"=== {stage} done" in line for line in list(run.lines)):
            killed_in.append(stage)
        run.kill()
    # Most stages take a few seconds here: every one of them must have been caught while it ran.
    assert len(killed_in) >= 6, killed_in

    final = Run(_args(tiny_teacher_dir, tmp_path / "killed"))
    assert final.proc.wait(timeout=900) == 0, "".join(final.lines)[-3000:]
    expected, got = _artifacts(tmp_path / "straight"), _artifacts(tmp_path / "killed")
    assert expected.keys() == got.keys()
    for key in expected:
        assert got[key] == expected[key], key
