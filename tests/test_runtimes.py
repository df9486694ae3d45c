"""GGUF (llama.cpp) and MLX exports, and the readiness checks for vLLM, llama.cpp and mlx-lm."""

import json

import pytest
import torch
from helpers import ADAPTERS, TINY_LLAMA, peft_deltas
from safetensors.torch import load_file

from adaptkit import convert, load_adapter
from adaptkit.cli import main
from adaptkit.formats.gguf import permute_rows, read_gguf_deltas, unpermute_rows

gguf = pytest.importorskip("gguf")
LLAMA_CFG = json.loads((TINY_LLAMA / "config.json").read_text())


@pytest.mark.parametrize("name", ["llama-lora", "llama-rslora-patterns"])
@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16"])
def test_gguf_reconstructs_peft_delta(tmp_path, name, outtype):
    out = tmp_path / "a.gguf"
    convert(ADAPTERS[name], out, to="gguf", base=TINY_LLAMA, outtype=outtype)
    reader = gguf.GGUFReader(str(out))
    fields = {f.name: f for f in reader.fields.values()}

    def text(key):
        f = fields[key]
        return bytes(f.parts[f.data[0]]).decode()

    assert text("general.type") == "adapter" and text("adapter.type") == "lora"
    assert text("general.architecture") == "llama"
    assert "adapter.lora.alpha" in fields
    base_ne = {}  # llama.cpp's shape checks, on ne (innermost first)
    for mod in load_adapter(ADAPTERS[name]).modules.values():
        out_f, in_f = mod.out_features, mod.in_features
        base_ne[mod.name] = (in_f, out_f)
    tensors = {t.name: [int(x) for x in t.shape] for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for mod, (ne0, ne1) in base_ne.items():
        stem = names.get_name(mod) + ".weight"
        a, b = tensors[stem + ".lora_a"], tensors[stem + ".lora_b"]
        assert ne0 == a[0] and ne1 == b[1] and a[1] == b[0], mod  # model ne[0]==a.ne[0], ne[1]==b.ne[1], a.ne[1]==b.ne[0]
    got = read_gguf_deltas(out, LLAMA_CFG)
    ref = peft_deltas(TINY_LLAMA, ADAPTERS[name])  # peft's own ΔW, with per-module rank/alpha/rsLoRA
    tol = {"f32": 1e-6, "f16": 2e-3, "bf16": 2e-2}[outtype]
    for mod, d in ref.items():
        g = got[names.get_name(mod) + ".weight"]
        assert torch.allclose(g, d, atol=tol * d.abs().max().item(), rtol=0), (mod, outtype)


def test_gguf_permutation_round_trips():
    w = torch.randn(64, 8)
    p = permute_rows(w, 4)
    assert not torch.equal(p, w) and torch.equal(unpermute_rows(p, 4), w)
    # the q rows really move as llama.cpp's converter moves them: head-interleaved halves
    head = w[:16]
    assert torch.equal(p[:16][0::2], head[:8]) and torch.equal(p[:16][1::2], head[8:])


def test_gguf_refusals(runner, tmp_path):
    res = runner.invoke(main, ["convert", str(ADAPTERS["llama-dora"]), "--to", "gguf", "--base", str(TINY_LLAMA),
                               "-o", str(tmp_path / "d.gguf")])
    assert res.exit_code == 2 and "DoRA" in res.stderr
    res = runner.invoke(main, ["convert", str(ADAPTERS["llama-embed-mts"]), "--to", "gguf", "--base", str(TINY_LLAMA),
                               "-o", str(tmp_path / "m.gguf")])
    assert res.exit_code == 2 and "modules_to_save" in res.stderr
    res = runner.invoke(main, ["convert", str(ADAPTERS["gpt2-lora"]), "--to", "gguf", "--base",
                               str(ADAPTERS["gpt2-lora"].parent.parent / "tiny-gpt2"), "-o", str(tmp_path / "g.gguf")])
    assert res.exit_code == 2 and "GGUF export supports" in res.stderr
    assert not list(tmp_path.glob("*.gguf"))


@pytest.mark.parametrize("name", ["llama-lora", "llama-rslora-patterns"])
def test_mlx_round_trip_and_layout(tmp_path, name):
    out = tmp_path / "mlx"
    convert(ADAPTERS[name], out, to="mlx", base=TINY_LLAMA)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["num_layers"] == 2
    assert set(cfg["lora_parameters"]) >= {"rank", "scale", "keys"}
    assert "self_attn.q_proj" in cfg["lora_parameters"]["keys"]
    t = load_file(out / "adapters.safetensors")
    a = load_adapter(ADAPTERS[name])
    scale = cfg["lora_parameters"]["scale"]
    for m in a.modules.values():
        la, lb = t[f"{m.name}.lora_a"], t[f"{m.name}.lora_b"]
        assert la.shape == (m.in_features, m.shape_rank) and lb.shape == (m.shape_rank, m.out_features)
        # mlx-lm's forward: x @ lora_a @ lora_b * scale == (ΔW x)ᵀ
        assert torch.allclose(scale * (la @ lb), m.delta().T, atol=1e-6), m.name
    convert(out, tmp_path / "back", to="peft")
    back = load_adapter(tmp_path / "back")
    assert set(back.modules) == set(a.modules)
    for n in a.modules:
        assert torch.allclose(back.modules[n].delta(), a.modules[n].delta(), atol=1e-6, rtol=1e-6), n


def test_checks_report_each_rule(runner, tmp_path):
    def run(name, *checks, rank=None):
        args = ["inspect", str(ADAPTERS[name]), "--json"] + [a for c in checks for a in ("--check", c)]
        if rank:
            args += ["--max-lora-rank", str(rank)]
        res = runner.invoke(main, args)
        return res.exit_code, json.loads(res.stdout)["checks"]

    code, checks = run("llama-lora", "vllm", "llamacpp", "mlx")
    assert code == 0 and all(c["ok"] for c in checks.values())
    code, checks = run("llama-lora", "vllm", rank=4)
    assert code == 1 and checks["vllm"]["problems"][0]["rule"] == "max_lora_rank"
    assert "--rank 4" in checks["vllm"]["problems"][0]["fix"]
    code, checks = run("llama-dora", "vllm", "llamacpp", "mlx")
    assert code == 1 and all(any(p["rule"] == "dora" for p in c["problems"]) for c in checks.values())
    code, checks = run("llama-embed-mts", "vllm", "llamacpp")
    assert any(p["rule"] == "modules_to_save" for p in checks["vllm"]["problems"])
    assert any(p["rule"] == "embedding" for p in checks["llamacpp"]["problems"])
    code, checks = run("gpt2-lora", "mlx")
    assert code == 1 and any(p["rule"] == "conv1d" for p in checks["mlx"]["problems"])


def test_rank_reduction_fix_makes_vllm_happy(runner, tmp_path):
    from adaptkit import combine
    from adaptkit.readiness import check

    combine([ADAPTERS["llama-lora"]], tmp_path / "r4", method="linear", rank=4)
    assert check(load_adapter(tmp_path / "r4"), "vllm", max_lora_rank=4).ok
    assert not check(load_adapter(ADAPTERS["llama-lora"]), "vllm", max_lora_rank=4).ok
