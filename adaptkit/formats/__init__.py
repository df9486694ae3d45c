"""Readers (and, for convert, writers) of the on-disk adapter formats.

``detect_and_load`` looks at a path and hands it to the right reader: a PEFT folder
(:mod:`.peft`), an mlx-lm folder (:mod:`.mlx`), a single file of raw PEFT-named tensors
(:mod:`.raw`), or a kohya-style file (:mod:`.kohya`). :mod:`.gguf` writes llama.cpp adapters.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import AdaptkitError


def detect_and_load(path: Path, base_names=None):
    """``base_names``: the base checkpoint's tensor names, to map kohya names back to modules."""
    from . import kohya, mlx, peft, raw

    if not path.exists():
        raise AdaptkitError("no such adapter file or folder", path)
    if path.is_dir():
        if mlx.is_mlx_dir(path):
            return mlx.load_mlx_dir(path)
        return peft.load_peft_dir(path)
    if path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
        if path.suffix == ".safetensors":
            from ..io.safetensors_file import read_header

            names = [t.name for t in read_header(path).tensors]
            if kohya.is_kohya(names):
                raw.refuse_lycoris(names, path)
                return kohya.load_kohya_file(path, base_names)
        return raw.load_raw_file(path)
    raise AdaptkitError("not an adapter: expected a PEFT folder or a .safetensors file", path)
