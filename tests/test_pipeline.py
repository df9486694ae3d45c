"""adaptkit/io/pipeline.py: the read → compute → write stream."""

from __future__ import annotations

import threading
import time

import pytest

from adaptkit.io.pipeline import Pool, run_stream


def _alive():
    return [t.name for t in threading.enumerate() if t.name.startswith("adaptkit-")]


def test_writes_in_order_and_skips_compute_where_not_needed():
    items = list(range(20))
    written, computed = [], []

    def compute(i, data):
        computed.append(i)
        time.sleep(0.001 * (i % 3))  # uneven work: order must still hold
        return data * 10

    run_stream(items, lambda i: i % 2 == 0, lambda i: i + 1, compute, lambda i, r: written.append((i, r)), depth=3)
    assert [i for i, _ in written] == items
    assert written == [(i, (i + 1) * 10 if i % 2 == 0 else None) for i in items]
    assert computed == list(range(0, 20, 2))
    assert not _alive()


@pytest.mark.parametrize("stage", ["read", "compute", "write"])
def test_the_first_failure_is_raised_and_every_thread_joined(stage):
    def fail_at(name, i):
        if stage == name and i == 5:
            raise ValueError(f"{name} failed")

    def read(i):
        fail_at("read", i)
        return i

    def compute(i, d):
        fail_at("compute", i)
        return d

    def write(i, r):
        fail_at("write", i)

    with pytest.raises(ValueError, match=f"{stage} failed"):
        run_stream(range(50), lambda i: True, read, compute, write)
    assert not _alive()


def test_a_stage_waiting_on_a_pool_is_woken_when_another_fails():
    """The reader takes buffers that only the writer gives back: when compute fails, the reader is
    left waiting on an empty pool; closing the pool on stop ends it (no hang, no thread left)."""
    pool = Pool(object, 2)

    def read(i):
        return pool.take()  # never given back: the third take waits

    def compute(i, buf):
        if i == 1:
            raise RuntimeError("boom")
        return buf

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="boom"):
        run_stream(range(10), lambda i: True, read, compute, lambda i, r: None, depth=1, on_stop=pool.close)
    assert time.monotonic() - t0 < 5
    assert not _alive()
