"""A single file of PEFT-named LoRA tensors (``…q_proj.lora_A.weight``), with or without a config.

adaptkit's own raw files keep the adapter config as JSON in the safetensors metadata under
``adapter_config``, so converting back is lossless. Without it, ranks come from the shapes and
alphas from ``lora_alpha`` metadata if any, else alpha = r (with a note).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..adapter import PEFT_PREFIX, Adapter, build_adapter
from ..errors import AdaptkitError
from .sources import open_source

CONFIG_METADATA_KEY = "adapter_config"

LYCORIS_MARKERS = {
    "hada_w1_a": "LoHa", "hada_w2_a": "LoHa", "lokr_w1": "LoKr", "lokr_w2": "LoKr",
    "lora_mid": "LoCon/Tucker", "oft_blocks": "OFT", ".a1.weight": "GLoRA", ".diff": "full diff",
}


def refuse_lycoris(keys, path: Path) -> None:
    for key in keys:
        for marker, what in LYCORIS_MARKERS.items():
            if marker in key:
                raise AdaptkitError(f"this is a LyCORIS {what} network (tensor {key!r}); only LoRA is supported", path)


def read(path: Path, base_names=None) -> Adapter:
    """A single safetensors (or .bin) file of PEFT-named tensors."""
    source = open_source(path)
    keys = source.keys()
    refuse_lycoris(keys, path)
    if not any(".lora_" in k for k in keys):
        raise AdaptkitError("no LoRA tensors found (expected names like '…q_proj.lora_A.weight')", path)
    metadata = getattr(source, "metadata", {}) or {}
    config = {}
    if CONFIG_METADATA_KEY in metadata:
        try:
            config = json.loads(metadata[CONFIG_METADATA_KEY])
        except ValueError as e:
            raise AdaptkitError(f"malformed adapter_config in the file's metadata: {e}", path) from None
        if not isinstance(config, dict):
            raise AdaptkitError("malformed adapter_config in the file's metadata: not a JSON object", path)
    elif "lora_alpha" in metadata:
        try:
            config = {"peft_type": "LORA", "lora_alpha": float(metadata["lora_alpha"])}
        except ValueError:
            pass
    return build_adapter(path, path, config, source, fmt="raw")


def write(adapter: Adapter, path: Path, *, dtype=None, **_) -> None:
    """One safetensors file, peft's tensor names, the adapter config in the metadata (lossless)."""
    from safetensors.torch import save_file

    from .peft import peft_config, peft_tensors

    tensors, config = peft_tensors(adapter, dtype), peft_config(adapter)
    save_file({PEFT_PREFIX + k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt", CONFIG_METADATA_KEY: json.dumps(config, sort_keys=True)})
