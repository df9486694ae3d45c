"""A model checkpoint on disk, read lazily tensor by tensor.

A checkpoint is a folder in the Hugging Face layout: ``config.json`` plus ``model.safetensors``, or
shards ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``, or the legacy
``pytorch_model*.bin`` (loaded with ``weights_only=True``, memory-mapped, never full pickle). Nothing
is loaded when a checkpoint is opened: only headers are parsed. :meth:`Checkpoint.read` reads one
tensor, optionally into a caller's (pinned) buffer.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import AdaptkitError
from .layout import find_weight_files
from .files import open_regular, read_json, require_regular
from .safetensors_file import TensorInfo, itemsize, numel, read_header, read_into

WEIGHT_FILE_RE = re.compile(
    r"^(model|pytorch_model|adapter_model|tf_model|flax_model)(-\d+-of-\d+)?\.(safetensors|bin|h5|msgpack)$"
    r"|\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf)$|\.index\.json$")


@dataclass
class Shard:
    """One weight file of a checkpoint."""

    path: Path
    kind: str  # "safetensors" or "bin"
    tensors: list[TensorInfo]  # in file order (for .bin: the state dict's order, offsets unused)
    metadata: dict[str, str] = field(default_factory=dict)
    _fd: int | None = None
    _state: dict | None = None

    def fd(self) -> int:
        if self._fd is None:
            self._fd = open_regular(self.path, "weights file")
        return self._fd

    def state_dict(self) -> dict:
        if self._state is None:
            self._state = load_bin(self.path)
        return self._state

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._state = None


def load_bin(path: Path) -> dict:
    """Load a PyTorch ``.bin`` state dict safely (``weights_only=True``; memory-mapped where possible)."""
    require_regular(path, "weights file")
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # old (non-zip) serialisation cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except AdaptkitError:
        raise
    except Exception as e:  # pickle errors, zip errors, refused globals...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdaptkitError(f"cannot load as a weights-only PyTorch file: {first}", path) from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise AdaptkitError("not a state dict of tensors", path)
    return sd


class Checkpoint:
    """A base model folder: its config, its weight shards and where each tensor lives."""

    def __init__(self, path: Path, config: dict, shards: list[Shard], index_file: str | None):
        self.path = path
        self.config = config
        self.shards = shards
        self.index_file = index_file
        self.tensors: dict[str, tuple[Shard, TensorInfo]] = {}
        for shard in shards:
            for info in shard.tensors:
                self.tensors[info.name] = (shard, info)

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        path = Path(path)
        if not path.exists():
            raise AdaptkitError("no such model folder", path)
        if not path.is_dir():
            raise AdaptkitError("a base model must be a folder (config.json and weights)", path)
        config = {}
        cfg_path = path / "config.json"
        if os.path.lexists(cfg_path):
            config = read_json(cfg_path, "config.json")
        shards, index_file = _find_shards(path)
        return cls(path, config, shards, index_file)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name][1]

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for _, info in self.tensors.values())

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor as a CPU tensor of its stored dtype and shape.

        ``out``, when given, is a uint8 buffer (pinned, say) of at least the tensor's size; the result
        is a view into it.
        """
        shard, info = self.tensors[name]
        if shard.kind == "bin":
            t = shard.state_dict()[name]
            if out is not None:
                dst = out[: info.nbytes].view(t.dtype).view(t.shape)
                dst.copy_(t)
                return dst
            return t
        if out is None:
            out = torch.empty(info.nbytes, dtype=torch.uint8)
        buf = out[: info.nbytes]
        if info.nbytes:
            read_into(shard.fd(), info.offset, memoryview(buf.numpy()), shard.path)
        return buf.view(info.dtype).view(info.shape) if info.shape else buf.view(info.dtype).reshape(())

    def read_many(self, names: list[str], out: torch.Tensor) -> list[torch.Tensor]:
        """Read several tensors into consecutive slices of the uint8 buffer ``out`` (each starting
        where the previous one ends; the caller keeps each start aligned to its dtype), one read for
        every run of tensors stored back to back in one file. Returns the views, as :meth:`read`."""
        views, pos, i = [], 0, 0
        while i < len(names):
            shard, info = self.tensors[names[i]]
            j, end = i + 1, info.offset + info.nbytes
            while shard.kind == "safetensors" and j < len(names):
                nxt_shard, nxt = self.tensors[names[j]]
                if nxt_shard is not shard or nxt.offset != end:
                    break
                end, j = end + nxt.nbytes, j + 1
            if shard.kind == "safetensors" and end > info.offset:
                read_into(shard.fd(), info.offset, memoryview(out[pos:pos + end - info.offset].numpy()), shard.path)
            for name in names[i:j]:
                _, tinfo = self.tensors[name]
                if shard.kind == "safetensors":
                    buf = out[pos:pos + tinfo.nbytes].view(tinfo.dtype)
                    views.append(buf.view(tinfo.shape) if tinfo.shape else buf.reshape(()))
                else:
                    views.append(self.read(name, out=out[pos:]))
                pos += tinfo.nbytes
            i = j
        return views

    def close(self) -> None:
        for shard in self.shards:
            shard.close()


def _find_shards(path: Path) -> tuple[list[Shard], str | None]:
    found = find_weight_files(path)
    make = _safetensors_shard if found.kind == "safetensors" else _bin_shard
    shards = [make(p) for p in found.files]
    if found.index is not None:
        listed = {t.name for s in shards for t in s.tensors}
        missing = [n for n in found.weight_map if n not in listed]
        if missing:
            raise AdaptkitError(f"{len(missing)} tensors in the index are in no shard (first: {missing[0]})",
                                found.index)
    return shards, found.index.name if found.index is not None else None


def _safetensors_shard(p: Path) -> Shard:
    header = read_header(p)
    return Shard(p, "safetensors", header.tensors, header.metadata)


def _bin_shard(p: Path) -> Shard:
    sd = load_bin(p)
    infos = []
    for name, t in sd.items():
        infos.append(TensorInfo(name, t.dtype, tuple(t.shape), -1, numel(t.shape) * itemsize(t.dtype)))
    return Shard(p, "bin", infos, {"format": "pt"}, _state=sd)


def is_weight_file(name: str) -> bool:
    return bool(WEIGHT_FILE_RE.search(name))
