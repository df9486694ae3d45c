"""The PEFT adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors`` (or legacy ``.bin``)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import torch

from .. import lora
from ..adapter import TOKEN_DELTA, PEFT_PREFIX, Adapter, build_adapter, check_peft_type, pattern_key, validate_config
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
    return config


def read(path: Path, base_names=None) -> Adapter:
    """A PEFT adapter folder, opened lazily."""
    config = read_config(path)
    for name in WEIGHT_NAMES:
        weights = path / name
        if weights.exists():
            break
    else:
        raise AdaptkitError(f"no adapter weights ({' or '.join(WEIGHT_NAMES)})", path)
    source = open_source(weights)
    return build_adapter(path, weights, config, source, fmt="peft")


def write(adapter: Adapter, out: Path, *, dtype: torch.dtype | None = None, **_) -> None:
    """``adapter_config.json`` + ``adapter_model.safetensors`` as peft's save_pretrained writes them."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = peft_tensors(adapter, dtype)
    config = peft_config(adapter)
    save_file({PEFT_PREFIX + k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHT_NAMES[0]),
              metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def peft_tensors(adapter: Adapter, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's names (without the ``base_model.model.`` prefix)."""
    def cast(t):
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    out = {}
    for m in adapter.modules.values():
        a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if m.kind == "embedding" else ("lora_A.weight", "lora_B.weight")
        out[f"{m.name}.{a_name}"] = cast(m.A)
        out[f"{m.name}.{b_name}"] = cast(m.B)
        if m.magnitude_key:
            out[f"{m.name}.lora_magnitude_vector"] = cast(m.magnitude)
        if m.bias_key:
            out[f"{m.name}.lora_B.bias"] = cast(m.lora_bias)
    embedding_modules = {m.name for m in adapter.modules.values() if m.kind == "embedding"}
    for name in adapter.full_tensors:
        mod, _, param = name.rpartition(".")
        key = f"{mod}.base_layer.{param}" if mod in embedding_modules else name
        out[key] = cast(adapter.full_tensor(name))
    for mod, (_, key) in adapter.token_rows.items():
        out[mod + TOKEN_DELTA] = cast(adapter.source.get(key))
    return out


def peft_config(adapter: Adapter) -> dict:
    """A peft LoraConfig (as a dict) under which every module gets its exact rank and scaling."""
    original = adapter.config if adapter.format in ("peft", "raw") and "r" in adapter.config else None
    if original is not None and _config_reproduces(original, adapter):
        return dict(original)
    if any(m.param or m.kind == "param" for m in adapter.modules.values()):
        # a target_parameters LoRA's rank and scaling are its config's patterns applied to the parameter
        # the base tells (MoE experts): only the config it came with says that
        raise AdaptkitError("LoRAs on parameters (target_parameters, MoE experts) are kept only with the config "
                            "they came with, which no longer gives every module its rank", adapter.path)
    mods = list(adapter.modules.values())
    if not mods:
        raise AdaptkitError("the adapter holds no LoRA modules", adapter.path)
    dora = {m.use_dora for m in mods}
    if len(dora) > 1:
        raise AdaptkitError("some modules use DoRA and some do not: peft's config cannot express that", adapter.path)
    ranks = {m.name: m.shape_rank for m in mods}
    alphas = {m.name: lora.alpha_for(m.scaling, m.shape_rank) for m in mods}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    embedding = {m.name for m in mods if m.kind == "embedding"}
    bias = adapter.config.get("bias", "none")
    saved = [n for n in adapter.full_tensors if bias == "none" or not n.endswith(".bias")]
    mts = sorted({n.rpartition(".")[0] for n in saved} - embedding)
    cfg = {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha,
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
        "target_modules": sorted(ranks), "use_rslora": False, "use_dora": dora.pop(),
        "lora_bias": any(m.bias_key for m in mods), "fan_in_fan_out": any(m.fan_in_fan_out for m in mods),
        "modules_to_save": mts or None, "lora_dropout": 0.0, "bias": bias, "init_lora_weights": True,
        "inference_mode": True, "base_model_name_or_path": adapter.config.get("base_model_name_or_path"),
        "task_type": adapter.config.get("task_type"),
    }
    if adapter.token_rows:
        cfg["trainable_token_indices"] = {mod: ids for mod, (ids, _) in adapter.token_rows.items()}
    if adapter.alora_tokens:
        cfg["alora_invocation_tokens"] = adapter.alora_tokens
    return cfg


def _config_reproduces(config: dict, adapter: Adapter) -> bool:
    """Whether ``config`` still gives every module its rank and scaling (it does unless edited)."""
    rp, ap = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    for m in adapter.modules.values():
        if m.kind == "param" or m.param:  # told by the base, from this same config: nothing to compare
            continue
        k = pattern_key(rp, m.name)
        r = int(rp[k]) if k is not None else int(config["r"])
        k = pattern_key(ap, m.name)
        alpha = ap[k] if k is not None else config.get("lora_alpha", 8)
        if r != m.shape_rank or lora.scaling(alpha, r, bool(config.get("use_rslora"))) != m.scaling:
            return False
    return True
