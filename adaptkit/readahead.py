"""Keep the disk reading ahead of the stream: input pages arrive while Python starts and while we compute.

A merge reads each byte of the base once, in order. Left alone, the disk idles while Python imports
torch and bitsandbytes (seconds, before the first read) and whenever the stream waits on the GPU or
the writer. :class:`Readahead` asks the kernel (``posix_fadvise(WILLNEED)``, asynchronous) to fetch
the next ``window`` bytes of a list of file ranges; the CLI starts one on the base's weight files
before anything heavy is imported, and the merge's reader moves one along as it goes.

The pages land in the page cache, not in this process: the window is bounded by a quarter of the
memory available (at most 8 GiB), so a 70B base on a 24 GB machine is still streamed, never cached
whole. Without ``posix_fadvise`` (macOS, Windows) this does nothing. This module imports no torch.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

MAX_WINDOW = 8 << 30
_CHUNK = 64 << 20  # one fadvise call: large enough to be cheap, small enough to stop early


def window_bytes() -> int:
    """How far ahead to read: a quarter of the available memory, at most :data:`MAX_WINDOW`."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return min(MAX_WINDOW, int(line.split()[1]) * 1024 // 4)
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 30


class Readahead:
    """Advise the kernel to read ``ranges`` ((path, offset, length), in reading order) ``window`` bytes ahead.

    :meth:`consumed` tells it how far the stream has read; advice never runs more than ``window``
    bytes past that. Every failure is ignored: this is a hint, the reads themselves stay correct.
    """

    def __init__(self, ranges, window: int | None = None):
        self._ranges = [(Path(p), int(o), int(n)) for p, o, n in ranges if n > 0]
        self.window = window_bytes() if window is None else window
        self._next = 0  # index of the first range not fully advised
        self._done_in_next = 0  # bytes of that range already advised
        self.advised = 0  # bytes advised so far
        self._read = 0
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def of_files(cls, paths, window: int | None = None) -> "Readahead":
        """Whole files, in the given order."""
        ranges = []
        for p in paths:
            try:
                ranges.append((p, 0, os.path.getsize(p)))
            except OSError:
                continue
        return cls(ranges, window)

    def consumed(self, nbytes: int = 0) -> None:
        """The stream has read ``nbytes`` more; advise up to ``window`` bytes past what it has read."""
        if not hasattr(os, "posix_fadvise"):
            return
        with self._lock:
            self._read += nbytes
            while not self._closed and self._next < len(self._ranges) and self.advised < self._read + self.window:
                path, offset, length = self._ranges[self._next]
                n = min(_CHUNK, length - self._done_in_next, self._read + self.window - self.advised)
                try:
                    fd = self._fds.get(path)
                    if fd is None:
                        fd = self._fds[path] = os.open(path, os.O_RDONLY)
                    os.posix_fadvise(fd, offset + self._done_in_next, n, os.POSIX_FADV_WILLNEED)
                except OSError:
                    pass
                self.advised += n
                self._done_in_next += n
                if self._done_in_next >= length:
                    self._next += 1
                    self._done_in_next = 0

    def start(self) -> "Readahead":
        """Advise the first window from a background thread (the caller goes on importing)."""
        threading.Thread(target=self.consumed, name="adaptkit-readahead", daemon=True).start()
        return self

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

