"""`adaptkit convert`: round trips keep ΔW bit for bit; outputs load in peft; foreign kohya files map back."""

import json
import shutil

import pytest
import torch
from helpers import ADAPTERS, BASE_OF, TINY_LLAMA, peft_deltas
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adaptkit import convert, load_adapter
from adaptkit.cli import main
from adaptkit.formats.kohya import heuristic_module_name

KOHYA_OK = ["llama-lora", "llama-rslora-patterns", "gpt2-lora"]  # DoRA / embeddings / modules_to_save refuse


def deltas(adapter):
    return {n: m.delta() for n, m in adapter.modules.items()}


def assert_same_adapter(a, b, exact=True):
    assert set(a.modules) == set(b.modules)
    da, db = deltas(a), deltas(b)
    for n in da:
        if exact:
            assert torch.equal(da[n], db[n]), n
        else:
            assert torch.allclose(da[n], db[n], rtol=1e-6, atol=1e-8), n
        assert a.modules[n].kind == b.modules[n].kind
        if a.modules[n].use_dora:
            assert torch.equal(a.modules[n].magnitude, b.modules[n].magnitude)
    assert set(a.full_tensors) == set(b.full_tensors)
    for n in a.full_tensors:
        assert torch.equal(a.full_tensor(n), b.full_tensor(n)), n


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_peft_raw_peft_round_trip(tmp_path, name):
    raw = tmp_path / "a.safetensors"
    convert(ADAPTERS[name], raw, to="raw")
    with safe_open(str(raw), "pt") as f:
        assert "adapter_config" in f.metadata()
        assert all(k.startswith("base_model.model.") for k in f.keys())
    convert(raw, tmp_path / "back", to="peft")
    original = load_adapter(ADAPTERS[name])
    assert_same_adapter(original, load_adapter(raw))
    assert_same_adapter(original, load_adapter(tmp_path / "back"))
    # the folder loads in peft and gives the same ΔW
    ours = peft_deltas(BASE_OF[name], tmp_path / "back")
    ref = peft_deltas(BASE_OF[name], ADAPTERS[name])
    assert set(ours) == set(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)


@pytest.mark.parametrize("name", KOHYA_OK)
def test_peft_kohya_peft_round_trip(tmp_path, name):
    k = tmp_path / "k.safetensors"
    convert(ADAPTERS[name], k, to="kohya")
    keys = list(load_file(k))
    assert all(key.startswith("lora_te_") for key in keys)
    assert all(key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for key in keys)
    convert(k, tmp_path / "back", to="peft")
    original = load_adapter(ADAPTERS[name])
    back = load_adapter(tmp_path / "back")
    assert_same_adapter(original, back)
    ours = peft_deltas(BASE_OF[name], tmp_path / "back")
    for n, d in deltas(original).items():
        assert torch.allclose(ours[n], d, rtol=1e-6, atol=1e-9), n


def test_kohya_alpha_is_per_module_and_exact(tmp_path):
    k = tmp_path / "k.safetensors"
    convert(ADAPTERS["llama-rslora-patterns"], k, to="kohya")
    t = load_file(k)
    a = load_adapter(ADAPTERS["llama-rslora-patterns"])
    for m in a.modules.values():
        stem = "lora_te_" + m.name.replace(".", "_")
        r = t[stem + ".lora_down.weight"].shape[0]
        assert float(t[stem + ".alpha"]) / r == m.scaling, m.name  # scale = alpha / r, rsLoRA included
    with safe_open(str(k), "pt") as f:
        md = f.metadata()
    assert md["ss_network_dim"] == "Dynamic" and md["ss_network_alpha"] == "Dynamic"


def _foreign_kohya(path, names, rank=4, alpha=2.0, dims=(64, 64), missing_alpha=()):
    gen = torch.Generator().manual_seed(3)
    t = {}
    for n in names:
        stem = "lora_te_" + n.replace(".", "_")
        out_f, in_f = dims[n] if isinstance(dims, dict) else dims
        t[stem + ".lora_down.weight"] = (0.1 * torch.randn(rank, in_f, generator=gen)).half()
        t[stem + ".lora_up.weight"] = (0.1 * torch.randn(out_f, rank, generator=gen)).half()
        if n not in missing_alpha:
            t[stem + ".alpha"] = torch.tensor(alpha).half()
    save_file(t, str(path), metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(alpha)})
    return t


def test_foreign_kohya_file_to_peft_loads_in_peft(tmp_path):
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj", "model.layers.0.mlp.down_proj"]
    dims = {names[0]: (64, 64), names[1]: (64, 64), names[2]: (64, 128)}
    k = tmp_path / "foreign.safetensors"
    t = _foreign_kohya(k, names, dims=dims, missing_alpha=(names[1],))
    out = tmp_path / "peft"
    convert(k, out, to="peft")  # the heuristic knows these names
    got = peft_deltas(TINY_LLAMA, out)
    assert set(got) == set(names)
    for n in names:
        stem = "lora_te_" + n.replace(".", "_")
        up, down = t[stem + ".lora_up.weight"].float(), t[stem + ".lora_down.weight"].float()
        scale = 2.0 / 4 if n != names[1] else 1.0  # alpha missing means alpha = r
        assert torch.allclose(got[n].float(), scale * up @ down, atol=1e-6), n
    # mapping through --base gives the same result
    convert(k, tmp_path / "peft2", to="peft", base=TINY_LLAMA)
    assert_same_adapter(load_adapter(out), load_adapter(tmp_path / "peft2"))


def test_heuristic_names():
    assert heuristic_module_name("model_layers_10_self_attn_q_proj") == "model.layers.10.self_attn.q_proj"
    assert heuristic_module_name("transformer_h_0_attn_c_attn") == "transformer.h.0.attn.c_attn"
    assert heuristic_module_name("model_layers_0_mlp_gate_up_proj") == "model.layers.0.mlp.gate_up_proj"
    assert heuristic_module_name("model_layers_0_weird_thing") is None


def test_unresolvable_kohya_names_fail(runner, tmp_path):
    k = tmp_path / "odd.safetensors"
    _foreign_kohya(k, ["model.layers.0.custom_mixer.zz_proj"])
    res = runner.invoke(main, ["convert", str(k), "--to", "peft", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "cannot map 1 kohya names" in res.stderr and "--base" in res.stderr
    res = runner.invoke(main, ["convert", str(k), "--to", "peft", "-o", str(tmp_path / "o"), "--base", str(TINY_LLAMA)])
    assert res.exit_code == 2 and "not in --base" in res.stderr and "{param}" not in res.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name,why", [("llama-dora", "DoRA"), ("llama-embed-mts", "cannot be written as a kohya")])
def test_kohya_refuses_what_it_cannot_hold(runner, tmp_path, name, why):
    out = tmp_path / "k.safetensors"
    res = runner.invoke(main, ["convert", str(ADAPTERS[name]), "--to", "kohya", "-o", str(out)])
    assert res.exit_code == 2 and why in res.stderr and not out.exists()


@pytest.mark.parametrize("key,what", [("lora_unet_x.hada_w1_a", "LoHa"), ("lora_te_x.lokr_w1", "LoKr"),
                                       ("lora_unet_x.lora_mid.weight", "LoCon")])
def test_lycoris_refused(runner, tmp_path, key, what):
    p = tmp_path / "ly.safetensors"
    t = {key: torch.ones(2, 2), "lora_unet_y.lora_down.weight": torch.ones(2, 2),
         "lora_unet_y.lora_up.weight": torch.ones(2, 2)}
    save_file(t, str(p))
    res = runner.invoke(main, ["convert", str(p), "--to", "peft", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and what in res.stderr


def test_kohya_dora_refused(runner, tmp_path):
    p = tmp_path / "dora.safetensors"
    save_file({"lora_te_model_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(2, 64),
               "lora_te_model_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(64, 2),
               "lora_te_model_layers_0_self_attn_q_proj.dora_scale": torch.ones(1, 64)}, str(p))
    res = runner.invoke(main, ["convert", str(p), "--to", "peft", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "DoRA" in res.stderr


def test_bin_adapter_to_safetensors(runner, tmp_path):
    src = tmp_path / "bin"
    src.mkdir()
    shutil.copy(ADAPTERS["llama-lora"] / "adapter_config.json", src)
    torch.save(load_file(ADAPTERS["llama-lora"] / "adapter_model.safetensors"), src / "adapter_model.bin")
    res = runner.invoke(main, ["convert", str(src), "--to", "peft", "-o", str(tmp_path / "st"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["source_format"] == "peft"
    assert (tmp_path / "st" / "adapter_model.safetensors").exists()
    assert_same_adapter(load_adapter(ADAPTERS["llama-lora"]), load_adapter(tmp_path / "st"))


def test_raw_without_config_assumes_alpha_r_and_says_so(runner, tmp_path):
    t = load_file(ADAPTERS["llama-lora"] / "adapter_model.safetensors")
    p = tmp_path / "bare.safetensors"
    save_file(t, str(p))
    res = runner.invoke(main, ["convert", str(p), "--to", "peft", "-o", str(tmp_path / "o")])
    assert res.exit_code == 0 and "alpha = r" in res.stderr
    cfg = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 8


def test_dtype_and_output_checks(runner, tmp_path):
    out = tmp_path / "half"
    convert(ADAPTERS["llama-lora"], out, to="peft", dtype="float16")
    assert {v.dtype for v in load_file(out / "adapter_model.safetensors").values()} == {torch.float16}
    res = runner.invoke(main, ["convert", str(ADAPTERS["llama-lora"]), "--to", "raw", "-o", str(tmp_path / "x.bin")])
    assert res.exit_code == 2 and "*.safetensors" in res.stderr
    res = runner.invoke(main, ["convert", str(ADAPTERS["llama-lora"]), "--to", "peft", "-o", str(out)])
    assert res.exit_code == 2 and "--force" in res.stderr
