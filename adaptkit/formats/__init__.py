"""Readers (and, for convert, writers) of the on-disk adapter formats.

``detect_and_load`` looks at a path and hands it to the right reader: a PEFT folder
(:mod:`.peft`), or a single file of raw PEFT-named tensors (:mod:`.raw`).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import AdaptkitError


def detect_and_load(path: Path):
    from . import peft, raw

    if not path.exists():
        raise AdaptkitError("no such adapter file or folder", path)
    if path.is_dir():
        return peft.load_peft_dir(path)
    if path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
        return raw.load_raw_file(path)
    raise AdaptkitError("not an adapter: expected a PEFT folder or a .safetensors file", path)
