"""Atomic writes and manifests: a failed write leaves the old artifact; mismatched tokenizers are refused."""

import pytest

from core.artifacts import (
    ArtifactError,
    atomic_dir,
    atomic_write_text,
    check_compatible,
    read_manifest,
    write_manifest,
)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "stage"
    with atomic_dir(out) as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "x").write_text("2")
        raise RuntimeError("crash mid-stage")
    assert (out / "x").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]


def test_manifest_roundtrip_and_compatibility(tmp_path):
    teacher = {"id": "t", "tokenizer_hash": "abc", "vocab_size": 10}
    write_manifest(tmp_path, "capture", config={"k": 4}, teacher=teacher)
    manifest = read_manifest(tmp_path, "capture")
    check_compatible(manifest, tokenizer_hash="abc", vocab_size=10, where=tmp_path)
    with pytest.raises(ArtifactError, match="tokenizer"):
        check_compatible(manifest, tokenizer_hash="zzz", vocab_size=10, where=tmp_path)
    with pytest.raises(ArtifactError, match="vocab_size 10"):
        check_compatible(manifest, tokenizer_hash="abc", vocab_size=11, where=tmp_path)
    with pytest.raises(ArtifactError, match="expected a 'train' artifact"):
        read_manifest(tmp_path, "train")


def test_missing_manifest_names_file(tmp_path):
    with pytest.raises(ArtifactError, match="manifest.json: missing"):
        read_manifest(tmp_path / "nothing", "data")
