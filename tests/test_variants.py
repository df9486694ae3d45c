"""peft's LoRA variants (issue 15): each merged exactly as peft merges it, or refused in one line;
and a verify that a wrong merge cannot pass. Every adapter here is made by peft in the test."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import adaptkit
from adaptkit.adapter import KNOWN_FIELDS, MATH_FIELDS
from fixtures import build
from helpers import FIXTURES, assert_one_line_error, invoke, load_dir, peft_merged


def _compare_with_peft(base, adapter, out):
    """Tensor by tensor (fp32 output: the two merges agree to fp32 rounding), then the logits of the
    reloaded merged model against peft's unmerged model."""
    from peft import PeftModel

    ours = load_dir(out)
    _, merged = peft_merged(base, [adapter], torch.float32)
    ref = merged.state_dict()
    for name, t in ours.items():
        assert torch.allclose(t, ref[name], rtol=1e-6, atol=1e-6), name
    unmerged = PeftModel.from_pretrained(build.load_model(base), adapter).eval()
    reloaded = build.load_model(out)
    ids = torch.tensor([[1, 3, 7, 11, 5, 9, 200, 3]])
    with torch.no_grad():
        a, b = unmerged(input_ids=ids), reloaded(input_ids=ids)
    out_a = a.logits if getattr(a, "logits", None) is not None else a.last_hidden_state
    out_b = b.logits if getattr(b, "logits", None) is not None else b.last_hidden_state
    assert torch.allclose(out_a, out_b, atol=1e-5), (out_a - out_b).abs().max()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("variant-bases")
    out = {}
    for tie in (False, True):
        out[f"llama-tie{tie}"] = root / f"llama-tie{tie}"
        build.build_model(build.llama_config(tie=tie, attention_bias=True), out[f"llama-tie{tie}"],
                          dtype=torch.float32)
    return out


# -------------------------------------------------------------------------------------- trainable tokens

@pytest.mark.parametrize("tie", [False, True])
def test_trainable_tokens_merge_as_peft_does(tmp_path, bases, tie):
    base = bases[f"llama-tie{tie}"]
    ad = build.build_adapter(base, tmp_path / "tt", r=4, lora_alpha=8, target_modules=["q_proj"],
                             trainable_token_indices=[3, 7, 11])
    out = tmp_path / "merged"
    result = adaptkit.merge(base, ad, out)
    assert json.loads((out / "config.json").read_text()).get("tie_word_embeddings", True) is tie  # still tied
    assert not result.warnings
    _compare_with_peft(base, ad, out)
    report = adaptkit.verify(base, ad, out)
    assert report.ok and "trainable tokens" in report.model.source
    assert [m.kind for m in report.modules if m.name == "model.embed_tokens.weight"] == ["rows"]
    info = adaptkit.inspect(ad)
    assert info.trainable_tokens == {"model.embed_tokens": [3, 7, 11]}
    # dropping the rows (what a merge that ignores them writes) fails verify: the rows on their own
    # scale at the layer level; at the model level (the prompts hold those tokens) where the tokens'
    # positions stand out from the rest (untied: tied, every position's logits move a little)
    wrong = load_dir(out)
    wrong["model.embed_tokens.weight"][[3, 7, 11]] = load_dir(base)["model.embed_tokens.weight"][[3, 7, 11]]
    shard = next(out.glob("*.safetensors"))
    save_file(wrong, shard, metadata={"format": "pt"})
    report = adaptkit.verify(base, ad, out)
    assert not report.ok and [m.name for m in report.modules if not m.ok] == ["model.embed_tokens.weight"]
    assert report.model.ok is tie


def test_trainable_tokens_convert_to_peft_and_refuse_kohya(tmp_path, bases):
    base = bases["llama-tieFalse"]
    ad = build.build_adapter(base, tmp_path / "tt", r=4, lora_alpha=8, target_modules=["q_proj"],
                             trainable_token_indices=[3, 7, 11])
    raw = tmp_path / "tt.safetensors"
    adaptkit.convert(ad, raw, to="raw")
    adaptkit.convert(raw, tmp_path / "back", to="peft")
    adaptkit.merge(base, tmp_path / "back", tmp_path / "m")
    _compare_with_peft(base, ad, tmp_path / "m")
    res = invoke(click_runner(), "convert", ad, "--to", "kohya", "-o", tmp_path / "k.safetensors")
    assert_one_line_error(res, "trainable tokens cannot be written as a kohya file")
    res = invoke(click_runner(), "inspect", ad, "--check", "vllm")
    assert res.exit_code == 1 and "trainable_tokens" in res.stdout


def click_runner():
    from click.testing import CliRunner

    return CliRunner()


# ---------------------------------------------------------------------------------------------- aLoRA

@pytest.fixture(scope="module")
def alora(bases, tmp_path_factory):
    return build.build_adapter(bases["llama-tieFalse"], tmp_path_factory.mktemp("alora") / "ad", r=4, lora_alpha=8,
                               target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[5, 6],
                               task_type="CAUSAL_LM")


def test_alora_is_refused_for_merge_and_kept_elsewhere(tmp_path, bases, alora, runner):
    res = invoke(runner, "merge", bases["llama-tieFalse"], alora, "-o", tmp_path / "m")
    assert_one_line_error(res, "aLoRA", "invocation tokens", "serve it unmerged")
    assert not (tmp_path / "m").exists()
    assert adaptkit.inspect(alora).alora_invocation_tokens == [5, 6]
    adaptkit.convert(alora, tmp_path / "a.safetensors", to="raw")
    back = adaptkit.convert(tmp_path / "a.safetensors", tmp_path / "back", to="peft")
    assert back.modules == 4
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text())["alora_invocation_tokens"] == [5, 6]
    for to, out in (("kohya", "k.safetensors"), ("mlx", "mlx")):
        assert invoke(runner, "convert", alora, "--to", to, "-o", tmp_path / out,
                      "--base", bases["llama-tieFalse"]).exit_code == 2
    r = adaptkit.combine([alora], tmp_path / "c", method="linear", rank=2)
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["alora_invocation_tokens"] == [5, 6]
    assert r.modules[0].rank == 2


def test_alora_runtimes_say_who_serves_it(tmp_path, bases, alora):
    """llama-server serves an aLoRA from a GGUF carrying the invocation tokens (llama.cpp reads them as
    a UINT32 array); vLLM and mlx-lm would apply it to every token, so their checks fail."""
    import gguf

    from adaptkit.readiness import check

    rules = {t: [p.rule for p in check(adaptkit.load_adapter(alora), t).problems] for t in ("vllm", "llamacpp", "mlx")}
    assert "alora" in rules["vllm"] and "alora" in rules["mlx"] and "alora" not in rules["llamacpp"]
    adaptkit.convert(alora, tmp_path / "a.gguf", to="gguf", base=bases["llama-tieFalse"])
    field = gguf.GGUFReader(str(tmp_path / "a.gguf")).fields["adapter.alora.invocation_tokens"]
    assert [gguf.GGUFValueType(t) for t in field.types] == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32]
    assert [int(field.parts[i][0]) for i in field.data] == [5, 6]
    plain = tmp_path / "plain.gguf"
    adaptkit.convert(FIXTURES / "adapters" / "llama-lora", plain, to="gguf", base=FIXTURES / "tiny-llama")
    assert "adapter.alora.invocation_tokens" not in gguf.GGUFReader(str(plain)).fields


# ------------------------------------------------------------------------- initialisations that rewrite W

@pytest.fixture(scope="module")
def pissa(bases, tmp_path_factory):
    """peft's PiSSA flow: initialise (the base is rewritten), save the initial adapter, train, save
    plainly and with peft's own conversion."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("pissa")
    pm = get_peft_model(build.load_model(bases["llama-tieFalse"]),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"))
    pm.save_pretrained(root / "initial")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    pm.save_pretrained(root / "trained")
    pm.save_pretrained(root / "converted", path_initial_model_for_weight_conversion=str(root / "initial"))
    return root


def test_pissa_is_refused_with_the_fix_and_converted_exactly(tmp_path, bases, pissa, runner):
    from peft import PeftModel

    base = bases["llama-tieFalse"]
    res = invoke(runner, "merge", base, pissa / "trained", "-o", tmp_path / "naive")
    assert_one_line_error(res, "init_lora_weights='pissa'", "--initial")
    adaptkit.convert(pissa / "trained", tmp_path / "plain", to="peft", initial=pissa / "initial")
    assert adaptkit.inspect(tmp_path / "plain").modules[0].rank == 8  # B·A − B0·A0: rank 2r
    adaptkit.merge(base, tmp_path / "plain", tmp_path / "ours")
    adaptkit.merge(base, pissa / "converted", tmp_path / "peft-converted")
    ours, theirs = load_dir(tmp_path / "ours"), load_dir(tmp_path / "peft-converted")
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # what peft computes when it reloads the trained adapter (it redoes PiSSA on the base), merged
    ref = PeftModel.from_pretrained(build.load_model(base), pissa / "trained").merge_and_unload().state_dict()
    for k, t in ours.items():
        assert torch.allclose(t, ref[k], atol=1e-6), k
    # a naive merge (B·A onto the original W) is caught by verify against the plain adapter
    naive = tmp_path / "naive-adapter"
    shutil.copytree(pissa / "trained", naive)
    cfg = json.loads((naive / "adapter_config.json").read_text())
    (naive / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": True}))
    adaptkit.merge(base, naive, tmp_path / "naive")
    assert not adaptkit.verify(base, tmp_path / "plain", tmp_path / "naive", model=False).ok
    assert adaptkit.verify(base, tmp_path / "plain", tmp_path / "ours", model=False).ok


# ------------------------------------------------------------------------------------- config fields

def test_every_lora_config_field_is_classified():
    """A peft release that adds a LoraConfig field fails here until adaptkit says what it means."""
    from peft import LoraConfig

    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    assert fields <= KNOWN_FIELDS, sorted(fields - KNOWN_FIELDS)
    assert {"r", "lora_alpha", "use_dora", "trainable_token_indices"} <= MATH_FIELDS


@pytest.mark.parametrize("change, needle", [
    ({"use_qalora": True}, "QA-LoRA"), ({"kasa_config": {"beta": 1}}, "KaSA"),
    ({"brand_new_variant": {"k": 2}}, "'brand_new_variant'"), ({"init_lora_weights": "olora"}, "'olora'"),
    ({"init_lora_weights": "who-knows"}, "unknown to adaptkit"), ({"bias": "some"}, "bias='some'"),
])
def test_fields_adaptkit_does_not_implement_are_refused(runner, tmp_path, change, needle):
    from helpers import ADAPTERS, TINY_LLAMA

    ad = tmp_path / "ad"
    shutil.copytree(ADAPTERS["llama-lora"], ad)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    assert_one_line_error(invoke(runner, "merge", TINY_LLAMA, ad, "-o", tmp_path / "o"), needle)
    res = invoke(runner, "inspect", ad, "--json")  # inspect still shows it, and why
    assert res.exit_code == 0 and any(needle.strip("'") in w for w in json.loads(res.stdout)["warnings"])


def test_unknown_fields_left_at_their_default_are_fine(runner, tmp_path):
    from helpers import ADAPTERS, TINY_LLAMA

    ad = tmp_path / "ad"
    shutil.copytree(ADAPTERS["llama-lora"], ad)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "future_option": None, "future_flag": False}))
    assert invoke(runner, "merge", TINY_LLAMA, ad, "-o", tmp_path / "o").exit_code == 0


def test_bias_all_applies_the_trained_biases(tmp_path, bases):
    base = bases["llama-tieFalse"]
    ad = build.build_adapter(base, tmp_path / "ba", r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"],
                             bias="all")
    saved = load_file(ad / "adapter_model.safetensors")
    assert any(k.endswith("self_attn.v_proj.bias") for k in saved)  # "all": biases of every layer
    key = next(k for k in saved if k.endswith("layers.0.self_attn.v_proj.bias"))
    saved[key] = saved[key] + 0.3  # as if training had moved it
    save_file(saved, ad / "adapter_model.safetensors")
    adaptkit.merge(base, ad, tmp_path / "m")
    _compare_with_peft(base, ad, tmp_path / "m")
    assert adaptkit.verify(base, ad, tmp_path / "m").ok


# ------------------------------------------------------------------------------------------- encoders

@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("bert")
    build.build_model(build.bert_config(), root / "base", dtype=torch.float16, auto=transformers.AutoModel)
    ad = build.build_adapter(root / "base", root / "lora", r=4, lora_alpha=8, target_modules=["query", "value"])
    return root / "base", ad


def test_verify_an_encoder_on_its_hidden_states(tmp_path, bert):
    base, ad = bert
    out = tmp_path / "m"
    adaptkit.merge(base, ad, out)
    report = adaptkit.verify(base, ad, out)
    assert report.ok and report.model.compared.startswith("hidden states (BertModel")
    wrong = load_dir(out)  # one perturbed tensor: caught
    name = "encoder.layer.1.attention.self.value.weight"
    wrong[name] = (wrong[name].float() * 1.05).half()
    save_file(wrong, next(out.glob("*.safetensors")), metadata={"format": "pt"})
    report = adaptkit.verify(base, ad, out)
    assert not report.ok and [m.name for m in report.modules if not m.ok] == [name]


def test_verify_falls_back_to_the_backbone_when_the_head_is_missing(tmp_path, bert):
    """A config naming a class with a head the checkpoint does not hold (a sentence-transformers
    BERT saved as BertForMaskedLM, say): comparing its randomly initialised heads would fail a
    correct merge; the backbone's hidden states are compared instead."""
    base, ad = bert
    named = tmp_path / "base"
    shutil.copytree(base, named)
    cfg = json.loads((named / "config.json").read_text())
    (named / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertForMaskedLM"]}))
    adaptkit.merge(named, ad, tmp_path / "m")
    report = adaptkit.verify(named, ad, tmp_path / "m")
    assert report.ok and "BertForMaskedLM's head is not in the checkpoint" in report.model.compared
