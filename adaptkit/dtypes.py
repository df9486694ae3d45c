"""Names of dtypes, as users, configs and transformers write them: one table for the whole package."""

from __future__ import annotations

import torch

from .errors import AdaptkitError

NAMES: dict[str, torch.dtype] = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "uint8": torch.uint8, "int8": torch.int8,
}
FLOATS = ("float16", "bfloat16", "float32")  # what an output may be converted to
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def parse_dtype(value, allowed=FLOATS, param: str = "dtype", path=None) -> torch.dtype:
    """A torch dtype from a name ('bfloat16', 'torch.float16', 'bf16') or a dtype, one of ``allowed``."""
    if isinstance(value, torch.dtype):
        dtype = value
    else:
        dtype = NAMES.get(str(value).lower().removeprefix("torch."))
    if dtype is None or name_of(dtype) not in allowed:
        raise AdaptkitError(f"unknown dtype {value!r} (choose {', '.join(allowed)})", path, param=param)
    return dtype


def resolve_dtype(value, param: str = "dtype") -> torch.dtype | None:
    """The output dtype of floating tensors: None for 'auto' (each keeps its own)."""
    if value is None or value == "auto":
        return None
    return parse_dtype(value, FLOATS, param)


def name_of(dtype: torch.dtype) -> str:
    """'float16' for torch.float16 (as config.json writes it)."""
    return str(dtype).removeprefix("torch.")
