"""adaptkit/io/files.py: inputs read safely (regular files only, bounded), OS errors as one line."""

from __future__ import annotations

import errno
import os

import pytest

from adaptkit.errors import AdaptkitError
from adaptkit.io.files import is_regular, open_regular, os_error, read_bytes, read_json, require_regular


def test_read_json_checks_kind_size_and_shape(tmp_path):
    p = tmp_path / "c.json"
    p.write_text('{"a": 1}')
    assert read_json(p) == {"a": 1}
    p.write_text("[1]")
    with pytest.raises(AdaptkitError, match="must be an object, not list"):
        read_json(p)
    assert read_json(p, expect=list) == [1]
    p.write_text("{" * 100_000)
    with pytest.raises(AdaptkitError, match="malformed JSON"):
        read_json(p)
    with pytest.raises(AdaptkitError, match="more than the 10"):
        read_bytes(p, 10)
    with pytest.raises(AdaptkitError, match="no such JSON file"):
        read_json(tmp_path / "missing.json")


@pytest.mark.parametrize("kind", ["fifo", "folder", "device"])
def test_only_regular_files_are_opened(tmp_path, kind):
    p = tmp_path / "x"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "folder":
        p.mkdir()
    else:
        p.symlink_to("/dev/zero")
    label = {"fifo": "a named pipe", "folder": "a folder", "device": "a character device"}[kind]
    for call in (open_regular, require_regular, read_json):
        with pytest.raises(AdaptkitError, match=f"expected a regular .*, found {label}"):
            call(p)
    assert not is_regular(p) and not is_regular(tmp_path / "nul\0")


def test_os_errors_name_the_file_and_the_errno(tmp_path):
    e = os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), tmp_path / "out")
    assert str(e) == f"{tmp_path / 'out'}: {os.strerror(errno.ENOSPC)} (ENOSPC): free some space or write elsewhere"
    e = os_error(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "f")), tmp_path / "other")
    assert str(e).startswith(f"{tmp_path / 'f'}: Permission denied (EACCES)")
