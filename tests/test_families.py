"""Model families whose in-memory names, layouts or classes differ from the classic dense causal LM
(issue 16): merged exactly as peft merges them, and verified, with tiny models and peft-made adapters."""

from __future__ import annotations

import shutil

import pytest
import torch

import adaptkit
from adaptkit.architecture import checkpoint_renames
from adaptkit.io.checkpoint import Checkpoint
from fixtures import build
from helpers import FAMILY_ADAPTERS, FAMILY_BASE_OF, assert_one_line_error, invoke, peft_merged


def assert_merge_is_peft(base, ad, merged) -> None:
    """The merge at ``merged`` equals peft's merge_and_unload tensor by tensor, its logits peft's unmerged
    model's (which the adapter moves), and verify accepts it."""
    from peft import PeftModel

    unmerged = PeftModel.from_pretrained(build.load_model(base), ad).eval()
    mine = build.load_model(merged)
    ids = torch.tensor([[1, 5, 9, 200, 7, 3, 11, 13, 60, 61]])
    with torch.no_grad():
        a, b = unmerged(input_ids=ids).logits, mine(input_ids=ids).logits
        with unmerged.disable_adapter():
            c = unmerged(input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-4 * a.abs().max() and (a - c).abs().max() > 100 * (a - b).abs().max()
    ref = unmerged.merge_and_unload().state_dict()
    for name, t in mine.state_dict().items():
        assert torch.allclose(t, ref[name], rtol=1e-6, atol=1e-7), name
    assert adaptkit.verify(base, ad, merged).ok


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


MOE = {"qwen3-moe": ("qwen3_moe_config", "model.layers.1.mlp.experts.2.up_proj.weight"),
       "gpt-oss": ("gpt_oss_config", "model.layers.1.mlp.experts.down_proj")}


@pytest.fixture(scope="module", params=list(MOE))
def moe(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    build.build_model(getattr(build, MOE[request.param][0])(), root / "base", dtype=torch.float32)
    ad = build.build_adapter(root / "base", root / "lora", r=2, lora_alpha=4, target_modules=["q_proj"],
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                             rank_pattern={"gate_up_proj": 3}, alpha_pattern={"down_proj": 8})
    return request.param, root / "base", ad


def test_a_lora_on_experts_merges_as_peft_merges_it(tmp_path, moe):
    """Per-expert tensors on disk (Qwen3-MoE) or fused ones (gpt-oss, stored (E, in, out)): every
    expert's delta lands where transformers loads it from, rank/alpha patterns included."""
    from peft import PeftModel

    family, base, ad = moe
    out = tmp_path / "m"
    result = adaptkit.merge(base, ad, out)
    assert result.modules_merged == 6
    info = adaptkit.inspect(ad)
    assert {m.experts for m in info.modules if "experts" in m.name} == {4}
    unmerged = PeftModel.from_pretrained(build.load_model(base), ad).eval()
    plain = build.load_model(base)
    mine = build.load_model(out)
    ids = torch.tensor([[1, 5, 9, 200, 7, 3, 11, 13, 60, 61]])
    with torch.no_grad():
        a, b, c = unmerged(input_ids=ids).logits, mine(input_ids=ids).logits, plain(input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    assert (a - c).abs().max() > 100 * (a - b).abs().max()  # the experts' deltas are really there
    ref = unmerged.merge_and_unload().state_dict()
    for name, t in mine.state_dict().items():
        assert torch.allclose(t, ref[name], rtol=1e-6, atol=1e-7), name
    assert adaptkit.verify(base, ad, out).ok


def test_shared_experts_their_gate_and_the_router_merge_as_peft_merges_them(tmp_path):
    """Qwen2-MoE: LoRAs on the shared expert's nn.Linear layers and its gate (target_modules), on the
    router's weight (a 2-D target_parameters) and on the routed experts, in one adapter."""
    build.build_model(build.qwen2_moe_config(), tmp_path / "base", dtype=torch.float32)
    ad = build.build_adapter(tmp_path / "base", tmp_path / "lora", r=2, lora_alpha=4,
                             target_modules=["shared_expert.gate_proj", "shared_expert_gate", "q_proj"],
                             target_parameters=["mlp.gate.weight", "mlp.experts.down_proj"])
    result = adaptkit.merge(tmp_path / "base", ad, tmp_path / "m")
    assert result.modules_merged == 10 and not result.warnings
    _, ref = peft_merged(tmp_path / "base", [ad], torch.float32)
    mine = build.load_model(tmp_path / "m").state_dict()
    base = build.load_model(tmp_path / "base").state_dict()
    changed = [n for n, t in ref.state_dict().items() if not torch.equal(t, base[n])]
    assert any(".mlp.gate.weight" in n for n in changed) and any("shared_expert_gate" in n for n in changed)
    for name, t in ref.state_dict().items():
        assert torch.allclose(mine[name], t, rtol=1e-6, atol=1e-7), name
    assert adaptkit.verify(tmp_path / "base", ad, tmp_path / "m").ok


def test_experts_stored_3d_under_another_name_merge_as_peft_merges_them(tmp_path):
    """GraniteMoe(Shared): the experts are 3-D on disk as block_sparse_moe.input_linear / output_linear,
    experts.gate_up_proj / down_proj in memory, the router's weight router.layer.weight on disk:
    transformers' renames are asked for only when the plain names do not fit, every delta lands on
    the disk tensor transformers loads the parameter from, and a dropped expert's delta fails verify."""
    build.build_model(build.granite_moe_shared_config(), tmp_path / "base", dtype=torch.float32)
    ad = build.build_adapter(tmp_path / "base", tmp_path / "lora", r=2, lora_alpha=4,
                             target_modules=["q_proj", "shared_mlp.input_linear"],
                             target_parameters=["block_sparse_moe.experts.gate_up_proj",
                                                "block_sparse_moe.experts.down_proj", "block_sparse_moe.router.weight"],
                             rank_pattern={"gate_up_proj": 3}, alpha_pattern={"down_proj": 8})
    result = adaptkit.merge(tmp_path / "base", ad, tmp_path / "m")
    assert result.modules_merged == 10 and not result.warnings
    assert set(Checkpoint.open(tmp_path / "m").tensors) == set(Checkpoint.open(tmp_path / "base").tensors)
    assert_merge_is_peft(tmp_path / "base", ad, tmp_path / "m")
    merged = Checkpoint.open(tmp_path / "m")
    name = "model.layers.1.block_sparse_moe.input_linear.weight"
    from safetensors.torch import load_file, save_file

    f = merged.path / "model.safetensors"
    t = load_file(f)
    t[name][2] = load_file(tmp_path / "base" / "model.safetensors")[name][2]  # expert 2's delta dropped
    save_file(t, f, metadata={"format": "pt"})
    report = adaptkit.verify(tmp_path / "base", ad, tmp_path / "m", model=False)
    assert not report.ok and name in [m.name for m in report.modules if not m.ok]


NEW_FAMILIES = {
    # Gemma 4's MoE layers (26B-A4B): experts stored fused 3-D as in memory (layers.N.experts, no mlp. prefix),
    # a dense MLP beside them and a router whose proj is an nn.Linear
    "gemma4-moe": (lambda: build.gemma4_config(moe=True),
                   dict(target_modules=["q_proj", "mlp.down_proj", "router.proj"],
                        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                        rank_pattern={"gate_up_proj": 3}), 10),
    # Qwen3.5: a gated delta net (in_proj_qkv/z/a/b, out_proj) and gated full attention
    "qwen3.5": (build.qwen35_config, dict(target_modules=["in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b",
                                                          "out_proj", "q_proj", "down_proj"]), 8),
    # Qwen3.5-MoE: routed experts stored per expert on disk, fused in memory; a gated shared expert
    "qwen3.5-moe": (lambda: build.qwen35_config(moe=True),
                    dict(target_modules=["in_proj_qkv", "out_proj", "shared_expert.up_proj", "shared_expert_gate"],
                         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]), 10),
    # Granite 4.0-H: Mamba-2 and attention layers, experts stored as input_linear / output_linear (renamed on
    # load; its config.json holds time_step_limit [0, inf], which transformers writes {"__float__": "Infinity"})
    "granite-hybrid": (build.granite_moe_hybrid_config,
                       dict(target_modules=["q_proj", "mamba.in_proj", "mamba.out_proj", "shared_mlp.input_linear"],
                            target_parameters=["block_sparse_moe.experts.gate_up_proj",
                                               "block_sparse_moe.experts.down_proj"]), 9),
    # Qwen3-Next: in_proj_qkvz / in_proj_ba of its gated delta net, experts per expert on disk
    "qwen3-next": (build.qwen3_next_config, dict(target_modules=["in_proj_qkvz", "in_proj_ba", "o_proj"],
                                                 target_parameters=["mlp.experts.gate_up_proj"]), 5),
    # LFM2-MoE: short convolutions, experts as feed_forward.experts.N.w1/w2/w3 on disk (w1, w3 fused in memory)
    "lfm2-moe": (build.lfm2_moe_config, dict(target_modules=["in_proj", "out_proj", "q_proj"],
                                             target_parameters=["feed_forward.experts.gate_up_proj",
                                                                "feed_forward.experts.down_proj"]), 6),
    # Hunyuan-A13B: per-expert tensors on disk, a shared MLP, the router an nn.Linear (mlp.gate.wg)
    "hunyuan-moe": (build.hunyuan_moe_config, dict(target_modules=["q_proj", "shared_mlp.down_proj", "gate.wg"],
                                                   target_parameters=["mlp.experts.gate_up_proj"]), 8),
    # Nemotron 3 Nano: backbone.layers…mixer… on disk, experts up_proj (E, I, H) and down_proj (E, H, I), each the
    # other's transpose (told apart by transformers' is_transposed, as peft reads them), a 2-D router parameter
    "nemotron-h": (build.nemotron_h_config, dict(target_modules=["q_proj", "in_proj", "shared_experts.down_proj"],
                                                 target_parameters=["mixer.experts.up_proj", "mixer.experts.down_proj",
                                                                    "mixer.gate.weight"]), 6),
    # AFMoE (Arcee Trinity): gated attention, shared and routed experts, the router an nn.Linear (router.gate)
    "afmoe": (build.afmoe_config, dict(target_modules=["q_proj", "shared_experts.down_proj", "router.gate"],
                                       target_parameters=["mlp.experts.gate_up_proj"]), 13),
    # Falcon-H1: attention and Mamba-2 side by side (its µP multipliers matter to llama.cpp only)
    "falcon-h1": (build.falcon_h1_config, dict(target_modules=["q_proj", "in_proj", "down_proj"]), 6),
    # DeepSeek-V4: attention renamed on load (wq_a -> q_a_proj, wkv -> kv_proj, wo_b -> o_b_proj), experts as
    # ffn.experts.N.w1/w2/w3 on disk, whose transformers rules are written as regexes (\.experts.*.w1.weight)
    "deepseek-v4": (build.deepseek_v4_config,
                    dict(target_modules=["q_a_proj", "kv_proj", "o_b_proj", "shared_experts.gate_proj"],
                         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                         rank_pattern={"down_proj": 3}), 15),
    # Kimi-Linear: KDA linear attention (its forget gate renamed on load) and MLA, experts as
    # block_sparse_moe.experts.N.w1/w2/w3 on disk (regex rules too)
    "kimi-linear": (build.kimi_linear_config,
                    dict(target_modules=["q_proj", "f_a_proj", "kv_b_proj", "shared_experts.down_proj"],
                         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]), 7),
}


@pytest.mark.parametrize("family", list(NEW_FAMILIES))
def test_newer_families_merge_as_peft_merges_them(tmp_path, family):
    """Gemma 4 (MoE), Qwen3.5 (dense, MoE), Granite 4.0-H, Qwen3-Next, LFM2-MoE, Hunyuan-A13B, Nemotron-H, AFMoE, Falcon-H1,
    DeepSeek-V4, Kimi-Linear:
    every delta exact against peft's merge_and_unload, logits equal peft's unmerged model, and verify
    accepts the merge."""
    config, lora, modules = NEW_FAMILIES[family]
    build.build_model(config(), tmp_path / "base", dtype=torch.float32)
    ad = build.build_adapter(tmp_path / "base", tmp_path / "lora", r=2, lora_alpha=4, **lora)
    result = adaptkit.merge(tmp_path / "base", ad, tmp_path / "m")
    assert result.modules_merged == modules and not result.warnings
    assert_merge_is_peft(tmp_path / "base", ad, tmp_path / "m")


def test_verify_catches_one_experts_delta_dropped_where_transformers_rules_are_regexes(tmp_path):
    """DeepSeek-V4 (ffn.experts.N.w1/w2/w3 on disk, matched by transformers' regex rules): verify names expert 2's
    up projection when its delta is left out of the merge, and nothing else."""
    from safetensors.torch import load_file, save_file

    build.build_model(build.deepseek_v4_config(), tmp_path / "base", dtype=torch.float32)
    ad = build.build_adapter(tmp_path / "base", tmp_path / "lora", r=2, lora_alpha=4,
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    adaptkit.merge(tmp_path / "base", ad, tmp_path / "m")
    assert adaptkit.verify(tmp_path / "base", ad, tmp_path / "m", model=False).ok
    name = "model.layers.1.ffn.experts.2.w3.weight"
    f = Checkpoint.open(tmp_path / "m").tensors[name][0].path
    t = load_file(f)
    t[name] = Checkpoint.open(tmp_path / "base").read(name)
    save_file(t, f, metadata={"format": "pt"})
    report = adaptkit.verify(tmp_path / "base", ad, tmp_path / "m", model=False)
    assert not report.ok and [m.name for m in report.modules if not m.ok] == [name]


def test_experts_stored_as_3d_parts_merge_as_peft_merges_them_and_verify_sees_one_dropped(tmp_path):
    """Step 3.7: the checkpoint stores each projection of all experts as one 3-D tensor (moe.gate_proj and
    moe.up_proj (E, I, H), concatenated into experts.gate_up_proj on load; moe.down_proj renamed): each part
    gets its rows of every expert's delta, exactly as peft merges them; verify accepts that and catches one
    expert's up-part delta dropped."""
    import transformers
    from safetensors.torch import load_file, save_file

    build.build_model(build.step3p7_config(), tmp_path / "base", dtype=torch.float32,
                      auto=transformers.AutoModelForImageTextToText)
    ad = build.build_adapter(tmp_path / "base", tmp_path / "lora", r=2, lora_alpha=4,
                             target_modules=r".*language_model.*\.(q_proj|down_proj)",
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                             rank_pattern={"gate_up_proj": 3})
    result = adaptkit.merge(tmp_path / "base", ad, tmp_path / "m")
    assert result.modules_merged == 6 and not result.warnings
    assert_merge_is_peft(tmp_path / "base", ad, tmp_path / "m")
    name = "model.layers.1.moe.up_proj.weight"
    f = tmp_path / "m" / "model.safetensors"
    t = load_file(f)
    t[name][2] = load_file(tmp_path / "base" / "model.safetensors")[name][2]  # expert 2's up rows unmerged
    save_file(t, f, metadata={"format": "pt"})
    report = adaptkit.verify(tmp_path / "base", ad, tmp_path / "m", model=False)
    assert not report.ok and [m.name for m in report.modules if not m.ok] == [name]


CONVERTED = {
    # Sarvam-MoE: query_key_value (Q + 2·KV rows) split into q/k/v on load (Split, sized by the model's own params)
    "sarvam-moe": (build.sarvam_moe_config, None, r".*\.(q_proj|k_proj|v_proj|o_proj)",
                   "model.layers.0.attention.query_key_value.weight", 8),
    # Mistral Large 4: its vision encoder's wq/wk rows permuted for RoPE on load (PermuteForRope); the language
    # model's wq, wkv_b, wo renamed only
    "mistral-large4": (build.mistral_large4_config, "AutoModelForImageTextToText",
                       r".*(vision_tower.*\.(q_proj|k_proj)|language_model.*\.(q_proj|kv_b_proj|o_proj))",
                       "vision_encoder.transformer.layers.0.attention.wk.weight", 8),
    # MiniMax-M3-VL: gate_proj and up_proj concatenated into one gate_up_proj on load (Concatenate): a fused module
    # in memory, each split tensor on disk taking its rows of ΔW
    "minimax-m3-vl": (build.minimax_m3_vl_config, "AutoModelForImageTextToText",
                      r".*language_model.*\.(gate_up_proj|q_proj)", "language_model.model.layers.0.mlp.up_proj.weight", 4),
    # Step 3.7's vision tower: in_proj_weight chunked into q/k/v and q/k permuted for RoPE (Chunk, PermuteForRope)
    "step3.7-vision": (build.step3p7_config, "AutoModelForImageTextToText",
                       r".*(vision_model.*\.(q_proj|k_proj|v_proj)|language_model.*\.q_proj)",
                       "vision_model.transformer.resblocks.0.attn.in_proj_weight", 5),
}


@pytest.mark.parametrize("family", list(CONVERTED))
def test_modules_transformers_builds_from_rows_of_other_tensors_merge_as_peft_merges_them(tmp_path, family):
    """A LoRA on a module transformers makes on load out of rows of differently laid-out checkpoint tensors:
    each on-disk tensor takes its rows of ΔW, in the order transformers' own converter reads them (found by
    running it on stand-ins), exactly as peft merges the LoRA into the loaded model; no warning (this is the
    model's own layout); verify catches the first rows of one such tensor left unmerged. Refused before."""
    import transformers
    from safetensors.torch import load_file, save_file

    config, auto, targets, fused, modules = CONVERTED[family]
    build.build_model(config(), tmp_path / "base", dtype=torch.float32, auto=auto and getattr(transformers, auto))
    ad = build.build_adapter(tmp_path / "base", tmp_path / "lora", r=2, lora_alpha=4, target_modules=targets)
    result = adaptkit.merge(tmp_path / "base", ad, tmp_path / "m")
    assert result.modules_merged == modules and not result.warnings
    assert_merge_is_peft(tmp_path / "base", ad, tmp_path / "m")
    merged = Checkpoint.open(tmp_path / "m")
    f = merged.tensors[fused][0].path
    t = load_file(f)
    base = Checkpoint.open(tmp_path / "base")
    t[fused][:4] = base.read(fused)[:4]  # four rows of the first part unmerged
    save_file(t, f, metadata={"format": "pt"})
    report = adaptkit.verify(tmp_path / "base", ad, tmp_path / "m", model=False)
    assert not report.ok and [m.name for m in report.modules if not m.ok] == [fused]


def test_weights_transformers_transposes_on_load_merge_as_peft_merges_them(tmp_path):
    """Ergo: the checkpoint stores its shared expert (feed_forward.shared_up_proj / shared_down_proj) and its router
    (feed_forward.gate_kernel) transposed, (in, out), which transformers transposes on load (Transpose alone):
    each ΔW lands transposed, exactly as peft merges the LoRA into the loaded model."""
    build.build_model(build.ergo_config(), tmp_path / "base", dtype=torch.float32)
    ad = build.build_adapter(tmp_path / "base", tmp_path / "lora", r=2, lora_alpha=4,
                             target_modules=["shared_experts.up_proj", "shared_experts.down_proj", "gate.linear",
                                             "o_proj"])
    result = adaptkit.merge(tmp_path / "base", ad, tmp_path / "m")
    assert result.modules_merged == 5 and not result.warnings
    assert_merge_is_peft(tmp_path / "base", ad, tmp_path / "m")


def test_a_module_transformers_builds_by_another_op_is_refused_naming_it(runner, tmp_path, monkeypatch):
    """A module transformers builds on load by an op adaptkit does not follow (here: as if Sarvam-MoE's q_proj came
    out of query_key_value by an Interleave): refused in one line naming the op and the on-disk tensor, nothing
    written."""
    from adaptkit import plan

    build.build_model(build.sarvam_moe_config(), tmp_path / "base", dtype=torch.float32)
    ad = build.build_adapter(tmp_path / "base", tmp_path / "lora", r=2, lora_alpha=4, target_modules=["q_proj"])
    real = plan.converted

    def converted(base):
        rows = dict(real(base))
        rows["model.layers.0.self_attn.q_proj.weight"] = ("transformers builds it on load from "
                                                          "model.layers.0.attention.query_key_value.weight with "
                                                          "Interleave, which adaptkit does not lay a LoRA across")
        return rows

    monkeypatch.setattr(plan, "converted", converted)
    res = invoke(runner, "merge", tmp_path / "base", ad, "-o", tmp_path / "m")
    assert_one_line_error(res, "model.layers.0.self_attn.q_proj", "query_key_value", "Interleave")
    assert not (tmp_path / "m").exists()


def test_the_rows_transformers_builds_a_module_from_are_read_off_its_converter(tmp_path):
    """converted_rows on Sarvam-MoE: q, k, v are rows [0, 64), [64, 96), [96, 128) of query_key_value, in
    order; Mistral Large 4's vision q_proj is its wq with each head's rows de-interleaved (PermuteForRope), its
    language model's q_proj a plain rename of wq (not a conversion)."""
    import transformers

    from adaptkit.architecture import converted_rows

    build.build_model(build.sarvam_moe_config(), tmp_path / "s", dtype=torch.float32)
    build.build_model(build.mistral_large4_config(), tmp_path / "m", dtype=torch.float32,
                      auto=transformers.AutoModelForImageTextToText)
    s, m = Checkpoint.open(tmp_path / "s"), Checkpoint.open(tmp_path / "m")
    rows = converted_rows(s.config, {n: tuple(i.shape) for n, (_, i) in s.tensors.items()})
    for proj, (lo, hi) in (("q_proj", (0, 64)), ("k_proj", (64, 96)), ("v_proj", (96, 128))):
        [(disk, disk_rows, memory_rows)] = rows[f"model.layers.0.self_attn.{proj}.weight"]
        assert disk == "model.layers.0.attention.query_key_value.weight"
        assert disk_rows.tolist() == list(range(lo, hi)) and memory_rows.tolist() == list(range(hi - lo))
    rows = converted_rows(m.config, {n: tuple(i.shape) for n, (_, i) in m.tensors.items()})
    assert "model.language_model.layers.0.self_attn.q_proj.weight" not in rows
    [(disk, disk_rows, memory_rows)] = rows["model.vision_tower.transformer.layers.0.attention.q_proj.weight"]
    head = 16  # 2 heads of 16: transformers reads head h's row 2i as its row i, row 2i+1 as its row 8 + i
    want = [h * head + (2 * i if i < head // 2 else 2 * (i - head // 2) + 1) for h in range(2) for i in range(head)]
    assert disk == "vision_encoder.transformer.layers.0.attention.wq.weight" and disk_rows.tolist() == want
    assert memory_rows.tolist() == list(range(32))


def test_a_laguna_lora_merges_what_the_trained_model_computed_where_peft_reloads_it_without_its_shared_expert(
        tmp_path):
    """Laguna renames the checkpoint's mlp.shared_expert. to mlp.shared_experts. with an unescaped regex; peft 0.21
    re-applies transformers' renames to an adapter's keys on load, already in-memory names, and
    "mlp.shared_experts.down_proj" becomes "mlp.shared_experts..down_proj": PeftModel.from_pretrained drops the
    shared expert's LoRA with a warning (peft's own merge_and_unload then loses it too). adaptkit merges the
    adapter as the model that saved it computed: checked against that model (get_peft_model with the saved factors
    loaded by name), and peft's reload shown off by the shared expert's delta (drop that assert once peft fixes it).
    verify's model-level reference fills those factors in by name and says so (else it would reject a right merge)."""
    import json

    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file

    build.build_model(build.laguna_config(), tmp_path / "base", dtype=torch.float32)
    ad = build.build_adapter(tmp_path / "base", tmp_path / "lora", r=2, lora_alpha=4,
                             target_modules=["q_proj", "shared_experts.down_proj", "shared_experts.up_proj"])
    result = adaptkit.merge(tmp_path / "base", ad, tmp_path / "m")
    assert result.modules_merged == 4 and not result.warnings
    cfg = json.loads((ad / "adapter_config.json").read_text())
    trained = get_peft_model(build.load_model(tmp_path / "base"),
                             LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"]))
    saved = {k.replace(".weight", ".default.weight"): v for k, v in load_file(ad / "adapter_model.safetensors").items()}
    loaded = trained.load_state_dict(saved, strict=False)
    assert not loaded.unexpected_keys and not [k for k in loaded.missing_keys if "lora_" in k]
    with pytest.warns(UserWarning, match="shared_experts"):
        reloaded = PeftModel.from_pretrained(build.load_model(tmp_path / "base"), ad).eval()
    ids = torch.tensor([[1, 5, 9, 200, 7, 3, 11, 13, 60, 61]])
    with torch.no_grad():
        want, got = trained.eval()(input_ids=ids).logits, build.load_model(tmp_path / "m")(input_ids=ids).logits
        peft_says = reloaded(input_ids=ids).logits
    assert (want - got).abs().max() <= 1e-5 * want.abs().max()
    assert (want - peft_says).abs().max() > 1e3 * (want - got).abs().max()
    report = adaptkit.verify(tmp_path / "base", ad, tmp_path / "m")
    assert report.ok and report.model.restored == ["model.layers.1.mlp.shared_experts.down_proj",
                                                   "model.layers.1.mlp.shared_experts.up_proj"]
    assert any("peft's own load of the adapter leaves 2 LoRA modules unloaded" in w for w in report.warnings)


SWEPT = [("minimax_m2", False), ("phimoe", False), ("hy_v3", False), ("kolibri1", False), ("ernie4_5_moe", False),
         ("minicpm5_moe", True), ("cosmos3_omni", True), ("hy_v4", True), ("aria", True), ("emu3", True)]


@pytest.mark.parametrize("model_type, dense", SWEPT)
def test_families_of_the_sweep_merge_as_peft_merges_them(tmp_path, model_type, dense):
    """A few of fixtures/sweep_families.py's passing families kept as tests, each with renames or conversions of
    its own (block_sparse_moe w1/w2/w3, router and bias renames, q_proj renamed q_gate_proj, to_q renamed q_proj,
    language_model prefixes): the generic tiny config, a peft LoRA on its experts (and q_proj) or all-linear."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from fixtures.sweep_families import lora_targets, tiny_config

    auto = None if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else transformers.AutoModelForImageTextToText
    model = build.build_model(tiny_config(model_type), tmp_path / "base", dtype=torch.float32, auto=auto)
    ad = build.build_adapter(tmp_path / "base", tmp_path / "lora", r=2, lora_alpha=4, **lora_targets(model, dense))
    result = adaptkit.merge(tmp_path / "base", ad, tmp_path / "m")
    assert result.modules_merged >= 2 and not result.warnings
    assert_merge_is_peft(tmp_path / "base", ad, tmp_path / "m")


def test_experts_transformers_transposes_on_load_merge_in_the_checkpoints_own_layout(tmp_path):
    """Qwen3-VL-MoE checkpoints on the Hub store the experts as (E, H, 2I) / (E, I, H), which
    transformers 5 transposes on load (conversion_mapping: Transpose(1, 2)); peft's LoRA is in the
    memory layout. Every expert's ΔW lands transposed on the tensor as stored, which keeps its layout:
    logits equal peft's unmerged model and verify accepts the merge."""
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file

    build.build_model(build.qwen3_vl_moe_config(), tmp_path / "base", dtype=torch.float32,
                      auto=transformers.Qwen3VLMoeForConditionalGeneration)
    sd = load_file(tmp_path / "base" / "model.safetensors")
    experts = [k for k in sd if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))]
    build.to_hub_expert_layout(tmp_path / "base")
    ad = build.build_adapter(tmp_path / "base", tmp_path / "lora", r=2, lora_alpha=4, target_modules=["q_proj"],
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    result = adaptkit.merge(tmp_path / "base", ad, tmp_path / "m", dtype="float32")
    assert result.modules_merged == 6
    stored = Checkpoint.open(tmp_path / "m")
    assert all(tuple(stored.info(k).shape) == tuple(sd[k].transpose(1, 2).shape) for k in experts)
    unmerged = PeftModel.from_pretrained(build.load_model(tmp_path / "base"), ad).eval()
    mine = build.load_model(tmp_path / "m")
    ids = torch.tensor([[1, 5, 9, 200, 7, 3, 11]])
    with torch.no_grad():
        a, b = unmerged(input_ids=ids).logits, mine(input_ids=ids).logits
        with unmerged.disable_adapter():
            c = unmerged(input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-5 * a.abs().max() and (a - c).abs().max() > 100 * (a - b).abs().max()
    assert adaptkit.verify(tmp_path / "base", ad, tmp_path / "m").ok


def test_a_lora_peft_moved_onto_the_experts_merges_as_peft_merges_it(tmp_path):
    """The everyday MoE LoRA: target_modules naming gate_proj, up_proj and down_proj on a transformers-5
    Qwen3-MoE. peft 0.21 rewrites that config itself (transformers_weight_conversion.py
    _convert_peft_config_moe): bare target_parameters ``gate_up_proj``, ``down_proj`` (which it matches on
    the parameter's last name), gate and up as one rank-2r factor pair with alpha doubled by a regex
    pattern. adaptkit once refused such an adapter; it merges as peft merges it."""
    import json

    build.build_model(build.qwen3_moe_config(), tmp_path / "base", dtype=torch.float32)
    ad = build.build_adapter(tmp_path / "base", tmp_path / "lora", r=2, lora_alpha=4,
                             target_modules=["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    config = json.loads((ad / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["down_proj", "gate_up_proj"]  # what the case is about
    assert config["rank_pattern"] == {r".*\.gate_up_proj": 4}
    result = adaptkit.merge(tmp_path / "base", ad, tmp_path / "m")
    assert result.modules_merged == 8 and not result.warnings
    _, ref = peft_merged(tmp_path / "base", [ad])
    mine, base = build.load_model(tmp_path / "m").state_dict(), build.load_model(tmp_path / "base").state_dict()
    changed = [n for n, t in ref.state_dict().items() if not torch.equal(t, base[n])]
    assert sum(".mlp.experts." in n for n in changed) == 4 and len(changed) == 8
    for name, t in ref.state_dict().items():
        assert torch.allclose(mine[name], t, rtol=1e-6, atol=1e-7), name
    info = adaptkit.inspect(ad)
    assert {m.name.rsplit(".", 1)[1]: m.experts for m in info.modules if m.experts > 1} == {"down_proj": 4,
                                                                                            "gate_up_proj": 4}
    assert adaptkit.verify(tmp_path / "base", ad, tmp_path / "m").ok


def test_a_rank_pattern_peft_saves_behind_its_own_is_refused_as_peft_cannot_load_it(runner, tmp_path):
    """peft 0.21's rewrite adds its ``.*\\.gate_up_proj`` rank key after the user's own; the saved config
    sorts its keys, so on loading peft's key wins and gives another rank than the tensors have (peft
    itself fails to load it). adaptkit refuses it in one line rather than pick a rank."""
    from peft import PeftModel

    build.build_model(build.qwen3_moe_config(), tmp_path / "base", dtype=torch.float32)
    ad = build.build_adapter(tmp_path / "base", tmp_path / "lora", r=2, lora_alpha=4,
                             target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"],
                             rank_pattern={"layers.1.mlp.experts.gate_up_proj": 2})
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(build.load_model(tmp_path / "base"), ad)
    res = invoke(runner, "merge", tmp_path / "base", ad, "-o", tmp_path / "m")
    assert_one_line_error(res, "model.layers.1.mlp.experts.gate_up_proj", "tensors have rank 8", "fix r or rank_pattern")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("version", ["v3", "v2-lite"])
def test_a_deepseek_lora_merges_as_peft_merges_it(tmp_path, version):
    """DeepSeek-V3 (and Kimi-K2, which has its layout) and V2-Lite (q_proj whole): multi-head latent
    attention, a dense first layer, then routed experts per expert on disk, a shared expert and a
    router whose weight is a parameter; a LoRA on attention, the router and every routed expert."""
    config = build.deepseek_v3_config() if version == "v3" else build.deepseek_v2_lite_config()
    build.build_model(config, tmp_path / "base", dtype=torch.float32)
    query = "q_b_proj" if version == "v3" else "q_proj"
    ad = build.build_adapter(tmp_path / "base", tmp_path / "lora", r=4, lora_alpha=8, use_rslora=True,
                             target_modules=["o_proj", query, "kv_b_proj"],
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj",
                                                "mlp.gate.weight"],
                             rank_pattern={"layers.1.self_attn.o_proj": 2}, alpha_pattern={"mlp.experts.down_proj": 3})
    result = adaptkit.merge(tmp_path / "base", ad, tmp_path / "m")
    assert result.modules_merged == 9 and not result.warnings
    _, ref = peft_merged(tmp_path / "base", [ad])
    mine, base = build.load_model(tmp_path / "m").state_dict(), build.load_model(tmp_path / "base").state_dict()
    changed = {n for n, t in ref.state_dict().items() if not torch.equal(t, base[n])}
    assert {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.experts.down_proj",
            "model.layers.0.self_attn.kv_b_proj.weight"} <= changed and len(changed) == 9
    for name, t in ref.state_dict().items():
        assert torch.allclose(mine[name], t, rtol=1e-6, atol=1e-7), name
    assert adaptkit.verify(tmp_path / "base", ad, tmp_path / "m").ok


def test_a_llama4_vlm_lora_on_its_experts_merges_as_peft_merges_it_and_verifies(tmp_path):
    """Llama 4 as it ships (Llama4ForConditionalGeneration): a LoRA on its language model's attention,
    shared expert, router and fused routed experts (stored (E, in, out), not marked is_transposed: peft's
    LoRA is in that orientation). Every tensor equals peft's merge; verify runs the model level through
    the language model (transformers 5.24's Llama4ForConditionalGeneration.forward fails on text alone)
    and, with one expert's delta dropped, names that tensor."""
    import transformers
    from safetensors.torch import load_file, save_file

    build.build_model(build.llama4_config(vlm=True), tmp_path / "base", dtype=torch.float32,
                      auto=transformers.Llama4ForConditionalGeneration)
    ad = build.build_adapter(tmp_path / "base", tmp_path / "lora", r=4, lora_alpha=8, use_rslora=True, scale=0.3,
                             target_modules=r".*language_model.*\.(q_proj|o_proj|shared_expert\.down_proj)",
                             target_parameters=["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj",
                                                "feed_forward.router.weight"],
                             rank_pattern={"layers.1.feed_forward.experts.down_proj": 2})
    result = adaptkit.merge(tmp_path / "base", ad, tmp_path / "m")
    assert result.modules_merged == 12 and not result.warnings  # 2 layers × 6
    _, ref = peft_merged(tmp_path / "base", [ad])
    mine, base = build.load_model(tmp_path / "m").state_dict(), build.load_model(tmp_path / "base").state_dict()
    changed = {n for n, t in ref.state_dict().items() if not torch.equal(t, base[n])}
    assert {"language_model.model.layers.1.feed_forward.experts.down_proj",
            "language_model.model.layers.0.feed_forward.router.weight"} <= changed and len(changed) == 12
    for name, t in ref.state_dict().items():
        assert torch.allclose(mine[name], t, rtol=1e-6, atol=1e-7), name
    report = adaptkit.verify(tmp_path / "base", ad, tmp_path / "m")
    assert report.ok and report.model is not None and report.model.ok
    name = "language_model.model.layers.1.feed_forward.experts.gate_up_proj"
    shard = next((tmp_path / "m").glob("*.safetensors"))
    merged = load_file(shard)
    merged[name][2] = load_file(next((tmp_path / "base").glob("*.safetensors")))[name][2]  # expert 2's delta dropped
    save_file(merged, shard, metadata={"format": "pt"})
    report = adaptkit.verify(tmp_path / "base", ad, tmp_path / "m", model=False)
    assert not report.ok and [m.name for m in report.modules if not m.ok] == [name]


def test_verify_catches_one_experts_delta_dropped(tmp_path, moe):
    from safetensors.torch import load_file, save_file

    family, base, ad = moe
    out = tmp_path / "m"
    adaptkit.merge(base, ad, out)
    name = MOE[family][1]
    shard = next(out.glob("*.safetensors"))
    merged, original = load_file(shard), load_file(next(base.glob("*.safetensors")))
    if merged[name].dim() == 3:  # fused: expert 2 only
        merged[name] = merged[name].clone()
        merged[name][2] = original[name][2]
    else:
        merged[name] = original[name]
    save_file(merged, shard, metadata={"format": "pt"})
    report = adaptkit.verify(base, ad, out, model=False)
    assert not report.ok and [m.name for m in report.modules if not m.ok] == [name]


def test_expert_loras_of_an_older_peft_are_refused(runner, tmp_path, moe):
    import json
    import shutil

    _, base, ad = moe
    old = tmp_path / "old"
    shutil.copytree(ad, old)
    cfg = json.loads((old / "adapter_config.json").read_text())
    (old / "adapter_config.json").write_text(json.dumps({**cfg, "peft_version": "0.17.1"}))
    assert_one_line_error(invoke(runner, "merge", base, old, "-o", tmp_path / "o"), "peft 0.17.1", ">= 0.21")


# ------------------------------------------------------------------------------------ fused projections

@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    """A tiny Phi-3 (q, k, v and gate, up fused), its llama-fied twin (split, same function), a LoRA made
    by peft on each layout, and a DoRA on the split one."""
    root = tmp_path_factory.mktemp("phi3")
    build.build_model(build.phi3_config(), root / "phi3", dtype=torch.float32)
    build.llamafy(root / "phi3", root / "llama")
    split = build.build_adapter(root / "llama", root / "split", r=4, lora_alpha=8, target_modules=build.LLAMA_ALL)
    dora = build.build_adapter(root / "llama", root / "dora", r=4, lora_alpha=8, use_dora=True,
                               target_modules=["q_proj", "k_proj", "up_proj"])
    fused = build.build_adapter(root / "phi3", root / "fused", r=4, lora_alpha=8,
                                target_modules=["qkv_proj", "gate_up_proj", "o_proj"])
    dora_all = build.build_adapter(root / "llama", root / "dora-all", r=2, lora_alpha=8, use_dora=True,
                                   target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"],
                                   rank_pattern={"k_proj": 3}, alpha_pattern={"v_proj": 2})
    return {"phi3": root / "phi3", "llama": root / "llama", "split": split, "dora": dora, "fused": fused,
            "dora-all": dora_all}


def _logits(model, ids=torch.tensor([[1, 5, 9, 200, 7, 3, 42]])):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_llama_fied_twin_computes_what_phi3_computes(phi3):
    assert torch.equal(_logits(build.load_model(phi3["phi3"])), _logits(build.load_model(phi3["llama"])))


@pytest.mark.parametrize("adapter, base, trained_on", [("split", "phi3", "llama"), ("dora", "phi3", "llama"),
                                                       ("fused", "llama", "phi3")])
def test_a_lora_merges_across_fused_and_split_projections(tmp_path, phi3, adapter, base, trained_on):
    """peft cannot load a split LoRA on Phi-3 (or a fused one on its twin): the oracle is peft on the
    layout it was trained on, unmerged, against transformers loading adaptkit's merge into the other."""
    from peft import PeftModel

    out = tmp_path / "m"
    result = adaptkit.merge(phi3[base], phi3[adapter], out)
    assert result.modules_merged == len(adaptkit.load_adapter(phi3[adapter]).modules)
    assert any("layout" in w for w in result.warnings)
    assert set(Checkpoint.open(out).tensors) == set(Checkpoint.open(phi3[base]).tensors)
    mine = _logits(build.load_model(out))
    theirs = _logits(PeftModel.from_pretrained(build.load_model(phi3[trained_on]), phi3[adapter]).eval())
    assert (mine - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    # and weight by weight: peft's merge on its own layout, re-laid out, equals ours
    _, ref = peft_merged(phi3[trained_on], [phi3[adapter]], torch.float32)
    ours = build.load_model(build.llamafy(out, tmp_path / "mine-split") if base == "phi3" else out).state_dict()
    if base == "llama":  # peft merged the fused Phi-3: lay it out split to compare
        ref.save_pretrained(tmp_path / "ref")
        build.llamafy(tmp_path / "ref", tmp_path / "ref-split")
        ref = build.load_model(tmp_path / "ref-split")
    for name, t in ref.state_dict().items():
        assert torch.allclose(ours[name], t, rtol=1e-6, atol=1e-6), name
    report = adaptkit.verify(phi3[base], phi3[adapter], out)  # the model level on the adapter re-laid out
    if adapter == "dora":  # DoRA on some parts of a fused weight: no exact re-layout for peft to load
        assert report.ok and report.model is None
        assert any("model-level check skipped: peft cannot load" in w for w in report.warnings)
    else:
        assert report.ok and report.model.ok and report.model.compared.startswith("logits")


@pytest.mark.parametrize("adapter, base, trained_on", [("split", "phi3", "llama"), ("fused", "llama", "phi3"),
                                                       ("dora-all", "phi3", "llama")])
def test_convert_moves_a_lora_between_fused_and_split_layouts(tmp_path, phi3, adapter, base, trained_on):
    """convert --base lays the LoRA out as the base stores its projections (split → fused block-diagonal,
    fused → split by B's rows); peft then loads it on that base and computes what it computed before."""
    from peft import PeftModel

    result = adaptkit.convert(phi3[adapter], tmp_path / "moved", to="peft", base=phi3[base])
    assert any("re-laid out" in w for w in result.warnings)
    moved = PeftModel.from_pretrained(build.load_model(phi3[base]), tmp_path / "moved").eval()
    layers = [n for n, _ in moved.named_modules() if n.endswith(("qkv_proj", "q_proj"))]
    assert layers and all(moved.get_submodule(n).__class__.__name__ == "Linear" for n in layers)  # peft's LoRA layer
    before = _logits(PeftModel.from_pretrained(build.load_model(phi3[trained_on]), phi3[adapter]).eval())
    assert (_logits(moved) - before).abs().max() <= 1e-5 * before.abs().max()
    adaptkit.merge(phi3[base], phi3[adapter], tmp_path / "m1")
    adaptkit.merge(phi3[base], tmp_path / "moved", tmp_path / "m2")
    m1, m2 = build.load_model(tmp_path / "m1").state_dict(), build.load_model(tmp_path / "m2").state_dict()
    assert all(torch.allclose(m1[n], m2[n], rtol=1e-6, atol=1e-7) for n in m1)


def test_a_dora_on_some_parts_of_a_fused_weight_is_not_re_laid_out(runner, tmp_path, phi3):
    res = invoke(runner, "convert", phi3["dora"], "--to", "peft", "--base", phi3["phi3"], "-o", tmp_path / "o")
    assert_one_line_error(res, "a DoRA on some parts of", "merge it instead")


def test_verify_catches_one_parts_delta_dropped(tmp_path, phi3):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "m"
    adaptkit.merge(phi3["phi3"], phi3["split"], out)
    shard = out / "model.safetensors"
    merged, original = load_file(shard), load_file(phi3["phi3"] / "model.safetensors")
    name = "model.layers.1.self_attn.qkv_proj.weight"
    merged[name] = merged[name].clone()
    merged[name][64:96] = original[name][64:96]  # k_proj's rows: its delta lost
    save_file(merged, shard, metadata={"format": "pt"})
    report = adaptkit.verify(phi3["phi3"], phi3["split"], out, model=False)
    assert not report.ok and [m.name for m in report.modules if not m.ok] == [name]


def test_a_split_lora_that_does_not_fit_the_fused_rows_is_refused(runner, tmp_path, phi3):
    import json

    base = tmp_path / "base"
    shutil.copytree(phi3["phi3"], base)
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 4}))  # k, v rows as the config says
    assert_one_line_error(invoke(runner, "merge", base, phi3["split"], "-o", tmp_path / "o"),
                          "does not fit rows", "qkv_proj.weight [128, 64]")
    assert_one_line_error(invoke(runner, "convert", phi3["split"], "--to", "peft", "--base", base, "-o",
                                 tmp_path / "c"), "does not fit rows", "qkv_proj.weight [128, 64]")  # merge's words


def test_the_fused_layout_table_gives_rows_from_the_config_and_parts_from_the_base(phi3):
    from adaptkit.families import fused_parent, split_parts

    cfg = Checkpoint.open(phi3["phi3"]).config  # 4 heads of 16, 2 kv heads; intermediate 96
    assert fused_parent(cfg, "model.layers.1.self_attn.k_proj") == ("model.layers.1.self_attn.qkv_proj", (64, 96))
    assert fused_parent(cfg, "model.layers.1.mlp.up_proj") == ("model.layers.1.mlp.gate_up_proj", (96, 192))
    assert fused_parent({**cfg, "model_type": "llama"}, "model.layers.1.self_attn.k_proj") is None
    rows = {"x.self_attn.q_proj": 64, "x.self_attn.k_proj": 32, "x.self_attn.v_proj": 32}
    assert split_parts("x.self_attn.qkv_proj", rows.get) == [
        ("x.self_attn.q_proj", (0, 64)), ("x.self_attn.k_proj", (64, 96)), ("x.self_attn.v_proj", (96, 128))]
    assert split_parts("x.self_attn.qkv_proj", {**rows, "x.self_attn.v_proj": None}.get) is None  # a part missing


@pytest.mark.parametrize("name", list(FAMILY_ADAPTERS))
def test_the_shipped_family_fixtures_merge_and_verify_from_the_cli(runner, tmp_path, name):
    """fixtures/ (made by ``python fixtures/build.py``): bf16 bases as they ship, peft-made LoRAs; the
    CLI merges each and verify passes on both levels (the model level is peft's unmerged logits)."""
    import json

    base, ad = FAMILY_BASE_OF[name], FAMILY_ADAPTERS[name]
    res = invoke(runner, "merge", base, ad, "-o", tmp_path / "m", "--json")
    assert res.exit_code == 0, res.output
    merged = json.loads(res.stdout)
    assert merged["modules_merged"] == len(adaptkit.load_adapter(ad).modules)
    assert set(Checkpoint.open(tmp_path / "m").tensors) == set(Checkpoint.open(base).tensors)
    res = invoke(runner, "verify", base, ad, tmp_path / "m", "--json", seconds=120)
    report = json.loads(res.stdout)
    assert res.exit_code == 0 and report["ok"] and report["model"]["ok"], res.output
    assert all(m["ok"] for m in report["modules"]) and len(report["modules"]) >= merged["modules_merged"]


@pytest.mark.parametrize("name", ["qwen3-moe-experts", "gpt-oss-experts"])
def test_expert_loras_convert_to_raw_and_back_losslessly(runner, tmp_path, name):
    """The config says what a target_parameters LoRA adapts: convert keeps it, and the merges of the
    original, its raw file and the peft folder made back from that are byte-identical."""
    base, ad = FAMILY_BASE_OF[name], FAMILY_ADAPTERS[name]
    adaptkit.convert(ad, tmp_path / "a.safetensors", to="raw")
    adaptkit.convert(tmp_path / "a.safetensors", tmp_path / "back", to="peft")
    outs = []
    for i, src in enumerate([ad, tmp_path / "a.safetensors", tmp_path / "back"]):
        adaptkit.merge(base, src, tmp_path / f"m{i}")
        outs.append((tmp_path / f"m{i}" / "model.safetensors").read_bytes())
    assert outs[0] != (base / "model.safetensors").read_bytes() and outs[0] == outs[1] == outs[2]
    res = invoke(runner, "convert", ad, "--to", "kohya", "-o", tmp_path / "k.safetensors")
    assert_one_line_error(res, "a LoRA on a parameter (target_parameters, MoE experts) cannot be written as a kohya")


def test_inspect_names_the_target_parameters():
    report = adaptkit.inspect(FAMILY_ADAPTERS["qwen3-moe-experts"])
    assert sorted(report.target_parameters) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert report.to_dict()["target_parameters"] == report.target_parameters


def peft_merged_dir(base, adapter, out):
    """peft's merge of one adapter into ``base``, saved (its model class names the on-disk layout)."""
    _, merged = peft_merged(base, [adapter], torch.float32)
    merged.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def two_moe(tmp_path_factory):
    """A tiny Qwen3-MoE (fp32) and two peft-made LoRAs on its experts and attention."""
    root = tmp_path_factory.mktemp("two-moe")
    build.build_model(build.qwen3_moe_config(), root / "base", dtype=torch.float32)
    kw = dict(target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    a1 = build.build_adapter(root / "base", root / "a1", seed=3, r=2, lora_alpha=4, **kw)
    a2 = build.build_adapter(root / "base", root / "a2", seed=4, r=3, lora_alpha=3, **kw)
    return root / "base", a1, a2


def test_expert_loras_combine_linearly_into_the_base_as_peft_merges_both(tmp_path, two_moe):
    base, a1, a2 = two_moe
    res = adaptkit.combine([a1, a2], tmp_path / "m", method="linear", base=base)
    assert {m.name: m.rank for m in res.modules}["model.layers.0.mlp.experts.gate_up_proj"] == 5  # 2 + 3, exact
    _, ref = peft_merged(base, [a1, a2], torch.float32)
    mine = build.load_model(tmp_path / "m").state_dict()
    for name, t in ref.state_dict().items():
        assert torch.allclose(mine[name], t, rtol=1e-5, atol=1e-6), name


def test_expert_loras_combine_by_ties_expert_by_expert(tmp_path, two_moe):
    """TIES per expert, against peft.utils.merge_utils.ties on each expert's two deltas (taken from
    peft's own merge of each adapter alone), at full rank."""
    from peft.utils import merge_utils
    from safetensors.torch import load_file

    base, a1, a2 = two_moe
    adaptkit.combine([a1, a2], tmp_path / "m", method="ties", density=0.5, rank=48, base=base)
    mine = load_file(tmp_path / "m" / "model.safetensors")
    w0 = load_file(base / "model.safetensors")
    name = "model.layers.1.mlp.experts.2.down_proj.weight"  # on disk: one tensor per expert
    deltas = [load_file(peft_merged_dir(base, a, tmp_path / f"p{i}") / "model.safetensors")[name] - w0[name]
              for i, a in enumerate([a1, a2])]
    ref = merge_utils.ties(torch.stack(deltas), torch.ones(2), 0.5)
    assert torch.allclose(mine[name] - w0[name], ref, atol=1e-5)
    assert not torch.allclose(ref, deltas[0] + deltas[1], atol=1e-5)  # TIES did something


def test_expert_loras_combine_only_into_a_base(runner, tmp_path, two_moe):
    _, a1, a2 = two_moe
    res = invoke(runner, "combine", a1, a2, "--method", "linear", "-o", tmp_path / "o")
    assert_one_line_error(res, "combine only into a base", "give base")


def test_a_transformers_4_era_mixtral_lora_on_per_expert_linears_merges_and_verifies(tmp_path):
    """Before transformers 5 fused Mixtral's experts in memory, peft adapted each expert's nn.Linear
    (block_sparse_moe.experts.N.w1…): names the checkpoint still holds on disk. peft cannot make such
    an adapter any more, so it is written here as peft 0.13 saved it; peft 0.21 still loads it, which
    gives verify's model level its reference."""
    import json

    from safetensors.torch import load_file, save_file

    build.build_model(build.mixtral_config(), tmp_path / "base", dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(2):
        for e in range(4):
            for w, (o, i) in {"w1": (48, 64), "w2": (64, 48), "w3": (48, 64)}.items():
                p = f"base_model.model.model.layers.{layer}.block_sparse_moe.experts.{e}.{w}"
                tensors[p + ".lora_A.weight"] = 0.1 * torch.randn(4, i, generator=gen)
                tensors[p + ".lora_B.weight"] = 0.1 * torch.randn(o, 4, generator=gen)
    ad = tmp_path / "lora"
    ad.mkdir()
    save_file(tensors, ad / "adapter_model.safetensors")
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                        "target_modules": ["w1", "w2", "w3"], "peft_version": "0.13.2"}))
    result = adaptkit.merge(tmp_path / "base", ad, tmp_path / "m")
    assert result.modules_merged == 24 and not result.warnings
    merged, base = load_file(tmp_path / "m" / "model.safetensors"), load_file(tmp_path / "base" / "model.safetensors")
    for name in base:
        key = "base_model.model." + name[: -len(".weight")]
        expected = base[name] + 2.0 * tensors[key + ".lora_B.weight"] @ tensors[key + ".lora_A.weight"] \
            if key + ".lora_A.weight" in tensors else base[name]
        assert torch.allclose(merged[name], expected, rtol=1e-6, atol=1e-7), name
    report = adaptkit.verify(tmp_path / "base", ad, tmp_path / "m")
    assert report.ok and report.model.ok and report.model.compared == "logits (MixtralForCausalLM)"


def test_runtime_checks_send_expert_loras_to_their_exports_or_the_merge():
    """llama.cpp applies a LoRA on its 3-D expert tensors (the GGUF export lays it out: test_runtimes,
    test_llama_cpp); vLLM reads per-expert pairs (convert --to vllm --base), mlx-lm its switch_mlp
    (convert --to mlx --base; mlx-lm itself runs the export in test_runtimes)."""
    report = adaptkit.inspect(FAMILY_ADAPTERS["qwen3-moe-experts"], checks=["vllm", "llamacpp", "mlx"])
    assert [c.target for c in report.checks if c.ok] == ["llamacpp"]
    fixes = {c.target: next(p.fix for p in c.problems if p.rule == "target_parameters") for c in report.checks[::2]}
    assert fixes["vllm"].startswith("adaptkit convert") and "--to vllm --base BASE" in fixes["vllm"]
    assert fixes["mlx"].startswith("adaptkit convert") and "--to mlx --base BASE" in fixes["mlx"]


def _vllm_deltas(folder):
    """What vLLM computes from a PEFT folder: one scaling lora_alpha / r (PEFTHelper) for every pair."""
    import json

    from safetensors.torch import load_file

    cfg = json.loads((folder / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    t = load_file(folder / "adapter_model.safetensors")
    return {k[len("base_model.model."):-len(".lora_A.weight")]: scale * t[k.replace("lora_A", "lora_B")] @ t[k]
            for k in t if k.endswith(".lora_A.weight")}, t


@pytest.mark.parametrize("family", ["qwen3-moe", "deepseek-v3"])
def test_expert_loras_go_to_vllm_as_per_expert_pairs(tmp_path, family):
    """peft 0.21 saves an expert LoRA on transformers 5's fused parameters; vLLM's Qwen-MoE/DeepSeek
    classes read one pair per expert and projection, every one present. The export writes that: a
    vLLM-shaped reader (one global alpha / r) rebuilds every expert's ΔW of peft's merge exactly,
    zeros where a projection had no LoRA, all at one rank."""
    import json

    config = build.qwen3_moe_config() if family == "qwen3-moe" else build.deepseek_v3_config()
    build.build_model(config, tmp_path / "base", dtype=torch.float32)
    ad = build.build_adapter(tmp_path / "base", tmp_path / "lora", r=4, lora_alpha=8, use_rslora=True,
                             target_modules=["o_proj"], target_parameters=["mlp.experts.down_proj"],
                             rank_pattern={"layers.1.self_attn.o_proj": 2})
    adaptkit.convert(ad, tmp_path / "vllm", to="vllm", base=tmp_path / "base")
    got, tensors = _vllm_deltas(tmp_path / "vllm")
    expert_ranks = {t.shape[0] for k, t in tensors.items() if ".experts." in k and k.endswith("lora_A.weight")}
    assert expert_ranks == {4}  # one rank for every expert pair (vLLM stacks them)
    _, merged = peft_merged(tmp_path / "base", [ad])
    ref, plain = merged.state_dict(), build.load_model(tmp_path / "base").state_dict()
    layers = [1] if family == "deepseek-v3" else [0, 1]  # DeepSeek's first layer is dense
    experts = 0
    for layer in layers:
        down = ref[f"model.layers.{layer}.mlp.experts.down_proj"] - plain[f"model.layers.{layer}.mlp.experts.down_proj"]
        for e in range(down.shape[0]):
            p = f"model.layers.{layer}.mlp.experts.{e}."
            assert torch.allclose(got[p + "down_proj"], down[e], atol=1e-6 * down.abs().max().item())
            assert not got[p + "gate_proj"].any() and not got[p + "up_proj"].any()  # present, zero
            experts += 1
    o = ref["model.layers.1.self_attn.o_proj.weight"] - plain["model.layers.1.self_attn.o_proj.weight"]
    assert torch.allclose(got["model.layers.1.self_attn.o_proj"], o, atol=1e-6 * o.abs().max().item())
    assert len(got) == 2 + 3 * experts
    cfg = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    assert {"down_proj", "gate_proj", "up_proj", "o_proj"} == set(cfg["target_modules"]) and not cfg["rank_pattern"]


def _vllm_3d_deltas(folder, experts):
    """What vLLM's 3-D MoE classes (gpt-oss…) compute from a PEFT folder (model_manager.py
    _stack_moe_lora_weights): per MoE layer, ``experts.base_layer`` is gate_up_proj and ``experts``
    down_proj whatever they hold; A reshaped (E, r, in), B (out, r, E) then (E, out, r); both asserted
    present; one scaling lora_alpha / r. Returns {…experts.gate_up_proj / .down_proj: (E, out, in)}."""
    import json

    from safetensors.torch import load_file

    cfg = json.loads((folder / "adapter_config.json").read_text())
    scale, t, got = cfg["lora_alpha"] / cfg["r"], load_file(folder / "adapter_model.safetensors"), {}
    for k in [k for k in t if k.endswith(".experts.lora_A.weight")]:
        module = k[len("base_model.model."):-len(".lora_A.weight")]
        for param, key in (("gate_up_proj", k.replace(".experts.", ".experts.base_layer.")), ("down_proj", k)):
            a, b = t[key], t[key.replace("lora_A", "lora_B")]  # a KeyError here is vLLM's assert
            a3, b3 = a.reshape(experts, -1, a.shape[-1]), b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)
            got[f"{module}.{param}"] = scale * b3 @ a3
    return got, cfg


@pytest.mark.parametrize("targets", [["mlp.experts.down_proj", "mlp.experts.gate_up_proj"],
                                     ["mlp.experts.gate_up_proj"]], ids=["both", "gate-up-only"])
def test_fused_expert_loras_go_to_vllm_in_its_3d_layout(tmp_path, targets):
    """gpt-oss stores its experts fused (E, in, out); vLLM's GptOssForCausalLM (is_3d_moe_weight) reads
    peft's 3-D layout, taking base_layer as gate_up_proj and the outer pair as down_proj by name alone,
    with one alpha / r. peft wraps gate_up_proj first whatever the order of target_parameters, but with
    gate_up_proj alone its pair is the outer one, which vLLM would read as down_proj. The export names
    them as vLLM reads them, adds zeros for the missing one and folds the per-module scalings: a
    vLLM-shaped reader rebuilds every expert's ΔW of peft's merge."""
    from safetensors import safe_open

    build.build_model(build.gpt_oss_config(), tmp_path / "base", dtype=torch.float32)
    ad = build.build_adapter(tmp_path / "base", tmp_path / "lora", r=4, lora_alpha=8, use_rslora=True,
                             target_modules=["o_proj"], target_parameters=targets,
                             alpha_pattern={"layers.1.self_attn.o_proj": 3})
    with safe_open(str(ad / "adapter_model.safetensors"), "pt") as f:
        keys = {k: f.get_slice(k).get_shape() for k in f.keys() if ".layers.0.mlp.experts." in k}
    # peft's own names: base_layer is gate_up_proj (in: hidden 64), the outer down_proj (in: I = 48); alone,
    # gate_up_proj is the outer one (what the second case is about)
    inner = keys.get("base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight")
    outer = keys["base_model.model.model.layers.0.mlp.experts.lora_A.weight"]
    assert (inner and inner[-1], outer[-1]) == ((64, 48) if len(targets) == 2 else (None, 64))
    adaptkit.convert(ad, tmp_path / "vllm", to="vllm", base=tmp_path / "base")
    got, cfg = _vllm_3d_deltas(tmp_path / "vllm", experts=4)
    assert cfg["target_parameters"] == ["experts.gate_up_proj", "experts.down_proj"]
    adaptkit.convert(ad, tmp_path / "padded", to="vllm", base=tmp_path / "base", pad_rank=8)
    padded, cfg8 = _vllm_3d_deltas(tmp_path / "padded", experts=4)
    assert cfg8["r"] == 8 and all(torch.allclose(padded[k], got[k], atol=1e-7) for k in got)
    _, merged = peft_merged(tmp_path / "base", [ad])
    ref, plain = merged.state_dict(), build.load_model(tmp_path / "base").state_dict()
    for layer in (0, 1):
        for param in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{layer}.mlp.experts.{param}"
            want = (ref[name] - plain[name]).transpose(1, 2)  # stored (E, in, out); vLLM's w13/w2 are (out, in)
            assert got[name].shape == want.shape
            assert torch.allclose(got[name], want, atol=1e-6 * max(want.abs().max().item(), 1e-30))
            assert want.any() == (f"mlp.experts.{param}" in targets)  # gate-up-only: down present, zero
    o = ref["model.layers.1.self_attn.o_proj.weight"] - plain["model.layers.1.self_attn.o_proj.weight"]
    flat, _ = _vllm_deltas(tmp_path / "vllm")
    assert torch.allclose(flat["model.layers.1.self_attn.o_proj"], o, atol=1e-6 * o.abs().max().item())
    # and adaptkit reads its own export back: the merge from it equals the merge from peft's adapter
    back = adaptkit.merge(tmp_path / "base", [tmp_path / "vllm"], tmp_path / "m2", dtype="float32")
    assert back is not None
    from safetensors.torch import load_file

    m2 = load_file(tmp_path / "m2" / "model.safetensors")
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        assert torch.allclose(m2[name], ref[name], atol=1e-6 * ref[name].abs().max().item())


def test_vllm_export_refuses_fused_experts_of_unchecked_classes(runner, tmp_path, monkeypatch):
    """Fused on-disk experts of a model whose vLLM class was not read (here: gpt-oss with the list of
    read classes emptied) are refused in one line, not written in a layout vLLM may read otherwise."""
    from adaptkit.formats import vllm

    monkeypatch.setattr(vllm, "VLLM_3D", set())
    res = invoke(runner, "convert", FAMILY_ADAPTERS["gpt-oss-experts"], "--to", "vllm", "--base",
                 FAMILY_BASE_OF["gpt-oss-experts"], "-o", tmp_path / "v")
    assert_one_line_error(res, "GptOssForCausalLM", "stores these experts fused")
    assert not (tmp_path / "v").exists()


def test_vllm_export_refuses_routers(runner, tmp_path):
    """A router's LoRA (a 2-D parameter) is not something adaptkit checked vLLM or mlx-lm load:
    refused in one line, nothing written."""
    build.build_model(build.qwen2_moe_config(), tmp_path / "base", dtype=torch.float32)
    ad = build.build_adapter(tmp_path / "base", tmp_path / "lora", r=2, lora_alpha=4, target_modules=["q_proj"],
                             target_parameters=["mlp.gate.weight", "mlp.experts.down_proj"])
    res = invoke(runner, "convert", ad, "--to", "vllm", "--base", tmp_path / "base", "-o", tmp_path / "v")
    assert_one_line_error(res, "router")
    assert not (tmp_path / "v").exists()
    res = invoke(runner, "convert", ad, "--to", "mlx", "--base", tmp_path / "base", "-o", tmp_path / "m")
    assert_one_line_error(res, "router")
    assert not (tmp_path / "m").exists()
    # one rule names the router for the runtimes that were not checked with one; llama.cpp applies it
    rules = {c.target: sorted(p.rule for p in c.problems) for c in adaptkit.inspect(ad, checks=["vllm", "mlx",
                                                                                             "llamacpp"]).checks}
    assert rules == {"vllm": ["routers", "target_parameters"], "mlx": ["routers", "target_parameters"],
                     "llamacpp": []}


def test_per_expert_linear_loras_go_to_vllm_complete_and_at_one_rank(tmp_path):
    """A transformers-4 era Mixtral LoRA on some experts' w2 only, at two ranks: vLLM's Mixtral stacks
    w1, w2, w3 of every expert (pack_moe), so inspect --check vllm flags it and the export fills zero
    pairs from the base and pads the ranks: a vLLM-shaped reader gets each expert's own ΔW back."""
    import json

    from safetensors.torch import save_file

    build.build_model(build.mixtral_config(), tmp_path / "base", dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    tensors, ranks = {}, {}
    for e, r in ((0, 4), (2, 2)):  # experts 1 and 3 without a LoRA
        p = f"base_model.model.model.layers.1.block_sparse_moe.experts.{e}.w2"
        if r != 4:
            ranks[p.removeprefix("base_model.model.")] = r
        tensors[p + ".lora_A.weight"] = torch.randn(r, 48, generator=gen)
        tensors[p + ".lora_B.weight"] = torch.randn(64, r, generator=gen)
    ad = tmp_path / "ad"
    ad.mkdir()
    save_file(tensors, ad / "adapter_model.safetensors")
    (ad / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": ranks, "target_modules": ["w2"],
        "use_rslora": True, "peft_version": "0.13.2"}))
    check = adaptkit.inspect(ad, checks=["vllm"]).checks[0]
    problem = next(p for p in check.problems if p.rule == "moe_experts")
    assert "experts.1.w2" in problem.detail and "--to vllm --base BASE" in problem.fix
    adaptkit.convert(ad, tmp_path / "v", to="vllm", base=tmp_path / "base")
    got, out = _vllm_deltas(tmp_path / "v")
    stem = "model.layers.1.block_sparse_moe.experts."
    assert set(got) == {f"{stem}{e}.{w}" for e in range(4) for w in ("w1", "w2", "w3")}
    assert {t.shape[0] for k, t in out.items() if k.endswith("lora_A.weight")} == {4}
    for e in range(4):
        key = f"base_model.model.{stem}{e}.w2"
        if key + ".lora_A.weight" in tensors:
            a, b = tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"]
            want = 8 / a.shape[0] ** 0.5 * b @ a  # rsLoRA, each expert its own r
            assert torch.allclose(got[f"{stem}{e}.w2"], want, atol=1e-5 * want.abs().max().item()), e
        else:
            assert not got[f"{stem}{e}.w2"].any()
        assert not got[f"{stem}{e}.w1"].any() and not got[f"{stem}{e}.w3"].any()
    res = adaptkit.inspect(tmp_path / "v", checks=["vllm"]).checks[0]
    assert res.ok, res.problems


def test_a_base_config_transformers_cannot_build_says_so_when_names_do_not_fit(runner, tmp_path):
    """Sarvam-MoE's q/k/v exist only through transformers' conversion of query_key_value: with a config.json
    transformers cannot build (num_key_value_heads "two"), the one-line refusal says no renames were tried,
    instead of only asking whether the adapter was trained on another model."""
    import json

    build.build_model(build.sarvam_moe_config(), tmp_path / "base", dtype=torch.float32)
    ad = build.build_adapter(tmp_path / "base", tmp_path / "lora", r=2, lora_alpha=4, target_modules=["q_proj"])
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    cfg["num_key_value_heads"] = "two"
    (tmp_path / "base" / "config.json").write_text(json.dumps(cfg))
    res = invoke(runner, "merge", tmp_path / "base", ad, "-o", tmp_path / "m")
    assert_one_line_error(res, "transformers cannot build a model from the base's config.json")
    assert not (tmp_path / "m").exists()
