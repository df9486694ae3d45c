"""All-or-nothing outputs (folders and single files): build beside the target, rename into place at the end.

The guarantees, for every command that writes:

- An input is never written: an output that is, contains or lies inside any input (real paths,
  symlinks resolved, every file of an input folder included) is refused, ``force`` or not.
- Nothing half-written: the output is built in ``.NAME.PID.XXXX.adaptkit-tmp`` beside its real
  location (a symlinked OUT is followed, so the final rename never crosses file systems) and renamed
  into place only when complete; an existing output is replaced only with ``force``, and only then.
- Any failure (an exception, Ctrl-C, SIGTERM turned into one by the CLI) removes the temporary
  folder; an ``OSError`` (disk full, read-only file system…) becomes one line naming the path.
- A process killed outright (SIGKILL) cannot clean up: the next run writing the same OUT removes
  the temporary folders of processes that no longer exist (and puts back a previous output that
  such a process had moved aside but not yet replaced).
- Written files get the ordinary mode (0666 less the umask), whatever the library that wrote them.

This module knows nothing of models or adapters: callers pass the paths they read.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from ..errors import AdaptkitError
from .files import os_error

TMP_SUFFIX = ".adaptkit-tmp"
OLD_SUFFIX = ".adaptkit-old"


def _real(p: str | Path) -> Path:
    return Path(os.path.realpath(p))


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def input_paths(paths: Iterable[str | Path | None]) -> list[Path]:
    """Real paths of the inputs and, for a folder, of each file in it (a Hub cache snapshot's files
    are symlinks into its blob store)."""
    out: list[Path] = []
    for p in paths:
        if p is None or not os.path.lexists(p):  # an in-memory adapter, say: nothing on disk to protect
            continue
        out.append(_real(p))
        if os.path.isdir(p):
            with contextlib.suppress(OSError):
                for entry in os.scandir(p):
                    if entry.is_symlink():
                        out.append(_real(entry.path))
    return list(dict.fromkeys(out))


def _refuse_inputs(out: Path, target: Path, inputs: Iterable[str | Path | None]) -> None:
    for real in input_paths(inputs):
        if target == real:
            why = f"it is the input {real}"
        elif _within(real, target):
            why = f"it contains the input {real}"
        elif _within(target, real):
            why = f"it lies inside the input {real}"
        else:
            continue
        raise AdaptkitError(f"refusing to write the output here: {why} (an input is never written, even with "
                            "{param}); choose another output", out, param="force")


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no other way to read it: set and restore at once
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def clean_stale(target: Path) -> list[Path]:
    """Remove what processes that died while writing ``target`` left beside it; return what was removed.

    A moved-aside previous output (``.NAME.PID.adaptkit-old``) whose process died before the new one
    took its place is put back when ``target`` is missing, else removed.
    """
    parent, name = target.parent, target.name
    # .NAME.PID.XXXXXXXX.adaptkit-tmp (mkdtemp's eight random characters) and .NAME.PID.adaptkit-old
    pattern = re.compile(rf"^\.{re.escape(name)}\.(\d+)(?:\.[a-z0-9_]{{8}}{re.escape(TMP_SUFFIX)}|"
                         rf"{re.escape(OLD_SUFFIX)})$")
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or _alive(int(m[1])):
            continue
        path = Path(entry.path)
        try:
            if entry.name.endswith(OLD_SUFFIX) and not os.path.lexists(target):
                os.replace(path, target)
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError:
            continue
    return removed


def check_output(out: str | Path, force: bool, inputs: Iterable[str | Path | None] = (),
                 folder: bool = True) -> Path:
    """Check an output before any work; return its real location (symlinks followed).

    Refuses an output that is, contains or lies inside an input; an existing output without
    ``force``; an existing output of the other kind (file for folder); a parent that is not a folder.
    Creates missing parent folders and removes what dead runs left beside the output.
    """
    if str(out).strip() == "":
        raise AdaptkitError("the output path is empty")
    out = Path(out)
    target = _real(out)
    _refuse_inputs(out, target, inputs)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise AdaptkitError(f"cannot create the output: {parent} is not a folder", out) from None
    except OSError as e:
        raise os_error(e, parent, "cannot create the output's folder") from None
    if not parent.is_dir():
        raise AdaptkitError(f"cannot create the output: {parent} is not a folder", out)
    clean_stale(target)
    if os.path.lexists(target):
        if not force:
            raise AdaptkitError("output already exists (pass {param} to replace it)", out, param="force")
        if folder and not target.is_dir():
            raise AdaptkitError("output exists and is not a folder", out)
        if not folder and not target.is_file():
            raise AdaptkitError("output exists and is not a file", out)
    return target


def _ordinary_modes(root: Path) -> None:
    """Files 0666 and folders 0777, less the umask (safetensors' writer and mkdtemp make them private)."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(folder, d), 0o777 & ~mask)
        for f in files:
            p = os.path.join(folder, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


def _publish(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` onto ``target``; an existing ``target`` is moved aside first and put back on failure."""
    old = None
    if os.path.lexists(target):
        old = target.parent / f".{target.name}.{os.getpid()}{OLD_SUFFIX}"
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _output_error(e: OSError, out: Path, tmp: Path | None, doing: str = "") -> AdaptkitError:
    """An OSError while writing, named by the output (not by the temporary file it happened in)."""
    inside = e.filename is None or (tmp is not None and str(e.filename).startswith(str(tmp)))
    if inside or str(e.filename).startswith(str(out.parent / f".{out.name}.")):
        e = OSError(e.errno, e.strerror)
    return os_error(e, out, doing)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def _building(target: Path, make, finish):
    """Yield the temporary path ``make(prefix, suffix, dir)`` creates beside ``target``; on success
    ``finish(tmp)`` and rename it onto ``target``, on any failure remove it (OS errors as one line)."""
    try:
        tmp = Path(make(prefix=f".{target.name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=target.parent))
    except OSError as e:
        raise _output_error(e, target, None, "cannot create the output") from None
    try:
        yield tmp
        finish(tmp)
        _publish(tmp, target)
    except OSError as e:
        _remove(tmp)
        raise _output_error(e, target, tmp) from None
    except BaseException:
        _remove(tmp)
        raise


def _new_file(**kwargs) -> str:
    fd, path = tempfile.mkstemp(**kwargs)
    os.close(fd)
    return path


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, force: bool = False, inputs: Iterable[str | Path | None] = ()):
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on failure it vanishes.

    ``inputs``: every path the command reads; an ``out`` that is, contains or lies inside one is
    refused. An interrupted run (exception, Ctrl-C) leaves no partial ``out``; an existing ``out`` is
    only replaced with ``force`` and only once the new one is complete.
    """
    with _building(check_output(out, force, inputs), tempfile.mkdtemp, _ordinary_modes) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_output_file(out: str | Path, force: bool = False, suffix: str | None = None,
                       inputs: Iterable[str | Path | None] = ()):
    """:func:`atomic_output_dir` for a single-file output: yields a temporary path beside ``out``."""
    out = Path(out)
    if suffix and out.suffix != suffix:
        raise AdaptkitError(f"this adapter is one file: name it *{suffix}", out)
    target = check_output(out, force, inputs, folder=False)
    with _building(target, _new_file, lambda tmp: os.chmod(tmp, 0o666 & ~_umask())) as tmp:
        yield tmp
