"""`adaptkit inspect`: JSON fields against peft, the spectrum against a full SVD, warnings and errors."""

import json
import shutil

import pytest
import torch
from helpers import ADAPTERS, BASE_OF, peft_layers
from safetensors.torch import load_file, save_file

from adaptkit import load_adapter
from adaptkit.cli import main


@pytest.mark.parametrize("name", ["llama-rslora-patterns", "gpt2-lora", "llama-embed-mts"])
def test_json_reports_peft_ranks_and_scalings(runner, name):
    res = runner.invoke(main, ["inspect", str(ADAPTERS[name]), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    for key in ("peft_type", "base_model", "r", "lora_alpha", "parameters", "modules"):
        assert key in report
    layers = peft_layers(BASE_OF[name], ADAPTERS[name])
    assert {m["name"] for m in report["modules"]} == set(layers)
    for m in report["modules"]:
        layer = layers[m["name"]]
        assert m["rank"] == layer.r["default"]
        assert m["scaling"] == pytest.approx(layer.scaling["default"])
        assert {"name", "rank", "alpha", "scaling", "in_features", "out_features"} <= set(m)
    n_params = sum(v.numel() for v in load_file(ADAPTERS[name] / "adapter_model.safetensors").values())
    assert report["parameters"] == n_params


def test_svd_equals_full_svd_of_delta(runner):
    res = runner.invoke(main, ["inspect", str(ADAPTERS["llama-rslora-patterns"]), "--json", "--svd"])
    report = json.loads(res.output)
    adapter = load_adapter(ADAPTERS["llama-rslora-patterns"])
    for m in report["modules"]:
        full = torch.linalg.svdvals(adapter.modules[m["name"]].delta().double())[: m["rank"]]
        assert torch.allclose(torch.tensor(m["singular_values"], dtype=torch.float64), full, rtol=1e-6)
        energy = torch.cumsum(full ** 2, 0) / (full ** 2).sum()
        assert m["rank_90"] == int((energy < 0.9 - 1e-12).sum()) + 1
        assert 1 <= m["rank_90"] <= m["rank_99"] <= m["rank"]


def test_human_output_has_summary_and_table(runner):
    res = runner.invoke(main, ["inspect", str(ADAPTERS["llama-dora"])])
    assert res.exit_code == 0
    assert "DoRA" in res.output and "yes" in res.output
    assert "model.layers.1.mlp.down_proj" in res.output


def test_health_warnings(runner, tmp_path):
    src = ADAPTERS["llama-lora"]
    dst = tmp_path / "sick"
    shutil.copytree(src, dst)
    t = load_file(dst / "adapter_model.safetensors")
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].zero_()
    t["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"][0, 0] = float("nan")
    t["base_model.model.stray.tensor"] = torch.ones(2)
    save_file(t, dst / "adapter_model.safetensors")
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"v_proj": 4}
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    res = runner.invoke(main, ["inspect", str(dst), "--json"])
    assert res.exit_code == 0
    warnings = " | ".join(json.loads(res.output)["warnings"])
    assert "B is all zero" in warnings and "layers.0.self_attn.q_proj" in warnings
    assert "NaN or Inf" in warnings and "layers.1.self_attn.k_proj" in warnings
    assert "belong to no LoRA module" in warnings and "stray.tensor" in warnings
    assert "rank differs from the config" in warnings and "v_proj" in warnings


def _bad_adapter(tmp_path, kind):
    dst = tmp_path / kind
    shutil.copytree(ADAPTERS["llama-lora"], dst)
    cfg_path = dst / "adapter_config.json"
    if kind == "missing-config":
        cfg_path.unlink()
    elif kind == "malformed-config":
        cfg_path.write_text('{"peft_type": "LORA", "r": 8,')
    elif kind == "no-peft-type":
        cfg_path.write_text('{"r": 8}')
    elif kind in ("ia3", "loha", "prefix"):
        ptype = {"ia3": "IA3", "loha": "LOHA", "prefix": "PREFIX_TUNING"}[kind]
        cfg_path.write_text(json.dumps({"peft_type": ptype}))
    elif kind == "truncated":
        p = dst / "adapter_model.safetensors"
        p.write_bytes(p.read_bytes()[:5000])
    elif kind == "corrupt":
        p = dst / "adapter_model.safetensors"
        raw = bytearray(p.read_bytes())
        raw[10:30] = b"\xff" * 20
        p.write_bytes(bytes(raw))
    elif kind == "no-weights":
        (dst / "adapter_model.safetensors").unlink()
    return dst


@pytest.mark.parametrize("kind,expect", [
    ("missing-config", "no adapter_config.json"),
    ("malformed-config", "malformed JSON"),
    ("no-peft-type", "no peft_type"),
    ("ia3", "IA3"),
    ("loha", "LoHa"),
    ("prefix", "prefix tuning"),
    ("truncated", "truncated"),
    ("corrupt", "corrupt header"),
    ("no-weights", "no adapter weights"),
])
def test_bad_input_exits_2_with_one_line(runner, tmp_path, kind, expect):
    path = _bad_adapter(tmp_path, kind)
    res = runner.invoke(main, ["inspect", str(path)])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert expect in lines[0] and "Traceback" not in res.output
    assert str(tmp_path) in lines[0]  # names the file
    if kind in ("ia3", "loha", "prefix"):
        assert "only LoRA" in lines[0] or "LoRA adapters only" in lines[0]


def test_missing_path_exits_2(runner, tmp_path):
    res = runner.invoke(main, ["inspect", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "no such adapter" in res.stderr


def test_lycoris_file_refused(runner, tmp_path):
    p = tmp_path / "loha.safetensors"
    save_file({"lora_unet_down.hada_w1_a": torch.ones(2, 2), "lora_unet_down.hada_w1_b": torch.ones(2, 2)}, p)
    res = runner.invoke(main, ["inspect", str(p)])
    assert res.exit_code == 2 and "LoHa" in res.stderr
