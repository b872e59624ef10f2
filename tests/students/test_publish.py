"""`distill publish`: HF folder + model card + licence handling + verification + hub upload (mocked)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.artifacts import ArtifactError, manifest_hash, read_manifest, write_manifest
from core.config import ConfigError, load_config, save_config, to_dict
from evaluation.report import compute_gaps
from students.init import init_student
from students.licensing import meta_llama_version
from students.publish import publish
from teachers.resolve import load_tokenizer, teacher_identity

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def make_run(run, teacher_dir, *overrides, teacher_id=SMOLLM2_ID, eval_report=True, student_init=False):
    """A finished run: config.yaml, train/final (the teacher's weights, or with `student_init` the student
    stage's output, stand in for a trained student), a train manifest and optionally eval/report.json."""
    cfg = load_config(None, [f"teacher.model={teacher_dir}", "student.size=teacher-full",
                             "data.sources=[{name: general}, {name: web, kind: hf, path: HuggingFaceFW/fineweb-edu}]",
                             *overrides])
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    source = init_student(cfg, run) if student_init else teacher_dir
    shutil.copytree(source, run / "train" / "final", ignore=shutil.ignore_patterns("manifest.json"))
    identity = {**teacher_identity(str(teacher_dir), None, load_tokenizer(teacher_dir), 49152), "id": teacher_id}
    write_manifest(run / "train", "train", config=to_dict(cfg.train), teacher=identity, num_steps=12,
                   weights={"general": 0.5, "web": 0.5}, world_size=1, final="final")
    if eval_report:
        write_eval(run, {"ppl": (20.0, 25.0, False), "gsm8k_acc": (0.3, 0.15, True)})
    return cfg


def write_eval(run, metrics):
    models = {"teacher": {"role": "teacher", "path": "t", "metrics": {m: v[0] for m, v in metrics.items()}},
              "student": {"role": "student", "path": str(run / "train" / "final"),
                          "metrics": {m: v[1] for m, v in metrics.items()}}}
    report = {"teacher": "teacher", "models": models, "settings": {"limit": 20},
              "gap": compute_gaps(models, "teacher", {m: v[2] for m, v in metrics.items()})}
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "report.json").write_text(json.dumps(report))
    write_manifest(run / "eval", "eval", config={}, teacher=None, inputs={"student": run / "train"},
                   report=report["gap"])


def card_meta(folder):
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---", 2)[1]), text


def test_publish_writes_a_verified_hf_folder_with_model_card(tiny_teacher_dir, tmp_path, capsys):
    run = tmp_path / "run"
    make_run(run, tiny_teacher_dir)
    out = publish(run)
    assert out == run / "publish"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json", "README.md", "manifest.json"):
        assert (out / name).is_file(), name
    meta, text = card_meta(out)
    assert meta["base_model"] == SMOLLM2_ID and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["HuggingFaceFW/fineweb-edu"] and "distillation" in meta["tags"]
    assert "| gsm8k_acc | ↑ | 0.3000 | 0.1500 | 0.1500 | 50.0% |" in text
    assert "top-64" in text and "temperature 1.0" in text and "12 steps" in text and "annealing: none" in text
    assert "Built with Llama" not in text and not (out / "NOTICE").exists()
    manifest = read_manifest(out, "publish")
    assert manifest["verification"]["transformers"]["max_abs_logit_diff"] == 0.0
    assert manifest["inputs"] == {"student": manifest_hash(run / "train"), "eval": manifest_hash(run / "eval")}
    # What a user gets from the folder is the trained model.
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Hello there, distilled world.", return_tensors="pt")["input_ids"]
    published = AutoModelForCausalLM.from_pretrained(out).eval()
    trained = AutoModelForCausalLM.from_pretrained(run / "train" / "final").eval()
    with torch.no_grad():
        assert torch.equal(published(ids).logits, trained(ids).logits)
    assert "SmolLM2-135M-Instruct-distilled-teacher-full" in capsys.readouterr().out
    # The card's usage snippet runs as written (pointed at the local folder).
    snippet = text.split("```python\n", 1)[1].split("```", 1)[0]
    exec(snippet.replace('"SmolLM2-135M-Instruct-distilled-teacher-full"', repr(str(out))), {})


def test_publish_is_idempotent_and_redoes_work_when_inputs_change(tiny_teacher_dir, tmp_path, capsys):
    run = tmp_path / "run"
    make_run(run, tiny_teacher_dir)
    out = publish(run, tmp_path / "out")
    stamp = (out / "manifest.json").stat().st_mtime_ns
    publish(run, tmp_path / "out")
    assert (out / "manifest.json").stat().st_mtime_ns == stamp and "up to date" in capsys.readouterr().out
    write_eval(run, {"ppl": (20.0, 22.0, False)})
    publish(run, tmp_path / "out")
    assert "| ppl | ↓ | 20.000 | 22.000 | 2.000 | 90.9% |" in (out / "README.md").read_text()


def test_publish_without_eval_warns_and_says_so(tiny_teacher_dir, tmp_path, capsys):
    run = tmp_path / "run"
    make_run(run, tiny_teacher_dir, "student.size=tiny-2l", "student.init=scratch", eval_report=False,
             student_init=True)
    out = publish(run)
    _, text = card_meta(out)
    assert "eval stage has not run" in text
    assert "- size: `tiny-2l`, initialised from scratch" in text and "- parameters: 6,685,312 (6.7M)" in text
    assert "2 layers, hidden 128, 4 heads / 2 KV heads (head_dim 32), MLP 384, tied embeddings" in text
    assert "publish: warning: The eval stage has not run" in capsys.readouterr().out


def test_stale_eval_is_flagged(tiny_teacher_dir, tmp_path):
    run = tmp_path / "run"
    cfg = make_run(run, tiny_teacher_dir)
    write_manifest(run / "train", "train", config=to_dict(cfg.train), teacher=read_manifest(run / "train")["teacher"],
                   num_steps=24)
    _, text = card_meta(publish(run))
    assert "measured on an earlier version of the student" in text


def test_publish_refuses_to_replace_a_foreign_folder(tiny_teacher_dir, tmp_path):
    run = tmp_path / "run"
    make_run(run, tiny_teacher_dir)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not a published model folder"):
        publish(run, precious)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_publish_fails_and_leaves_nothing_when_the_reloaded_folder_differs(tiny_teacher_dir, tmp_path, monkeypatch):
    import students.publish as pub

    real_save = pub.save_hf_folder

    def corrupting_save(model, tokenizer, generation_config, folder):
        real_save(model, tokenizer, generation_config, folder)
        config = json.loads((folder / "config.json").read_text())
        config["rms_norm_eps"] = 0.5  # a plausible-looking config error that changes every logit
        (folder / "config.json").write_text(json.dumps(config))

    monkeypatch.setattr(pub, "save_hf_folder", corrupting_save)
    run = tmp_path / "run"
    make_run(run, tiny_teacher_dir)
    with pytest.raises(ArtifactError, match="logits differ from the trained model"):
        publish(run)
    assert not (run / "publish").exists()


@pytest.fixture
def llama_teacher(tiny_teacher_dir, tmp_path):
    """The tiny teacher dressed as a Meta Llama 3.2 checkpoint folder (model card licence + licence files)."""
    folder = tmp_path / "Llama-3.2-1B"
    shutil.copytree(tiny_teacher_dir, folder)
    (folder / "README.md").write_text("---\nlicense: llama3.2\nlibrary_name: transformers\n---\n# Llama 3.2\n")
    (folder / "LICENSE.txt").write_text("LLAMA 3.2 COMMUNITY LICENSE AGREEMENT ...\n")
    (folder / "USE_POLICY.md").write_text("Llama 3.2 Acceptable Use Policy ...\n")
    return folder


def test_meta_llama_teacher_gets_llama_name_and_notices(llama_teacher, tmp_path):
    run = tmp_path / "run"
    make_run(run, llama_teacher, teacher_id="meta-llama/Llama-3.2-1B")
    out = publish(run)
    meta, text = card_meta(out)
    manifest = read_manifest(out, "publish")
    assert manifest["name"].startswith("Llama") and manifest["name"] == "Llama-3.2-1B-distilled-teacher-full"
    assert meta["license"] == "llama3.2" and meta["base_model"] == "meta-llama/Llama-3.2-1B"
    assert "**Built with Llama**" in text and "# Llama-3.2-1B-distilled-teacher-full" in text
    assert "Llama 3.2 is licensed under the Llama 3.2 Community License" in (out / "NOTICE").read_text()
    assert (out / "LICENSE.txt").is_file() and (out / "USE_POLICY.md").is_file()


def test_meta_llama_teacher_refuses_a_non_llama_name_or_licence(llama_teacher, tmp_path):
    make_run(tmp_path / "a", llama_teacher, "publish.name=my-student", teacher_id="meta-llama/Llama-3.2-1B")
    with pytest.raises(ConfigError, match="publish.name: 'my-student'.*starting with 'Llama'"):
        publish(tmp_path / "a")
    make_run(tmp_path / "b", llama_teacher, "publish.license=apache-2.0", teacher_id="meta-llama/Llama-3.2-1B")
    with pytest.raises(ConfigError, match="publish.license"):
        publish(tmp_path / "b")
    make_run(tmp_path / "c", llama_teacher, "publish.name=Llama-tiny-student", teacher_id="meta-llama/Llama-3.2-1B")
    with pytest.raises(ConfigError, match="push_to_hub: 'me/tiny-student'"):
        publish(tmp_path / "c", push_to_hub="me/tiny-student")


@pytest.mark.parametrize(("teacher_id", "version"), [
    ("meta-llama/Llama-3.2-1B", "3.2"), ("meta-llama/Llama-3.1-8B-Instruct", "3.1"),
    ("meta-llama/Meta-Llama-3-8B", "3"), ("meta-llama/Llama-2-7b-hf", "2"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", None), ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", None),
    ("embedded:smollm2-135m-instruct", None),
])
def test_meta_llama_detection_by_id(teacher_id, version):
    assert meta_llama_version(teacher_id, None) == version


def test_llama_architecture_alone_is_not_meta_llama(tiny_teacher_dir):
    assert json.loads((tiny_teacher_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert meta_llama_version(str(tiny_teacher_dir), tiny_teacher_dir) is None


def test_push_to_hub_uploads_the_verified_folder(tiny_teacher_dir, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, **kw: calls.append(("create_repo", kw)))

    def fake_upload(self, **kw):
        calls.append(("upload_folder", kw))
        return "https://huggingface.co/me/student/commit/abc"

    monkeypatch.setattr(HfApi, "upload_folder", fake_upload)
    run = tmp_path / "run"
    make_run(run, tiny_teacher_dir)
    out = publish(run, push_to_hub="me/student")
    assert calls[0] == ("create_repo", {"repo_id": "me/student", "repo_type": "model", "exist_ok": True})
    name, kw = calls[1]
    assert name == "upload_folder" and kw["repo_id"] == "me/student" and kw["folder_path"] == str(out)
    assert kw["repo_type"] == "model" and kw["ignore_patterns"] == ["manifest.json"]
    assert 'from_pretrained("me/student")' in (out / "README.md").read_text()


@pytest.mark.slow
@pytest.mark.vllm
def test_publish_verifies_the_folder_in_vllm(tiny_teacher_dir, tmp_path):
    pytest.importorskip("vllm")
    run = tmp_path / "run"
    make_run(run, tiny_teacher_dir, "publish.verify_vllm=true")
    out = publish(run)
    figures = read_manifest(out, "publish")["verification"]["vllm"]
    assert figures["max_abs_logprob_diff"] <= 2e-3 and figures["positions"] > 100 and figures["k"] == 8
    assert "served with vllm" in (out / "README.md").read_text()
