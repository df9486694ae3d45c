"""Reading input files safely: regular files only, bounded sizes, OS errors as one line.

A FIFO, a socket or a device in place of a weights file or a config would make a plain ``open``
block forever (a FIFO with no writer) or read without end (``/dev/zero``). Every input goes
through :func:`open_regular` (opened non-blocking, then checked with ``fstat``, so there is no
window between the check and the open) or :func:`read_json` (the same, with a size limit). Any
``OSError`` becomes an :class:`AdaptkitError` naming the file and the errno (:func:`os_error`).
This module imports no torch.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

from ..errors import AdaptkitError

MAX_JSON_BYTES = 64 << 20  # configs are kilobytes; a shard index of a very large model a few MB

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def os_error(e: OSError, path: str | Path | None = None, doing: str = "") -> AdaptkitError:
    """An ``OSError`` as one line: what failed, on which file, and the errno's name."""
    name = errno.errorcode.get(e.errno or 0, "")
    what = e.strerror or str(e)
    hint = {errno.ENOSPC: ": free some space or write elsewhere", errno.EDQUOT: ": free some space or write elsewhere",
            errno.EROFS: ": the file system is read-only, write elsewhere"}.get(e.errno or 0, "")
    target = e.filename if e.filename is not None else path
    prefix = f"{doing}: " if doing else ""
    return AdaptkitError(f"{prefix}{what}{f' ({name})' if name else ''}{hint}", target)


def _kind(mode: int) -> str:
    for test, label in _KINDS:
        if test(mode):
            return label
    return "not a regular file"


def require_regular(path: str | Path, what: str = "file") -> os.stat_result:
    """``stat`` of ``path`` (symlinks followed); a one-line error unless it is a regular file."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise AdaptkitError(f"no such {what}", path) from None
    except OSError as e:
        raise os_error(e, path) from None
    if not stat.S_ISREG(st.st_mode):
        raise AdaptkitError(f"expected a regular {what}, found {_kind(st.st_mode)}", path)
    return st


def open_regular(path: str | Path, what: str = "file") -> int:
    """A read-only file descriptor of the regular file ``path``; never blocks on a FIFO or device."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
                     | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise AdaptkitError(f"no such {what}", path) from None
    except OSError as e:
        raise os_error(e, path) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise AdaptkitError(f"expected a regular {what}, found {_kind(mode)}", path)
        if hasattr(os, "O_NONBLOCK"):  # regular files ignore it; clear it for the readers all the same
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes(path: str | Path, max_bytes: int, what: str = "file") -> bytes:
    """The whole of a regular file, refused when larger than ``max_bytes``."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise AdaptkitError(f"{what} is {size} bytes, more than the {max_bytes} a {what} can sensibly be", path)
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:  # grew while being read
                raise AdaptkitError(f"{what} is larger than {max_bytes} bytes", path)
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise os_error(e, path) from None
    finally:
        os.close(fd)


def read_json(path: str | Path, what: str = "JSON file", expect: type | None = dict,
              max_bytes: int = MAX_JSON_BYTES):
    """Parse a JSON file (regular, at most ``max_bytes``); ``expect``: the type the top level must have."""
    raw = read_bytes(path, max_bytes, what)
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise AdaptkitError(f"malformed JSON ({what}): {e}", path) from None
    except RecursionError:
        raise AdaptkitError(f"malformed {what}: nested too deeply", path) from None
    if expect is not None and not isinstance(obj, expect):
        kind = {dict: "an object", list: "a list"}.get(expect, expect.__name__)
        raise AdaptkitError(f"malformed {what}: the top level must be {kind}, not {type(obj).__name__}", path)
    return obj


def is_regular(path: str | Path) -> bool:
    """Whether ``path`` is a regular file (symlinks followed); never blocks."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):  # ValueError: a NUL in the name
        return False
