"""Write a student as a standard Hugging Face folder that every consumer reads the same way.

`save_pretrained` gives safetensors + config.json; we add the tokenizer (with its chat template), the
generation config, and spell out fields that older transformers (inside vLLM or lm-eval installs) would read
differently: `rope_theta` at the top level of config.json (4.x ignores `rope_parameters` and falls back to
10000) and a `tokenizer_class` 4.x knows (`TokenizersBackend`, the 5.x generic name, becomes
`PreTrainedTokenizerFast`, which loads tokenizer.json in every version; a specific class is kept).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from students.configs import rope_theta_of


def load_generation_config(folder: Path, model_config: Any) -> Any:
    """The folder's generation_config.json, or one derived from the model config (bos/eos/pad ids)."""
    from transformers import GenerationConfig

    if (Path(folder) / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(folder)
    return GenerationConfig.from_model_config(model_config)


def save_hf_folder(model: Any, tokenizer: Any, generation_config: Any, folder: Path) -> None:
    """Save `model` (safetensors), `tokenizer` and `generation_config` into `folder`, consumer-proofed."""
    folder = Path(folder)
    model.generation_config = generation_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    generation_config.save_pretrained(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["rope_theta"] = rope_theta_of(model.config)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    tok_cfg_path = folder / "tokenizer_config.json"
    if tok_cfg_path.is_file():
        tok_cfg = json.loads(tok_cfg_path.read_text())
        if tok_cfg.get("tokenizer_class") in (None, "TokenizersBackend"):
            tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
            tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
