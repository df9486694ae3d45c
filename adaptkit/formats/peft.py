"""The PEFT adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors`` (or legacy ``.bin``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..adapter import Adapter, build_adapter, check_peft_type, validate_config
from ..errors import AdaptkitError
from ..io.files import read_json
from .sources import open_source

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")


def read_config(path: Path) -> dict:
    cfg_path = path / CONFIG_NAME
    if not os.path.lexists(cfg_path):
        subdirs = [p.name for p in path.iterdir() if (p / CONFIG_NAME).exists()] if path.is_dir() else []
        hint = f" (adapters found in subfolders: {', '.join(sorted(subdirs))})" if subdirs else ""
        raise AdaptkitError(f"no {CONFIG_NAME} here: not a PEFT adapter folder{hint}", path)
    config = read_json(cfg_path, "adapter config")
    if "peft_type" not in config:
        raise AdaptkitError("malformed adapter config: no peft_type", cfg_path)
    check_peft_type(config, cfg_path)
    validate_config(config, cfg_path)
    _refuse_unsupported(config, cfg_path)
    return config


def _refuse_unsupported(config: dict, cfg_path: Path) -> None:
    if config.get("layer_replication"):
        raise AdaptkitError("layer_replication is not supported (the adapter changes the model's layer layout)", cfg_path)
    if config.get("target_parameters"):
        raise AdaptkitError("target_parameters (LoRA on raw nn.Parameters) is not supported yet", cfg_path)


def load_peft_dir(path: Path) -> Adapter:
    config = read_config(path)
    for name in WEIGHT_NAMES:
        weights = path / name
        if weights.exists():
            break
    else:
        raise AdaptkitError(f"no adapter weights ({' or '.join(WEIGHT_NAMES)})", path)
    source = open_source(weights)
    return build_adapter(path, weights, config, source, fmt="peft")


def write_peft_dir(out: Path, tensors: dict, config: dict) -> None:
    """``adapter_config.json`` + ``adapter_model.safetensors`` as peft's save_pretrained writes them."""
    from safetensors.torch import save_file

    from ..adapter import PEFT_PREFIX

    out.mkdir(parents=True, exist_ok=True)
    save_file({PEFT_PREFIX + k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHT_NAMES[0]),
              metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
