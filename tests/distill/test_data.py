"""The data stage: packed rows with restarting position ids, per-domain held-out rows, clear input errors."""

import json
from pathlib import Path

import pytest

from core.config import load_config
from distill.data import Document, build_data, load_split, pack

ROOT = Path(__file__).resolve().parents[2]


def test_pack_restarts_positions_and_masks_document_starts():
    docs = [Document([1, 2, 3], [1, 1, 1]), Document([4, 5, 6, 7, 8], [1, 0, 1, 1, 1])]
    rows = pack(iter(docs), seq_len=4, max_rows=None)
    assert rows["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert rows["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 2, 3]]
    # the first token of each document (and of a continued one) is never a target
    assert rows["loss_mask"].tolist() == [[0, 1, 1, 0], [0, 1, 1, 1]]


def test_build_data_on_builtin_mix(tmp_path, tiny_run_overrides):
    cfg = load_config(ROOT / "configs/tiny.yaml", tiny_run_overrides)
    out = build_data(cfg, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    train, held = load_split(out, "train"), load_split(out, "heldout")
    assert manifest["domains"] == ["code", "general", "math"]
    assert train["input_ids"].shape == (manifest["num_train"], 64)
    assert manifest["num_train"] * 64 >= cfg.data.train_tokens
    assert held["input_ids"].shape == (6, 64)  # 2 rows per domain
    assert sorted(set(held["domain"].tolist())) == [0, 1, 2]
    assert manifest["teacher"]["vocab_size"] == 49152 and len(manifest["teacher"]["tokenizer_hash"]) == 16
    # about half of the rows are general text, as weighted
    general = (train["domain"] == 1).mean()
    assert 0.4 < general < 0.6
    # rerun is a no-op on a complete stage
    mtime = (out / "manifest.json").stat().st_mtime_ns
    build_data(cfg, tmp_path)
    assert (out / "manifest.json").stat().st_mtime_ns == mtime


def test_jsonl_source_errors_name_the_line(tmp_path, tiny_run_overrides):
    bad = tmp_path / "corpus.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text field"}) + "\n")
    cfg = load_config(ROOT / "configs/tiny.yaml", tiny_run_overrides + [
        f"data.sources=[{{name: mine, kind: jsonl, domain: general, path: {bad}}}]"])
    with pytest.raises(ValueError, match=r"corpus.jsonl:2: expected a JSON object with a 'text' field"):
        build_data(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "data").exists()
