"""Merging into bitsandbytes 4-bit bases, against peft's own 4-bit LoRA layers (CPU)."""

import json
import warnings

import pytest
import torch
from helpers import ADAPTERS, TINY_LLAMA, assert_merge_close, load_dir
from helpers import TINY_GPT2 as BASE_OF_GPT2

from adaptkit import merge
from adaptkit.cli import main


def load_4bit(path, double_quant=True):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                           bnb_4bit_compute_dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu",
                                                    dtype=torch.float16).eval()


@pytest.fixture(scope="module", params=[True, False], ids=["double-quant", "single-quant"])
def nf4_base(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("nf4") / "base"
    load_4bit(TINY_LLAMA, double_quant=request.param).save_pretrained(out)
    return out


def peft_4bit(base, adapter):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(load_4bit(base), adapter).eval()


def lora_layers(pm):
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in pm.base_model.model.named_modules() if isinstance(m, LoraLayer)}


def test_dense_output_equals_dequant_plus_delta(tmp_path, nf4_base):
    import bitsandbytes.functional as F

    out = tmp_path / "dense"
    res = merge(nf4_base, [ADAPTERS["llama-lora"]], out)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "float16"
    ours = load_dir(out)
    assert not any(".absmax" in k or "quant_state" in k for k in ours)
    pm = peft_4bit(nf4_base, ADAPTERS["llama-lora"])
    for name, layer in lora_layers(pm).items():
        w = layer.get_base_layer().weight
        base = F.dequantize_4bit(w.data, w.quant_state).float()
        exact = base + layer.get_delta_weight("default").float()
        assert_merge_close(ours[name + ".weight"], exact.half(), base, name=name)
    assert res.quantization["layers"] == 14 and res.quantization["worst"] < 1e-3  # fp16 rounding only
    from fixtures.build import load_model

    model = load_model(out, dtype=torch.float32)  # transformers loads it as a plain dense model
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = pm(input_ids=ids).logits.float()
        got = model(input_ids=ids).logits
    assert (ref - got).abs().max() < 2e-2  # the 4-bit reference computes in fp16


def test_nf4_output_keeps_4bit_and_is_no_worse_than_peft(tmp_path, nf4_base, variants):
    import bitsandbytes.functional as F

    adapter = variants["llama-layers"]  # q_proj and v_proj of layer 1 only
    out = tmp_path / "nf4"
    res = merge(nf4_base, [adapter], out, quantize="nf4")
    assert json.loads((out / "config.json").read_text())["quantization_config"] == \
        json.loads((nf4_base / "config.json").read_text())["quantization_config"]
    ours, base = load_dir(out), load_dir(nf4_base)
    assert set(ours) == set(base)
    touched = {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    for k in base:  # untouched 4-bit layers (and everything else) byte for byte
        if not any(k.startswith(t + ".") for t in touched):
            assert torch.equal(ours[k], base[k]), k
    pm = peft_4bit(nf4_base, adapter)
    layers = lora_layers(pm)
    exact = {}
    for name in touched:
        layer = layers[name]
        w = layer.get_base_layer().weight
        exact[name] = F.dequantize_4bit(w.data, w.quant_state).float() + layer.get_delta_weight("default").float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = pm.merge_and_unload()
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()  # transformers loads it 4-bit
    for name in touched:
        peft_w = merged.get_submodule(name).weight
        ours_w = loaded.get_submodule(name).weight
        err_peft = ((F.dequantize_4bit(peft_w.data, peft_w.quant_state).float() - exact[name]).norm() / exact[name].norm())
        err_ours = ((F.dequantize_4bit(ours_w.data, ours_w.quant_state).float() - exact[name]).norm() / exact[name].norm())
        assert err_ours <= err_peft * 1.01, (name, float(err_ours), float(err_peft))
        assert res.quantization["per_layer"][name + ".weight"] == pytest.approx(float(err_ours), rel=1e-2)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unmerged = peft_4bit(nf4_base, adapter)(input_ids=ids).logits.float()
        got = loaded(input_ids=ids).logits.float()
    assert torch.nn.functional.cosine_similarity(unmerged.flatten(), got.flatten(), dim=0) > 0.99


def test_cli_reports_quantization_error(runner, tmp_path, nf4_base):
    res = runner.invoke(main, ["merge", str(nf4_base), str(ADAPTERS["llama-lora"]), "-o", str(tmp_path / "o"),
                               "--quantize", "nf4", "--json"])
    assert res.exit_code == 0, res.output
    q = json.loads(res.stdout)["quantization"]
    assert q["layers"] == 14 and 0 < q["median"] <= q["worst"] < 0.5 and q["what"] == "requantized to 4-bit"
    res = runner.invoke(main, ["merge", str(nf4_base), str(ADAPTERS["llama-lora"]), "-o", str(tmp_path / "h"),
                               "--quantize", "nf4"])
    assert "requantized to 4-bit" in res.stdout and "worst" in res.stdout
    # --quantize same keeps a 4-bit base 4-bit too: the same files as --quantize nf4
    res = runner.invoke(main, ["merge", str(nf4_base), str(ADAPTERS["llama-lora"]), "-o", str(tmp_path / "s"),
                               "--quantize", "same"])
    assert res.exit_code == 0, res.output
    nf4, same = load_dir(tmp_path / "h"), load_dir(tmp_path / "s")
    assert set(nf4) == set(same) and all(torch.equal(nf4[k], same[k]) for k in nf4)


@pytest.mark.parametrize("qc,msg", [
    ({"quant_method": "gptq", "bits": 4}, "GPTQ int4 bases are refused"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "8-bit"),
])
def test_unsupported_quantization_refused(runner, tmp_path, qc, msg):
    import shutil

    base = tmp_path / "q"
    shutil.copytree(TINY_LLAMA, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = qc
    (base / "config.json").write_text(json.dumps(cfg))
    res = runner.invoke(main, ["merge", str(base), str(ADAPTERS["llama-lora"]), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and msg in res.stderr and not (tmp_path / "o").exists()


def test_qlora_merge_equals_peft_on_the_4bit_model(tmp_path):
    """--qlora on a dense base = what peft's 4-bit layer computes when transformers quantizes it."""
    import bitsandbytes.functional as F

    out = tmp_path / "qlora"
    res = merge(TINY_LLAMA, [ADAPTERS["llama-lora"]], out, qlora=True)
    ours, dense = load_dir(out), load_dir(TINY_LLAMA)
    pm = peft_4bit(TINY_LLAMA, ADAPTERS["llama-lora"])  # transformers quantizes the dense base, as in training
    for name, layer in lora_layers(pm).items():
        w = layer.get_base_layer().weight
        base = F.dequantize_4bit(w.data, w.quant_state).float()
        exact = base + layer.get_delta_weight("default").float()
        assert_merge_close(ours[name + ".weight"], exact.half(), base, name=name)
    for k in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(ours[k], dense[k]), k  # transformers does not quantize these
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert res.quantization["layers"] == 14 and 0.01 < res.quantization["median"] < 0.5  # the gap is reported


def test_quantize_dense_base_to_nf4_loads_in_transformers(tmp_path):
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    res = merge(TINY_LLAMA, [ADAPTERS["llama-lora"]], out, quantize="nf4")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["bnb_4bit_quant_type"] == "nf4"
    dense_out = tmp_path / "dense"
    merge(TINY_LLAMA, [ADAPTERS["llama-lora"]], dense_out, dtype="float32")
    exact = load_dir(dense_out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
        theirs = load_4bit(dense_out)  # transformers quantizing the merged model itself
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        w = loaded.get_submodule(name).weight
        t = theirs.get_submodule(name).weight
        ref = exact[name + ".weight"]
        e_ours = (F.dequantize_4bit(w.data, w.quant_state).float() - ref).norm() / ref.norm()
        e_theirs = (F.dequantize_4bit(t.data, t.quant_state).float() - ref).norm() / ref.norm()
        assert e_ours <= e_theirs * 1.01, (name, float(e_ours), float(e_theirs))
        assert res.quantization["per_layer"][name + ".weight"] == pytest.approx(float(e_ours), rel=1e-2)
    assert loaded.lm_head.weight.dtype == torch.float16  # skipped, as transformers skips it


def test_quantize_conv1d_model_refused(runner, tmp_path):
    res = runner.invoke(main, ["merge", str(BASE_OF_GPT2), str(ADAPTERS["gpt2-lora"]), "-o", str(tmp_path / "o"),
                               "--quantize", "nf4"])
    assert res.exit_code == 2 and "Conv1D" in res.stderr


def test_qlora_on_4bit_base_refused(runner, tmp_path, nf4_base):
    res = runner.invoke(main, ["merge", str(nf4_base), str(ADAPTERS["llama-lora"]), "-o", str(tmp_path / "o"), "--qlora"])
    assert res.exit_code == 2 and "dense bases" in res.stderr


def test_verify_nf4_merges(runner, tmp_path, nf4_base):
    """verify: a dense merge of a 4-bit base passes; a kept-4-bit merge passes with its requantization
    error shown; a merge into the 16-bit original, checked against the 4-bit base, fails and says why."""
    from adaptkit import verify

    ad = ADAPTERS["llama-lora"]
    merge(nf4_base, [ad], tmp_path / "dense")
    assert verify(nf4_base, [ad], tmp_path / "dense", model=False).ok
    merge(nf4_base, [ad], tmp_path / "nf4", quantize="nf4")
    r = verify(nf4_base, [ad], tmp_path / "nf4", model=False)
    assert r.ok and not r.untouched_mismatched
    four = [m for m in r.modules if m.note.startswith("4-bit output")]
    assert len(four) == 14 and all(0.01 < m.rel_error <= m.allowed for m in four)
    assert any("requantization error" in w for w in r.warnings)
    assert not any("lacks" in w for w in r.warnings)
    merge(TINY_LLAMA, [ad], tmp_path / "sixteen")
    res = runner.invoke(main, ["verify", str(nf4_base), str(ad), str(tmp_path / "sixteen"), "--no-model", "--json"])
    assert res.exit_code == 1
    report = json.loads(res.stdout)
    assert len(report["summary"]["failed"]) == 14
    assert any("quantization gap" in m["note"] for m in report["modules"])
    assert any("quantization error" in w for w in report["warnings"])


def test_quant_config_reads_bitsandbytes_configs(tmp_path, nf4_base):
    from transformers import BitsAndBytesConfig

    from adaptkit.errors import AdaptkitError
    from adaptkit.quant import QuantSettings

    bnb = tmp_path / "bnb.json"
    BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16,
                       llm_int8_skip_modules=["q_proj"]).to_json_file(bnb)
    assert QuantSettings.from_config(bnb) == QuantSettings(quant_type="fp4", blocksize=64, double_quant=False,
                                                           compute_dtype=torch.bfloat16, storage=torch.uint8,
                                                           skip_modules=("q_proj",))
    saved = json.loads((nf4_base / "config.json").read_text())["quantization_config"]
    from_model = QuantSettings.from_config(nf4_base)  # the folder of a 4-bit model: its config.json
    assert (from_model.quant_type, from_model.double_quant, from_model.compute_dtype) == \
        ("nf4", saved["bnb_4bit_use_double_quant"], torch.float16)
    with pytest.raises(AdaptkitError, match="not a bitsandbytes 4-bit"):
        QuantSettings.from_config(TINY_LLAMA / "config.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"load_in_4bit": True, "blocksize": "big"}))
    with pytest.raises(AdaptkitError, match="blocksize is not an integer"):
        QuantSettings.from_config(bad)


def test_quant_config_sets_qlora_settings_and_flags_override_it(runner, tmp_path):
    from transformers import BitsAndBytesConfig

    bnb = tmp_path / "bnb.json"
    BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False).to_json_file(bnb)
    args = ["merge", str(TINY_LLAMA), str(ADAPTERS["llama-lora"]), "--qlora", "-o"]
    outs = {}
    for key, extra in {"config": ["--quant-config", str(bnb)],
                       "flags": ["--quant-type", "fp4", "--no-double-quant"],
                       "config+flag": ["--quant-config", str(bnb), "--quant-type", "nf4"],
                       "nf4-flags": ["--quant-type", "nf4", "--no-double-quant"]}.items():
        res = runner.invoke(main, args + [str(tmp_path / key)] + extra)
        assert res.exit_code == 0, res.output
        outs[key] = load_dir(tmp_path / key)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(outs["config"][name], outs["flags"][name])
    assert torch.equal(outs["config+flag"][name], outs["nf4-flags"][name])
    assert not torch.equal(outs["config"][name], outs["nf4-flags"][name])  # fp4 and nf4 do differ
    res = runner.invoke(main, ["merge", str(TINY_LLAMA), str(ADAPTERS["llama-lora"]), "-o", str(tmp_path / "x"),
                               "--quant-config", str(bnb)])
    assert res.exit_code == 2 and "--quant-config: is for --qlora or --quantize" in res.stderr


def test_quant_config_skip_modules_stay_dense(tmp_path):
    from transformers import BitsAndBytesConfig

    from adaptkit.quant import QuantSettings

    bnb = tmp_path / "bnb.json"
    BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["q_proj", "lm_head"]
                       ).to_json_file(bnb)
    out = tmp_path / "q"
    merge(TINY_LLAMA, [ADAPTERS["llama-lora"]], out, quantize="nf4", quant_settings=QuantSettings.load(bnb))
    names = set(load_dir(out))
    assert "model.layers.0.self_attn.q_proj.weight.absmax" not in names  # skipped: dense
    assert "model.layers.0.self_attn.v_proj.weight.absmax" in names
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert set(cfg["llm_int8_skip_modules"]) >= {"q_proj", "lm_head"}


def test_4bit_conv1d_base_refused_not_merged_transposed(runner, tmp_path):
    """transformers stores a 4-bit Conv1D weight transposed; a square one would silently merge wrong."""
    q = tmp_path / "gpt2-4bit"
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        AutoModelForCausalLM.from_pretrained(BASE_OF_GPT2, device_map="cpu", dtype=torch.float16,
                                             quantization_config=BitsAndBytesConfig(load_in_4bit=True)
                                             ).save_pretrained(q)
    res = runner.invoke(main, ["merge", str(q), str(ADAPTERS["gpt2-lora"]), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "Conv1D" in res.stderr and not (tmp_path / "o").exists()
