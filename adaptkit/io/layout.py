"""Which files of a model folder hold its weights, in reading order (no torch: the CLI asks before importing it).

The Hugging Face layouts: ``model.safetensors``; shards listed by ``model.safetensors.index.json``;
other single ``*.safetensors`` files; ``pytorch_model.bin`` or its shards with
``pytorch_model.bin.index.json``. :mod:`.checkpoint` parses what is found here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import AdaptkitError
from .files import read_json


@dataclass
class WeightFiles:
    kind: str  # "safetensors" or "bin"
    files: list[Path]  # in the order the index first names them (or name order)
    index: Path | None  # the shard index, when there is one
    weight_map: dict[str, str] | None = None  # the index's tensor name -> file


def find_weight_files(path: str | Path) -> WeightFiles:
    """The weight files of the model folder ``path``; a clear error when it holds none."""
    path = Path(path)
    st_index = path / "model.safetensors.index.json"
    bin_index = path / "pytorch_model.bin.index.json"
    if st_index.exists():
        return WeightFiles("safetensors", *_from_index(path, st_index))
    if (path / "model.safetensors").exists():
        return WeightFiles("safetensors", [path / "model.safetensors"], None)
    singles = [p for p in sorted(path.glob("*.safetensors")) if not p.name.startswith("adapter_model")]
    if singles:
        return WeightFiles("safetensors", singles, None)
    if bin_index.exists():
        return WeightFiles("bin", *_from_index(path, bin_index))
    if (path / "pytorch_model.bin").exists():
        return WeightFiles("bin", [path / "pytorch_model.bin"], None)
    if (path / "adapter_config.json").exists():
        raise AdaptkitError("this is a LoRA adapter, not a base model (pass it as ADAPTER)", path)
    raise AdaptkitError("no model weights found (expected model.safetensors, sharded safetensors with "
                        "model.safetensors.index.json, or pytorch_model.bin)", path)


def _from_index(path: Path, index: Path) -> tuple[list[Path], Path, dict[str, str]]:
    weight_map = read_json(index, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise AdaptkitError("malformed shard index: weight_map must map tensor names to file names", index)
    files = []
    for name in dict.fromkeys(weight_map.values()):
        p = path / name
        if Path(name).name != name or name in (".", ".."):
            raise AdaptkitError(f"malformed shard index: {name!r} is not a file name in the model folder", index)
        if not p.exists():
            raise AdaptkitError(f"shard {name} listed in the index is missing", index)
        files.append(p)
    return files, index, weight_map
