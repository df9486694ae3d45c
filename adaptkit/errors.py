"""The one exception type for user mistakes.

Anything the user can fix (a missing file, a malformed config, an adapter that does not fit its base)
is raised as :class:`AdaptkitError` with one line naming the file and the problem. The CLI prints it
to stderr and exits with status 2; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class AdaptkitError(Exception):
    """A user-facing error: one line, naming the file (when there is one) or the parameter, and the problem.

    ``param`` names the argument of the library call that is wrong (``weights``, ``density``…); the
    CLI shows the flag that sets it instead. A message may name it itself with ``{param}`` (then it
    is not also put in front).
    """

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None, *, param: str | None = None):
        self.path = Path(path) if path is not None else None
        self.param = param
        self.message = " ".join(str(message).split())  # always one line
        super().__init__(self.render())

    def render(self, param_name: str | None = None) -> str:
        """The one line, with the parameter called ``param_name`` (a CLI flag, say) when given."""
        where = [printable(self.path)] if self.path is not None else []
        message = self.message
        if self.param is not None:
            name = param_name or self.param
            if "{param}" in message:
                message = message.replace("{param}", name)
            else:
                where.append(name)
        return ": ".join([*where, message])


def printable(value) -> str:
    """``value`` as text on one line: control characters (a newline in a file name, say) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))
