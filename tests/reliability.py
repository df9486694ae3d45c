"""Helpers for the reliability tests: input snapshots, one-line error checks, a hang guard."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
from pathlib import Path

from adaptkit.cli import main


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
