"""adaptkit/io/layout.py: which files of a model folder hold its weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from adaptkit.errors import AdaptkitError
from adaptkit.io.layout import find_weight_files
from helpers import ADAPTERS, TINY_LLAMA


def test_sharded_safetensors_in_index_order():
    found = find_weight_files(TINY_LLAMA)
    assert found.kind == "safetensors" and found.index.name == "model.safetensors.index.json"
    # in the order the index first names them
    assert [p.name for p in found.files] == list(dict.fromkeys(found.weight_map.values()))
    assert sorted(p.name for p in found.files) == ["model-00001-of-00002.safetensors",
                                                   "model-00002-of-00002.safetensors"]


def test_single_files_and_bins(tmp_path):
    save_file({"a": torch.zeros(1)}, tmp_path / "model.safetensors")
    assert [p.name for p in find_weight_files(tmp_path).files] == ["model.safetensors"]
    other = tmp_path / "other"
    other.mkdir()
    save_file({"a": torch.zeros(1)}, other / "weights.safetensors")
    save_file({"b": torch.zeros(1)}, other / "adapter_model.safetensors")  # not a base weight
    assert [p.name for p in find_weight_files(other).files] == ["weights.safetensors"]
    bins = tmp_path / "bins"
    bins.mkdir()
    torch.save({"a": torch.zeros(1)}, bins / "pytorch_model.bin")
    found = find_weight_files(bins)
    assert found.kind == "bin" and [p.name for p in found.files] == ["pytorch_model.bin"]


@pytest.mark.parametrize("case, message", [
    ("adapter", "this is a LoRA adapter"), ("empty", "no model weights found"),
    ("missing-shard", "listed in the index is missing"), ("index-list", "weight_map must map"),
    ("path-in-index", "not a file name"),
])
def test_what_is_not_a_model_folder(tmp_path, case, message):
    folder = ADAPTERS["llama-lora"] if case == "adapter" else tmp_path
    index = tmp_path / "model.safetensors.index.json"
    if case == "missing-shard":
        index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    elif case == "index-list":
        index.write_text(json.dumps({"weight_map": ["a"]}))
    elif case == "path-in-index":
        index.write_text(json.dumps({"weight_map": {"a": "../elsewhere.safetensors"}}))
    with pytest.raises(AdaptkitError, match=message):
        find_weight_files(folder)
