"""Readers and writers of the on-disk adapter formats, one module each, with one interface.

Every format module has ``read(path, base_names=None) -> Adapter`` (where it can be read) and
``write(adapter, out, ...)``. :func:`load_adapter` looks at a path and picks the reader: a PEFT
folder (:mod:`.peft`), an mlx-lm folder (:mod:`.mlx`), a single file of PEFT-named tensors
(:mod:`.raw`) or a kohya-style file (:mod:`.kohya`). :data:`TARGETS` lists what ``convert`` can
write, with the help text the CLI shows: the one place that says so.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdaptkitError


@dataclass(frozen=True)
class Target:
    """A format ``convert`` writes: its module's ``write(adapter, out, **options)`` writes it."""

    name: str
    summary: str
    suffix: str | None  # the file's suffix; None: a folder
    base: str  # "no", "optional" or "required": does the writer need the base model's config?

    def write(self, adapter, out: Path, **options) -> None:
        """Write ``adapter`` at ``out`` (a prepared temporary path). Options: ``dtype``,
        ``base_config``, ``base_path``, ``prefix`` (kohya), ``outtype`` (gguf); each writer takes
        what applies to it."""
        importlib.import_module(f"{__name__}.{self.name}").write(adapter, out, **options)


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("peft", "a folder peft loads (adapter_config.json + adapter_model.safetensors)", None, "no"),
    Target("raw", "one .safetensors file with peft's names, the config in its metadata", ".safetensors", "no"),
    Target("kohya", "one .safetensors file with kohya names (lora_down/lora_up/alpha)", ".safetensors", "no"),
    Target("gguf", "a llama.cpp adapter (needs the base model's config)", ".gguf", "required"),
    Target("mlx", "an mlx-lm adapter folder (one rank, DoRA as mlx-lm's dora, MoE experts on its switch_mlp; "
           "needs the base's layer count)", None, "required"),
    Target("vllm", "a PEFT folder vLLM loads exactly (each module's scaling folded into lora_B, one r; MoE experts "
           "as per-expert pairs, given the base)", None, "no"),
)}


def load_adapter(path: str | Path, base_names=None):
    """Open an adapter lazily: a PEFT folder, an mlx-lm folder, or a single ``.safetensors`` / ``.bin``
    file (PEFT names or kohya-style; ``base_names``, a base checkpoint's tensor names, resolve kohya
    names). Returns an :class:`adaptkit.Adapter`."""
    from . import kohya, mlx, peft, raw

    path = Path(path)
    if not path.exists():
        raise AdaptkitError("no such adapter file or folder", path)
    if path.is_dir():
        return (mlx if mlx.is_mlx_dir(path) else peft).read(path)
    if path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
        if path.suffix == ".safetensors":
            from ..io.safetensors_file import read_header

            names = [t.name for t in read_header(path).tensors]
            if kohya.is_kohya(names):
                raw.refuse_lycoris(names, path)
                return kohya.read(path, base_names)
        return raw.read(path)
    raise AdaptkitError("not an adapter: expected a PEFT folder or a .safetensors file", path)
