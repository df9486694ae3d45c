"""How a library call tells its caller what it is doing: one :class:`Reporter` for every command.

Every public function (``adaptkit.merge``, ``combine``, ``convert``, ``verify``, ``inspect``,
``pull``, ``push``) takes ``reporter=``; it receives the steps of long work and every warning, as
they happen. Warnings are also returned in the result's ``warnings``, so a caller that passes no
reporter loses nothing::

    >>> import adaptkit
    >>> class Log(adaptkit.Reporter):
    ...     def warn(self, message):
    ...         print("warning:", message)

The default reporter is silent (warnings stay in the result). The CLI's reporter draws rich
progress bars on stderr and prints warnings there.
"""

from __future__ import annotations


class Reporter:
    """Receives progress and warnings from a library call; override what you need.

    A call reports one or more *tasks* in turn: :meth:`start` (a label, a total and its unit:
    ``"bytes"`` or ``"items"``; a total of None means the length is unknown), then :meth:`advance`
    as work is done. :meth:`warn` may come at any time.
    """

    def start(self, label: str, total: int | None, unit: str = "items") -> None:
        """A task begins: ``total`` units of work (None: unknown)."""

    def advance(self, n: int = 1) -> None:
        """``n`` more units of the current task are done."""

    def warn(self, message: str) -> None:
        """Something the caller should know (the result's ``warnings`` lists it too)."""


class Collected(Reporter):
    """Keeps what it is told, and passes it on to another reporter (used by every command)."""

    def __init__(self, downstream: Reporter | None = None):
        self.downstream = downstream or Reporter()
        self.warnings: list[str] = []

    def start(self, label: str, total: int | None, unit: str = "items") -> None:
        self.downstream.start(label, total, unit)

    def advance(self, n: int = 1) -> None:
        self.downstream.advance(n)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
            self.downstream.warn(message)
