"""A PEFT folder every vLLM loads exactly.

vLLM's ``PEFTHelper`` (``vllm/lora/peft_helper.py``) reads only ``r``, ``lora_alpha`` and
``use_rslora`` from adapter_config.json and applies one scaling, lora_alpha / r (or / √r), to every
module: ``rank_pattern`` and ``alpha_pattern`` are ignored, so an adapter with per-module ranks or
alphas is scaled wrongly there. This writer folds each module's own scaling sₘ into its lora_B
(B' = sₘ·B, :func:`adaptkit.lora.fold`) and writes ``lora_alpha`` = ``r``, so the one scaling vLLM
applies is 1 and every module computes its own ΔW. ``pad_rank`` zero-pads every module to one rank
(exact: zero rows of A, zero columns of B add nothing). What vLLM cannot load at all
(modules_to_save, DoRA, LoRA biases, trainable tokens, aLoRA, LoRAs on expert parameters) is refused
with the reason (:mod:`adaptkit.readiness`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import lora
from ..adapter import PEFT_PREFIX, Adapter
from ..errors import AdaptkitError

FIXED_BY_EXPORT = {"scaling", "max_lora_rank"}  # what this writer makes right; everything else is refused


def write(adapter: Adapter, out: Path, *, pad_rank: int | None = None, dtype: torch.dtype | None = None, **_) -> dict:
    """``adapter_config.json`` + ``adapter_model.safetensors`` with one scaling (1) for vLLM."""
    from safetensors.torch import save_file

    from ..readiness import check

    problems = [p for p in check(adapter, "vllm").problems if p.rule not in FIXED_BY_EXPORT]
    if problems:
        p = problems[0]
        raise AdaptkitError(f"vLLM cannot take this adapter: {p.rule}: {p.detail} (fix: {p.fix})", adapter.path)
    mods = list(adapter.modules.values())
    if any(m.kind != "linear" or m.fan_in_fan_out for m in mods):
        odd = next(m.name for m in mods if m.kind != "linear" or m.fan_in_fan_out)
        raise AdaptkitError(f"{odd}: only nn.Linear LoRAs are written for vLLM (embedding and Conv1D LoRAs are not)",
                            adapter.path)
    top = max(m.shape_rank for m in mods)
    rank = pad_rank if pad_rank is not None else top
    if rank < top:
        raise AdaptkitError(f"pad_rank {pad_rank} is below the adapter's largest rank {top}", param="pad_rank")
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    tensors = {}
    for m in mods:
        pad = (rank - m.shape_rank) if pad_rank is not None else 0
        a = torch.nn.functional.pad(m.A.to(torch.float32), (0, 0, 0, pad))
        b = torch.nn.functional.pad(lora.fold(m.B.to(torch.float32), m.scaling, 1.0), (0, pad))
        tensors[f"{PEFT_PREFIX}{m.name}.lora_A.weight"] = cast(a).contiguous()
        tensors[f"{PEFT_PREFIX}{m.name}.lora_B.weight"] = cast(b).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "r": rank, "lora_alpha": rank, "use_rslora": False, "rank_pattern": {},
        "alpha_pattern": {}, "target_modules": sorted({m.name.rsplit(".", 1)[-1] for m in mods}), "use_dora": False,
        "lora_bias": False, "fan_in_fan_out": False, "modules_to_save": None, "bias": "none", "lora_dropout": 0.0,
        "init_lora_weights": True, "inference_mode": True, "task_type": adapter.config.get("task_type") or "CAUSAL_LM",
        "base_model_name_or_path": adapter.config.get("base_model_name_or_path"),
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config
