"""The disk is kept busy: inputs read ahead within a window, outputs handed to the disk as written."""

import os
import subprocess
import sys
import time

import pytest
import torch
from helpers import ADAPTERS, TINY_LLAMA
from safetensors.torch import load_file

import adaptkit.io.safetensors_file as stf
from adaptkit import merge
from adaptkit.io import readahead
from adaptkit.io.readahead import Readahead


@pytest.fixture
def fadvise_calls(monkeypatch):
    calls = []
    real = os.posix_fadvise

    def record(fd, offset, length, advice):
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length, advice))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)
    return calls


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_readahead_reads_within_its_window_and_skips_what_the_stream_passed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"x" * 300)
    b.write_bytes(b"y" * 500)
    ra = Readahead([(a, 100, 200), (b, 0, 500)], window=250)
    assert ra.fill() and ra.fetched == 250 and ra.read_from_disk == 250
    ra.consumed(100)
    assert ra.fill() and ra.fetched == 350 and ra.read_from_disk == 350
    ra.consumed(1000)  # the stream ran past everything: nothing more is read
    assert not ra.fill() and ra.fetched == 700 and ra.read_from_disk == 350


def test_readahead_thread_is_paced_by_the_stream(tmp_path):
    f = tmp_path / "big"
    f.write_bytes(os.urandom(3 * readahead.CHUNK))
    ra = Readahead.of_files([f], window=readahead.CHUNK).start()
    wait_for(lambda: ra.fetched == readahead.CHUNK)
    time.sleep(0.05)
    assert ra.fetched == readahead.CHUNK  # waits for the stream
    ra.consumed(readahead.CHUNK)
    wait_for(lambda: ra.fetched == 2 * readahead.CHUNK)
    ra.close()
    ra._thread.join(timeout=5)
    assert not ra._thread.is_alive()


def test_merge_takes_over_the_prefetcher_the_cli_started(tmp_path, monkeypatch):
    import adaptkit.cli as cli

    used = []
    real = readahead.for_stream
    monkeypatch.setattr(readahead, "for_stream", lambda ranges: used.append(real(ranges)) or used[-1])
    early = cli._read_ahead(TINY_LLAMA, [ADAPTERS["llama-lora"]])
    merge(TINY_LLAMA, [ADAPTERS["llama-lora"]], tmp_path / "out")
    assert used == [early]
    adapter_file = ADAPTERS["llama-lora"] / "adapter_model.safetensors"
    assert early._files[0] == adapter_file  # the adapter first, then the base's shards
    assert early.total == adapter_file.stat().st_size + sum(
        p.stat().st_size for p in TINY_LLAMA.glob("model-*.safetensors"))
    assert early not in readahead._active.values()  # closed by the stream, unregistered


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this OS")
def test_writers_hand_written_bytes_to_the_disk_as_they_go(tmp_path, fadvise_calls, monkeypatch):
    monkeypatch.setattr(stf, "WRITEBACK_EVERY", 1000)
    tensors = {f"t{i}": torch.randn(100, 7) for i in range(5)}  # 2800 bytes each
    path = tmp_path / "out.safetensors"
    w = stf.StreamingWriter(path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()])
    for n, t in tensors.items():
        w.write(n, t)
    w.close()
    handed = [(o, n) for p, o, n, adv in fadvise_calls if adv == os.POSIX_FADV_DONTNEED and p == str(path)]
    assert len(handed) == 5 and handed[0][0] == 0
    assert all(o1 + n1 == o2 for (o1, n1), (o2, _) in zip(handed, handed[1:]))  # contiguous, in order
    assert handed[-1][0] + handed[-1][1] == path.stat().st_size
    back = load_file(path)
    assert all(torch.equal(back[n], t) for n, t in tensors.items())


def test_cli_starts_without_torch_and_reads_the_base_ahead():
    code = ("import sys, adaptkit.cli as c; assert 'torch' not in sys.modules, 'torch imported'; "
            f"ra = c._read_ahead({str(TINY_LLAMA)!r}); ra.close(); "
            "print(sorted(p.name for p, _, _ in ra._ranges)); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    names, torch_loaded = out.stdout.split("\n")[:2]
    assert names == str(sorted(p.name for p in TINY_LLAMA.glob("model-*.safetensors")))
    assert torch_loaded == "False"
