"""adaptkit/io/checkpoint.py: a base model read lazily, tensor by tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from adaptkit.errors import AdaptkitError
from adaptkit.io.checkpoint import Checkpoint, is_weight_file
from helpers import TINY_LLAMA, load_dir


def test_every_tensor_read_equals_the_safetensors_library():
    ck = Checkpoint.open(TINY_LLAMA)
    ref = load_dir(TINY_LLAMA)
    try:
        assert set(ck.tensors) == set(ref) and ck.index_file == "model.safetensors.index.json"
        assert ck.config["model_type"] == "llama"
        for name, t in ref.items():
            assert torch.equal(ck.read(name), t), name
        # into a caller's buffer: a view of it, same bytes
        name = "model.layers.0.mlp.up_proj.weight"
        buf = torch.empty(ck.info(name).nbytes + 16, dtype=torch.uint8)
        got = ck.read(name, out=buf)
        assert got.data_ptr() == buf.data_ptr() and torch.equal(got, ref[name])
        assert ck.total_bytes == sum(t.numel() * t.element_size() for t in ref.values())
    finally:
        ck.close()


def test_read_many_reads_runs_of_tensors_into_one_buffer():
    ck = Checkpoint.open(TINY_LLAMA)
    ref = load_dir(TINY_LLAMA)
    try:
        order = [t.name for s in ck.shards for t in s.tensors]
        names = order[:3] + order[4:]  # a gap in one file, and the runs cross into the next shard
        size = sum(ck.info(n).nbytes for n in names)
        buf = torch.empty(size + 8, dtype=torch.uint8)
        got = ck.read_many(names, buf)
        assert [tuple(g.shape) for g in got] == [tuple(ref[n].shape) for n in names]
        assert all(torch.equal(g, ref[n]) for g, n in zip(got, names))
        assert got[0].data_ptr() == buf.data_ptr()  # packed back to back from the buffer's start
        assert got[-1].data_ptr() + ck.info(names[-1]).nbytes == buf.data_ptr() + size
    finally:
        ck.close()


def test_a_bin_checkpoint_reads_the_same(tmp_path):
    ref = load_dir(TINY_LLAMA)
    torch.save(ref, tmp_path / "pytorch_model.bin")
    shutil.copy(TINY_LLAMA / "config.json", tmp_path)
    ck = Checkpoint.open(tmp_path)
    assert all(torch.equal(ck.read(n), t) for n, t in ref.items())
    names = list(ref)[:4]
    got = ck.read_many(names, torch.empty(sum(ref[n].nbytes for n in names), dtype=torch.uint8))
    assert all(torch.equal(g, ref[n]) for g, n in zip(got, names))


def test_an_index_naming_tensors_no_shard_holds(tmp_path):
    shutil.copytree(TINY_LLAMA, tmp_path / "m")
    index = tmp_path / "m" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(AdaptkitError, match="1 tensors in the index are in no shard"):
        Checkpoint.open(tmp_path / "m")


@pytest.mark.parametrize("path, message", [("nowhere", "no such model folder"), ("file", "must be a folder")])
def test_not_a_folder(tmp_path, path, message):
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdaptkitError, match=message):
        Checkpoint.open(tmp_path / path)


@pytest.mark.parametrize("name, weight", [("model.safetensors", True), ("model-00001-of-00002.safetensors", True),
                                          ("pytorch_model.bin", True), ("model.safetensors.index.json", True),
                                          ("consolidated.pth", True), ("tokenizer.json", False),
                                          ("config.json", False)])
def test_is_weight_file(name, weight):
    assert is_weight_file(name) is weight


def test_reading_a_shard_that_shrank_is_one_line(tmp_path):
    shutil.copytree(TINY_LLAMA, tmp_path / "m")
    ck = Checkpoint.open(tmp_path / "m")
    shard = tmp_path / "m" / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:200])
    name = next(n for n, (s, _) in ck.tensors.items() if s.path == shard and _.offset > 400)
    with pytest.raises(AdaptkitError, match="unexpected end of file"):
        ck.read(name)
