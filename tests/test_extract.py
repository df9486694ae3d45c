"""adaptkit extract (issue 19): fine-tunes made from tiny transformers models by known changes, the
extracted LoRA checked against the exact optimum (torch.linalg.svd: Eckart–Young), loaded by peft,
merged by adaptkit, and verify reporting how close base + LoRA comes to the fine-tune."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import adaptkit
from adaptkit.readiness import check
from fixtures import build
from tests.helpers import FIXTURES, assert_one_line_error, invoke, load_dir

GEN = torch.Generator().manual_seed(0)
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _finetune(base, out, change, config_edit=None):
    """``base`` (a one-file model) with ``change(name, tensor)`` applied to every tensor, in fp32."""
    out.mkdir(parents=True)
    state = {}
    for name, t in load_file(base / "model.safetensors").items():
        new = change(name, t.float())
        state[name] = (t.float() if new is None else new).contiguous()
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((base / "config.json").read_text())
    if config_edit:
        config_edit(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    for p in base.iterdir():
        if p.name not in ("config.json", "model.safetensors"):
            shutil.copy2(p, out / p.name)
    return out


def _lowrank(shape, r, scale=0.05):
    return scale * torch.randn(shape[0], r, generator=GEN) @ torch.randn(r, shape[1], generator=GEN) / r ** 0.5


def _is_linear(name):
    return name.endswith(".weight") and name.rsplit(".", 2)[-2] in LINEAR


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    base = root / "base"
    build.build_model(build.llama_config(), base, dtype=torch.float32)
    deltas = {}

    def rank4(name, t):
        if _is_linear(name):
            deltas[name] = _lowrank(t.shape, 4)
            return t + deltas[name]

    def full(name, t):  # a full-rank change beside a low-rank one, their balance depending on the module
        if _is_linear(name):
            noise = 0.004 * (1 + LINEAR.index(name.rsplit(".", 2)[-2]) % 4)
            return t + noise * torch.randn(t.shape, generator=GEN) + _lowrank(t.shape, 8)

    def vocab(name, t):
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return torch.cat([t, 0.02 * torch.randn(2, t.shape[1], generator=GEN)])
        if _is_linear(name) and ".layers.0." in name:
            return t + _lowrank(t.shape, 2)
        if name == "model.norm.weight":
            return t * 1.1

    out = {"base": base, "rank4": _finetune(base, root / "rank4", rank4), "deltas": deltas,
           "full": _finetune(base, root / "full", full),
           "vocab": _finetune(base, root / "vocab", vocab, lambda c: c.update(vocab_size=c["vocab_size"] + 2))}
    return out


def _layers(path):
    return load_dir(path)


def _adapter_delta(adapter_dir, module):
    return adaptkit.load_adapter(adapter_dir).modules[module].delta()


def test_an_exact_low_rank_change_is_reproduced(models, tmp_path):
    r = adaptkit.extract(models["base"], models["rank4"], tmp_path / "a", rank=4)
    assert len(r.lora_modules) == 14 and r.identical == 7 and not r.warnings
    for name, d in models["deltas"].items():
        module = name[: -len(".weight")]
        got = _adapter_delta(tmp_path / "a", module)
        assert float((got - d).norm() / d.norm()) < 1e-5, module
    assert r.worst_energy > 1 - 1e-6  # fp32 rounding of W + ΔW − W
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 4 and not cfg["rank_pattern"] and not cfg["modules_to_save"]


def test_a_full_rank_change_is_within_1_percent_of_the_optimum(models, tmp_path):
    r = adaptkit.extract(models["base"], models["full"], tmp_path / "a", rank=8)
    base, ft = _layers(models["base"]), _layers(models["full"])
    for m in r.lora_modules:
        d = ft[m.name + ".weight"] - base[m.name + ".weight"]
        s = torch.linalg.svdvals(d.double())
        optimum = float(s[8:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
        got = _adapter_delta(tmp_path / "a", m.name).double()
        err = float((got - d).norm() / d.norm())
        assert err <= 1.01 * optimum, (m.name, err, optimum)
        assert abs(m.rel_error - err) <= 1e-4  # the reported error is the real one
        assert abs(m.energy - float(s[:8].pow(2).sum() / s.pow(2).sum())) < 1e-4


def test_energy_picks_each_modules_smallest_rank(models, tmp_path):
    r = adaptkit.extract(models["base"], models["full"], tmp_path / "a", energy=0.95)
    base, ft = _layers(models["base"]), _layers(models["full"])
    ranks = set()
    for m in r.lora_modules:
        d = (ft[m.name + ".weight"] - base[m.name + ".weight"]).double()
        cum = torch.cumsum(torch.linalg.svdvals(d) ** 2, 0) / (d ** 2).sum()
        assert m.rank == int((cum < 0.95 - 1e-12).sum()) + 1, m.name
        assert m.energy >= 0.95
        ranks.add(m.rank)
    assert len(ranks) > 1  # modules of several ranks: rank_pattern says which
    loaded = adaptkit.load_adapter(tmp_path / "a")
    assert {n: mod.shape_rank for n, mod in loaded.modules.items()} == {m.name: m.rank for m in r.lora_modules}
    assert all(mod.scaling == 1.0 for mod in loaded.modules.values())
    capped = adaptkit.extract(models["base"], models["full"], tmp_path / "b", energy=0.95, max_rank=3)
    assert max(m.rank for m in capped.lora_modules) == 3


def test_peft_loads_it_and_a_resized_vocabulary_is_saved_whole(models, tmp_path):
    from peft import PeftModel

    r = adaptkit.extract(models["base"], models["vocab"], tmp_path / "a", rank=2)
    saved = {m.name for m in r.modules if m.kind == "saved"}
    assert saved == {"model.embed_tokens", "lm_head", "model.norm"}
    assert any("resize the base's embeddings" in w for w in r.warnings)
    base = build.load_model(models["base"])
    base.resize_token_embeddings(base.config.vocab_size + 2)
    pm = PeftModel.from_pretrained(base, tmp_path / "a").eval()
    ft = build.load_model(models["vocab"])
    ids = torch.randint(3, 258, (2, 12), generator=GEN)  # the two new tokens included
    ids[0, :2] = torch.tensor([256, 257])
    with torch.no_grad():
        want, got = ft(ids).logits, pm(ids).logits
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    # adaptkit's own merge grows the vocabulary too and gives the fine-tune back
    m = adaptkit.merge(models["base"], tmp_path / "a", tmp_path / "merged", dtype="float32")
    assert any("grows the vocabulary to 258" in w for w in m.warnings)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["vocab_size"] == 258
    merged, ref = load_dir(tmp_path / "merged"), _layers(models["vocab"])
    assert set(merged) == set(ref)
    for k in ref:
        assert torch.allclose(merged[k], ref[k], atol=1e-6), k
    report = adaptkit.verify(models["base"], tmp_path / "a", models["vocab"], tolerance=1e-5)
    assert report.ok, [c for c in report.modules if not c.ok]


def test_the_output_works_in_adaptkits_own_commands(models, tmp_path):
    adaptkit.extract(models["base"], models["full"], tmp_path / "a", rank=8)
    info = adaptkit.inspect(tmp_path / "a")
    assert info.r == 8 and not info.warnings
    assert all(check(adaptkit.load_adapter(tmp_path / "a"), t).ok for t in ("vllm", "llamacpp", "mlx"))
    adaptkit.convert(tmp_path / "a", tmp_path / "a.safetensors", to="raw")
    back = adaptkit.convert(tmp_path / "a.safetensors", tmp_path / "back", to="peft")
    assert back.modules == 14
    # verify's numbers are the extraction's error: within it, the pair passes; without, it does not
    report = adaptkit.verify(models["base"], tmp_path / "a", models["full"], model=False)
    assert not report.ok
    worst = max(c.rel_error for c in report.modules)
    assert adaptkit.verify(models["base"], tmp_path / "a", models["full"], model=False, tolerance=1.01 * worst).ok


def test_biases_norms_and_conv1d(tmp_path):
    """Biases of LoRA layers ride in lora_B.bias when every LoRA layer has one, else their layers are
    saved whole; changed norms are saved whole; GPT-2's Conv1D layers get fan_in_fan_out."""
    from peft import PeftModel

    base = tmp_path / "base"
    build.build_model(build.llama_config(attention_bias=True), base, dtype=torch.float32)

    def attn(name, t):
        if ".self_attn." in name:
            return t + (0.01 * torch.randn(t.shape, generator=GEN) if t.dim() == 1 else _lowrank(t.shape, 2))
        if name.endswith("input_layernorm.weight"):
            return t + 0.1

    ft = _finetune(base, tmp_path / "attn", attn)
    r = adaptkit.extract(base, ft, tmp_path / "a", rank=2)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["lora_bias"] is True and sorted(cfg["modules_to_save"]) == [
        "model.layers.0.input_layernorm", "model.layers.1.input_layernorm"]
    ids = torch.randint(3, 250, (2, 10), generator=GEN)
    pm = PeftModel.from_pretrained(build.load_model(base), tmp_path / "a").eval()
    with torch.no_grad():
        assert torch.allclose(pm(ids).logits, build.load_model(ft)(ids).logits, atol=1e-4)
    assert not r.warnings

    def mixed(name, t):  # the MLP (no biases) changes too: the attention layers go whole
        if ".mlp." in name and t.dim() == 2:
            return t + _lowrank(t.shape, 2)
        return attn(name, t)

    ft2 = _finetune(base, tmp_path / "mixed", mixed)
    r = adaptkit.extract(base, ft2, tmp_path / "b", rank=2)
    assert any("saved whole (modules_to_save)" in w for w in r.warnings)
    assert {m.name.rsplit(".", 1)[-1] for m in r.lora_modules} == {"gate_proj", "up_proj", "down_proj"}
    pm = PeftModel.from_pretrained(build.load_model(base), tmp_path / "b").eval()
    with torch.no_grad():
        assert torch.allclose(pm(ids).logits, build.load_model(ft2)(ids).logits, atol=1e-4)

    gpt2 = tmp_path / "gpt2"
    build.build_model(build.gpt2_config(), gpt2, dtype=torch.float32)
    ft3 = _finetune(gpt2, tmp_path / "gpt2-ft", lambda n, t: t + _lowrank(t.shape, 2) if n.endswith("c_fc.weight")
                    else None)
    adaptkit.extract(gpt2, ft3, tmp_path / "c", rank=2)
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    pm = PeftModel.from_pretrained(build.load_model(gpt2), tmp_path / "c").eval()
    with torch.no_grad():
        assert torch.allclose(pm(ids).logits, build.load_model(ft3)(ids).logits, atol=1e-4)


def test_embeddings_factor_option(models, tmp_path):
    def emb(name, t):
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return t + _lowrank(t.shape, 3)

    ft = _finetune(models["base"], tmp_path / "emb", emb)
    saved = adaptkit.extract(models["base"], ft, tmp_path / "s", rank=3)
    assert {m.kind for m in saved.modules} == {"saved"}
    factored = adaptkit.extract(models["base"], ft, tmp_path / "f", rank=3, embeddings="factor")
    assert {m.name: m.kind for m in factored.modules} == {"model.embed_tokens": "embedding", "lm_head": "lora"}
    assert factored.worst_energy > 1 - 1e-6
    adaptkit.merge(models["base"], tmp_path / "f", tmp_path / "m", dtype="float32")
    got, want = load_dir(tmp_path / "m"), load_dir(ft)
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)


def test_moe_experts_are_refused_unless_excluded(tmp_path):
    base = FIXTURES / "tiny-qwen3-moe"
    ft = _finetune(base, tmp_path / "moe", lambda n, t: t + 0.01 if n.endswith("experts.1.down_proj.weight")
                   or n.endswith("self_attn.q_proj.weight") else None)
    with pytest.raises(adaptkit.AdaptkitError, match="LoRAs on experts"):
        adaptkit.extract(base, ft, tmp_path / "a", rank=2)
    r = adaptkit.extract(base, ft, tmp_path / "a", rank=2, exclude=r"\.experts\.")
    assert len(r.excluded) == 2 and any("does not carry their change" in w for w in r.warnings)
    assert {m.name.rsplit(".", 1)[-1] for m in r.lora_modules} == {"q_proj"}


def test_cli_and_its_errors(models, runner, tmp_path):
    res = invoke(runner, "extract", models["base"], models["rank4"], "-o", tmp_path / "a", "--rank", "4", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert len(data["modules"]) == 14 and data["worst_energy"] > 0.999999 and data["identical"] == 7
    res = invoke(runner, "extract", models["base"], models["full"], "-o", tmp_path / "b", "--rank", "2")
    assert res.exit_code == 0 and "energy kept: worst" in res.stdout and "keep less than 90%" in res.stderr
    other = tmp_path / "gpt2"
    build.build_model(build.gpt2_config(), other, dtype=torch.float32)
    cases = [
        ([models["base"], models["rank4"], "--rank", "4", "--energy", "0.9"], "give one of rank"),
        ([models["base"], models["rank4"]], "give one of rank"),
        ([models["base"], models["rank4"], "--energy", "1.5"], "--energy: must be in (0, 1]"),
        ([models["base"], models["rank4"], "--rank", "4", "--max-rank", "2"], "--max-rank: caps the ranks energy"),
        ([models["base"], models["rank4"], "--rank", "2", "--include", "("], "--include: not a regular expression"),
        ([models["base"], other, "--rank", "2"], "model_type"),
        ([models["base"], models["base"], "--rank", "2"], "nothing to extract"),
    ]
    for i, (args, needle) in enumerate(cases):
        out = tmp_path / f"bad{i}"
        assert_one_line_error(invoke(runner, "extract", *args[:2], "-o", out, *args[2:]), needle)
        assert not out.exists()
    res = invoke(runner, "extract", models["base"], models["rank4"], "-o", models["rank4"], "--rank", "4", "--force")
    assert_one_line_error(res, "input")
