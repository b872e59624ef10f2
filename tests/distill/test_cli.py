"""The CLI: verbs exist, bad input exits 2 and a run stopped on purpose exits 3, each with one line naming the
problem; stages run on their own."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "distill.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_help_lists_every_verb():
    out = run_cli("--help").stdout
    verbs = ("run", "data", "synth", "capture", "student", "train", "anneal", "eval", "publish", "average", "sizes")
    for verb in verbs:
        assert verb in out


def test_bad_override_is_one_line_error(tmp_path):
    proc = run_cli("run", "configs/quickstart.yaml", "train.lr=fast", "--output-dir", str(tmp_path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["distill run: error: configs/quickstart.yaml: train.lr: expected a number, got 'fast'"]
    assert not any(tmp_path.iterdir())


def test_data_stage_alone(tmp_path, tiny_teacher_dir):
    proc = run_cli("data", "configs/tiny.yaml", f"teacher.model={tiny_teacher_dir}", "--output-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "data" / "manifest.json").is_file()
    assert (tmp_path / "config.yaml").is_file()


def test_missing_teacher_folder_is_named(tmp_path):
    proc = run_cli("data", "configs/tiny.yaml", "teacher.model=./no/such/teacher", "--output-dir", str(tmp_path))
    assert proc.returncode == 2
    assert "teacher.model: local folder ./no/such/teacher does not exist" in proc.stderr


def test_a_run_that_stops_on_purpose_is_one_line_with_its_own_exit_status(tmp_path, tiny_teacher_dir):
    """A diverging run (an absurd LR: the loss turns non-finite after the first update) stops before the
    optimizer step with exit status 3 and one line saying what is kept and what to try — no traceback."""
    import yaml
    from test_trainer import make_run

    from core.config import to_dict

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(to_dict(make_run(tmp_path, tiny_teacher_dir))))
    proc = run_cli("train", str(config), "-o", str(tmp_path), "train.lr=1e30", "train.max_grad_norm=0")
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("distill train: stopped: train step 2: "), proc.stderr[-3000:]
    assert "no checkpoint was written" in last and "Try a lower train.lr" in last
