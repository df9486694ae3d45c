"""The documentation runs: docs/python.md and the library's docstring examples are executed, and
docs/cli.md must be what the CLI prints (regenerate it with `python docs/build_cli_md.py`)."""

from __future__ import annotations

import doctest
import importlib
import sys

import pytest
from helpers import ROOT

sys.path.insert(0, str(ROOT / "docs"))
import build_cli_md  # noqa: E402

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
DOCSTRING_MODULES = ["adaptkit", "adaptkit.commands.merge", "adaptkit.commands.verify", "adaptkit.commands.combine",
                     "adaptkit.commands.convert", "adaptkit.commands.inspect", "adaptkit.commands.extract",
                     "adaptkit.quant", "adaptkit.reporting", "adaptkit.plots"]


@pytest.fixture
def in_a_scratch_root(tmp_path, monkeypatch):
    """Run examples from a folder where fixtures/ is the repository's and out/ is scratch."""
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_python_md_runs(in_a_scratch_root):
    result = doctest.testfile(str(ROOT / "docs" / "python.md"), module_relative=False, optionflags=FLAGS,
                              raise_on_error=False, verbose=False)
    assert result.attempted > 30 and result.failed == 0, result


@pytest.mark.parametrize("module", DOCSTRING_MODULES)
def test_docstring_examples_run(in_a_scratch_root, module):
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=FLAGS, raise_on_error=False, verbose=False)
    assert result.failed == 0, result
    if module != "adaptkit.reporting":
        assert result.attempted > 0, f"{module} has no example"


def test_public_functions_are_documented_with_arguments():
    import adaptkit

    for name in ("merge", "combine", "convert", "extract", "verify", "inspect", "pull", "push"):
        doc = getattr(adaptkit, name).__doc__ or ""
        assert "Args:" in doc and "Returns:" in doc, name


def test_cli_md_is_current():
    assert (ROOT / "docs" / "cli.md").read_text() == build_cli_md.render(), \
        "docs/cli.md is stale: run python docs/build_cli_md.py"
