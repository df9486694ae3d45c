"""Keep the disk reading ahead of the stream: input pages arrive while Python starts and while we compute.

A merge reads each byte of the base once, in order. Left alone, the disk idles while Python imports
torch and bitsandbytes (seconds, before the first read) and whenever the stream waits on the GPU or
the writer. :class:`Readahead` is a thread that reads the next ``window`` bytes of a list of file
ranges into the page cache (through one small scratch buffer), paced by what the stream reports
as consumed. The CLI starts one on the base's weight files before anything heavy is imported; the
merge's stream takes it over (:func:`for_stream`) or starts its own.

Real reads, not ``posix_fadvise(WILLNEED)``: Linux caps that hint at the device's readahead size
(a few hundred KB per call), far short of a window. The pages land in the page cache, not in this
process: the window is bounded by a quarter of the memory available (at most 8 GiB), so a 70B base
on a 24 GB machine is still streamed, never cached whole. This module imports no torch.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

MAX_WINDOW = 8 << 30
CHUNK = 8 << 20  # one read into the scratch buffer

_active: dict[Path, "Readahead"] = {}  # whole-file prefetchers by file, for :func:`for_stream`
_active_lock = threading.Lock()


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
    """Read ``ranges`` ((path, offset, length), in the order the stream reads them) up to ``window``
    bytes past what the stream has consumed (:meth:`consumed`).

    :meth:`fill` does the reading (the thread of :meth:`start` calls it whenever the stream moves
    on). Every failure is ignored: this only warms the cache, the stream's own reads stay correct.
    """

    def __init__(self, ranges, window: int | None = None):
        ranges = list(ranges)
        paths = {p: Path(p) for p, _, _ in ranges}  # one Path per file (an MoE stream: ~19k ranges, a few files)
        self._ranges = [(paths[p], int(o), int(n)) for p, o, n in ranges if n > 0]
        self.total = sum(n for _, _, n in self._ranges)
        self.window = window_bytes() if window is None else window
        self.fetched = 0  # bytes of the sequence read (or skipped because the stream was already past)
        self.read_from_disk = 0  # bytes this prefetcher actually read
        self._consumed = 0
        self._next = 0  # index of the first range not fully fetched
        self._done_in_next = 0
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._files: list[Path] = []

    @classmethod
    def of_files(cls, paths, window: int | None = None) -> "Readahead":
        """Whole files, in the given order; the stream of a merge of them takes this one over."""
        ranges = []
        for p in paths:
            try:
                ranges.append((Path(p), 0, os.path.getsize(p)))
            except OSError:
                continue
        ra = cls(ranges, window)
        ra._files = [r[0] for r in ranges]
        return ra

    def consumed(self, nbytes: int) -> None:
        """The stream has read ``nbytes`` more."""
        with self._cv:
            self._consumed += nbytes
            self._cv.notify_all()

    def fill(self) -> bool:
        """Read until ``window`` bytes past the consumed point, or the end; False once there is no more."""
        buf = memoryview(bytearray(CHUNK))
        while True:
            with self._cv:
                if self._closed or self._next >= len(self._ranges):
                    return False
                if self.fetched >= self._consumed + self.window:
                    return True
                path, offset, length = self._ranges[self._next]
                n = min(CHUNK, length - self._done_in_next, self._consumed + self.window - self.fetched)
                start = offset + self._done_in_next
                skip = self.fetched + n <= self._consumed  # the stream is already past these bytes
            if not skip:
                self.read_from_disk += _read_into(path, start, buf[:n])
            with self._cv:
                self.fetched += n
                self._done_in_next += n
                if self._done_in_next >= length:
                    self._next += 1
                    self._done_in_next = 0

    def start(self) -> "Readahead":
        """Keep reading from a background thread (the caller goes on, importing torch say)."""
        if self._files:
            with _active_lock:
                for p in self._files:
                    _active[p] = self
        self._thread = threading.Thread(target=self._run, name="adaptkit-readahead", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while self.fill():
            with self._cv:
                while not self._closed and self.fetched >= self._consumed + self.window:
                    self._cv.wait()

    def close(self) -> None:
        """Stop reading ahead; returns once the thread has ended (after at most one chunk's read)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        with _active_lock:
            for p in self._files:
                if _active.get(p) is self:
                    del _active[p]
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()


def _read_into(path: Path, offset: int, buf: memoryview) -> int:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return 0
    try:
        return os.preadv(fd, [buf], offset) if hasattr(os, "preadv") else len(os.pread(fd, len(buf), offset))
    except OSError:
        return 0
    finally:
        os.close(fd)


def for_stream(ranges) -> Readahead:
    """A running prefetcher for a stream reading ``ranges``: the one already reading all their files
    whole (the CLI's, started before torch was imported), else a new one."""
    ranges = list(ranges)
    with _active_lock:
        owners = {_active.get(Path(p)) for p in {p for p, _, _ in ranges}}
    if len(owners) == 1 and None not in owners:
        return owners.pop()
    return Readahead(ranges).start()
