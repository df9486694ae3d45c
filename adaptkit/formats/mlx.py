"""mlx-lm LoRA adapters: ``adapters.safetensors`` + ``adapter_config.json``.

mlx-lm's LoRALinear computes y = W·x + scale · (x @ lora_a) @ lora_b with lora_a (in × r) and
lora_b (r × out), the transposes of PEFT's A and B, and one absolute ``scale`` in
``lora_parameters`` (no alpha). Each module's own scaling sₘ is folded into its lora_b so one scale
is exact: lora_b = (sₘ / scale) · Bᵀ. LoRA goes on the last ``num_layers`` layers for the ``keys``
listed (module paths inside a layer); weights it finds no tensor for start at zero (no change).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch

from .. import lora
from ..adapter import Adapter, build_adapter
from ..errors import AdaptkitError
from ..io.files import read_json
from .sources import DictSource, open_source

WEIGHTS = "adapters.safetensors"
CONFIG = "adapter_config.json"
_LAYER = re.compile(r"^(?P<prefix>.*?\.layers\.)(?P<i>\d+)\.(?P<key>.+)$")


def is_mlx_dir(path: Path) -> bool:
    cfg = path / CONFIG
    if not (path / WEIGHTS).exists() or not cfg.exists():
        return False
    try:
        return "lora_parameters" in read_json(cfg, "adapter config")
    except AdaptkitError:
        return False


def write(adapter: Adapter, out: Path, *, base_config: dict | None = None, **_) -> dict:
    """``adapters.safetensors`` + ``adapter_config.json`` as mlx-lm reads them. mlx-lm adapts the last
    ``num_layers`` layers: the base's layer count when its config is given, else the adapter's last
    layer + 1."""
    num_layers = int((base_config or {}).get("num_hidden_layers", 0) or 0) or None
    from safetensors.torch import save_file

    from ..readiness import require

    require(adapter, "mlx")  # Linear LoRA inside numbered layers only
    mods = list(adapter.modules.values())
    scale = Counter(m.scaling for m in mods).most_common(1)[0][0]
    tensors, keys, layers = {}, set(), []
    for m in mods:
        match = _LAYER.match(m.name)
        keys.add(match["key"])
        layers.append(int(match["i"]))
        tensors[f"{m.name}.lora_a"] = m.A.to(torch.float32).T.contiguous()
        tensors[f"{m.name}.lora_b"] = lora.fold(m.B.to(torch.float32).T, m.scaling, scale).contiguous()
    # mlx-lm adapts the last num_layers layers: the model's layer count covers every layer
    n = num_layers or (max(layers) + 1)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "mlx"})
    rank = Counter(m.shape_rank for m in mods).most_common(1)[0][0]
    config = {"fine_tune_type": "lora", "num_layers": n,
              "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": sorted(keys)},
              "base_model_name_or_path": adapter.config.get("base_model_name_or_path")}
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return config


def read(path: Path, base_names=None) -> Adapter:
    """An mlx-lm adapter folder."""
    config = read_json(path / CONFIG, "adapter config")
    ftype = config.get("fine_tune_type", "lora")
    if ftype != "lora":
        raise AdaptkitError(f"mlx-lm fine_tune_type {ftype!r} is not supported (LoRA only)", path / CONFIG)
    params = config.get("lora_parameters") or {}
    scale = params.get("scale", 20.0) if isinstance(params, dict) else None  # 20: mlx-lm's default scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise AdaptkitError(f"malformed mlx-lm config: lora_parameters.scale must be a finite number, got {scale!r}",
                            path / CONFIG)
    source = open_source(path / WEIGHTS)
    tensors, alphas = {}, {}
    for key in source.keys():
        if key.endswith(".lora_a"):
            mod = key[: -len(".lora_a")]
            if mod + ".lora_b" not in source.keys():
                raise AdaptkitError(f"{mod}: lora_a without lora_b", path / WEIGHTS)
            a = source.get(key).T.contiguous()
            b = source.get(mod + ".lora_b").T.contiguous()
            tensors[f"{mod}.lora_A.weight"] = a
            tensors[f"{mod}.lora_B.weight"] = b
            alphas[mod] = scale * a.shape[0]  # scaling = alpha / r = scale
        elif not key.endswith(".lora_b"):
            raise AdaptkitError(f"unexpected tensor {key!r} in an mlx-lm adapter", path / WEIGHTS)
    cfg = {"peft_type": "LORA", "base_model_name_or_path": config.get("base_model_name_or_path")}
    adapter = build_adapter(path, path / WEIGHTS, {}, DictSource(path / WEIGHTS, tensors), fmt="mlx",
                            infer_alpha=alphas)
    adapter.config = cfg
    return adapter
