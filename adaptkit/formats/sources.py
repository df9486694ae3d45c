"""Lazy tensor sources for adapter files (small files: the safetensors package reads them)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..io.checkpoint import load_bin
from ..errors import AdaptkitError
from ..io.safetensors_file import read_header


class SafetensorsSource:
    """Tensors of one safetensors file, each read on first use."""

    def __init__(self, path: Path):
        self.path = path
        header = read_header(path)  # validates offsets and truncation with a clear message
        self.metadata = header.metadata
        self._info = {t.name: t for t in header.tensors}
        self._handle = None
        self._cache: dict[str, torch.Tensor] = {}

    def keys(self) -> list[str]:
        return list(self._info)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self._info[key].dtype

    def get(self, key: str) -> torch.Tensor:
        t = self._cache.get(key)
        if t is None:
            try:
                if self._handle is None:
                    self._handle = safe_open(str(self.path), framework="pt", device="cpu")
                t = self._handle.get_tensor(key)
            except SafetensorError as e:
                raise AdaptkitError(f"cannot read tensor {key!r}: {e}", self.path) from None
            self._cache[key] = t
        return t


class DictSource:
    """Tensors of an in-memory (or memory-mapped ``.bin``) state dict."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
        self.path = path
        self._tensors = tensors
        self.metadata = metadata or {}

    @classmethod
    def from_bin(cls, path: Path) -> "DictSource":
        return cls(path, load_bin(path))

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]


def open_source(path: Path):
    if path.suffix == ".safetensors":
        return SafetensorsSource(path)
    return DictSource.from_bin(path)
