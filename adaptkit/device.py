"""Where the arithmetic runs: ``auto`` picks CUDA when there is one, else the CPU."""

from __future__ import annotations

import re

import torch

from .errors import AdaptkitError

CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``/None (CUDA when PyTorch sees one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if isinstance(device, torch.device):
        device = str(device)
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device.strip().lower()):
        raise AdaptkitError(f"unknown device {device!r} (choose {CHOICES})", param="device")
    dev = torch.device(device.strip().lower())
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise AdaptkitError(f"{device!r} was asked for, but PyTorch sees no CUDA device", param="device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise AdaptkitError(f"{device!r}: PyTorch sees {torch.cuda.device_count()} CUDA devices "
                                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})", param="device")
    return dev
