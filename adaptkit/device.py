"""Where the arithmetic runs: ``auto`` picks CUDA when there is one, else the CPU."""

from __future__ import annotations

import torch

from .errors import AdaptkitError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AdaptkitError("--device cuda was asked for, but PyTorch sees no CUDA device")
    return dev
