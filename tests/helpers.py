"""What the tests share, in one place: fixture paths, oracles (peft's own merge, ΔW and layers),
tolerance checks, and the reliability helpers (one-line errors, input snapshots, a hang guard).
Test files import from here, never from one another; conftest.py holds only pytest fixtures."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file

from adaptkit.cli import main
from fixtures import build

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
TINY_LLAMA = FIXTURES / "tiny-llama"
TINY_GPT2 = FIXTURES / "tiny-gpt2"
ADAPTERS = {name: FIXTURES / "adapters" / name for name in build.ADAPTERS}
BASE_OF = {name: FIXTURES / base for name, (base, _) in build.ADAPTERS.items()}
FAMILY_ADAPTERS = {name: FIXTURES / "adapters" / name for name in build.FAMILY_ADAPTERS}
FAMILY_BASE_OF = {name: FIXTURES / base for name, (base, _) in build.FAMILY_ADAPTERS.items()}

def load_dir(path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in a folder, read with the safetensors package."""
    out = {}
    for f in sorted(glob.glob(str(Path(path) / "*.safetensors"))):
        out.update(load_file(f))
    return out


def assert_merge_close(ours: torch.Tensor, ref: torch.Tensor, base: torch.Tensor, ulps: float = 2.0, name="",
                       atol: float = 0.0):
    """|ours - ref| within ``ulps`` units of the output dtype, measured on the size of W and ΔW.

    peft rounds the base into the output dtype, rounds ΔW, then rounds the sum; adaptkit rounds once,
    so they can differ by a few units at the scale of |W| + |ΔW|.
    """
    assert ours.dtype == ref.dtype, name
    assert ours.shape == ref.shape, name
    eps = torch.finfo(ours.dtype).eps if ours.is_floating_point() else 0
    o, r, b = ours.double(), ref.double(), base.double()
    bound = ulps * eps * (b.abs() + (r - b).abs() + r.abs()) + atol + 1e-30
    excess = ((o - r).abs() - bound).max().item()
    assert excess <= 0, f"{name}: off by more than {ulps} ulps (worst excess {excess:.3g})"


def peft_merged(base_path, adapter_paths, dtype=torch.float32):
    """peft's own merge: base in ``dtype`` + adapters loaded with PeftModel, merge_and_unload."""
    from peft import PeftModel

    model = build.load_model(base_path, dtype=dtype)
    names = []
    pm = None
    for i, path in enumerate(adapter_paths):
        name = f"a{i}"
        if pm is None:
            pm = PeftModel.from_pretrained(model, path, adapter_name=name)
        else:
            pm.load_adapter(path, adapter_name=name)
        names.append(name)
    pm.base_model.set_adapter(names)
    return pm, pm.merge_and_unload()


def peft_deltas(base, adapter_dir):
    """peft's own ΔW per module, canonical (out, in) orientation."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    pm = PeftModel.from_pretrained(build.load_model(base), adapter_dir)
    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if isinstance(mod, LoraLayer):
            d = mod.get_delta_weight("default")  # as the base stores it; canonical (out, in) below
            out[name] = d.T if getattr(mod, "fan_in_fan_out", False) or name.endswith("embed_tokens") else d
    return out


def peft_layers(base, adapter_path):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = build.load_model(base)
    pm = PeftModel.from_pretrained(model, adapter_path)
    inner = pm.base_model.model
    return {name: mod for name, mod in inner.named_modules() if isinstance(mod, LoraLayer)}


class Hung(BaseException):
    """Raised by :func:`deadline` (a BaseException, so no handler in adaptkit can swallow it)."""


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail the test instead of hanging: SIGALRM after ``seconds``."""
    def boom(signum, frame):
        raise Hung(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def snapshot(*roots) -> dict[str, str]:
    """Content hash of every file under ``roots`` (files or folders), symlinks not followed."""
    out = {}
    for root in roots:
        root = Path(root)
        paths = [root] if not root.is_dir() else sorted(p for p in root.rglob("*"))
        for p in paths:
            if p.is_symlink():
                out[str(p)] = "-> " + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha1(p.read_bytes()).hexdigest()
            elif p.exists() and not p.is_dir():
                out[str(p)] = "special"
    return out


def listing(folder) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir())


def invoke(runner, *args, seconds: int = 60):
    with deadline(seconds):
        return runner.invoke(main, [str(a) for a in args])


def assert_one_line_error(res, *needles, code: int = 2) -> str:
    """Exit ``code``, exactly one line on stderr starting with 'error: ', no traceback; returns the line."""
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def copy_inputs(fixtures: dict[str, Path], dst: Path) -> dict[str, Path]:
    out = {}
    for name, src in fixtures.items():
        out[name] = dst / name
        if src.is_dir():
            shutil.copytree(src, out[name])
        else:
            shutil.copy2(src, out[name])
    return out
