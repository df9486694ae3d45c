"""The adapter model against peft: the same modules, ranks, alphas and scalings, and the same ΔW."""

import json
import shutil

import pytest
import torch
from helpers import ADAPTERS, BASE_OF, peft_layers
from safetensors.torch import load_file, save_file

from adaptkit import load_adapter
from adaptkit.adapter import pattern_key


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_modules_ranks_and_scalings_match_peft(name):
    adapter = load_adapter(ADAPTERS[name])
    layers = peft_layers(BASE_OF[name], ADAPTERS[name])
    assert set(adapter.modules) == set(layers)
    for mod_name, layer in layers.items():
        m = adapter.modules[mod_name]
        assert m.rank == layer.r["default"], mod_name
        assert m.scaling == pytest.approx(layer.scaling["default"], rel=1e-12), mod_name
        assert m.use_dora == bool(layer.use_dora.get("default", False)), mod_name
        if m.kind == "embedding":
            ref = layer.get_delta_weight("default")  # (vocab, dim)
            assert torch.allclose(m.delta().T, ref, atol=1e-6), mod_name
        else:
            ref = layer.get_delta_weight("default")
            ours = m.delta().T if m.fan_in_fan_out else m.delta()
            assert torch.allclose(ours, ref, atol=1e-6), mod_name


def test_names_match_the_base_checkpoint():
    from adaptkit.io.checkpoint import Checkpoint

    for name, path in ADAPTERS.items():
        base = Checkpoint.open(BASE_OF[name])
        for m in load_adapter(path).modules.values():
            assert m.weight_name in base.tensors, m.weight_name


def test_pattern_key_follows_peft():
    from peft.utils.other import get_pattern_key

    patterns = {"q_proj": 1, "layers.1.mlp.down_proj": 2, r"model\.layers\.0\..*": 3, "proj": 4}
    for name in ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.0.mlp.up_proj",
                 "model.layers.3.mlp.down_proj", "x.k_proj", "lm_head", "a.q_proj_x"]:
        ours = pattern_key(patterns, name)
        theirs = get_pattern_key(list(patterns), name)
        assert (ours if ours is not None else name) == theirs, name


def test_modules_to_save_and_embedding_base_layer():
    a = load_adapter(ADAPTERS["llama-embed-mts"])
    assert "lm_head.weight" in a.full_tensors
    assert "model.embed_tokens.weight" in a.full_tensors  # peft saves embed_tokens.base_layer.weight
    assert a.modules["model.embed_tokens"].kind == "embedding"
    assert not a.unclaimed


def test_legacy_bin_adapter_loads_with_weights_only(tmp_path):
    src = ADAPTERS["llama-lora"]
    dst = tmp_path / "bin-adapter"
    dst.mkdir()
    shutil.copy(src / "adapter_config.json", dst)
    torch.save(load_file(src / "adapter_model.safetensors"), dst / "adapter_model.bin")
    a, b = load_adapter(dst), load_adapter(src)
    assert set(a.modules) == set(b.modules)
    for k in a.modules:
        assert torch.equal(a.modules[k].delta(), b.modules[k].delta())


def test_raw_file_without_config_assumes_alpha_r(tmp_path):
    tensors = load_file(ADAPTERS["llama-lora"] / "adapter_model.safetensors")
    raw = tmp_path / "raw.safetensors"
    save_file({k.removeprefix("base_model.model."): v for k, v in tensors.items()}, raw)
    a = load_adapter(raw)
    assert len(a.modules) == 14
    assert all(m.rank == 8 and m.scaling == 1.0 for m in a.modules.values())
    assert any("alpha = r" in n for n in a.notes)


def test_raw_file_with_config_metadata(tmp_path):
    tensors = load_file(ADAPTERS["llama-rslora-patterns"] / "adapter_model.safetensors")
    cfg = json.loads((ADAPTERS["llama-rslora-patterns"] / "adapter_config.json").read_text())
    raw = tmp_path / "raw.safetensors"
    save_file(tensors, raw, metadata={"adapter_config": json.dumps(cfg)})
    a, b = load_adapter(raw), load_adapter(ADAPTERS["llama-rslora-patterns"])
    assert {k: m.scaling for k, m in a.modules.items()} == {k: m.scaling for k, m in b.modules.items()}
