"""All-or-nothing outputs (folders and single files): build beside the target, rename into place at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import AdaptkitError


def check_output(out: str | Path, force: bool) -> Path:
    out = Path(out)
    if out.exists() and not force:
        raise AdaptkitError("output already exists (pass --force to replace it)", out)
    if out.exists() and not out.is_dir():
        raise AdaptkitError("output exists and is not a folder", out)
    parent = out.resolve().parent
    if not parent.exists():
        parent.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, force: bool = False):
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on failure it vanishes.

    An interrupted run (exception, Ctrl-C) leaves no partial ``out``; an existing ``out`` is only
    replaced with ``force`` and only once the new one is complete.
    """
    out = check_output(out, force)
    parent = out.resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".adaptkit-tmp", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        old = None
        if out.exists():
            old = parent / f".{out.name}.adaptkit-old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_output_file(out: str | Path, force: bool = False, suffix: str | None = None):
    """:func:`atomic_output_dir` for a single-file output: yields a temporary path beside ``out``."""
    out = Path(out)
    if suffix and out.suffix != suffix:
        raise AdaptkitError(f"this adapter is one file: name it *{suffix}", out)
    if out.exists() and not force:
        raise AdaptkitError("output already exists (pass --force to replace it)", out)
    if out.is_dir():
        raise AdaptkitError("output is a folder; this format is a single file", out)
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".adaptkit-tmp", dir=parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
