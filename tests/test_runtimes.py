"""GGUF (llama.cpp) and MLX exports, and the readiness checks for vLLM, llama.cpp and mlx-lm."""

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import ADAPTERS, TINY_LLAMA, assert_one_line_error, invoke, load_dir, peft_deltas
from safetensors.torch import load_file

from adaptkit import convert, inspect, load_adapter, merge
from adaptkit.cli import main
from adaptkit.formats.gguf import permute_rows, read_gguf_deltas, unpermute_rows
from adaptkit.errors import AdaptkitError

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


def test_gguf_base_config_without_architectures(tmp_path):
    """A base whose config.json has no ``architectures``: its model_type says what it is."""
    bare = tmp_path / "base"
    shutil.copytree(TINY_LLAMA, bare)
    cfg = json.loads((bare / "config.json").read_text())
    cfg.pop("architectures", None)
    (bare / "config.json").write_text(json.dumps(cfg))
    convert(ADAPTERS["llama-lora"], tmp_path / "a.gguf", to="gguf", base=TINY_LLAMA)
    convert(ADAPTERS["llama-lora"], tmp_path / "b.gguf", to="gguf", base=bare)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


@pytest.mark.parametrize("edit, says", [
    ({"architectures": "LlamaForCausalLM"}, "not a list of class names"),  # a bare string, not read as "L"
    ({"architectures": None, "model_type": "nosuch"}, "model_type 'nosuch', which names no causal LM"),
])
def test_gguf_base_config_malformed_or_unknown(runner, tmp_path, edit, says):
    bare = tmp_path / "base"
    shutil.copytree(TINY_LLAMA, bare)
    cfg = {**json.loads((bare / "config.json").read_text()), **edit}
    (bare / "config.json").write_text(json.dumps(cfg))
    res = runner.invoke(main, ["convert", str(ADAPTERS["llama-lora"]), "--to", "gguf", "--base", str(bare),
                               "-o", str(tmp_path / "a.gguf")])
    assert res.exit_code == 2 and says in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "a.gguf").exists()


def test_gguf_refusals(runner, tmp_path):
    res = runner.invoke(main, ["convert", str(ADAPTERS["llama-dora"]), "--to", "gguf", "--base", str(TINY_LLAMA),
                               "-o", str(tmp_path / "d.gguf")])
    assert res.exit_code == 2 and "DoRA" in res.stderr
    res = runner.invoke(main, ["convert", str(ADAPTERS["llama-embed-mts"]), "--to", "gguf", "--base", str(TINY_LLAMA),
                               "-o", str(tmp_path / "m.gguf")])
    assert res.exit_code == 2 and "modules_to_save" in res.stderr
    other = tmp_path / "dbrx"  # an architecture not read off llama.cpp's converter: refused, not guessed
    shutil.copytree(ADAPTERS["gpt2-lora"].parent.parent / "tiny-gpt2", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["DbrxForCausalLM"]}))
    res = runner.invoke(main, ["convert", str(ADAPTERS["gpt2-lora"]), "--to", "gguf", "--base", str(other),
                               "-o", str(tmp_path / "g.gguf")])
    assert res.exit_code == 2 and "GGUF export supports" in res.stderr and "DbrxForCausalLM" in res.stderr
    assert not list(tmp_path.glob("*.gguf"))


def test_gguf_refuses_a_malformed_head_count_in_one_line(runner, tmp_path):
    base = tmp_path / "gpt2"
    shutil.copytree(ADAPTERS["gpt2-lora"].parent.parent / "tiny-gpt2", base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "n_head": "x"}))
    res = runner.invoke(main, ["convert", str(ADAPTERS["gpt2-lora"]), "--to", "gguf", "--base", str(base),
                               "-o", str(tmp_path / "g.gguf")])
    assert res.exit_code == 2 and "n_head is 'x', not a whole number" in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "g.gguf").exists()


def test_gguf_takes_gpt2_conv1d_loras_in_llama_cpps_orientation(tmp_path):
    """GPT-2's Conv1D weights are stored (in, out); llama.cpp's converter (gpt2.py) transposes them to
    (out, in), the orientation of peft's B·A for a fan_in_fan_out LoRA: the factors go as they are, and
    what llama.cpp adds is peft's merge delta transposed (llama.cpp itself runs it in test_llama_cpp)."""
    from helpers import peft_merged

    from fixtures import build

    base = ADAPTERS["gpt2-lora"].parent.parent / "tiny-gpt2"
    out = tmp_path / "g.gguf"
    convert(ADAPTERS["gpt2-lora"], out, to="gguf", base=base)
    got = read_gguf_deltas(out, json.loads((base / "config.json").read_text()))
    _, merged = peft_merged(base, [ADAPTERS["gpt2-lora"]])
    ref, plain = merged.state_dict(), build.load_model(base).state_dict()
    pairs = {"attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "mlp.c_fc": "ffn_up"}
    for layer in range(2):
        for hf, gname in pairs.items():
            name = f"transformer.h.{layer}.{hf}.weight"
            want = (ref[name] - plain[name]).T  # (out, in)
            assert want.abs().max() > 0, name  # the adapter moves this weight
            d = got[f"blk.{layer}.{gname}.weight"]
            assert d.shape == want.shape and torch.allclose(d, want, atol=1e-5 * want.abs().max().item()), name


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
    scale, rank = cfg["lora_parameters"]["scale"], cfg["lora_parameters"]["rank"]
    assert rank == max(m.shape_rank for m in a.modules.values())  # one rank: mlx-lm refuses any other
    for m in a.modules.values():
        la, lb = t[f"{m.name}.lora_a"], t[f"{m.name}.lora_b"]
        assert la.shape == (m.in_features, rank) and lb.shape == (rank, m.out_features)  # smaller ones zero-padded
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
    assert "--max-lora-rank 8" in checks["vllm"]["problems"][0]["fix"]  # a value vLLM accepts
    code, checks = run("llama-lora", "vllm", rank=2)
    assert "--max-lora-rank 8" in checks["vllm"]["problems"][0]["fix"]
    code, checks = run("llama-dora", "vllm", "llamacpp", "mlx")
    assert code == 1 and all(any(p["rule"] == "dora" for p in checks[t]["problems"]) for t in ("vllm", "llamacpp"))
    assert checks["mlx"]["ok"]  # mlx-lm's dora (convert --to mlx writes it)
    code, checks = run("llama-rslora-patterns", "vllm", "mlx")  # vLLM applies one lora_alpha / r to all
    assert code == 1 and [p["rule"] for p in checks["vllm"]["problems"]] == ["scaling"] and checks["mlx"]["ok"]
    assert "--to vllm" in checks["vllm"]["problems"][0]["fix"]
    code, checks = run("llama-embed-mts", "vllm", "llamacpp")
    assert any(p["rule"] == "modules_to_save" for p in checks["vllm"]["problems"])
    assert [p["rule"] for p in checks["llamacpp"]["problems"]] == ["modules_to_save"]  # token_embd LoRA is fine there
    code, checks = run("gpt2-lora", "mlx")
    assert code == 1 and any(p["rule"] == "conv1d" for p in checks["mlx"]["problems"])


def test_rank_reduction_fix_makes_vllm_happy(runner, tmp_path):
    from adaptkit import combine
    from adaptkit.readiness import check

    combine([ADAPTERS["llama-lora"]], tmp_path / "r4", method="linear", rank=4)
    assert check(load_adapter(tmp_path / "r4"), "vllm", max_lora_rank=4).ok
    assert not check(load_adapter(ADAPTERS["llama-lora"]), "vllm", max_lora_rank=4).ok


def _vllm_like_deltas(folder):
    """ΔW per module as vLLM computes it: one scaling from r, lora_alpha and use_rslora (its
    PEFTHelper), rank_pattern and alpha_pattern ignored."""
    import math

    cfg = json.loads((folder / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    t = load_file(folder / "adapter_model.safetensors")
    out = {}
    for key in t:
        if key.endswith(".lora_A.weight"):
            mod = key[len("base_model.model."): -len(".lora_A.weight")]
            out[mod] = s * (t[key.replace("lora_A", "lora_B")].double() @ t[key].double())
    return out


def test_vllm_export_is_exact_under_one_scaling(runner, tmp_path):
    from helpers import peft_deltas

    src = ADAPTERS["llama-rslora-patterns"]
    want = {n: d.double() for n, d in peft_deltas(TINY_LLAMA, src).items()}
    wrong = _vllm_like_deltas(src)  # what vLLM makes of the PEFT folder itself: scaled wrongly
    assert max(float((wrong[n] - want[n]).norm() / want[n].norm()) for n in want) > 0.1
    res = runner.invoke(main, ["convert", str(src), "--to", "vllm", "-o", str(tmp_path / "v")])
    assert res.exit_code == 0, res.output
    got = _vllm_like_deltas(tmp_path / "v")
    assert set(got) == set(want)
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-7, rtol=1e-6), n
    from adaptkit.readiness import check

    assert check(load_adapter(tmp_path / "v"), "vllm").ok
    res = runner.invoke(main, ["convert", str(src), "--to", "vllm", "-o", str(tmp_path / "p"), "--pad-rank", "16"])
    assert res.exit_code == 0, res.output
    t = load_file(tmp_path / "p" / "adapter_model.safetensors")
    assert {v.shape[0] for k, v in t.items() if "lora_A" in k} == {16}
    assert all(torch.allclose(d, want[n], atol=1e-7, rtol=1e-6) for n, d in _vllm_like_deltas(tmp_path / "p").items())
    for args, needle in ((["--pad-rank", "2"], "below the adapter's largest rank 8"),
                         (["--to", "peft", "--pad-rank", "16"], "--pad-rank"),):
        to = [] if "--to" in args else ["--to", "vllm"]
        res = runner.invoke(main, ["convert", str(src), *to, *args, "-o", str(tmp_path / "x")])
        assert res.exit_code == 2 and needle in res.stderr, res.stderr
    for name, rule in (("llama-dora", "dora"), ("llama-embed-mts", "modules_to_save")):
        res = runner.invoke(main, ["convert", str(ADAPTERS[name]), "--to", "vllm", "-o", str(tmp_path / name)])
        assert res.exit_code == 2 and rule in res.stderr and not (tmp_path / name).exists()


def test_mlx_export_dora_and_num_layers(runner, tmp_path):
    res = runner.invoke(main, ["convert", str(ADAPTERS["llama-lora"]), "--to", "mlx", "-o", str(tmp_path / "nb")])
    if (TINY_LLAMA / "config.json").exists() and res.exit_code == 0:  # the adapter's own base_model was found
        assert json.loads((tmp_path / "nb" / "adapter_config.json").read_text())["num_layers"] == 2
    nobase = tmp_path / "nobase"
    shutil.copytree(ADAPTERS["llama-lora"], nobase)
    cfg = json.loads((nobase / "adapter_config.json").read_text())
    (nobase / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": None}))
    res = runner.invoke(main, ["convert", str(nobase), "--to", "mlx", "-o", str(tmp_path / "m")])
    assert res.exit_code == 2 and "base model" in res.stderr and not (tmp_path / "m").exists()
    convert(ADAPTERS["llama-dora"], tmp_path / "d", to="mlx", base=TINY_LLAMA)
    cfg = json.loads((tmp_path / "d" / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "dora"
    t = load_file(tmp_path / "d" / "adapters.safetensors")
    a = load_adapter(ADAPTERS["llama-dora"])
    for m in a.modules.values():
        assert torch.equal(t[f"{m.name}.m"], m.magnitude.float()), m.name
    back = load_adapter(tmp_path / "d")  # mlx → adaptkit: DoRA kept, the same merge
    assert all(back.modules[n].use_dora for n in a.modules)
    merge(TINY_LLAMA, ADAPTERS["llama-dora"], tmp_path / "m1", dtype="float32")
    merge(TINY_LLAMA, tmp_path / "d", tmp_path / "m2", dtype="float32")
    m1, m2 = load_dir(tmp_path / "m1"), load_dir(tmp_path / "m2")
    assert all(torch.allclose(m1[k], m2[k], atol=1e-6) for k in m1)


@pytest.fixture(scope="module")
def mlx_base(tmp_path_factory):
    """A tiny fp32 Llama mlx-lm can load (its rope_theta at the top level, as mlx-lm reads it)."""
    pytest.importorskip("mlx_lm")
    from fixtures import build

    path = tmp_path_factory.mktemp("mlx") / "llama32"
    build.build_model(build.llama_config(), path, dtype=torch.float32)
    cfg = json.loads((path / "config.json").read_text())
    cfg.setdefault("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("name", ["llama-lora", "llama-rslora-patterns", "llama-dora"])
def test_mlx_lm_itself_computes_what_peft_does(tmp_path, mlx_base, name):
    """The real runtime (mlx-lm on the CPU): mlx_lm loads every export, and its logits match peft's
    unmerged model within mlx-lm's own base-vs-base noise."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model
    from peft import PeftModel

    from fixtures import build

    out = tmp_path / "mlx"
    convert(ADAPTERS[name], out, to="mlx", base=mlx_base)
    ids = np.random.default_rng(0).integers(3, 250, size=(1, 12))
    base_mlx, _ = load_model(mlx_base)
    base_logits = np.array(base_mlx(mx.array(ids)).astype(mx.float32))
    adapted = load_adapters(load_model(mlx_base)[0], str(out))
    got = np.array(adapted(mx.array(ids)).astype(mx.float32))
    with torch.no_grad():
        plain = build.load_model(mlx_base)(torch.tensor(ids)).logits.numpy()
        want = PeftModel.from_pretrained(build.load_model(mlx_base), ADAPTERS[name]).eval()(torch.tensor(ids)).logits.numpy()
    noise = float(np.abs(base_logits - plain).max())  # mlx-lm against transformers, no adapter
    err, effect = float(np.abs(got - want).max()), float(np.abs(want - plain).max())
    print(f"\nmlx-lm {name}: max |Δlogits| vs peft {err:.2e}, base vs base {noise:.2e}, the adapter's effect {effect:.2e}")
    assert err <= max(10 * noise, 1e-4) and effect > 100 * err, (err, noise, effect)


def _assert_mlx_lm_computes_peft(base, ad, mlx_dir, label: str) -> None:
    """mlx-lm with the export at ``mlx_dir`` matches peft's unmerged model within mlx-lm's own base-vs-base
    noise, and the adapter moves the logits far more than that."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model
    from peft import PeftModel

    from fixtures import build

    ids = np.random.default_rng(0).integers(3, 250, size=(1, 12))
    base_logits = np.array(load_model(base)[0](mx.array(ids)).astype(mx.float32))
    got = np.array(load_adapters(load_model(base)[0], str(mlx_dir))(mx.array(ids)).astype(mx.float32))
    with torch.no_grad():
        plain = build.load_model(base)(torch.tensor(ids)).logits.numpy()
        want = PeftModel.from_pretrained(build.load_model(base), ad).eval()(torch.tensor(ids)).logits.numpy()
    noise = float(np.abs(base_logits - plain).max())
    err, effect = float(np.abs(got - want).max()), float(np.abs(want - plain).max())
    print(f"\nmlx-lm {label}: vs peft {err:.2e}, base vs base {noise:.2e}, effect {effect:.2e}")
    assert err <= max(10 * noise, 1e-4) and effect > 100 * err, (err, noise, effect)


@pytest.mark.parametrize("family", ["qwen3-moe", "deepseek-v3", "mixtral", "olmoe"])
def test_mlx_lm_itself_runs_expert_loras_as_peft_does(tmp_path, family):
    """A peft LoRA on transformers 5's fused expert parameters, exported onto mlx-lm's switch_mlp
    (lora_a (E, r, in), lora_b (E, out, r)) from the base's per-expert checkpoint: mlx-lm loads it and
    its logits match peft's unmerged model within mlx-lm's own base-vs-base noise; rank and alpha
    patterns, rsLoRA and DeepSeek's dense first layer included."""
    pytest.importorskip("mlx_lm")
    from transformers import OlmoeConfig

    from fixtures import build

    # Mixtral's experts are block_sparse_moe.experts.N.w1/w2/w3 on disk, mlx-lm's block_sparse_moe.switch_mlp
    config = {"qwen3-moe": build.qwen3_moe_config, "deepseek-v3": build.deepseek_v3_config, "mixtral":
              build.mixtral_config, "olmoe": lambda: OlmoeConfig(
                  vocab_size=256, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, num_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)}[family]()
    base = tmp_path / "base"
    build.build_model(config, base, dtype=torch.float32)
    cfg = json.loads((base / "config.json").read_text())  # what mlx-lm's ModelArgs read under their old names
    cfg.setdefault("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    cfg.setdefault("num_experts", cfg.get("num_local_experts"))
    (base / "config.json").write_text(json.dumps(cfg))
    ad = build.build_adapter(base, tmp_path / "lora", r=4, lora_alpha=8, use_rslora=True, target_modules=["o_proj"],
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                             rank_pattern={"layers.1.self_attn.o_proj": 2}, alpha_pattern={"mlp.experts.down_proj": 3})
    convert(ad, tmp_path / "mlx", to="mlx", base=base)
    t = load_file(tmp_path / "mlx" / "adapters.safetensors")
    moe = "block_sparse_moe" if family == "mixtral" else "mlp"
    assert tuple(t[f"model.layers.1.{moe}.switch_mlp.gate_proj.lora_a"].shape) == (4, 4, 64)  # (E, r, in)
    assert tuple(t[f"model.layers.1.{moe}.switch_mlp.down_proj.lora_b"].shape) == (4, 64, 4)  # (E, out, r)
    _assert_mlx_lm_computes_peft(base, ad, tmp_path / "mlx", f"{family} experts")


@pytest.mark.parametrize("family", ["qwen3-vl", "qwen3.5", "qwen3.5-moe", "mistral3", "gemma3", "gemma4", "llama4",
                                    "qwen2.5-vl"])
def test_mlx_lm_itself_runs_a_vlm_language_model_lora(tmp_path, family):
    """A LoRA on a vision-language model's language model (peft: model.language_model.layers…): mlx-lm's
    VLM classes hold it as language_model.model.layers… (their sanitize maps the checkpoint's names
    there), so the export names tensors as mlx-lm's modules are; mlx-lm loads it, matches peft's
    unmerged model within its own base-vs-base noise, and equals mlx-lm on the adaptkit merge. Read
    back, the modules have peft's names again (model.language_model.; Llama 4's, which keeps
    language_model.model. in memory, are not told apart without the base's config). Qwen3.5-MoE with
    its experts as its Hub checkpoints store them, fused (E, 2I, H): mlx-lm's sanitize splits gate_up in
    halves into switch_mlp, and the export lays the expert LoRA out the same way."""
    pytest.importorskip("mlx_lm")
    import mlx.core as mx
    import numpy as np
    import transformers
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model
    from peft import PeftModel

    from fixtures import build

    config, cls = {"qwen3-vl": (lambda: build.qwen_vl_config("3"), transformers.Qwen3VLForConditionalGeneration),
                   "qwen3.5": (lambda: build.qwen_vl_config("3.5"), transformers.Qwen3_5ForConditionalGeneration),
                   "qwen3.5-moe": (lambda: build.qwen_vl_config("3.5-moe"),
                                   transformers.Qwen3_5MoeForConditionalGeneration),
                   "mistral3": (build.mistral3_vlm_config, transformers.Mistral3ForConditionalGeneration),
                   "gemma4": (build.gemma4_vlm_config, transformers.Gemma4ForConditionalGeneration),
                   "gemma3": (build.gemma3_vlm_config, transformers.Gemma3ForConditionalGeneration),
                   # four layers: mlx-lm's Llama 4 takes its global mask from the fourth
                   "llama4": (lambda: build.llama4_config(vlm=True, layers=4), transformers.Llama4ForConditionalGeneration),
                   "qwen2.5-vl": (lambda: build.qwen_vl_config("2.5"),
                                  transformers.Qwen2_5_VLForConditionalGeneration)}[family]
    base = tmp_path / "base"
    build.build_model(config(), base, dtype=torch.float32, auto=cls)
    if family == "qwen3.5-moe":
        base = build.to_fused_expert_layout(base, tmp_path / "fused")
    cfg = json.loads((base / "config.json").read_text())
    text = cfg["text_config"]  # what mlx-lm's Llama 4 and Qwen2.5-VL read under the old names
    if family in ("llama4", "qwen2.5-vl"):
        text.setdefault("rope_theta", (text.get("rope_parameters") or {}).get("rope_theta", 500000.0))
    if family == "llama4":
        text.setdefault("rope_scaling", None)
    cfg.setdefault("vocab_size", text["vocab_size"])  # mlx-lm's Gemmas read it at the top (their default: Gemma's)
    (base / "config.json").write_text(json.dumps(cfg))
    linear = "|in_proj_qkv|in_proj_z|out_proj" if family.startswith("qwen3.5") else ""  # its gated delta net
    experts = dict(target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                   alpha_pattern={"mlp.experts.down_proj": 3}) if family == "qwen3.5-moe" else {}
    ad = build.build_adapter(base, tmp_path / "lora", r=4, lora_alpha=8, use_rslora=True, scale=0.2,
                             target_modules=rf".*language_model.*\.(q_proj|o_proj|down_proj{linear})",
                             rank_pattern={"layers.1.self_attn.q_proj": 2}, **experts)
    convert(ad, tmp_path / "mlx", to="mlx", base=base)
    names = load_file(tmp_path / "mlx" / "adapters.safetensors")
    assert names and all(k.startswith("language_model.model.layers.") for k in names)
    ids = np.random.default_rng(0).integers(3, 250, size=(1, 12))
    base_logits = np.array(load_model(base)[0](mx.array(ids)).astype(mx.float32))
    got = np.array(load_adapters(load_model(base)[0], str(tmp_path / "mlx"))(mx.array(ids)).astype(mx.float32))
    merge(base, ad, tmp_path / "merged", dtype="float32")
    merged = np.array(load_model(tmp_path / "merged")[0](mx.array(ids)).astype(mx.float32))
    with torch.no_grad():
        ref = PeftModel.from_pretrained(build.load_model(base), ad).eval()
        want = ref(input_ids=torch.tensor(ids)).logits.numpy()
        with ref.disable_adapter():
            plain = ref(input_ids=torch.tensor(ids)).logits.numpy()
    noise = float(np.abs(base_logits - plain).max())
    err, effect = float(np.abs(got - want).max()), float(np.abs(want - plain).max())
    print(f"\nmlx-lm {family} VLM: vs peft {err:.2e}, base vs base {noise:.2e}, effect {effect:.2e}, "
          f"vs the merge in mlx-lm {float(np.abs(got - merged).max()):.2e}")
    assert effect > 0.1 and float(np.abs(got - merged).max()) <= 1e-5 * float(np.abs(merged).max())
    assert err <= max(10 * noise, 1e-4), (err, noise, effect)
    if family not in ("llama4", "qwen3.5-moe"):  # llama4: in memory language_model.model. as in mlx-lm (read back as
        # transformers 5's usual name); switch_mlp LoRAs are not read back
        assert set(load_adapter(tmp_path / "mlx").modules) == set(load_adapter(ad).modules)


@pytest.mark.parametrize("moe", [False, True])
def test_mlx_lm_itself_runs_gemma4_loras_as_peft_does(tmp_path, moe):
    """Gemma 4's text model in mlx-lm (gemma4_text): attention and MLP LoRAs, and with ``moe`` its fused
    experts, which mlx-lm's sanitize splits into experts.switch_glu (gate_up in halves along its rows);
    the router's per_expert_scale is on mlx-lm's routing weights as on transformers', so no fold there
    (unlike llama.cpp). mlx-lm's logits match peft's unmerged model within its own noise."""
    pytest.importorskip("mlx_lm")
    from fixtures import build

    base = tmp_path / "base"
    build.build_model(build.gemma4_config(moe=moe), base, dtype=torch.float32)
    experts = dict(target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                   alpha_pattern={"experts.down_proj": 3}) if moe else {}
    ad = build.build_adapter(base, tmp_path / "lora", r=4, lora_alpha=8, use_rslora=True, scale=0.2,
                             target_modules=["q_proj", "v_proj", "mlp.down_proj"],
                             rank_pattern={"layers.1.self_attn.q_proj": 2}, **experts)
    convert(ad, tmp_path / "mlx", to="mlx", base=base)
    if moe:
        t = load_file(tmp_path / "mlx" / "adapters.safetensors")
        assert tuple(t["model.layers.1.experts.switch_glu.gate_proj.lora_a"].shape) == (4, 4, 64)  # (E, r, in)
        assert tuple(t["model.layers.1.experts.switch_glu.down_proj.lora_b"].shape) == (4, 64, 4)  # (E, out, r)
    _assert_mlx_lm_computes_peft(base, ad, tmp_path / "mlx", "gemma4-moe" if moe else "gemma4")


@pytest.mark.parametrize("family", ["falcon-h1", "nemotron-h"])
def test_mlx_lm_itself_runs_hybrid_model_loras(tmp_path, family):
    """Mamba-2 hybrids in mlx-lm. Falcon-H1: mlx-lm's sanitize multiplies µP multipliers into the weights
    (its own choice of them: q/k by attention_in, not v nor key_multiplier), so lora_b carries the same
    ones and mlx-lm's LoRA run equals its run of the adaptkit merge (mlx-lm's own model is then off
    transformers' by its multipliers: not asserted against peft). Nemotron-H: mlx-lm's modules keep the
    checkpoint's names (backbone.layers.N.mixer…, model.layers.N.mixer… in peft), its experts stacked
    into mixer.switch_mlp.fc1 (up) / fc2 (down): matches peft."""
    pytest.importorskip("mlx_lm")
    import mlx.core as mx
    import numpy as np
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model
    from peft import PeftModel

    from fixtures import build

    base = tmp_path / "base"
    if family == "falcon-h1":
        build.build_model(build.falcon_h1_config(), base, dtype=torch.float32)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "gate_proj", "down_proj"]
    else:
        build.build_model(build.nemotron_h_config(), base, dtype=torch.float32)
        build.nemotron_hub_config(base)
        targets = ["q_proj", "in_proj", "shared_experts.down_proj"]
    experts = dict(target_parameters=["mixer.experts.up_proj", "mixer.experts.down_proj"]) if family == "nemotron-h" \
        else {}
    ad = build.build_adapter(base, tmp_path / "lora", r=4, lora_alpha=8, scale=0.2, target_modules=targets, **experts)
    convert(ad, tmp_path / "mlx", to="mlx", base=base)
    merge(base, ad, tmp_path / "merged", dtype="float32")
    ids = np.random.default_rng(0).integers(3, 250, size=(1, 12))
    got = np.array(load_adapters(load_model(base)[0], str(tmp_path / "mlx"))(mx.array(ids)).astype(mx.float32))
    merged = np.array(load_model(tmp_path / "merged")[0](mx.array(ids)).astype(mx.float32))
    plain_mlx = np.array(load_model(base)[0](mx.array(ids)).astype(mx.float32))
    scale = float(np.abs(merged).max())
    print(f"\nmlx-lm {family}: LoRA vs the merge in mlx-lm {np.abs(got - merged).max() / scale:.2e}")
    assert np.abs(got - merged).max() <= 1e-5 * scale and np.abs(merged - plain_mlx).max() > 0.05 * scale
    if family == "nemotron-h":
        t = load_file(tmp_path / "mlx" / "adapters.safetensors")
        assert tuple(t["backbone.layers.2.mixer.switch_mlp.fc1.lora_a"].shape) == (4, 4, 64)  # (E, r, in)
        with torch.no_grad():
            want = PeftModel.from_pretrained(build.load_model(base), ad).eval()(torch.tensor(ids)).logits.numpy()
        assert np.abs(got - want).max() <= 1e-5 * scale


def test_mlx_refuses_what_mlx_lm_would_not_load_on_experts(runner, tmp_path):
    """A fused-expert base (gpt-oss) and DeepSeek's kv_b_proj (mlx-lm splits it into other modules):
    refused in one line, nothing written."""
    from helpers import FAMILY_ADAPTERS, FAMILY_BASE_OF, assert_one_line_error

    from fixtures import build

    res = runner.invoke(main, ["convert", str(FAMILY_ADAPTERS["gpt-oss-experts"]), "--to", "mlx", "--base",
                               str(FAMILY_BASE_OF["gpt-oss-experts"]), "-o", str(tmp_path / "a")])
    assert_one_line_error(res, "switch_mlp")
    build.build_model(build.deepseek_v3_config(), tmp_path / "base", dtype=torch.float32)
    ad = build.build_adapter(tmp_path / "base", tmp_path / "lora", r=2, lora_alpha=4, target_modules=["kv_b_proj"])
    res = runner.invoke(main, ["convert", str(ad), "--to", "mlx", "--base", str(tmp_path / "base"), "-o",
                               str(tmp_path / "b")])
    assert_one_line_error(res, "kv_b_proj", "merge instead")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_vllm_flags_and_refuses_a_kv_b_proj_lora(runner, tmp_path):
    """vLLM's multi-head latent attention never calls the wrapped kv_b_proj (its issue #48974): the
    check says so with the merge as the fix, and the export refuses it; q_b_proj, which vLLM runs as a
    module, passes."""
    from helpers import assert_one_line_error

    from fixtures import build

    build.build_model(build.deepseek_v3_config(), tmp_path / "base", dtype=torch.float32)
    ad = build.build_adapter(tmp_path / "base", tmp_path / "lora", r=2, lora_alpha=4,
                             target_modules=["kv_b_proj", "q_b_proj"])
    (vllm,) = inspect(ad, checks=["vllm"]).checks
    assert [p.rule for p in vllm.problems] == ["mla_kv_b_proj"] and "adaptkit merge" in vllm.problems[0].fix
    assert "layers.0.self_attn.kv_b_proj" in vllm.problems[0].detail
    res = runner.invoke(main, ["convert", str(ad), "--to", "vllm", "-o", str(tmp_path / "v")])
    assert_one_line_error(res, "kv_b_proj", "#48974")
    assert not (tmp_path / "v").exists()
    only_q = build.build_adapter(tmp_path / "base", tmp_path / "q", r=2, lora_alpha=4, target_modules=["q_b_proj"])
    assert inspect(only_q, checks=["vllm"]).checks[0].ok


def test_gguf_token_embd_lora_is_laid_out_as_llama_cpp_reads_it(tmp_path):
    """An input-embedding LoRA goes to token_embd (llama.cpp adds scale · B · A[token]: A stored
    (vocab, r), B (hidden, r), its loader's flipped shape check), and rebuilds peft's ΔW."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]))
    for n, p in pm.named_parameters():
        if "lora_embedding_A" in n or "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)
    pm.save_pretrained(tmp_path / "ad")  # peft saves the base embedding beside it too (save_embedding_layers)
    from adaptkit.readiness import check

    ad = load_adapter(tmp_path / "ad")
    assert "model.embed_tokens.weight" in ad.full_tensors
    assert [p.rule for p in check(ad, "llamacpp").problems] == ["modules_to_save"]  # the copy; the LoRA is fine
    assert "embedding" in [p.rule for p in check(ad, "mlx").problems]
    out = tmp_path / "a.gguf"
    result = convert(tmp_path / "ad", out, to="gguf", base=TINY_LLAMA)  # the base shows the copy is the base's own
    assert any("equal the base's own" in w for w in result.warnings)
    shapes = {t.name: [int(x) for x in t.shape] for t in gguf.GGUFReader(str(out)).tensors}
    vocab, hidden = LLAMA_CFG["vocab_size"], LLAMA_CFG["hidden_size"]
    a, b = shapes["token_embd.weight.lora_a"], shapes["token_embd.weight.lora_b"]
    assert b[1] == hidden and a[1] == vocab and a[0] == b[0] == 4  # model ne = (hidden, vocab)
    got = read_gguf_deltas(out, LLAMA_CFG)
    ref = peft_deltas(TINY_LLAMA, tmp_path / "ad")
    d = ref["model.embed_tokens"]
    assert d.shape == (hidden, vocab) and torch.allclose(got["token_embd.weight"], d, atol=1e-6 * d.abs().max().item())


@pytest.mark.parametrize("config, want", [
    ({"architectures": ["Qwen3ForCausalLM"]}, ("qwen3", "")),
    ({"architectures": ["GraniteForCausalLM"]}, ("granite", "rope")),  # llama.cpp's GraniteModel is a LlamaModel
    ({"model_type": "gemma3_text"}, ("gemma3", "")),  # through transformers' causal-LM table
    ({"model_type": "olmo3"}, ("olmo2", "")),  # olmo.py's Olmo2Model registers Olmo3 too
    ({"architectures": ["DeepseekV3ForCausalLM"]}, ("deepseek2", "")),
    ({"architectures": ["Glm4ForCausalLM"], "rope_parameters": {"partial_rotary_factor": 0.5}}, ("glm4", "")),
    ({"model_type": "ernie4_5"}, ("ernie4_5", "")),
    ({"architectures": ["Ministral3ForCausalLM"]}, ("mistral3", "rope")),  # a LlamaModel in mistral3.py
    ({"model_type": "cohere2"}, ("cohere2", "")),
    ({"model_type": "apertus"}, ("apertus", "")),  # ApertusModel(LlamaModel) with undo_permute False
    ({"architectures": ["Glm4MoeForCausalLM"]}, ("glm4moe", "")),
    ({"model_type": "ernie4_5_moe"}, ("ernie4_5-moe", "")),
    ({"model_type": "dots1"}, ("dots1", "")),
    ({"architectures": ["GraniteMoeSharedForCausalLM"]}, ("granitemoe", "rope")),  # a GraniteModel: q/k permuted
    ({"model_type": "minimax_m2"}, ("minimax-m2", "")),
    ({"model_type": "hunyuan_v1_dense"}, ("hunyuan-dense", "")),
    ({"architectures": ["Qwen3VLMoeForConditionalGeneration"]}, ("qwen3vlmoe", "")),
    ({"model_type": "gemma4_text"}, ("gemma4", "")),
    ({"architectures": ["Gemma4ForConditionalGeneration"]}, ("gemma4", "")),
    ({"model_type": "qwen3_5_text"}, ("qwen35", "v-heads")),
    ({"architectures": ["Qwen3_5MoeForConditionalGeneration"]}, ("qwen35moe", "v-heads")),
    ({"model_type": "lfm2"}, ("lfm2", "")),
    ({"architectures": ["GraniteMoeHybridForCausalLM"]}, ("granitehybrid", "rope")),  # a LlamaModel's undo_permute
    ({"model_type": "qwen3_next"}, ("qwen3next", "")),
    ({"model_type": "lfm2_moe"}, ("lfm2moe", "")),
    ({"model_type": "glm4_moe_lite"}, ("deepseek2", "")),  # glm.py Glm4MoeLiteModel(DeepseekV2Model)
    ({"architectures": ["SolarOpenForCausalLM"]}, ("glm4moe", "")),
    ({"model_type": "jais2"}, ("jais2", "")),
    ({"model_type": "minicpm3"}, ("minicpm3", "")),
    ({"model_type": "falcon_h1"}, ("falcon-h1", "")),
    ({"model_type": "hunyuan_v1_moe"}, ("hunyuan-moe", "")),
    ({"model_type": "afmoe"}, ("afmoe", "")),
    ({"model_type": "nemotron_h", "hybrid_override_pattern": "M*E"}, ("nemotron_h_moe", "rope")),
])
def test_gguf_architectures_beyond_the_first_six(config, want):
    from adaptkit.formats.gguf import PERMUTED, base_architecture

    assert base_architecture(config, "base") == want
    assert ("granite" in PERMUTED) and ("qwen3" not in PERMUTED)


def test_gguf_refuses_a_dense_nemotron_h_in_one_line():
    """A Nemotron-H without MoE layers: llama.cpp's converter reads its config through transformers 5, whose
    defaults hold num_experts_per_tok, and writes a nemotron_h_moe GGUF llama.cpp cannot load: refused."""
    from adaptkit.formats.gguf import base_architecture

    with pytest.raises(AdaptkitError, match="without MoE layers"):
        base_architecture({"model_type": "nemotron_h", "hybrid_override_pattern": "M*-"}, "base")
    with pytest.raises(AdaptkitError, match="without MoE layers"):
        base_architecture({"architectures": ["NemotronHForCausalLM"],
                           "layers_block_type": ["linear_attention", "full_attention", "mlp"]}, "base")


def test_gguf_architectures_are_transformers_classes_and_gguf_architectures():
    import gguf
    import transformers

    from adaptkit.formats.gguf import ARCHITECTURES

    names = set(gguf.MODEL_ARCH_NAMES.values())
    assert [a for a in ARCHITECTURES if not hasattr(transformers, a)] == []
    assert [g for g, _ in ARCHITECTURES.values() if g not in names] == []


def test_gguf_refuses_a_glm4_with_m_rope():
    """glm.py permutes GLM-4's q/k rows only under M-RoPE; that re-layout is not mirrored, so refused."""
    from adaptkit.errors import AdaptkitError
    from adaptkit.formats.gguf import base_architecture

    with pytest.raises(AdaptkitError, match="M-RoPE"):
        base_architecture({"architectures": ["Glm4ForCausalLM"], "rope_parameters": {"mrope_section": [8, 12, 12]}},
                          "base")


def test_gguf_gpt_neox_query_key_value_regrouped_as_llama_cpp_converts_it(tmp_path):
    """GPT-NeoX keeps query_key_value's rows per head [q k v]; llama.cpp's converter (gptneox.py) regroups
    the weight into [Q; K; V], so B of a LoRA on it is regrouped alike (A is untouched), and reading the
    GGUF back undoes it."""
    from transformers import GPTNeoXConfig

    heads, hidden = 4, 32
    cfg = GPTNeoXConfig(vocab_size=64, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=heads, max_position_embeddings=32)
    base, ad, out, conf = _qkv_case(tmp_path, cfg, "query_key_value")
    raw = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(str(out)).tensors}
    got = 2.0 * raw["blk.0.attn_qkv.weight.lora_b"] @ raw["blk.0.attn_qkv.weight.lora_a"]
    ref = peft_deltas(base, ad)
    d = ref["gpt_neox.layers.0.attention.query_key_value"]
    per_head = d.reshape(heads, 3, hidden // heads, hidden)  # the converter's own reshape and concatenation
    want = torch.cat([per_head[:, i].reshape(-1, hidden) for i in range(3)])
    assert not torch.allclose(want, d) and torch.allclose(got, want, atol=1e-6 * d.abs().max().item())
    back = read_gguf_deltas(out, conf)
    assert torch.allclose(back["blk.0.attn_qkv.weight"], d, atol=1e-6 * d.abs().max().item())
    dense = ref["gpt_neox.layers.0.attention.dense"]
    assert torch.allclose(back["blk.0.attn_output.weight"], dense, atol=1e-6 * dense.abs().max().item())


@pytest.mark.parametrize("name", ["qwen3-moe-experts", "gpt-oss-experts"])
def test_gguf_expert_loras_are_laid_out_as_llama_cpp_converts_experts(tmp_path, name):
    """A LoRA on transformers 5's fused expert parameters (peft target_parameters): llama.cpp applies
    a (E, r, in) / b (E, out, r) per expert on ffn_{gate,up,down}_exps (E, out, in), which its converter
    makes from the checkpoint: Qwen3-MoE's per-expert tensors stacked (gate and up: the halves of
    gate_up_proj), gpt-oss's fused (E, in, out) ones transposed, gate and up interleaved (rows ::2 and
    1::2). The same transformation applied to peft's merge_and_unload ΔW gives what llama.cpp adds."""
    from helpers import FAMILY_ADAPTERS, FAMILY_BASE_OF, peft_merged

    from fixtures.build import load_model

    base, ad = FAMILY_BASE_OF[name], FAMILY_ADAPTERS[name]
    out = tmp_path / "a.gguf"
    convert(ad, out, to="gguf", base=base)
    cfg = json.loads((base / "config.json").read_text())
    E = cfg.get("num_experts") or cfg["num_local_experts"]
    inter, hidden = cfg.get("moe_intermediate_size") or cfg["intermediate_size"], cfg["hidden_size"]
    r = json.loads((ad / "adapter_config.json").read_text())["r"]
    shapes = {t.name: [int(x) for x in t.shape] for t in gguf.GGUFReader(str(out)).tensors}
    assert shapes["blk.0.ffn_gate_exps.weight.lora_a"] == [hidden, r, E]  # ggml ne, innermost first
    assert shapes["blk.0.ffn_gate_exps.weight.lora_b"] == [r, inter, E]
    assert shapes["blk.1.ffn_down_exps.weight.lora_b"] == [r, hidden, E]
    got = read_gguf_deltas(out, cfg)
    _, merged = peft_merged(base, [ad])
    ref, plain = merged.state_dict(), load_model(base).state_dict()
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}.mlp.experts."
        gate_up = ref[p + "gate_up_proj"] - plain[p + "gate_up_proj"]
        down = ref[p + "down_proj"] - plain[p + "down_proj"]
        if name == "gpt-oss-experts":  # (E, H, 2I), (E, I, H) as stored
            gate_up, down = gate_up.transpose(-1, -2), down.transpose(-1, -2)
            gate, up = gate_up[:, ::2], gate_up[:, 1::2]
        else:
            gate, up = gate_up[:, :inter], gate_up[:, inter:]
        for gname, want in (("ffn_gate_exps", gate), ("ffn_up_exps", up), ("ffn_down_exps", down)):
            d = got[f"blk.{layer}.{gname}.weight"]
            assert d.shape == want.shape and torch.allclose(d, want, atol=1e-5 * want.abs().max().item()), gname


def _gguf_and_peft(tmp_path, ad):
    """Export ``ad`` to GGUF for the base at ``tmp_path / "base"``: (ΔW per gguf tensor as llama.cpp
    computes it, peft's merge_and_unload state dict, the base's state dict)."""
    from helpers import peft_merged

    from fixtures.build import load_model

    convert(ad, tmp_path / "a.gguf", to="gguf", base=tmp_path / "base")
    got = read_gguf_deltas(tmp_path / "a.gguf", json.loads((tmp_path / "base" / "config.json").read_text()))
    _, merged = peft_merged(tmp_path / "base", [ad])
    return got, merged.state_dict(), load_model(tmp_path / "base").state_dict()


@pytest.mark.parametrize("hybrid", [False, True])
def test_gguf_granitemoe_splits_input_linear_and_the_shared_mlp_as_its_converter_does(tmp_path, hybrid):
    """GraniteMoeShared and Granite 4.0-H (GraniteMoeHybrid, its GraniteHybridModel a GraniteMoeModel
    there): granite.py splits the experts' input_linear (E, 2I, H) and the shared MLP's input_linear
    (2S, H) in halves, gate first, into ffn_gate/up_exps and ffn_gate/up_shexp; the router is
    router.layer on disk (ffn_gate_inp); q/k rows are permuted as for llama."""

    from fixtures.build import build_adapter, build_model, granite_moe_hybrid_config, granite_moe_shared_config

    build_model((granite_moe_hybrid_config if hybrid else granite_moe_shared_config)(), tmp_path / "base",
                dtype=torch.float32)
    ad = build_adapter(tmp_path / "base", tmp_path / "lora", r=2, lora_alpha=4,
                       target_modules=["shared_mlp.input_linear"],
                       target_parameters=["block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.router.weight"])
    got, ref, plain = _gguf_and_peft(tmp_path, ad)
    for layer in range(2):
        p = f"model.layers.{layer}."
        experts = ref[p + "block_sparse_moe.experts.gate_up_proj"] - plain[p + "block_sparse_moe.experts.gate_up_proj"]
        shared = ref[p + "shared_mlp.input_linear.weight"] - plain[p + "shared_mlp.input_linear.weight"]
        router = ref[p + "block_sparse_moe.router.weight"] - plain[p + "block_sparse_moe.router.weight"]
        for gname, want in (("ffn_gate_exps", experts[:, :48]), ("ffn_up_exps", experts[:, 48:]),
                            ("ffn_gate_shexp", shared[:32]), ("ffn_up_shexp", shared[32:]), ("ffn_gate_inp", router)):
            d = got[f"blk.{layer}.{gname}.weight"]
            assert d.shape == want.shape and torch.allclose(d, want, atol=1e-5 * want.abs().max().item()), gname


def test_gguf_gemma4_experts_stay_fused_and_carry_the_routers_per_expert_scale(tmp_path):
    """Gemma 4's MoE (26B-A4B's layout): gemma.py keeps experts.gate_up_proj (E, 2I, H) fused as
    ffn_gate_up_exps and writes router.per_expert_scale as ffn_down_exps.scale, which llama.cpp
    (llama-graph.cpp build_lora_mm_id) multiplies into W·x only, where transformers scales the whole
    expert output: the down experts' B carries that scale, so llama.cpp adds s_e·ΔW_e."""

    from fixtures.build import build_adapter, build_model, gemma4_config

    build_model(gemma4_config(moe=True), tmp_path / "base", dtype=torch.float32)
    ad = build_adapter(tmp_path / "base", tmp_path / "lora", r=2, lora_alpha=4, target_modules=["q_proj", "router.proj"],
                       target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    got, ref, plain = _gguf_and_peft(tmp_path, ad)
    for layer in range(2):
        p = f"model.layers.{layer}."
        scale = plain[p + "router.per_expert_scale"]
        assert (scale - 1).abs().min() > 0.01  # set away from one: a missing fold shows
        d = {k: ref[p + k] - plain[p + k] for k in ("experts.gate_up_proj", "experts.down_proj", "router.proj.weight",
                                                    "self_attn.q_proj.weight")}
        for gname, want in (("ffn_gate_up_exps", d["experts.gate_up_proj"]),
                            ("ffn_down_exps", scale[:, None, None] * d["experts.down_proj"]),
                            ("ffn_gate_inp", d["router.proj.weight"]), ("attn_q", d["self_attn.q_proj.weight"])):
            t = got[f"blk.{layer}.{gname}.weight"]
            assert t.shape == want.shape and torch.allclose(t, want, atol=1e-5 * want.abs().max().item()), gname


@pytest.mark.parametrize("family", ["gemma4", "minicpm3"])
def test_gguf_refuses_loras_the_newer_graphs_drop(runner, tmp_path, family):
    """gemma4.cpp multiplies per_layer_model_proj with ggml_mul_mat (no LoRA) and reads per_layer_token_embd
    by get_rows; minicpm3.cpp multiplies its latent attention's projections so: a LoRA there is refused in
    one line instead of loading and being dropped."""
    from helpers import assert_one_line_error
    from transformers import MiniCPM3Config

    from fixtures.build import build_adapter, build_model, gemma4_config

    config, module, tensor = {
        "gemma4": (gemma4_config(per_layer=8), "per_layer_model_projection", "per_layer_model_proj"),
        "minicpm3": (MiniCPM3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=4, head_dim=16, kv_lora_rank=16,
                                    q_lora_rank=32, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16),
                     "q_a_proj", "attn_q_a")}[family]
    build_model(config, tmp_path / "base", dtype=torch.float32)
    ad = build_adapter(tmp_path / "base", tmp_path / "lora", r=2, lora_alpha=4, target_modules=["o_proj", module])
    res = runner.invoke(main, ["convert", str(ad), "--to", "gguf", "--base", str(tmp_path / "base"), "-o",
                               str(tmp_path / "a.gguf")])
    assert_one_line_error(res, tensor, "without its LoRA")
    assert not (tmp_path / "a.gguf").exists()


@pytest.mark.parametrize("moe", [False, True])
def test_gguf_qwen35_value_heads_are_tiled_as_its_converter_tiles_them(tmp_path, moe):
    """Qwen3.5: qwen.py reorders the gated delta net's value heads from grouped by key head to tiled
    where there are more value than key heads: the value rows of in_proj_qkv, the rows of in_proj_z
    (a value head each) and in_proj_a/b (one each), the columns of out_proj. What llama.cpp adds is
    peft's ΔW with exactly that permutation (built here as the converter builds it for LoRA tensors:
    an index over (key heads, values per key, head dim) swapped), q/k/v kept elsewhere."""
    from helpers import peft_merged

    from fixtures.build import build_adapter, build_model, load_model, qwen35_config

    config = qwen35_config(moe=moe)
    build_model(config, tmp_path / "base", dtype=torch.float32)
    linear = ["in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj"]
    ad = build_adapter(tmp_path / "base", tmp_path / "lora", r=2, lora_alpha=4, target_modules=linear + ["q_proj"],
                       **({"target_parameters": ["mlp.experts.down_proj"]} if moe else {}))
    convert(ad, tmp_path / "a.gguf", to="gguf", base=tmp_path / "base")
    reader = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    raw = {t.name: torch.from_numpy(np.array(t.data)).float().reshape([int(x) for x in reversed(t.shape)])
           for t in reader.tensors}
    alpha = 4.0
    _, merged = peft_merged(tmp_path / "base", [ad])
    ref, plain = merged.state_dict(), load_model(tmp_path / "base").state_dict()
    n_k, n_v, d = 2, 4, 16

    def tiled(n_heads_dim):  # qwen.py's index for a LoRA tensor: arange(n).reshape(n_k, n_v/n_k, dim).permute(1, 0, 2)
        return torch.arange(n_v * n_heads_dim).reshape(n_k, n_v // n_k, n_heads_dim).permute(1, 0, 2).reshape(-1)

    p = "model.layers.0.linear_attn."
    d_w = {k: ref[p + k + ".weight"] - plain[p + k + ".weight"] for k in linear}
    qk = 2 * n_k * d
    want = {"attn_qkv": torch.cat([d_w["in_proj_qkv"][:qk], d_w["in_proj_qkv"][qk:][tiled(d)]]),
            "attn_gate": d_w["in_proj_z"][tiled(d)], "ssm_alpha": d_w["in_proj_a"][tiled(1)],
            "ssm_beta": d_w["in_proj_b"][tiled(1)], "ssm_out": d_w["out_proj"][:, tiled(d)]}
    for gname, w in want.items():
        a, b = raw[f"blk.0.{gname}.weight.lora_a"], raw[f"blk.0.{gname}.weight.lora_b"]
        got = alpha / a.shape[0] * b @ a
        assert not torch.allclose(w, d_w[{"attn_qkv": "in_proj_qkv", "attn_gate": "in_proj_z", "ssm_alpha": "in_proj_a",
                                          "ssm_beta": "in_proj_b", "ssm_out": "out_proj"}[gname]])  # it moves
        assert torch.allclose(got, w, atol=1e-5 * w.abs().max().item()), gname
    back = read_gguf_deltas(tmp_path / "a.gguf", json.loads((tmp_path / "base" / "config.json").read_text()))
    q = ref["model.layers.1.self_attn.q_proj.weight"] - plain["model.layers.1.self_attn.q_proj.weight"]
    assert torch.allclose(back["blk.1.attn_q.weight"], q, atol=1e-5 * q.abs().max().item())  # kept as it is
    assert torch.allclose(back["blk.0.ssm_out.weight"], d_w["out_proj"], atol=1e-5 * d_w["out_proj"].abs().max().item())
    if moe:
        down = ref["model.layers.1.mlp.experts.down_proj"] - plain["model.layers.1.mlp.experts.down_proj"]
        assert torch.allclose(back["blk.1.ffn_down_exps.weight"], down, atol=1e-5 * down.abs().max().item())


def test_gguf_qwen3_next_splits_in_proj_qkvz_as_its_converter_does(tmp_path):
    """Qwen3-Next: qwen.py views in_proj_qkvz as (hidden, key heads, q+k+v+z), splits each head's
    [q k v z] and writes attn_qkv = [all q; all k; all v] and attn_gate = all z. llama.cpp adds peft's
    ΔW with those rows (rebuilt here as the converter does it, on the ΔW); in_proj_ba and out_proj
    stay as they are; LFM2-MoE's experts are stacked under the converter's names (no "model.")."""
    from helpers import peft_merged

    from fixtures.build import build_adapter, build_model, lfm2_moe_config, load_model, qwen3_next_config

    build_model(qwen3_next_config(), tmp_path / "base", dtype=torch.float32)
    ad = build_adapter(tmp_path / "base", tmp_path / "lora", r=2, lora_alpha=4,
                       target_modules=["in_proj_qkvz", "in_proj_ba", "out_proj"])
    got, ref, plain = _gguf_and_peft(tmp_path, ad)
    p = "model.layers.0.linear_attn."
    d = {k: ref[p + k + ".weight"] - plain[p + k + ".weight"] for k in ("in_proj_qkvz", "in_proj_ba", "out_proj")}
    hidden, n_k, d_k, v = 64, 2, 16, 2 * 16  # v: the value rows per key head (n_v / n_k value heads of 16)
    w = d["in_proj_qkvz"].T.reshape(hidden, n_k, 2 * d_k + 2 * v)  # as Qwen3NextModel.modify_tensors views it
    q, k, vv, z = torch.split(w, [d_k, d_k, v, v], dim=-1)
    want = {"attn_qkv": torch.cat([t.reshape(hidden, -1) for t in (q, k, vv)], dim=-1).T,
            "attn_gate": z.reshape(hidden, -1).T, "ssm_ba": d["in_proj_ba"], "ssm_out": d["out_proj"]}
    assert not torch.allclose(want["attn_qkv"], d["in_proj_qkvz"][: want["attn_qkv"].shape[0]])  # it moves
    for gname, t in want.items():
        assert torch.allclose(got[f"blk.0.{gname}.weight"], t, atol=1e-5 * t.abs().max().item()), gname

    build_model(lfm2_moe_config(), tmp_path / "lfm", dtype=torch.float32)
    ad = build_adapter(tmp_path / "lfm", tmp_path / "lfm-lora", r=2, lora_alpha=4,
                       target_parameters=["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"])
    convert(ad, tmp_path / "b.gguf", to="gguf", base=tmp_path / "lfm")
    got = read_gguf_deltas(tmp_path / "b.gguf", json.loads((tmp_path / "lfm" / "config.json").read_text()))
    _, merged = peft_merged(tmp_path / "lfm", [ad])
    ref, plain = merged.state_dict(), load_model(tmp_path / "lfm").state_dict()
    e = "model.layers.1.feed_forward.experts."
    gate_up, down = (ref[e + n] - plain[e + n] for n in ("gate_up_proj", "down_proj"))
    for gname, t in (("ffn_gate_exps", gate_up[:, :48]), ("ffn_up_exps", gate_up[:, 48:]), ("ffn_down_exps", down)):
        assert torch.allclose(got[f"blk.1.{gname}.weight"], t, atol=1e-5 * t.abs().max().item()), gname


def test_vllm_check_takes_qwen35_delta_net_loras(tmp_path):
    """vLLM's Qwen3.5 (qwen3_5.py) adapts the gated delta net's in_proj_qkv, in_proj_z (separate modules
    with LoRA on) and in_proj_b/in_proj_a (packed as in_proj_ba) besides out_proj: no target_modules
    problem for them (before, `inspect --check vllm` sent such an adapter to the merge)."""
    from adaptkit.readiness import check

    from fixtures.build import build_adapter, build_model, qwen35_config

    build_model(qwen35_config(), tmp_path / "base", dtype=torch.float32)
    ad = build_adapter(tmp_path / "base", tmp_path / "lora", r=4, lora_alpha=8,
                       target_modules=["in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj", "q_proj"])
    assert [p.rule for p in check(load_adapter(ad), "vllm").problems] == []


def test_gguf_falcon_h1_loras_carry_the_multipliers_its_converter_folds_into_the_weights(tmp_path):
    """Falcon-H1: falcon_h1.py multiplies its µP multipliers into the weights (q/v by attention_in, k by
    key·attention_in, gate/down by mlp_multipliers, in_proj by ssm_in and its [z x B C dt] row segments by
    ssm_multipliers, the embedding and head...), where transformers multiplies those modules' inputs or
    outputs: what llama.cpp adds must be m·ΔW, built here from the config beside peft's ΔW."""

    from fixtures.build import build_adapter, build_model, falcon_h1_config

    build_model(falcon_h1_config(), tmp_path / "base", dtype=torch.float32)
    ad = build_adapter(tmp_path / "base", tmp_path / "lora", r=2, lora_alpha=4,
                       target_modules=["q_proj", "k_proj", "gate_proj", "up_proj", "in_proj", "embed_tokens"])
    got, ref, plain = _gguf_and_peft(tmp_path, ad)
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    d = {k: ref[k] - plain[k] for k in ref if k.startswith(("model.layers.0.", "model.embed_tokens"))}
    p = "model.layers.0."
    segments = torch.ones(d[p + "mamba.in_proj.weight"].shape[0])
    inner, state = cfg["mamba_d_ssm"], cfg["mamba_n_groups"] * cfg["mamba_d_state"]
    for i, (lo, hi) in enumerate([(0, inner), (inner, 2 * inner), (2 * inner, 2 * inner + state),
                                  (2 * inner + state, 2 * inner + 2 * state), (2 * inner + 2 * state, None)]):
        segments[lo:hi] = cfg["ssm_multipliers"][i]
    want = {"attn_q": cfg["attention_in_multiplier"] * d[p + "self_attn.q_proj.weight"],
            "attn_k": cfg["key_multiplier"] * cfg["attention_in_multiplier"] * d[p + "self_attn.k_proj.weight"],
            "ffn_gate": cfg["mlp_multipliers"][0] * d[p + "feed_forward.gate_proj.weight"],
            "ffn_up": d[p + "feed_forward.up_proj.weight"],
            "ssm_in": cfg["ssm_in_multiplier"] * segments[:, None] * d[p + "mamba.in_proj.weight"]}
    for gname, w in want.items():
        t = got[f"blk.0.{gname}.weight"]
        assert t.shape == w.shape and torch.allclose(t, w, atol=1e-5 * w.abs().max().item()), gname
    emb = cfg["embedding_multiplier"] * d["model.embed_tokens.weight"].T  # (hidden, vocab), as llama.cpp's ΔW
    assert torch.allclose(got["token_embd.weight"], emb, atol=1e-5 * emb.abs().max().item())


@pytest.mark.parametrize("to", ["gguf", "mlx"])
def test_a_base_config_the_export_cannot_read_is_named_as_the_bases(runner, tmp_path, to):
    """A Falcon-H1 base whose config.json lacks a multiplier the runtime folds into the weights: the one-line
    error names the base's folder (the file at fault), not the adapter's."""
    from fixtures.build import build_adapter, build_model, falcon_h1_config

    build_model(falcon_h1_config(), tmp_path / "base", dtype=torch.float32)
    ad = build_adapter(tmp_path / "base", tmp_path / "lora", r=2, lora_alpha=4, target_modules=["down_proj"])
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    del cfg["mlp_multipliers"]
    (tmp_path / "base" / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / ("a.gguf" if to == "gguf" else "mlx")
    line = assert_one_line_error(invoke(runner, "convert", ad, "--to", to, "--base", tmp_path / "base", "-o", out))
    assert line.startswith(f"error: {tmp_path / 'base'}:") and "mlp_multipliers" in line, line
    assert not out.exists()


@pytest.mark.parametrize("layout", ["hub", "transformers"])
def test_gguf_qwen3_vl_moe_experts_as_its_converter_reads_the_hubs_layout(runner, tmp_path, layout):
    """Qwen3-VL-MoE: qwen3vl.py takes the experts as the Hub stores them, (E, H, 2I) / (E, I, H), splits
    gate_up's last dimension in halves and transposes; peft's ΔW (in transformers' (E, 2I, H) layout)
    then lands on ffn_{gate,up,down}_exps as it is. A base saved in transformers' own layout, which
    that converter would mis-split, is refused in one line."""
    import transformers

    from fixtures.build import build_adapter, build_model, qwen3_vl_moe_config, to_hub_expert_layout

    build_model(qwen3_vl_moe_config(), tmp_path / "base", dtype=torch.float32,
                auto=transformers.Qwen3VLMoeForConditionalGeneration)
    if layout == "hub":
        to_hub_expert_layout(tmp_path / "base")
    ad = build_adapter(tmp_path / "base", tmp_path / "lora", r=2, lora_alpha=4,
                       target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    if layout == "transformers":
        res = runner.invoke(main, ["convert", str(ad), "--to", "gguf", "--base", str(tmp_path / "base"),
                                   "-o", str(tmp_path / "a.gguf")])
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and "Hub's" in res.output
        assert not (tmp_path / "a.gguf").exists()
        return
    got, ref, plain = _gguf_and_peft(tmp_path, ad)
    for layer in range(2):
        p = f"model.language_model.layers.{layer}.mlp.experts."
        gate_up = ref[p + "gate_up_proj"] - plain[p + "gate_up_proj"]  # (E, 2I, H) in memory
        down = ref[p + "down_proj"] - plain[p + "down_proj"]
        for gname, want in (("ffn_gate_exps", gate_up[:, :48]), ("ffn_up_exps", gate_up[:, 48:]),
                            ("ffn_down_exps", down)):
            d = got[f"blk.{layer}.{gname}.weight"]
            assert d.shape == want.shape and torch.allclose(d, want, atol=1e-5 * want.abs().max().item()), gname


@pytest.mark.parametrize("vlm", [False, True], ids=["text", "vlm"])
def test_gguf_llama4_expert_loras_are_transposed_from_the_parameters_orientation(tmp_path, vlm):
    """Llama 4 stores its experts fused as (E, in, out) like gpt-oss but transformers does not mark them
    is_transposed, so peft's LoRA is in the parameter's own orientation (A (E·r, 2I), B (H, r·E) on
    gate_up_proj); llama.cpp's converter transposes them and splits gate_up in halves: llama.cpp's ΔW
    is the transpose of peft's, its factors swapped. What llama.cpp adds equals peft's merge so laid out
    (llama.cpp itself runs it in test_llama_cpp). The same for the language model of the vision-language
    Llama4ForConditionalGeneration (every Llama 4 checkpoint on the Hub), whose text model llama.cpp's
    converter makes of it."""
    import transformers
    from helpers import peft_merged

    from fixtures import build

    build.build_model(build.llama4_config(vlm=vlm), tmp_path / "base", dtype=torch.float32,
                      auto=transformers.Llama4ForConditionalGeneration if vlm else None)
    ad = build.build_adapter(tmp_path / "base", tmp_path / "lora", r=4, lora_alpha=8,  # (the vision tower has q_proj)
                             target_modules=r".*language_model.*\.q_proj" if vlm else ["q_proj"],
                             target_parameters=["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"],
                             rank_pattern={"layers.1.feed_forward.experts.down_proj": 2})
    out = tmp_path / "a.gguf"
    convert(ad, out, to="gguf", base=tmp_path / "base")
    shapes = {t.name: [int(x) for x in t.shape] for t in gguf.GGUFReader(str(out)).tensors}
    assert shapes["blk.0.ffn_gate_exps.weight.lora_a"] == [64, 4, 4]  # ggml ne: (in = hidden, r, E)
    assert shapes["blk.1.ffn_down_exps.weight.lora_b"] == [2, 64, 4]  # (r, out = hidden, E)
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    got = read_gguf_deltas(out, config)
    _, merged = peft_merged(tmp_path / "base", [ad])
    ref, plain = merged.state_dict(), build.load_model(tmp_path / "base").state_dict()
    for layer in range(2):
        p = ("language_model." if vlm else "") + f"model.layers.{layer}.feed_forward.experts."
        gate_up = (ref[p + "gate_up_proj"] - plain[p + "gate_up_proj"]).transpose(-1, -2)  # (E, 2I, H)
        down = (ref[p + "down_proj"] - plain[p + "down_proj"]).transpose(-1, -2)
        for gname, want in (("ffn_gate_exps", gate_up[:, :48]), ("ffn_up_exps", gate_up[:, 48:]),
                            ("ffn_down_exps", down)):
            d = got[f"blk.{layer}.{gname}.weight"]
            assert d.shape == want.shape and torch.allclose(d, want, atol=1e-5 * want.abs().max().item()), gname


def test_gguf_stacks_per_expert_linear_loras_zero_padded(tmp_path):
    """Per-expert nn.Linear LoRAs (transformers-4 era Mixtral): one ffn_*_exps tensor per projection,
    each expert padded with zeros to the largest rank, an expert without a LoRA all zeros: exact."""
    from safetensors.torch import save_file

    from fixtures import build

    build.build_model(build.mixtral_config(), tmp_path / "base", dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    tensors, ranks = {}, {}
    for e in (0, 2):  # experts 1 and 3 without a LoRA
        p = f"base_model.model.model.layers.1.block_sparse_moe.experts.{e}.w2"
        r = 4 if e == 0 else 2
        if r != 4:
            ranks[p.removeprefix("base_model.model.")] = r
        tensors[p + ".lora_A.weight"] = torch.randn(r, 48, generator=gen)
        tensors[p + ".lora_B.weight"] = torch.randn(64, r, generator=gen)
    (tmp_path / "ad").mkdir()
    save_file(tensors, tmp_path / "ad" / "adapter_model.safetensors")
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": ranks, "target_modules": ["w2"],
        "use_rslora": True, "peft_version": "0.13.2"}))
    out = tmp_path / "a.gguf"
    convert(tmp_path / "ad", out, to="gguf", base=tmp_path / "base")
    shapes = {t.name: [int(x) for x in t.shape] for t in gguf.GGUFReader(str(out)).tensors}
    assert shapes == {"blk.1.ffn_down_exps.weight.lora_a": [48, 4, 4], "blk.1.ffn_down_exps.weight.lora_b": [4, 64, 4]}
    got = read_gguf_deltas(out, json.loads((tmp_path / "base" / "config.json").read_text()))["blk.1.ffn_down_exps.weight"]
    for e in range(4):
        p = f"base_model.model.model.layers.1.block_sparse_moe.experts.{e}.w2"
        if p + ".lora_A.weight" not in tensors:
            assert torch.count_nonzero(got[e]) == 0
            continue
        a, b = tensors[p + ".lora_A.weight"], tensors[p + ".lora_B.weight"]
        want = 8 / a.shape[0] ** 0.5 * b @ a  # rsLoRA: alpha / sqrt(r), each expert its own r
        assert torch.allclose(got[e], want, atol=1e-5 * want.abs().max().item()), e


def test_gguf_splits_experts_stored_fused_where_qwens_converter_does_and_refuses_elsewhere(runner, tmp_path):
    """Experts stored fused as transformers holds them in memory (mlp.experts.gate_up_proj (E, 2I, H): the
    layout of Qwen3.5-MoE's Hub checkpoints): qwen.py's Qwen2MoeModel (Qwen2/3-MoE, Qwen3-Next,
    Qwen3.5-MoE) splits gate_up in halves along its rows, so the LoRA is split the same way; OLMoE's
    converter only stacks per-expert tensors (its GGUF of such a base fails), so that export is refused."""
    from helpers import FAMILY_ADAPTERS, FAMILY_BASE_OF, assert_one_line_error, peft_merged
    from transformers import OlmoeConfig

    from fixtures.build import build_adapter, build_model, load_model, to_fused_expert_layout

    fused = to_fused_expert_layout(FAMILY_BASE_OF["qwen3-moe-experts"], tmp_path / "fused")
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(fused / "model.safetensors")
    ad = FAMILY_ADAPTERS["qwen3-moe-experts"]
    convert(ad, tmp_path / "a.gguf", to="gguf", base=fused)
    cfg = json.loads((fused / "config.json").read_text())
    got = read_gguf_deltas(tmp_path / "a.gguf", cfg)
    _, merged = peft_merged(fused, [ad])
    ref, plain = merged.state_dict(), load_model(fused).state_dict()
    inter = cfg["moe_intermediate_size"]
    p = "model.layers.1.mlp.experts."
    gate_up, down = (ref[p + n] - plain[p + n] for n in ("gate_up_proj", "down_proj"))
    for gname, want in (("ffn_gate_exps", gate_up[:, :inter]), ("ffn_up_exps", gate_up[:, inter:]),
                        ("ffn_down_exps", down)):
        d = got[f"blk.1.{gname}.weight"]
        assert d.shape == want.shape and torch.allclose(d, want, atol=1e-5 * want.abs().max().item()), gname

    olmoe = OlmoeConfig(vocab_size=256, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, num_experts=4, num_experts_per_tok=2, max_position_embeddings=128)
    build_model(olmoe, tmp_path / "olmoe", dtype=torch.float32)
    to_fused_expert_layout(tmp_path / "olmoe", tmp_path / "olmoe-fused")
    ad = build_adapter(tmp_path / "olmoe-fused", tmp_path / "olmoe-lora", r=2, lora_alpha=4,
                       target_parameters=["mlp.experts.gate_up_proj"])
    res = runner.invoke(main, ["convert", str(ad), "--to", "gguf", "--base", str(tmp_path / "olmoe-fused"), "-o",
                               str(tmp_path / "b.gguf")])
    assert_one_line_error(res, "gate and up fused", "gate_up_proj")
    assert not (tmp_path / "b.gguf").exists()


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    from fixtures import build

    root = tmp_path_factory.mktemp("deepseek")
    build.build_model(build.deepseek_v3_config(), root / "base", dtype=torch.float32)
    return root / "base"


def test_gguf_deepseek_v3_loras_land_where_llama_cpp_applies_them(tmp_path, deepseek):
    """DeepSeek-V3 as llama.cpp's deepseek2: the attention output, the dense first MLP, the router
    (ffn_gate_inp) and the routed experts stacked into ffn_*_exps carry what peft's merge adds."""
    from fixtures.build import build_adapter, load_model
    from helpers import peft_merged

    ad = build_adapter(deepseek, tmp_path / "ad", r=4, lora_alpha=8, use_rslora=True, target_modules=["o_proj"],
                       target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"],
                       alpha_pattern={"mlp.experts.down_proj": 3})
    out = tmp_path / "a.gguf"
    convert(ad, out, to="gguf", base=deepseek)
    cfg = json.loads((deepseek / "config.json").read_text())
    got = read_gguf_deltas(out, cfg)
    assert sorted(got) == ["blk.0.attn_output.weight", "blk.1.attn_output.weight", "blk.1.ffn_down_exps.weight",
                           "blk.1.ffn_gate_exps.weight", "blk.1.ffn_gate_inp.weight", "blk.1.ffn_up_exps.weight"]
    _, merged = peft_merged(deepseek, [ad])
    ref, plain = merged.state_dict(), load_model(deepseek).state_dict()
    delta = {k: ref[k] - plain[k] for k in ref}
    inter = cfg["moe_intermediate_size"]
    p = "model.layers.1."
    want = {"blk.0.attn_output.weight": delta["model.layers.0.self_attn.o_proj.weight"],
            "blk.1.attn_output.weight": delta[p + "self_attn.o_proj.weight"],
            "blk.1.ffn_gate_inp.weight": delta[p + "mlp.gate.weight"],
            "blk.1.ffn_gate_exps.weight": delta[p + "mlp.experts.gate_up_proj"][:, :inter],
            "blk.1.ffn_up_exps.weight": delta[p + "mlp.experts.gate_up_proj"][:, inter:],
            "blk.1.ffn_down_exps.weight": delta[p + "mlp.experts.down_proj"]}
    for name, w in want.items():
        assert got[name].shape == w.shape and torch.allclose(got[name], w, atol=1e-5 * w.abs().max().item()), name


@pytest.mark.parametrize("module, tensor", [("q_b_proj", "blk.0.attn_q_b"), ("kv_b_proj", "blk.0.attn_kv_b"),
                                            ("kv_a_proj_with_mqa", "blk.0.attn_kv_a_mqa"), ("lm_head", "output")])
def test_gguf_refuses_loras_llama_cpp_would_drop(runner, tmp_path, deepseek, module, tensor):
    _refused_for_llama_cpp(runner, tmp_path, deepseek, module, tensor)


def test_gguf_refuses_deepseek_v2_lite_q_proj(runner, tmp_path):
    """V2-Lite has no q_lora_rank: its whole q_proj is llama.cpp's wq, multiplied without a LoRA too."""
    from fixtures import build

    build.build_model(build.deepseek_v2_lite_config(), tmp_path / "base", dtype=torch.float32)
    _refused_for_llama_cpp(runner, tmp_path, tmp_path / "base", "q_proj", "blk.0.attn_q")


def _refused_for_llama_cpp(runner, tmp_path, deepseek, module, tensor):
    """llama.cpp's deepseek2 graph multiplies the latent-attention projections and the output head with
    plain ggml_mul_mat (src/models/deepseek2.cpp), never adding a LoRA there: such a GGUF would load
    and run without that delta, so the export refuses it, naming the module and the tensor."""
    from fixtures.build import build_adapter

    ad = build_adapter(deepseek, tmp_path / "ad", r=2, lora_alpha=4, target_modules=["o_proj", module])
    res = runner.invoke(main, ["convert", str(ad), "--to", "gguf", "--base", str(deepseek), "-o",
                               str(tmp_path / "a.gguf")])
    # (on lm_head, peft saves the base's head beside the LoRA: a warning line says it is left out)
    assert res.exit_code == 2 and "Traceback" not in res.output
    error = [line for line in res.stderr.splitlines() if not line.startswith("warning: ")]
    assert len(error) == 1 and error[0].startswith("error: ")
    assert all(word in error[0] for word in (module, tensor, "without its LoRA", "adaptkit merge"))
    assert not list(tmp_path.glob("*.gguf"))


def test_check_llamacpp_tells_peft_embedding_copy_from_a_trained_one_given_the_base(runner, tmp_path):
    """peft saves the base's embedding beside an embedding LoRA (save_embedding_layers). Without the base
    the check cannot know it is only a copy and says so; with --base a copy equal to the base's is left
    out (llama.cpp then takes the adapter, as the GGUF export does), a changed one is still refused."""
    from safetensors.torch import load_file, save_file

    from fixtures.build import build_adapter

    ad = build_adapter(TINY_LLAMA, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"])
    alone = runner.invoke(main, ["inspect", str(ad), "--check", "llamacpp", "--json"])
    check = json.loads(alone.stdout)["checks"]["llamacpp"]
    assert alone.exit_code == 1 and not check["ok"] and "--base BASE tells" in check["problems"][0]["detail"]
    given = runner.invoke(main, ["inspect", str(ad), "--check", "llamacpp", "--base", str(TINY_LLAMA), "--json"])
    assert given.exit_code == 0 and json.loads(given.stdout)["checks"]["llamacpp"]["ok"]
    tensors = load_file(ad / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("embed_tokens.base_layer.weight"))
    tensors[key] = tensors[key] + 0.01  # trained (or resized) embedding: not the base's
    save_file(tensors, ad / "adapter_model.safetensors")
    changed = runner.invoke(main, ["inspect", str(ad), "--check", "llamacpp", "--base", str(TINY_LLAMA), "--json"])
    assert changed.exit_code == 1 and not json.loads(changed.stdout)["checks"]["llamacpp"]["ok"]


def test_gguf_takes_a_vlm_language_model_lora(tmp_path):
    """A LoRA on a Llava's language model (peft names it model.language_model.layers…): llama.cpp's
    converter turns the language model into a llama text model (names without language_model.,
    hyper-parameters from text_config, q/k rows permuted), so the GGUF carries peft's ΔW there."""
    from helpers import FAMILY_ADAPTERS, FAMILY_BASE_OF, peft_merged

    from fixtures.build import load_model

    ad, base = FAMILY_ADAPTERS["llava-language-model"], FAMILY_BASE_OF["llava-language-model"]
    convert(ad, tmp_path / "a.gguf", to="gguf", base=base)
    got = read_gguf_deltas(tmp_path / "a.gguf", json.loads((base / "config.json").read_text()))
    _, merged = peft_merged(base, [ad])
    ref, plain = merged.state_dict(), load_model(base).state_dict()
    names = {"attn_q": "self_attn.q_proj", "attn_v": "self_attn.v_proj", "ffn_down": "mlp.down_proj"}
    assert len(got) == 6
    for gname, d in got.items():
        _, layer, kind, _ = gname.split(".")
        key = f"model.language_model.layers.{layer}.{names[kind]}.weight"
        want = ref[key] - plain[key]
        assert want.abs().max() > 0 and torch.allclose(d, want, atol=1e-5 * want.abs().max().item()), gname


def test_gguf_refuses_a_vlm_vision_tower_lora(runner, tmp_path):
    """llama.cpp converts a VLM's vision tower into a separate mmproj file, which takes no LoRA here;
    mlx-lm's VLM classes load the language model alone."""
    from helpers import FAMILY_BASE_OF, assert_one_line_error

    from fixtures.build import build_adapter

    base = FAMILY_BASE_OF["llava-language-model"]
    ad = build_adapter(base, tmp_path / "ad", r=2, lora_alpha=4, target_modules=["q_proj"])  # both towers
    res = runner.invoke(main, ["convert", str(ad), "--to", "gguf", "--base", str(base), "-o", str(tmp_path / "a.gguf")])
    assert_one_line_error(res, "vision_tower", "outside the language model", "mmproj")
    assert not (tmp_path / "a.gguf").exists()
    res = runner.invoke(main, ["convert", str(ad), "--to", "mlx", "--base", str(base), "-o", str(tmp_path / "mlx")])
    assert_one_line_error(res, "vision_tower", "outside the language model", "mlx-lm")  # it loads that part only
    assert not (tmp_path / "mlx").exists()
    from adaptkit.readiness import check

    assert "vision_tower" in [p.rule for p in check(load_adapter(ad), "mlx").problems]  # inspect --check mlx agrees
    lm_only = build_adapter(base, tmp_path / "lm", r=2, lora_alpha=4, target_modules=r".*language_model.*\.q_proj")
    assert "vision_tower" not in [p.rule for p in check(load_adapter(lm_only), "mlx").problems]


def _qkv_case(tmp_path, cfg, module, drop=()):
    """A tiny base of ``cfg`` (config.json keys in ``drop`` removed, as Hub checkpoints lack them) and a
    LoRA on its fused ``module`` with B drawn at random: (base, adapter, gguf file)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "base")
    conf = json.loads((tmp_path / "base" / "config.json").read_text())
    for key in drop:
        conf.pop(key, None)
    (tmp_path / "base" / "config.json").write_text(json.dumps(conf))
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                        LoraConfig(r=4, lora_alpha=8, target_modules=[module, "dense"]))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)
    pm.save_pretrained(tmp_path / "ad")
    out = tmp_path / "a.gguf"
    convert(tmp_path / "ad", out, to="gguf", base=tmp_path / "base")
    return tmp_path / "base", tmp_path / "ad", out, conf


@pytest.mark.parametrize("case", ["bloom", "falcon-grouped", "falcon-multi-query", "falcon-per-head"])
def test_gguf_fused_qkv_rows_regrouped_as_llama_cpp_converts_them(tmp_path, case):
    """Bloom (bloom.py: per head [q k v], as GPT-NeoX) and Falcon (falcon.py: n_kv groups of [queries,
    key, value], n_kv read as llama.cpp reads it): B of a LoRA on query_key_value is regrouped as the
    converter regroups the weight, into [Q; K; V], and reading the GGUF back undoes it."""
    from transformers import BloomConfig, FalconConfig

    heads, hidden = 4, 32
    hd = hidden // heads
    if case == "bloom":
        cfg, drop, kv, layer = BloomConfig(vocab_size=64, hidden_size=hidden, n_layer=1, n_head=heads), (), None, \
            "transformer.h.0.self_attention"
    else:
        kw = dict(vocab_size=64, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=heads)
        kw, drop, kv = {"falcon-grouped": (dict(kw, new_decoder_architecture=True, num_kv_heads=2), (), 2),
                        "falcon-multi-query": (dict(kw, multi_query=True), ("num_kv_heads",), 1),  # falcon-7b's
                        "falcon-per-head": (dict(kw, multi_query=False), (), heads)}[case]
        cfg, layer = FalconConfig(**kw), "transformer.h.0.self_attention"
    base, ad, out, conf = _qkv_case(tmp_path, cfg, "query_key_value", drop)
    raw = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(str(out)).tensors}
    got = 2.0 * raw["blk.0.attn_qkv.weight.lora_b"] @ raw["blk.0.attn_qkv.weight.lora_a"]
    d = peft_deltas(base, ad)[f"{layer}.query_key_value"]
    if kv is None:  # the converters' own reshapes and concatenations
        g = d.reshape(heads, 3, hd, hidden)
        want = torch.cat([g[:, i].reshape(-1, hidden) for i in range(3)])
    else:
        g = d.reshape(kv, heads // kv + 2, hd, hidden)
        want = torch.cat([g[:, :-2].reshape(-1, hidden), g[:, -2].reshape(-1, hidden), g[:, -1].reshape(-1, hidden)])
    assert torch.allclose(want, d) is (kv == 1)  # one key/value head: already [Q; K; V]
    assert torch.allclose(got, want, atol=1e-6 * d.abs().max().item())
    back = read_gguf_deltas(out, conf)
    assert torch.allclose(back["blk.0.attn_qkv.weight"], d, atol=1e-6 * d.abs().max().item())


def test_gguf_refuses_a_falcon_llama_cpp_would_convert_wrongly(runner, tmp_path):
    """transformers saves num_kv_heads = the head count for a multi-query Falcon, which has one key/value
    head: llama.cpp's converter would reshape by the saved count, so the export refuses in one line."""
    from transformers import FalconConfig

    cfg = FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, multi_query=True)
    with pytest.raises(AdaptkitError, match="llama.cpp's Falcon converter reshapes query_key_value by 4"):
        _qkv_case(tmp_path, cfg, "query_key_value")
    res = runner.invoke(main, ["convert", str(tmp_path / "ad"), "--to", "gguf", "--base", str(tmp_path / "base"),
                               "-o", str(tmp_path / "b.gguf")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and "Falcon" in res.output
    assert not (tmp_path / "b.gguf").exists()


def test_gguf_nemotron_is_renames_only():
    from adaptkit.formats.gguf import base_architecture

    assert base_architecture({"architectures": ["NemotronForCausalLM"]}, "base") == ("nemotron", "")
    assert base_architecture({"model_type": "bloom"}, "base") == ("bloom", "neox-qkv")
