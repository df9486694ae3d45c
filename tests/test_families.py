"""Model families whose in-memory names, layouts or classes differ from the classic dense causal LM
(issue 16): merged exactly as peft merges them, and verified, with tiny models and peft-made adapters."""

from __future__ import annotations

import pytest
import torch

import adaptkit
from adaptkit.architecture import checkpoint_renames
from adaptkit.io.checkpoint import Checkpoint
from fixtures import build
from helpers import assert_one_line_error, invoke, peft_merged


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    import transformers

    build.build_model(build.llava_config(), root / "base", dtype=torch.float32,
                      auto=transformers.LlavaForConditionalGeneration)
    ad = build.build_adapter(root / "base", root / "lora", r=4, lora_alpha=8,
                             target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)")
    return root / "base", ad


def test_transformers_renames_are_read_from_transformers(llava):
    base, _ = llava
    ck = Checkpoint.open(base)
    renames = checkpoint_renames(ck.config, ck.tensors)
    assert renames["model.language_model.layers.0.self_attn.q_proj.weight"] == \
        "language_model.model.layers.0.self_attn.q_proj.weight"
    assert renames["lm_head.weight"] == "language_model.lm_head.weight"
    assert all(v in ck.tensors for v in renames.values())


def test_a_vlm_lora_merges_as_peft_merges_it(tmp_path, llava):
    from peft import PeftModel

    base, ad = llava
    out = tmp_path / "m"
    result = adaptkit.merge(base, ad, out)
    assert result.modules_merged == 6 and not result.warnings
    assert set(Checkpoint.open(out).tensors) == set(Checkpoint.open(base).tensors)  # the checkpoint's own names
    _, ref = peft_merged(base, [ad], torch.float32)
    mine = build.load_model(out)
    theirs = dict(ref.named_parameters())
    for name, p in mine.named_parameters():
        assert torch.allclose(p, theirs[name], rtol=1e-6, atol=1e-7), name
    unmerged = PeftModel.from_pretrained(build.load_model(base), ad).eval()
    ids = torch.tensor([[1, 5, 9, 200, 7, 3]])
    with torch.no_grad():
        assert torch.allclose(unmerged(input_ids=ids).logits, mine(input_ids=ids).logits, atol=1e-5)
    report = adaptkit.verify(base, ad, out)
    assert report.ok and report.model.compared == "logits (LlavaForConditionalGeneration)"


def test_names_that_no_rule_maps_are_refused_with_the_closest_tensor(runner, tmp_path, llava):
    base, _ = llava
    odd = build.build_adapter(base, tmp_path / "odd", r=2, lora_alpha=2, target_modules=["q_proj"])
    from safetensors.torch import load_file, save_file

    t = load_file(odd / "adapter_model.safetensors")
    save_file({k.replace("language_model.layers", "text_model.blocks"): v for k, v in t.items()},
              odd / "adapter_model.safetensors")
    res = invoke(runner, "merge", base, odd, "-o", tmp_path / "o")
    assert_one_line_error(res, "not in the base (with transformers' renames", "closest base tensor")
