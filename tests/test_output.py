"""adaptkit/io/output.py: outputs that never touch an input, appear whole or not at all."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from adaptkit.errors import AdaptkitError
from adaptkit.io.output import atomic_output_dir, atomic_output_file, check_output, clean_stale


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.safetensors").write_text("w")
    (tmp_path / "adapter.safetensors").write_text("a")
    return tmp_path


@pytest.mark.parametrize("out, why", [
    ("base", "it is the input"), ("base/.", "it is the input"), (".", "it contains the input"),
    ("base/sub", "lies inside the input"), ("base/model.safetensors", "lies inside the input"),
    ("adapter.safetensors", "it is the input"),
])
def test_an_output_that_is_holds_or_lies_in_an_input_is_refused(tree, monkeypatch, out, why):
    monkeypatch.chdir(tree)
    with pytest.raises(AdaptkitError, match=why):
        check_output(out, force=True, inputs=["base", "adapter.safetensors"])


def test_symlinks_are_resolved_both_ways(tree):
    (tree / "alias").symlink_to(tree / "base")
    with pytest.raises(AdaptkitError, match="it is the input"):
        check_output(tree / "alias", force=True, inputs=[tree / "base"])
    with pytest.raises(AdaptkitError, match="it is the input"):
        check_output(tree / "base", force=True, inputs=[tree / "alias"])


def test_an_existing_output_needs_force_and_the_right_kind(tree):
    (tree / "out").mkdir()
    with pytest.raises(AdaptkitError, match="already exists"):
        check_output(tree / "out", force=False)
    assert check_output(tree / "out", force=True) == tree / "out"
    with pytest.raises(AdaptkitError, match="not a file"):
        check_output(tree / "out", force=True, folder=False)


def test_success_replaces_and_failure_leaves_the_old_output(tree):
    out = tree / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(ValueError):
        with atomic_output_dir(out, force=True) as tmp:
            (tmp / "new").write_text("new")
            raise ValueError("midway")
    assert sorted(os.listdir(out)) == ["old"]
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(os.listdir(out)) == ["new"]
    assert sorted(p.name for p in tree.iterdir()) == ["adapter.safetensors", "base", "out"]


def test_the_old_output_is_put_back_when_the_final_rename_fails(tree, monkeypatch):
    out = tree / "out"
    out.mkdir()
    (out / "old").write_text("old")
    real = os.replace

    def flaky(src, dst):
        if str(src).endswith(".adaptkit-tmp"):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(AdaptkitError, match="EXDEV"):
        with atomic_output_dir(out, force=True) as tmp:
            (tmp / "new").write_text("new")
    assert sorted(os.listdir(out)) == ["old"]
    assert sorted(p.name for p in tree.iterdir()) == ["adapter.safetensors", "base", "out"]


def test_single_file_outputs(tree):
    out = tree / "a.gguf"
    with pytest.raises(AdaptkitError, match=r"name it \*.safetensors"):
        with atomic_output_file(out, suffix=".safetensors"):
            pass
    mask = os.umask(0o027)
    try:
        with atomic_output_file(out, suffix=".gguf") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(mask)
    assert out.read_text() == "x" and oct(out.stat().st_mode & 0o777) == "0o640"


def test_clean_stale_removes_dead_runs_only(tree):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead, alive = proc.pid, os.getpid()
    for name in (f".out.{dead}.abcdefgh.adaptkit-tmp", f".out.{alive}.abcdefgh.adaptkit-tmp",
                 f".output.{dead}.abcdefgh.adaptkit-tmp"):
        (tree / name).mkdir()
    removed = clean_stale(tree / "out")
    assert [p.name for p in removed] == [f".out.{dead}.abcdefgh.adaptkit-tmp"]
    assert (tree / f".out.{alive}.abcdefgh.adaptkit-tmp").exists()
    assert (tree / f".output.{dead}.abcdefgh.adaptkit-tmp").exists()  # another output's
