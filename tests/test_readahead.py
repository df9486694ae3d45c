"""The disk is kept busy: inputs read ahead (WILLNEED) within a window, outputs handed to the disk as written."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import adaptkit.safetensors_file as stf
from adaptkit.checkpoint import Checkpoint
from adaptkit.merge import merge
from adaptkit.readahead import Readahead
from conftest import ADAPTERS, TINY_LLAMA

pytestmark = pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this OS")


@pytest.fixture
def fadvise_calls(monkeypatch):
    calls = []
    real = os.posix_fadvise

    def record(fd, offset, length, advice):
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length, advice))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)
    return calls


def test_readahead_stays_within_its_window(tmp_path, fadvise_calls):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"x" * 300)
    b.write_bytes(b"y" * 500)
    ra = Readahead([(a, 100, 200), (b, 0, 500)], window=250)
    ra.consumed()
    assert ra.advised == 250
    assert [(os.path.basename(p), o, n) for p, o, n, _ in fadvise_calls] == [("a", 100, 200), ("b", 0, 50)]
    ra.consumed(100)
    assert ra.advised == 350 and fadvise_calls[-1][1:3] == (50, 100)
    ra.consumed(1000)
    assert ra.advised == 700 and sum(c[2] for c in fadvise_calls) == 700
    assert {c[3] for c in fadvise_calls} == {os.POSIX_FADV_WILLNEED}
    ra.close()
    ra.consumed(10)  # closed: no more advice, no error
    assert ra.advised == 700


def test_merge_reads_ahead_every_byte_of_the_base(tmp_path, fadvise_calls):
    merge(TINY_LLAMA, [ADAPTERS["llama-lora"]], tmp_path / "out", warn=lambda m: None)
    advised = {}
    for path, offset, length, advice in fadvise_calls:
        if advice == os.POSIX_FADV_WILLNEED:
            advised.setdefault(os.path.basename(path), set()).update(range(offset, offset + length))
    ck = Checkpoint.open(TINY_LLAMA)
    for shard, info in ck.tensors.values():
        assert set(range(info.offset, info.offset + info.nbytes)) <= advised[shard.path.name], info.name


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
