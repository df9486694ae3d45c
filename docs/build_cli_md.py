"""Regenerate docs/cli.md from the CLI's own --help (tests/test_docs.py fails when it is stale).

    python docs/build_cli_md.py
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMMANDS = ["inspect", "merge", "verify", "combine", "convert", "pull", "push"]


def help_text(*args: str) -> str:
    from click.testing import CliRunner

    from adaptkit.cli import main

    res = CliRunner().invoke(main, [*args, "--help"], prog_name="adaptkit", terminal_width=100)
    assert res.exit_code == 0, res.output
    return res.output.rstrip() + "\n"


def render() -> str:
    parts = ["# adaptkit command line reference", "",
             "Generated from `--help` by `python docs/build_cli_md.py`; `tests/test_docs.py` fails when this page",
             "differs from what the CLI prints. Every command is also a Python function: see",
             "[python.md](python.md).", "", "```text", help_text().rstrip(), "```", ""]
    for cmd in COMMANDS:
        parts += [f"## adaptkit {cmd}", "", "```text", help_text(cmd).rstrip(), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    (HERE / "cli.md").write_text(render())
    print(f"wrote {HERE / 'cli.md'}")
