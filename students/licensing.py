"""The published model's name and licence, and the notices a Llama-derived model must carry.

A student distilled from a Meta Llama checkpoint is a derivative of the "Llama Materials": the Llama 3.1+
community licences require "Llama" at the start of the model's name, "Built with Llama" displayed on the
model card, a copy of the licence passed on, and the attribution notice "Llama 3.x is licensed under the
Llama 3.x Community License, Copyright © Meta Platforms, Inc. All Rights Reserved." (Llama 3.0: name starting
with "Llama 3" and "Built with Meta Llama 3"). Only Meta Llama checkpoints trigger this — not every model
with the LLaMA architecture: SmolLM2 is a LlamaForCausalLM under Apache-2.0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from core.config import ConfigError, PublishConfig

# Licences of teachers whose folders carry no model card (the embedded SmolLM2 is converted from a GGUF).
KNOWN_LICENSES = {"HuggingFaceTB/SmolLM2-": "apache-2.0"}
# Files of a Meta Llama repository that the licence asks to pass on with derivatives.
LLAMA_LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "USE_POLICY.md", "NOTICE", "NOTICE.txt")

_LLAMA_NAME = re.compile(r"^(meta-)?llama-?(\d+)(?:\.(\d+))?", re.IGNORECASE)
_CARD_LICENSE = re.compile(r"^license:\s*['\"]?([\w.\-]+)", re.MULTILINE)


@dataclass
class LicensePlan:
    """What the published folder says about its licence.

    `license` is the Hugging Face licence id for the card metadata; `built_with` the line the card must show
    (Meta Llama only); `notice` the attribution text written to NOTICE; `copy_files` teacher files to pass on.
    """

    name: str
    license: str
    meta_llama_version: str | None = None
    name_prefix: str | None = None  # what the model (and hub repository) name must start with
    built_with: str | None = None
    notice: str | None = None
    copy_files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def teacher_card_license(teacher_dir: Path | None) -> str | None:
    """The `license:` field of the teacher folder's model card (README.md YAML header), if any."""
    readme = Path(teacher_dir) / "README.md" if teacher_dir else None
    if readme is None or not readme.is_file():
        return None
    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    header = text.split("---", 2)[1]
    match = _CARD_LICENSE.search(header)
    return match.group(1).lower() if match else None


def meta_llama_version(teacher_id: str, teacher_dir: Path | None) -> str | None:
    """"3.2", "3", "2", … when the teacher is a Meta Llama checkpoint, else None.

    Recognised by the hub organisation (meta-llama/…), a repository name that starts with Llama-N or
    Meta-Llama-N, or a teacher model card whose licence is a Llama licence (llama2, llama3.1, …).
    """
    card = teacher_card_license(teacher_dir)
    if card and (m := re.fullmatch(r"llama(\d+)(?:\.(\d+))?", card)):
        return m.group(1) + (f".{m.group(2)}" if m.group(2) else "")
    base = teacher_id.rstrip("/").split("/")[-1]
    m = _LLAMA_NAME.match(base)
    if m:
        return m.group(2) + (f".{m.group(3)}" if m.group(3) else "")
    if teacher_id.lower().startswith("meta-llama/"):
        return "3"  # a meta-llama repository without a version in its name: the strictest 3.x rules apply
    return None


def _sanitize(name: str) -> str:
    """A hub-safe repository name: letters, digits, '.', '_' and '-'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")


def _llama_rules(version: str) -> tuple[str | None, str | None, str]:
    """(required name prefix, "Built with" line, attribution notice) of a Llama licence version."""
    major, _, minor = version.partition(".")
    if major == "2":
        return None, None, ("Llama 2 is licensed under the LLAMA 2 Community License, "
                            "Copyright (c) Meta Platforms, Inc. All Rights Reserved.")
    if major == "3" and not minor:
        return "Llama-3", "Built with Meta Llama 3", ("Meta Llama 3 is licensed under the Meta Llama 3 Community "
                                                      "License, Copyright © Meta Platforms, Inc. All Rights Reserved.")
    return "Llama", "Built with Llama", (f"Llama {version} is licensed under the Llama {version} Community License, "
                                         "Copyright © Meta Platforms, Inc. All Rights Reserved.")


def plan_license(cfg: PublishConfig, teacher_id: str, teacher_dir: Path | None, size: str) -> LicensePlan:
    """Decide the model name and licence, enforcing the Llama licence terms for Meta Llama teachers.

    An explicit `publish.name` that breaks the naming rule, or an explicit `publish.license` other than the
    teacher's Llama licence, is refused (ConfigError naming the field) rather than silently changed.
    """
    base = teacher_id.rstrip("/").split("/")[-1]
    version = meta_llama_version(teacher_id, teacher_dir)
    derived = _sanitize(f"{re.sub(r'^Meta-', '', base, flags=re.IGNORECASE)}-distilled-{size}")
    name = _sanitize(cfg.name) if cfg.name else derived
    if version is None:
        license_id = cfg.license or teacher_card_license(teacher_dir) or next(
            (lic for prefix, lic in KNOWN_LICENSES.items() if teacher_id.startswith(prefix)), None)
        plan = LicensePlan(name=name, license=license_id or "other")
        if license_id is None:
            plan.warnings.append(f"the licence of teacher {teacher_id} is unknown: set publish.license "
                                 "(the card says 'other' for now)")
        return plan
    prefix, built_with, notice = _llama_rules(version)
    llama_license = teacher_card_license(teacher_dir) or f"llama{version}"
    if cfg.license and cfg.license.lower() != llama_license:
        raise ConfigError(f"publish.license: {cfg.license!r} — a model distilled from the Meta Llama teacher "
                          f"{teacher_id} is bound by its licence ({llama_license}); leave publish.license empty")
    if prefix is not None and not name.startswith(prefix):
        if cfg.name:
            raise ConfigError(f"publish.name: {cfg.name!r} — the Llama {version} licence requires a model built "
                              f"from {teacher_id} to have a name starting with {prefix!r}")
        recased = "Llama" + name[5:]  # a derived name from a lower-case repo id ("llama-3.2-1b-…")
        name = recased if recased.startswith(prefix) else f"{prefix}-{name}"
    copy_files = [Path(teacher_dir) / f for f in LLAMA_LICENSE_FILES
                  if teacher_dir and (Path(teacher_dir) / f).is_file()]
    plan = LicensePlan(name=name, license=llama_license, meta_llama_version=version, name_prefix=prefix,
                       built_with=built_with, notice=notice, copy_files=copy_files)
    if not any(p.name.startswith("LICENSE") for p in copy_files):
        plan.warnings.append(f"the teacher folder has no LICENSE file to pass on: add the Llama {version} "
                             "Community License text to the published folder before distributing it")
    return plan
