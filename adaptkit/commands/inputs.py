"""Opening what a command reads: paths or Hub ids (a local path wins), or objects already open."""

from __future__ import annotations

from pathlib import Path

from ..adapter import Adapter
from ..formats import load_adapter
from ..hub import resolve
from ..io.checkpoint import Checkpoint


def open_base(base) -> Checkpoint:
    """A model folder, a Hub id ``org/name[@revision]`` (pulled into the cache), or an open Checkpoint."""
    if isinstance(base, Checkpoint):
        return base
    return Checkpoint.open(resolve(base))


def open_adapter(adapter, base_names=None) -> Adapter:
    """A path, a Hub id or an :class:`Adapter` already loaded."""
    if isinstance(adapter, Adapter):
        return adapter
    return load_adapter(resolve(adapter, adapter_only=True), base_names=base_names)


def open_adapters(adapters) -> list[Adapter]:
    return [open_adapter(a) for a in adapters]


def read_paths(ckpt: Checkpoint | None, adapters: list[Adapter]) -> list[Path]:
    """Every file and folder a command reads: an output may be none of them, nor hold or lie in one."""
    paths = [p for a in adapters for p in (a.path, a.weights_path)]
    if ckpt is not None:
        paths += [ckpt.path, *(s.path for s in ckpt.shards)]
    return paths
