"""The streaming safetensors writer and header reader, checked against the safetensors package."""

import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adaptkit.errors import AdaptkitError
from adaptkit.io.safetensors_file import StreamingWriter, read_header


def test_streaming_writer_reads_back_with_safetensors(tmp_path):
    tensors = {
        "a.weight": torch.randn(7, 5),
        "b": torch.randn(3).to(torch.bfloat16),
        "c": torch.randn(2, 2, 2).half(),
        "scalar": torch.tensor(3.5),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "empty": torch.zeros(0, 4),
        "mask": torch.tensor([True, False, True]),
    }
    path = tmp_path / "x.safetensors"
    w = StreamingWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], {"format": "pt"})
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    back = load_file(path)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    # the header is 8-byte aligned, as the spec asks
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n % 8 == 0


def test_copy_from_copies_bytes_of_another_file(tmp_path):
    src = tmp_path / "src.safetensors"
    t = {"x": torch.randn(100, 3), "y": torch.randn(10).half()}
    save_file(t, src)
    h = read_header(src)
    y = next(i for i in h.tensors if i.name == "y")
    out = tmp_path / "out.safetensors"
    w = StreamingWriter(out, [("renamed", y.dtype, y.shape)])
    import os

    fd = os.open(src, os.O_RDONLY)
    w.copy_from("renamed", fd, y.offset, y.nbytes)
    os.close(fd)
    w.close()
    assert torch.equal(load_file(out)["renamed"], t["y"])


def test_writer_refuses_out_of_order_or_missing(tmp_path):
    w = StreamingWriter(tmp_path / "o.safetensors", [("a", torch.float32, (2,)), ("b", torch.float32, (2,))])
    with pytest.raises(RuntimeError):
        w.write("b", torch.zeros(2))
    w.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="never written"):
        w.close()


def test_header_matches_safetensors_offsets(tmp_path):
    path = tmp_path / "m.safetensors"
    t = {"w1": torch.randn(4, 4), "w0": torch.randn(3).half()}
    save_file(t, path)
    h = read_header(path)
    raw = path.read_bytes()
    for info in h.tensors:
        data = raw[info.offset: info.offset + info.nbytes]
        got = torch.frombuffer(bytearray(data), dtype=info.dtype).reshape(info.shape)
        assert torch.equal(got, t[info.name])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "short"])
def test_header_errors_are_clear(tmp_path, damage):
    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.randn(64, 64)}, path)
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(raw[:8] + b"{not json" + raw[17:])
    else:
        path.write_bytes(b"abc")
    with pytest.raises(AdaptkitError) as e:
        read_header(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_reserved_header_writer_reads_back(tmp_path):
    import os

    from adaptkit.io.safetensors_file import ReservedHeaderWriter, header_reserve

    src = tmp_path / "src.safetensors"
    save_file({"copied": torch.arange(10, dtype=torch.int32)}, src)
    info = read_header(src).tensors[0]
    names = ["a", "blob", "copied"]
    path = tmp_path / "r.safetensors"
    w = ReservedHeaderWriter(path, names, header_reserve(names, {"format": "pt"}), {"format": "pt"})
    w.write("a", torch.randn(3, 4).half())
    w.write("blob", torch.tensor(list(b'{"json": 1}'), dtype=torch.uint8))  # size known only now
    fd = os.open(src, os.O_RDONLY)
    w.copy_from("copied", fd, info.offset, info.nbytes, info.dtype, info.shape)
    os.close(fd)
    w.close()
    back = load_file(path)
    assert list(back) == names or set(back) == set(names)
    assert bytes(back["blob"].tolist()) == b'{"json": 1}'
    assert torch.equal(back["copied"], torch.arange(10, dtype=torch.int32))
    assert back["a"].shape == (3, 4) and back["a"].dtype == torch.float16


def test_write_block_writes_consecutive_tensors_in_one_go(tmp_path):
    t = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int16), "c": torch.randn(2).half()}
    block = torch.cat([v.reshape(-1).view(torch.uint8) for v in t.values()])
    path = tmp_path / "o.safetensors"
    w = StreamingWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in t.items()])
    with pytest.raises(RuntimeError, match="a block of"):  # sizes that do not add up to the block
        w.write_block([("a", 60), ("b", 14)], memoryview(block.numpy()))
    w.write_block([(k, v.nbytes) for k, v in t.items()], memoryview(block.numpy()))
    w.close()
    got = load_file(path)
    assert all(torch.equal(got[k], v) for k, v in t.items())
