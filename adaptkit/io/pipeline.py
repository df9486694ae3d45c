"""A three-stage stream: read → compute → write, each stage in its own thread.

Reading (``pread`` into a buffer), computing (torch, which releases the GIL) and writing (``write``
or an in-kernel ``copy_file_range``) overlap; bounded queues keep at most a few tensors in flight,
so memory follows the largest tensor. Items that need no compute skip the first two stages and are
handed to the writer in order. The first exception in any stage stops the others and is re-raised
in the caller's thread; both stage threads are joined before :func:`run_stream` returns or raises.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")

_DONE = object()


def limit_heap_growth(threshold: int = 1 << 20) -> None:
    """Serve allocations above ``threshold`` from mmap, returned to the OS on free (glibc only).

    glibc raises its mmap threshold as large blocks are freed (up to 32 MB), after which tensors of a
    few tens of MB come from arenas that threads fragment and rarely trim: resident memory then
    creeps towards the model's size. A fixed threshold keeps it at what is live.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD; setting it also stops the dynamic adjustment
    except (OSError, AttributeError):
        pass


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Stopped(Exception):
    """Raised inside a stage when another stage failed."""


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while True:
        if stop.is_set():
            raise Stopped()
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _get(q: queue.Queue, stop: threading.Event):
    while True:
        if stop.is_set():
            raise Stopped()
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue


def run_stream(items: Iterable[T], needs_compute: Callable[[T], bool], read: Callable, compute: Callable,
               write: Callable, depth: int = 2, on_stop: Callable[[], None] | None = None) -> None:
    """Call ``write(item, compute(item, read(item)))`` for computed items and ``write(item, None)``
    for the rest, writing strictly in the order of ``items``.

    ``on_stop()`` is called when the stream ends, before the stage threads are joined: the place to
    wake a stage that waits on something of the caller's (a buffer pool, see :class:`Pool`)."""
    items = list(items)
    work = [it for it in items if needs_compute(it)]
    stop = threading.Event()
    read_q: queue.Queue = queue.Queue(maxsize=depth)
    done_q: queue.Queue = queue.Queue(maxsize=depth)

    def reader():
        try:
            for it in work:
                _put(read_q, (it, read(it)), stop)
            _put(read_q, _DONE, stop)
        except Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            stop.set()
            done_q.put(_Failure(e))

    def computer():
        try:
            while True:
                got = _get(read_q, stop)
                if got is _DONE:
                    break
                it, data = got
                _put(done_q, (it, compute(it, data)), stop)
        except Stopped:
            pass
        except BaseException as e:  # noqa: BLE001
            stop.set()
            done_q.put(_Failure(e))

    threads = [threading.Thread(target=reader, daemon=True, name="adaptkit-read"),
               threading.Thread(target=computer, daemon=True, name="adaptkit-compute")]
    for t in threads:
        t.start()
    try:
        for it in items:
            if not needs_compute(it):
                write(it, None)
                continue
            while True:
                try:
                    got = done_q.get(timeout=0.1)
                    break
                except queue.Empty:
                    if not any(t.is_alive() for t in threads) and done_q.empty():
                        raise RuntimeError("stream stages ended early")
            if isinstance(got, _Failure):
                raise got.exc
            done_it, result = got
            assert done_it is it, "stream out of order"
            write(it, result)
    finally:
        stop.set()  # the stages notice within 0.1 s, once their current read or compute returns
        if on_stop is not None:
            on_stop()
        for t in threads:
            t.join()


class Pool:
    """Reusable buffers: no allocation churn, bounded memory. :meth:`take` waits for one to be given
    back; once :meth:`close` is called it raises :class:`Stopped` instead of waiting forever."""

    def __init__(self, make: Callable[[], object], count: int):
        self._q: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        for _ in range(count):
            self._q.put(make())

    def take(self):
        while True:
            if self._closed.is_set():
                raise Stopped()
            try:
                return self._q.get(timeout=0.1)
            except queue.Empty:
                continue

    def give(self, buf) -> None:
        self._q.put(buf)

    def close(self) -> None:
        self._closed.set()
