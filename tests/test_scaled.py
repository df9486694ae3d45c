"""FP8 and MXFP4 bases (issue 20): the codecs against the formats' own code, merges against
transformers' dequantized load + peft, ``--quantize same`` against the formats' own quantizers,
verify on both outputs, and every refusal in one line.

Oracles: transformers' ``Fp8Quantize`` / ``Fp8Dequantize`` (fp8), compressed-tensors'
``calculate_qparams`` / ``quantize`` / ``dequantize``, transformers' ``convert_moe_packed_tensors``
(MXFP4 dequantization) and, for the MXFP4 quantizer, its definition written arithmetically (scale
2^⌈log2(max/6)⌉, nearest e2m1 value, halves away from zero) rather than with the reference's bit
procedure that adaptkit follows.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import adaptkit
from adaptkit import scaled
from adaptkit.io.checkpoint import Checkpoint
from adaptkit.formats import load_adapter
from adaptkit.plan import plan_merge, scaled_weights
from fixtures import build
from tests.helpers import FIXTURES, assert_merge_close, assert_one_line_error, invoke, load_dir, snapshot

ct = pytest.importorskip("compressed_tensors")


class _Settings:
    """What transformers' Fp8Quantize / Fp8Dequantize read of their quantizer."""

    def __init__(self, block, scale_fmt="float"):
        self.quantization_config = type("C", (), {"weight_block_size": block, "scale_fmt": scale_fmt})()


def _weight(shape, block, style, scale: torch.Tensor, name="a.weight", suffix="_scale_inv"):
    return scaled.ScaledWeight(name, name, name + suffix, tuple(shape), tuple(block), style, scale.dtype,
                               tuple(scale.shape))


def _dequant(w, data, scale):
    return scaled.dequantize_(w, data, scale, torch.empty(w.shape))


# ------------------------------------------------------------------------------------------- codecs

@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
def test_fp8_codec_is_transformers_own(scale_fmt):
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

    x = torch.randn(256, 384, generator=torch.Generator().manual_seed(0)) * 0.02
    x[:128, :128] = 0  # an all-zero block: scale 1, as transformers stores it
    ref = Fp8Quantize(_Settings((128, 128), scale_fmt))._quantize_one("a.weight", x)
    w = _weight(x.shape, (128, 128), "fp8" if scale_fmt == "float" else "fp8-ue8m0", ref["a.weight_scale_inv"])
    ours = scaled.quantize(w, x)
    assert torch.equal(ours["a.weight"].view(torch.uint8), ref["a.weight"].view(torch.uint8))
    assert ours["a.weight_scale_inv"].dtype == ref["a.weight_scale_inv"].dtype
    assert torch.equal(ours["a.weight_scale_inv"].float(), ref["a.weight_scale_inv"].float())
    want = Fp8Dequantize(_Settings((128, 128), scale_fmt))._dequantize_one(ref["a.weight"], ref["a.weight_scale_inv"],
                                                                          torch.float32)
    assert torch.equal(_dequant(w, ref["a.weight"], ref["a.weight_scale_inv"]), want)


def test_fp8_partial_blocks_take_their_block_scale():
    """Shapes that are no multiple of the block (DeepSeek-V3's 576-row kv_a_proj_with_mqa): the last,
    partial block has its own scale, as DeepSeek's weight_dequant reads it (transformers derives the
    block from the scale grid and would get 24-row blocks here)."""
    gen = torch.Generator().manual_seed(1)
    q = (torch.randn(72, 80, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.rand(3, 3, generator=gen) + 0.5
    w = _weight((72, 80), (32, 32), "fp8", s)
    want = q.float() * s.repeat_interleave(32, 0)[:72].repeat_interleave(32, 1)[:, :80]
    assert torch.equal(_dequant(w, q, s), want)
    x = torch.randn(72, 80, generator=gen)
    stored = scaled.quantize(w, x)
    assert stored["a.weight_scale_inv"].shape == (3, 3)
    qs = stored["a.weight"].float()
    for i in range(3):  # each block's largest value lands on FP8's largest, 448
        for j in range(3):
            assert qs[32 * i:32 * i + 32, 32 * j:32 * j + 32].abs().max() == 448
    back = _dequant(w, stored["a.weight"], stored["a.weight_scale_inv"])
    assert float((back - x).norm() / x.norm()) < 0.05


@pytest.mark.parametrize("strategy", ["tensor", "channel", "group", "block"])
def test_compressed_tensors_codec_is_the_librarys_own(strategy):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    x = torch.randn(256, 384, generator=torch.Generator().manual_seed(2))
    kw = {"block_structure": [128, 128]} if strategy == "block" else {"group_size": 128} if strategy == "group" else {}
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy, **kw)
    block = {"tensor": (256, 384), "channel": (1, 384), "group": (1, 128), "block": (128, 128)}[strategy]
    grid = x.reshape(256 // block[0], block[0], 384 // block[1], block[1])
    lo, hi = grid.amin((1, 3)), grid.amax((1, 3))
    if strategy == "tensor":
        lo, hi = lo.reshape(1), hi.reshape(1)
    scale, zero = calculate_qparams(lo, hi, args)
    q = quantize(x, scale, zero, args, dtype=torch.float8_e4m3fn)
    w = _weight(x.shape, block, "compressed-tensors", scale, suffix="_scale")
    ours = scaled.quantize(w, x)
    assert torch.equal(ours["a.weight"].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(ours["a.weight_scale"], scale)
    assert torch.equal(_dequant(w, q, scale), dequantize(q, scale, zero, args).float())


def _mx_by_definition(x: torch.Tensor) -> torch.Tensor:
    """MXFP4 of x (…, K, N) along K, written from the definition: per 32 values the scale is
    2^⌈log2(max|x| / 6)⌉ and each value goes to the nearest e2m1 value (halves away from zero)."""
    src = x.transpose(-1, -2)
    *lead, n, k = src.shape
    g = src.reshape(*lead, n, k // 32, 32)
    s = torch.exp2(torch.ceil(torch.log2(g.abs().amax(-1, keepdim=True) / 6)))
    v = g / s
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    dist = (v.abs().unsqueeze(-1) - grid).abs()
    ties_up = torch.where(dist <= dist.min(-1, keepdim=True).values, torch.arange(8), -1).max(-1).values
    return (grid[ties_up] * v.sign() * s).reshape(*lead, n, k).transpose(-1, -2)


def test_mxfp4_codec():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (2, 96, 2, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(115, 130, (2, 96, 2), generator=gen, dtype=torch.uint8)
    w = scaled.ScaledWeight("e.gate_up_proj", "e.gate_up_proj_blocks", "e.gate_up_proj_scales", (2, 64, 96), (1, 32),
                            "mxfp4", torch.uint8, (2, 96, 2))
    dense = _dequant(w, blocks, scales)
    assert torch.equal(dense, convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    again = scaled.quantize(w, dense)  # values already on the grid come back unchanged
    assert torch.equal(_dequant(w, again[w.data], again[w.scales]), dense)
    x = torch.randn(2, 64, 96, generator=gen)
    x[0, :32, 0] = 0  # an all-zero group
    q = scaled.quantize(w, x)
    assert q[w.data].shape == blocks.shape and q[w.scales].shape == scales.shape
    assert torch.equal(_dequant(w, q[w.data], q[w.scales]), _mx_by_definition(x))


# ------------------------------------------------------------------------------------------- bases

@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Quantized bases in each layout, with peft-made LoRAs trained on their dense originals."""
    root = tmp_path_factory.mktemp("scaled")
    llama = root / "llama-bf16"
    build.build_model(build.llama_config(), llama, dtype=torch.bfloat16)
    gpt = build.gpt_oss_config()
    gpt.intermediate_size = 64  # MXFP4 groups of 32 along every expert's K
    oss = root / "gpt-oss-bf16"
    build.build_model(gpt, oss, dtype=torch.bfloat16)
    out = {
        "fp8-block": (build.fp8_checkpoint(llama, root / "fp8-block"), "llama"),
        "fp8-tensor": (build.fp8_checkpoint(llama, root / "fp8-tensor", block=None, static=True), "llama"),
        "fp8-ue8m0": (build.fp8_checkpoint(llama, root / "fp8-ue8m0", scale_fmt="ue8m0"), "llama"),
        "ct-channel": (build.compressed_fp8_checkpoint(llama, root / "ct-channel", "channel", scale_dtype=torch.bfloat16),
                       "llama"),
        "ct-block": (build.compressed_fp8_checkpoint(llama, root / "ct-block", "block"), "llama"),
        "qwen3-moe-fp8": (build.fp8_checkpoint(FIXTURES / "tiny-qwen3-moe", root / "qwen3-moe-fp8", block=(16, 16)),
                          "moe"),
        "mxfp4": (build.mxfp4_checkpoint(oss, root / "mxfp4"), "oss"),
    }
    adapters = {
        "llama": build.build_adapter(llama, root / "llama-lora", seed=11, r=4, lora_alpha=8,
                                     target_modules=["q_proj", "v_proj", "down_proj"]),
        "moe": FIXTURES / "adapters" / "qwen3-moe-experts",
        "oss": build.build_adapter(out["mxfp4"][0], root / "oss-lora", seed=12, r=4, lora_alpha=8,
                                   target_modules=["q_proj"], target_parameters=build.EXPERTS),
    }
    return {name: (path, adapters[kind]) for name, (path, kind) in out.items()}


def _transformers_dense(path, dtype=torch.float32):
    """The quantized model as transformers loads it dequantized (its own definitions) in ``dtype``."""
    import transformers
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    method = json.loads((path / "config.json").read_text())["quantization_config"]["quant_method"]
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if method == "compressed-tensors" else {}
    transformers.logging.set_verbosity_error()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()


def _peft_reference(base, adapter):
    """(unmerged PeftModel on transformers' dequantized base, its merge_and_unload state dict), fp32."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(_transformers_dense(base), adapter)
    ids = torch.randint(3, 250, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = pm(ids).logits
    return ids, logits, {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


CASES = ["fp8-block", "fp8-tensor", "fp8-ue8m0", "ct-channel", "ct-block", "qwen3-moe-fp8", "mxfp4"]


@pytest.mark.parametrize("case", CASES)
def test_dense_merge_is_transformers_dequant_plus_peft(bases, case, tmp_path):
    base, adapter = bases[case]
    ids, want_logits, want = _peft_reference(base, adapter)
    r = adaptkit.merge(base, adapter, tmp_path / "fp32", dtype="float32")
    assert r.tensors_merged > 0
    stored = load_dir(tmp_path / "fp32")
    assert not [k for k in stored if k.endswith(("_scale", "_scale_inv", "_blocks", "_scales", "activation_scale"))]
    assert all(t.dtype == torch.float32 for t in stored.values())
    cfg = json.loads((tmp_path / "fp32" / "config.json").read_text())
    assert "quantization_config" not in cfg
    merged = build.load_model(tmp_path / "fp32")  # in memory, as peft's merge is (MoE experts fused)
    got = {k: v.detach() for k, v in merged.state_dict().items()}
    names = {k for k in want if not k.endswith(".activation_scale")}
    assert set(got) == names, set(got) ^ names
    for k in sorted(names):
        assert_merge_close(got[k], want[k], want[k], ulps=2, name=k)
    with torch.no_grad():
        logits = merged(ids).logits
    assert float((logits - want_logits).abs().max()) <= 1e-4 * float(want_logits.abs().max())
    # by default the dense output takes the config's dtype (bf16): the exact sum rounded once
    adaptkit.merge(base, adapter, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_dir(tmp_path / "bf16").values())
    bf16 = build.load_model(tmp_path / "bf16").state_dict()
    for k in sorted(names):
        assert_merge_close(bf16[k].to(torch.bfloat16), got[k].to(torch.bfloat16), want[k], ulps=1, name=k)


def _format_quantizer(case: str, w: scaled.ScaledWeight, exact: torch.Tensor) -> torch.Tensor:
    """The exact merged weight through the format's own quantizer and back (fp32)."""
    if case == "mxfp4":
        return _mx_by_definition(exact)
    if case.startswith("ct"):
        from compressed_tensors.quantization import QuantizationArgs
        from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
        from compressed_tensors.quantization.utils.helpers import calculate_qparams

        strategy = case.split("-")[1]
        kw = {"block_structure": [32, 32]} if strategy == "block" else {}
        args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy, **kw)
        b = w.block
        g = exact.reshape(exact.shape[0] // b[0], b[0], exact.shape[1] // b[1], b[1])
        lo, hi = g.amin((1, 3)), g.amax((1, 3))
        scale, zero = calculate_qparams(lo, hi, args)
        scale = scale.to(w.scale_dtype)
        return dequantize(quantize(exact, scale, zero, args, dtype=torch.float8_e4m3fn), scale, zero, args).float()
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

    block = w.block
    settings = _Settings(block, "ue8m0" if w.style == "fp8-ue8m0" else "float")
    stored = Fp8Quantize(settings)._quantize_one(w.data, exact)
    scale = stored[w.scales]
    return Fp8Dequantize(settings)._dequantize_one(stored[w.data], scale.reshape(1, 1) if scale.dim() < 2 else scale,
                                                  torch.float32)


@pytest.mark.parametrize("case", CASES)
def test_quantize_same_keeps_the_format(bases, case, tmp_path):
    base, adapter = bases[case]
    # the exact merge, by on-disk name: the fp32 dense merge (equal to transformers + peft, test above)
    adaptkit.merge(base, adapter, tmp_path / "exact", dtype="float32")
    exact = load_dir(tmp_path / "exact")
    before = snapshot(base)
    out = tmp_path / "same"
    r = adaptkit.merge(base, adapter, out, quantize="same")
    assert snapshot(base) == before
    assert json.loads((out / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    got, orig = load_dir(out), load_dir(base)
    assert set(got) == set(orig)
    merged_names = set(r.quantization["per_layer"])  # the requantized layers
    ckpt = Checkpoint.open(base)
    _, found, _ = scaled_weights(ckpt)
    assert merged_names and merged_names <= set(found)
    plan = plan_merge(ckpt, [load_adapter(adapter)], quantize="same")
    touched = {n for j in plan.jobs if j.ops for n in j.out_names}
    assert {n for w in merged_names for n in found[w].stored} <= touched
    for name, t in orig.items():  # every tensor the adapter does not touch: the same bytes
        if name not in touched:
            assert torch.equal(got[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name
    for name in merged_names:
        w = found[name]
        ours = _dequant(w, got[w.data], got[w.scales])
        ref = _format_quantizer(case, w, exact[name].float())
        err = float((ours - exact[name]).norm() / exact[name].norm())
        ref_err = float((ref - exact[name]).norm() / exact[name].norm())
        assert err <= ref_err * 1.001 + 1e-7, (name, err, ref_err)  # no worse than the format's own quantizer
        assert abs(r.quantization["per_layer"][name] - err) <= 1e-3 * err + 1e-7
    _transformers_dense(out)  # transformers loads it


def test_verify_accepts_both_outputs_and_catches_a_dropped_expert(bases, tmp_path):
    base, adapter = bases["mxfp4"]
    adaptkit.merge(base, adapter, tmp_path / "dense")
    adaptkit.merge(base, adapter, tmp_path / "same", quantize="same")
    for out in ("dense", "same"):
        r = adaptkit.verify(base, adapter, tmp_path / out, model=False)
        assert r.ok, [m for m in r.modules if not m.ok]
    # one expert's delta dropped from the requantized output: its blocks put back as the base stores them
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "same", bad)
    state, orig = load_dir(bad), load_dir(base)
    name = "model.layers.1.mlp.experts.down_proj"
    for suffix in ("_blocks", "_scales"):
        state[name + suffix][2] = orig[name + suffix][2]
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    r = adaptkit.verify(base, adapter, bad, model=False)
    assert not r.ok and [m.name for m in r.modules if not m.ok] == [name]


def test_verify_rejects_a_perturbed_fp8_merge(bases, tmp_path):
    base, adapter = bases["fp8-block"]
    adaptkit.merge(base, adapter, tmp_path / "dense")
    r = adaptkit.verify(base, adapter, tmp_path / "dense")  # the model level loads the FP8 base in transformers
    assert r.ok and r.model is not None and r.model.ok
    state = load_dir(tmp_path / "dense")
    name = "model.layers.0.self_attn.v_proj.weight"
    state[name] = (state[name].float() * 1.01).to(state[name].dtype)
    save_file(state, tmp_path / "dense" / "model.safetensors", metadata={"format": "pt"})
    r = adaptkit.verify(base, adapter, tmp_path / "dense", model=False)
    assert [m.name for m in r.modules if not m.ok] == [name]


def test_cli_merge_same_reports_the_requantization(bases, runner, tmp_path):
    base, adapter = bases["fp8-block"]
    res = invoke(runner, "merge", base, adapter, "-o", tmp_path / "out", "--quantize", "same")
    assert res.exit_code == 0, res.output
    assert "requantized to FP8 (32×32 blocks)" in res.output and "relative error per layer" in res.output
    res = invoke(runner, "merge", base, adapter, "-o", tmp_path / "out2", "--quantize", "fp8", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["quantization"]["layers"] == 6


def _edit_config(src, dst, edit):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg["quantization_config"])
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_refusals_are_one_line_and_write_nothing(bases, runner, tmp_path):
    base, adapter = bases["fp8-block"]
    cases = [
        (_edit_config(base, tmp_path / "gptq", lambda q: q.update(quant_method="gptq")), [],
         "GPTQ int4 bases are refused: their dequantization"),
        (_edit_config(base, tmp_path / "hqq", lambda q: q.update(quant_method="hqq")), [],
         "quant_method 'hqq' is not supported"),
        (_edit_config(base, tmp_path / "field", lambda q: q.update(new_knob=3)), [], "field 'new_knob' (fp8)"),
        (_edit_config(base, tmp_path / "fp4x", lambda q: q.update(expert_dtype="fp4")), [], "expert_dtype 'fp4'"),
        (base, ["--quantize", "nf4"], "the base is fp8"),
        (base, ["--quantize", "mxfp4"], "the base is fp8"),
        (base, ["--quantize", "same", "--max-shard-size", "1MB"], "cannot re-shard a quantized output"),
        (base, ["--qlora"], "qlora is for dense bases"),
        (bases["ct-channel"][0], ["--quantize", "fp8"], None),  # compressed-tensors FP8 is fp8 too: accepted
    ]
    noscale = tmp_path / "noscale"
    shutil.copytree(base, noscale)
    state = load_dir(noscale)
    del state["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    save_file(state, noscale / "model.safetensors", metadata={"format": "pt"})
    cases.append((noscale, [], "q_proj.weight is float8_e4m3fn but has no"))
    nan = tmp_path / "nan"  # e4m3fn's NaN byte in an untouched weight: refused, not read as a number
    shutil.copytree(base, nan)
    state = load_dir(nan)
    state["model.layers.1.self_attn.k_proj.weight"].view(torch.uint8)[3, 5] = 0x7F
    save_file(state, nan / "model.safetensors", metadata={"format": "pt"})
    cases.append((nan, [], "model.layers.1.self_attn.k_proj.weight holds FP8 NaN values"))
    bad_scale = tmp_path / "nanscale"  # a NaN scale on an untouched layer: refused, not written as NaN
    shutil.copytree(base, bad_scale)
    state = load_file(bad_scale / "model.safetensors")
    state["model.layers.1.self_attn.k_proj.weight_scale_inv"][0, 0] = float("nan")
    save_file(state, bad_scale / "model.safetensors", metadata={"format": "pt"})
    cases.append((bad_scale, [], "k_proj.weight_scale_inv holds NaN or infinite scales"))
    for i, (b, flags, needle) in enumerate(cases):
        out = tmp_path / f"out{i}"
        res = invoke(runner, "merge", b, adapter, "-o", out, *flags)
        if needle is None:
            assert res.exit_code == 0, res.output
            continue
        assert_one_line_error(res, needle)
        assert not out.exists()
    res = invoke(runner, "merge", FIXTURES / "tiny-llama", FIXTURES / "adapters" / "llama-lora", "-o",
                 tmp_path / "dense", "--quantize", "same")
    assert_one_line_error(res, "is not quantized")


def test_shipped_fp8_fixture_merges_and_verifies_from_the_cli(runner, tmp_path):
    """The README's example: the committed tiny FP8 Llama (fixtures/build.py) with the llama LoRA."""
    base, adapter = FIXTURES / "tiny-llama-fp8", FIXTURES / "adapters" / "llama-lora"
    for flags in ([], ["--quantize", "same"]):
        out = tmp_path / ("same" if flags else "dense")
        res = invoke(runner, "merge", base, adapter, "-o", out, *flags)
        assert res.exit_code == 0 and "merged 14 modules into 14 of 21 tensors" in res.output, res.output
        res = invoke(runner, "verify", base, adapter, out, "--no-model")
        assert res.exit_code == 0 and "verified" in res.output, res.output
