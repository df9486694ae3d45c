"""`adaptkit verify`: correct merges pass; each kind of wrong merge fails with exit 1 and names the tensor."""

import json
import shutil

import pytest
import torch
from helpers import ADAPTERS, BASE_OF, FAMILY_ADAPTERS, FAMILY_BASE_OF, TINY_LLAMA, load_dir
from safetensors.torch import load_file, save_file

from adaptkit import merge, verify
from adaptkit.cli import main


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("name", list(ADAPTERS))
def test_correct_merges_pass(tmp_path, name, dtype):
    out = tmp_path / "m"
    merge(BASE_OF[name], [ADAPTERS[name]], out, dtype=dtype)
    report = verify(BASE_OF[name], [ADAPTERS[name]], out, model=(dtype == "float16"))
    assert report.ok, [(m.name, m.rel_error, m.allowed) for m in report.modules if not m.ok]
    assert report.untouched_checked > 0 and not report.untouched_mismatched
    lora = [m for m in report.modules if m.kind in ("lora", "dora")]
    assert lora and all(m.rel_error <= 1.5 * m.rounding_noise + 1e-6 for m in lora)  # rounding is all there is
    if dtype == "float16":
        assert report.model is not None and report.model.ok and report.model.top1_agreement > 0.95


def _tamper(merged, tensor, fn):
    for f in merged.glob("*.safetensors"):
        t = load_file(f)
        if tensor in t:
            t[tensor] = fn(t[tensor])
            save_file(t, f, metadata={"format": "pt"})
            return
    raise KeyError(tensor)


def _fails_naming(runner, base, adapter, merged, tensor, extra=()):
    res = runner.invoke(main, ["verify", str(base), str(adapter), str(merged), "--json", *extra])
    assert res.exit_code == 1, res.output
    report = json.loads(res.stdout)
    assert tensor in report["summary"]["failed"], report["summary"]
    return report


@pytest.fixture
def good(tmp_path):
    out = tmp_path / "good"
    merge(TINY_LLAMA, [ADAPTERS["llama-lora"]], out)
    return out


def test_perturbed_adapted_tensor_fails(runner, good):
    name = "model.layers.1.mlp.up_proj.weight"
    _tamper(good, name, lambda t: t.index_put((torch.tensor([3]),), t[3] + 0.05))
    _fails_naming(runner, TINY_LLAMA, ADAPTERS["llama-lora"], good, name)


def test_perturbed_untouched_tensor_fails(runner, good):
    name = "model.layers.0.input_layernorm.weight"
    _tamper(good, name, lambda t: t.index_put((torch.tensor([0]),), t[0] + 0.001))
    report = _fails_naming(runner, TINY_LLAMA, ADAPTERS["llama-lora"], good, name, ["--no-model"])
    assert report["untouched_mismatched"] == [name]


def test_missing_module_fails(runner, good):
    name = "model.layers.0.self_attn.v_proj.weight"
    base = load_file(TINY_LLAMA / "model-00001-of-00002.safetensors") | load_file(TINY_LLAMA / "model-00002-of-00002.safetensors")
    _tamper(good, name, lambda t: base[name].clone())  # as if the module had not been merged
    _fails_naming(runner, TINY_LLAMA, ADAPTERS["llama-lora"], good, name, ["--no-model"])


def test_transposed_delta_fails(runner, tmp_path):
    from adaptkit import load_adapter

    out = tmp_path / "m"
    merge(TINY_LLAMA, [ADAPTERS["llama-lora"]], out, dtype="float32")
    name = "model.layers.0.self_attn.q_proj"
    m = load_adapter(ADAPTERS["llama-lora"]).modules[name]
    base = load_file(TINY_LLAMA / "model-00001-of-00002.safetensors")[name + ".weight"].float()
    _tamper(out, name + ".weight", lambda t: base + m.delta().T)
    _fails_naming(runner, TINY_LLAMA, ADAPTERS["llama-lora"], out, name + ".weight", ["--no-model"])


def test_wrong_scaling_fails(runner, tmp_path):
    """Merging with α/r where the adapter says rsLoRA (α/√r) is caught on every module."""
    wrong_ad = tmp_path / "plain"
    shutil.copytree(ADAPTERS["llama-rslora-patterns"], wrong_ad)
    cfg = json.loads((wrong_ad / "adapter_config.json").read_text())
    cfg["use_rslora"] = False
    (wrong_ad / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "m"
    merge(TINY_LLAMA, [wrong_ad], out)
    res = runner.invoke(main, ["verify", str(TINY_LLAMA), str(ADAPTERS["llama-rslora-patterns"]), str(out), "--json"])
    assert res.exit_code == 1
    report = json.loads(res.stdout)
    assert len(report["summary"]["failed"]) == 14
    assert report["model"]["ok"] is False  # the logits show it too


def test_tolerance_option_and_human_output(runner, good):
    res = runner.invoke(main, ["verify", str(TINY_LLAMA), str(ADAPTERS["llama-lora"]), str(good), "--no-model"])
    assert res.exit_code == 0 and "verified" in res.stdout and "bit-identical" in res.stdout
    res = runner.invoke(main, ["verify", str(TINY_LLAMA), str(ADAPTERS["llama-lora"]), str(good), "--no-model",
                               "--tolerance", "1e-9"])
    assert res.exit_code == 1 and "not verified" in res.stdout


def test_weights_are_verified(runner, tmp_path):
    out = tmp_path / "m"
    merge(TINY_LLAMA, [ADAPTERS["llama-lora"]], out, weights=[0.5])
    args = ["verify", str(TINY_LLAMA), str(ADAPTERS["llama-lora"]), str(out), "--no-model"]
    assert runner.invoke(main, args + ["--weight", "0.5"]).exit_code == 0
    assert runner.invoke(main, args).exit_code == 1


def test_bad_input_exits_2(runner, tmp_path, good):
    res = runner.invoke(main, ["verify", str(TINY_LLAMA), str(good)])
    assert res.exit_code == 2 and "adapter" in res.stderr
    res = runner.invoke(main, ["verify", str(TINY_LLAMA), str(ADAPTERS["llama-lora"]), str(tmp_path / "nope")])
    assert res.exit_code == 2 and "no such model folder" in res.stderr


def test_paths_with_square_brackets_print_verbatim(runner, tmp_path):
    """Paths go to the terminal as text, never as rich markup ('[bold]' stays, '[/x]' does not crash)."""
    ad = tmp_path / "run[1]" / "ad[bold]"
    shutil.copytree(ADAPTERS["llama-lora"], ad)
    out = tmp_path / "run[1]" / "[/x]"
    res = runner.invoke(main, ["merge", str(TINY_LLAMA), str(ad), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert str(out) in res.stdout
    res = runner.invoke(main, ["inspect", str(ad), "--check", "vllm", "--max-lora-rank", "4"])
    assert res.exit_code == 1 and str(ad) in res.stdout
    res = runner.invoke(main, ["verify", str(TINY_LLAMA), str(ad), str(out), "--no-model"])
    assert res.exit_code == 0 and "verified" in res.stdout


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["llama-lora", "gpt2-lora", "llama-rslora-patterns", "phi3-fused"])
def test_the_blocked_probe_route_agrees_with_the_whole_tensor_route(tmp_path, monkeypatch, name, dtype):
    """16-bit merges of plain LoRAs take verify._probe_rows (fp32 blocks on every core; transposed
    GPT-2 Conv1D and a fused Phi-3 among them): the same probes, errors, noise and verdicts as the
    whole-tensor route, and a dropped delta is caught by both."""
    from adaptkit.commands import verify as verify_mod
    from helpers import FAMILY_ADAPTERS, FAMILY_BASE_OF

    adapter = ADAPTERS.get(name) or FAMILY_ADAPTERS[name]
    base = BASE_OF.get(name) or FAMILY_BASE_OF[name]
    out = tmp_path / "m"
    merge(base, [adapter], out, dtype=dtype)
    calls = []
    real = verify_mod._probe_rows
    monkeypatch.setattr(verify_mod, "_probe_rows", lambda *a: calls.append(1) or real(*a))
    blocked = verify(base, [adapter], out, model=False)
    assert calls, "the blocked route was not taken"
    monkeypatch.setattr(verify_mod, "_row_probed", lambda *a: False)
    whole = verify(base, [adapter], out, model=False)
    assert blocked.ok and whole.ok
    pairs = list(zip(blocked.modules, whole.modules))
    assert pairs and all(a.name == b.name and a.ok == b.ok for a, b in pairs)
    for a, b in pairs:
        assert a.rel_error == pytest.approx(b.rel_error, rel=1e-3, abs=1e-9), a.name
        assert a.rounding_noise == pytest.approx(b.rounding_noise, rel=1e-4), a.name
    victim = next(m.name for m in blocked.modules if m.kind == "lora")
    original = load_dir(base)[victim]
    _tamper(out, victim, lambda t: original.to(t.dtype))  # that module's delta dropped
    monkeypatch.undo()
    dropped = verify(base, [adapter], out, model=False)
    assert not dropped.ok and [m.name for m in dropped.modules if not m.ok] == [victim]


def test_a_reference_transformers_cannot_run_skips_the_model_level_with_a_warning(runner, good, monkeypatch):
    """transformers or peft failing on base + adapters (as transformers 5.24's Llama 4 VLM did on text
    alone) leaves nothing to compare with: the model level is skipped, naming the error, and the layer
    level still decides; no traceback. A merged model that transformers cannot run is not excused so."""
    import adaptkit.commands.verify as verify_module

    def broken(model):
        def run(**_):
            raise AttributeError("'MoeCausalLMOutputWithPast' object has no attribute 'image_outputs'")
        return run

    monkeypatch.setattr(verify_module, "_text_model", broken)
    res = runner.invoke(main, ["verify", str(TINY_LLAMA), str(ADAPTERS["llama-lora"]), str(good), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["ok"] and report["model"] is None
    assert any("model-level check skipped" in w and "AttributeError: 'MoeCausalLMOutputWithPast'" in w
               for w in report["warnings"])
    calls = []

    def merged_broken(model):  # the reference runs, the merged model does not: an error, not a skip
        calls.append(model)
        if len(calls) == 1:
            return model
        raise RuntimeError("merged model cannot run")

    monkeypatch.setattr(verify_module, "_text_model", merged_broken)
    with pytest.raises(RuntimeError, match="merged model cannot run"):
        verify(TINY_LLAMA, ADAPTERS["llama-lora"], good)


def test_the_merged_model_is_upcast_into_the_references_modules_with_the_same_verdict(good, monkeypatch):
    """A 16-bit merged model: transformers loads it in its own dtype and its weights go into the
    reference's modules once peft's layers are unloaded (taken over where the base is stored in the same
    dtype, see Fp32Compute; upcast into fp32 ones otherwise). The logits are those of the merged model
    loaded in fp32 (the same numbers to the last bit), and a wrong merge still fails at the model level."""
    import adaptkit.commands.verify as verify_module

    taken = []
    real = verify_module._into_reference
    monkeypatch.setattr(verify_module, "_into_reference", lambda ref, m: taken.append(real(ref, m)) or taken[-1])
    reused = verify(TINY_LLAMA, [ADAPTERS["llama-lora"]], good)
    assert taken == [True] and reused.ok and reused.model.ok
    monkeypatch.setattr(verify_module, "_stored_16bit", lambda ck: None)  # the merged model loaded in fp32
    loaded = verify(TINY_LLAMA, [ADAPTERS["llama-lora"]], good)
    assert taken == [True] and loaded.model == reused.model
    monkeypatch.undo()
    monkeypatch.setattr(verify_module, "_into_reference", lambda ref, m: taken.append(real(ref, m)) or taken[-1])
    name = "model.layers.1.mlp.down_proj.weight"
    _tamper(good, name, lambda t: t * -20)
    wrong = verify(TINY_LLAMA, [ADAPTERS["llama-lora"]], good)
    assert taken[-1] is True and not wrong.model.ok and name in [m.name for m in wrong.modules if not m.ok]


def test_a_reference_of_another_structure_is_not_reused():
    """Another config, or a tie the reference lost (peft's copy of a tied embedding in modules_to_save):
    nothing is copied, and the merged model is loaded in fp32 instead."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import adaptkit.commands.verify as verify_module

    cfg = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               tie_word_embeddings=True)
    ref, merged = LlamaForCausalLM(LlamaConfig(**cfg)), LlamaForCausalLM(LlamaConfig(**cfg)).half()
    before = ref.model.norm.weight.detach().clone()
    with torch.no_grad():
        merged.model.norm.weight.fill_(3.0)
    other = LlamaForCausalLM(LlamaConfig(**dict(cfg, rms_norm_eps=1e-5))).half()
    assert not verify_module._into_reference(ref, other)
    ref.lm_head.weight = torch.nn.Parameter(ref.lm_head.weight.detach().clone())  # untied
    assert not verify_module._into_reference(ref, merged)
    assert torch.equal(ref.model.norm.weight, before)
    ref.lm_head.weight = ref.model.embed_tokens.weight  # tied again
    assert verify_module._into_reference(ref, merged)
    assert torch.equal(ref.model.norm.weight, torch.full_like(before, 3.0))
    assert torch.equal(ref.lm_head.weight, merged.lm_head.weight.float())


CASES_16BIT = [(ADAPTERS[n], BASE_OF[n], "float16") for n in ("llama-dora", "llama-embed-mts", "gpt2-lora")] + [
    (FAMILY_ADAPTERS[n], FAMILY_BASE_OF[n], "bfloat16") for n in FAMILY_ADAPTERS]


@pytest.mark.parametrize("adapter, base, dtype", CASES_16BIT, ids=lambda v: getattr(v, "name", v))
def test_a_16bit_base_and_merge_run_in_fp32_arithmetic_with_the_fp32_verdict(tmp_path, adapter, base, dtype,
                                                                               monkeypatch):
    """Base and merged model stored in one 16-bit dtype: both load in it and run through Fp32Compute;
    the model-level check equals the one that loads the base in fp32 (DoRA, a modules_to_save
    embedding, GPT-2's Conv1D, MoE experts through peft's parametrization, a VLM, fused projections), and
    a wrong merge moves its KL by orders of magnitude."""
    import adaptkit.commands.verify as verify_module

    out = tmp_path / "m"
    merge(base, [adapter], out, dtype=dtype)
    used = []
    real = verify_module.Fp32Compute
    monkeypatch.setattr(verify_module, "Fp32Compute", lambda m: used.append(real(m)) or used[-1])
    low = verify(base, [adapter], out)
    assert low.ok and low.model is not None and low.model.ok
    assert used and all(u.units for u in used)
    used.clear()
    monkeypatch.setattr(verify_module, "_stored_16bit", lambda ck: None)  # the base in fp32
    fp32 = verify(base, [adapter], out)
    assert not used
    # the same numbers (to the last bit on the machines tried: the same fp32 values go through the same kernels)
    assert low.model.mean_kl == pytest.approx(fp32.model.mean_kl, rel=1e-6, abs=1e-15)
    assert low.model.max_abs_logit_diff == pytest.approx(fp32.model.max_abs_logit_diff, rel=1e-6, abs=1e-9)
    assert low.model.compared == fp32.model.compared
    monkeypatch.undo()
    tensor = next(m.name for m in low.modules if m.kind in ("lora", "dora", "experts"))
    _tamper(out, tensor, lambda t: t * -20)
    wrong = verify(base, [adapter], out)
    assert not wrong.ok and wrong.model.mean_kl > 100 * low.model.mean_kl  # the model level sees it too


def test_fp32_compute_gives_the_fp32_models_logits_and_leaves_the_16bit_weights():
    from transformers import LlamaConfig, LlamaForCausalLM

    from adaptkit.commands.verify import Fp32Compute

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
    half = LlamaForCausalLM(cfg).half().eval()
    full = LlamaForCausalLM(cfg).eval()
    full.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    run = Fp32Compute(half)
    assert len(run.units) == 2 and half.model.layers[0].mlp.up_proj.weight.dtype == torch.float16
    assert half.lm_head.weight.dtype == torch.float32 and half.lm_head.weight is half.model.embed_tokens.weight
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        got, want = half(input_ids=ids).logits, full(input_ids=ids).logits
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=0, atol=1e-6 * want.abs().max().item())
    assert all(p.dtype == torch.float16 for p in half.model.layers.parameters())  # given back after each layer
    assert sum(len(v) for v in run.free.values()) == sum(1 for _ in half.model.layers[0].parameters())  # one layer's


def test_a_dora_on_a_base_stored_in_out_is_verified_in_the_bases_orientation(tmp_path):
    """GPT-2's Conv1D weights are stored (in, out): verify's DoRA norms are taken on the base weight in the
    (out, in) orientation its probes already use (it transposed that weight back, failing on c_attn's
    (64, 192) with a shape error and, on the square c_proj, comparing against the wrong norms)."""
    from helpers import TINY_GPT2, peft_merged

    from fixtures.build import build_adapter

    ad = build_adapter(TINY_GPT2, tmp_path / "dora", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                       use_dora=True, fan_in_fan_out=True)
    merge(TINY_GPT2, [ad], tmp_path / "m")
    report = verify(TINY_GPT2, [ad], tmp_path / "m")
    assert report.ok and {m.kind for m in report.modules if m.kind != "untouched"} >= {"dora"}
    _, ref = peft_merged(TINY_GPT2, [ad])
    got = load_dir(tmp_path / "m")
    for name, t in ref.state_dict().items():
        if name in got:
            assert torch.allclose(got[name].float(), t.float(), rtol=1e-3, atol=1e-4), name
