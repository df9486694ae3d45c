"""Will this adapter load where people serve models? Rules of vLLM, llama.cpp and mlx-lm.

Each check returns the problems found, each with the adaptkit command that fixes it. Where a rule
rests on a runtime's code, the file and version are named beside it.
- vLLM reads LoRAs on MoE experts as per-expert pairs for models storing experts apart, and as
  peft's 3-D pairs named by position (``experts.base_layer`` = gate_up_proj) for those storing them
  fused (``convert --to vllm --base BASE`` writes either); a router's LoRA is sent to the merge.
- vLLM silently drops a LoRA on multi-head latent attention's ``kv_b_proj`` (DeepSeek-V2/V3: its
  issue #48974), which is sent to the merge.
- vLLM rejects ``modules_to_save``, DoRA, ranks above ``max_lora_rank`` (16 by default; it accepts
  only :data:`VLLM_MAX_RANKS`), LoRA biases and modules outside the linear projections it knows;
  its ``PEFTHelper`` (vllm/lora/peft_helper.py) applies one scaling, lora_alpha / r, to every
  module, so per-module scalings (rank_pattern, alpha_pattern) need ``convert --to vllm``.
- llama.cpp (GGUF) takes Linear LoRA and a LoRA on the input embedding (``token_embd``: since PR
  #11131, llama.cpp ``src/llama-graph.cpp`` ``build_inp_embd`` adds scale · B · A[token], and
  ``src/llama-adapter.cpp`` checks its flipped shapes); no DoRA, no ``modules_to_save``, no
  biases (the base's architecture is checked by ``convert --to gguf``, which needs the base, as are
  the tensors an architecture's graph multiplies without a LoRA: formats/gguf.py ``UNAPPLIED``).
- mlx-lm takes Linear LoRA inside numbered layers (of the language model only, for its vision-language
  models, whose ``sanitize`` drops the vision tower), DoRA included (mlx-lm 0.32 ``tuner/dora.py``:
  ``convert --to mlx`` writes ``fine_tune_type: dora``); no ``modules_to_save`` or embedding LoRA;
  one rank for every module (``convert --to mlx`` pads to it); LoRAs on MoE experts on its stacked
  ``switch_mlp`` (``convert --to mlx --base BASE`` lays them out).
- Activated LoRA (aLoRA): llama-server serves it from a GGUF that carries the invocation tokens;
  vLLM and mlx-lm do not (:data:`ALORA_SUPPORT`, with the sources each verdict rests on).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from . import lora
from .adapter import Adapter
from .errors import AdaptkitError

TARGETS = {"vllm": "vLLM", "llamacpp": "llama.cpp", "mlx": "mlx-lm"}  # name -> the runtime, for messages
# Activated LoRA (peft's alora_invocation_tokens: the delta applies only from the invocation tokens on),
# per runtime, as their repositories stood (searched 2026-12-01):
ALORA_SUPPORT = {
    # ggml-org/llama.cpp PR #15327 (merged 2025-09): llama-adapter.cpp reads adapter.alora.invocation_tokens
    # (a UINT32 array) from the GGUF LoRA; tools/server activates the adapter after the sequence
    "llamacpp": "llama-server applies it from the invocation tokens on (llama.cpp PR #15327); other llama.cpp "
                "tools apply a LoRA to every token",
    # vllm-project/vllm PR #19710 ("[Model] Activated LoRA") was closed unmerged: vLLM would apply the
    # adapter to every token of the prompt
    "vllm": "vLLM does not implement activated LoRA (its PR #19710 was closed unmerged) and would apply it to "
            "every token",
    "mlx": "mlx-lm does not implement activated LoRA and would apply it to every token",
}
VLLM_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj",
                "gate_up_proj", "dense", "dense_h_to_4h", "dense_4h_to_h", "query_key_value", "c_attn", "c_proj",
                "c_fc", "fc1", "fc2", "out_proj", "w1", "w2", "w3", "wqkv", "wo", "embed_tokens", "lm_head",
                # multi-head latent attention (vllm/model_executor/models/deepseek_v2.py: q_a_proj and
                # kv_a_proj_with_mqa packed as fused_qkv_a_proj); kv_b_proj has its own rule below
                "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "fused_qkv_a_proj", "kv_b_proj",
                # gated delta nets (vllm/model_executor/models/qwen3_5.py at 00def4f: with LoRA enabled in_proj_qkv
                # and in_proj_z stay separate modules, in_proj_b and in_proj_a pack into in_proj_ba; qwen3_next.py
                # packs in_proj_qkvz and in_proj_ba as themselves)
                "in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "in_proj_qkvz", "in_proj_ba"}


VLLM_MAX_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's LoRAConfig.max_lora_rank choices


def vllm_rank(r: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds rank ``r``."""
    return next((v for v in VLLM_MAX_RANKS if v >= r), r)


PER_EXPERT = re.compile(r"^(?P<stem>.+\.experts)\.(?P<e>\d+)\.(?P<proj>[^.]+)\.weight$")  # a per-expert tensor


def missing_expert_pair(names) -> str | None:
    """The first (expert, projection) pair a full set of per-expert modules lacks, or None."""
    groups: dict[str, tuple[set, set, set]] = {}
    for name in names:
        hit = PER_EXPERT.match(name + ".weight")
        experts, projs, have = groups.setdefault(hit["stem"], (set(), set(), set()))
        experts.add(int(hit["e"]))
        projs.add(hit["proj"])
        have.add((int(hit["e"]), hit["proj"]))
    for stem, (experts, projs, have) in sorted(groups.items()):
        for e in range(max(experts) + 1):
            for proj in sorted(projs):
                if (e, proj) not in have:
                    return f"{stem}.{e}.{proj}"
    return None


@dataclass
class Problem:
    rule: str
    detail: str
    fix: str


@dataclass
class Readiness:
    target: str
    ok: bool
    problems: list[Problem] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def check(adapter: Adapter, target: str, max_lora_rank: int = 16) -> Readiness:
    """Whether ``adapter`` loads in the runtime ``target`` (one of :data:`TARGETS`), with each rule it breaks."""
    if target not in TARGETS:
        raise AdaptkitError(f"unknown runtime {target!r} (choose {', '.join(TARGETS)})", param="checks")
    problems: list[Problem] = []
    src = str(adapter.path)
    mods = list(adapter.modules.values())
    merge_fix = f"adaptkit merge BASE {src} -o MERGED  (serve the merged model)"
    if adapter.full_tensors:
        copies = [n for n in adapter.full_tensors if n.removesuffix(".weight") in adapter.modules]
        why = (f" ({len(copies)} beside their own LoRA: peft's save_embedding_layers copy, harmless if it equals the "
               "base's; --base BASE tells)") if copies else ""
        problems.append(Problem("modules_to_save", f"full tensors {', '.join(sorted(adapter.full_tensors))}{why}",
                                merge_fix))
    if adapter.use_dora and target != "mlx":
        dora = [m.name for m in mods if m.use_dora]
        problems.append(Problem("dora", f"{len(dora)} DoRA modules (first: {dora[0]})", merge_fix))
    biased = [m.name for m in mods if m.bias_key]
    if biased:
        problems.append(Problem("lora_bias", f"{len(biased)} modules with a LoRA bias (first: {biased[0]})", merge_fix))
    # llama.cpp applies a LoRA on a 3-D expert tensor expert by expert (llama.cpp in llama-cpp-python 0.3.36:
    # src/llama-graph.cpp llm_graph_context::build_lora_mm_id); the GGUF export lays the factors out
    # vLLM: models whose checkpoints keep experts apart (is_3d_moe_weight False) read expert LoRAs per expert
    # and projection (vllm/lora/lora_model.py, PackedLoRALayerWeights.pack_moe); is_3d_moe_weight True ones read
    # peft's 3-D pairs by position (vllm/lora/model_manager.py _stack_moe_lora_weights); convert --to vllm lays
    # out either
    # A router's LoRA (a 2-D parameter, m.experts == 1): llama.cpp applies it to ffn_gate_inp (build_lora_mm);
    # what vLLM (a replicated gate) and mlx-lm do with one differs per release and model and was not checked.
    routers = [m.name for m in mods if m.param and m.experts == 1 and target != "llamacpp"]
    if routers:
        problems.append(Problem("routers", f"{len(routers)} LoRAs on a router's weight (first: {routers[0]}), which "
                                "adaptkit has not checked this runtime loads", merge_fix))
    experts = [m.name for m in mods if (m.kind == "param" or m.param and m.experts > 1) and target != "llamacpp"]
    if experts:
        if target == "vllm":
            why, fix = ("vLLM reads them as per-expert pairs (experts.N.gate_proj…) for models storing experts apart, "
                        "and for fused ones by position (base_layer = gate_up_proj) with one scaling",
                        f"adaptkit convert {src} --to vllm --base BASE -o VLLM  (laid out from the base, exact; "
                        "it refuses a base storing experts fused outside vLLM's 3-D classes, Llama 4's among them: "
                        "merge those)")
        elif target == "mlx":
            why, fix = ("mlx-lm reads them on its stacked switch_mlp layers (Qwen-MoE, OLMoE, DeepSeek-V3, Mixtral)",
                        f"adaptkit convert {src} --to mlx --base BASE -o MLX  (laid out from the base, exact)")
        else:
            why, fix = "which adaptkit does not export for this runtime", merge_fix
        problems.append(Problem("target_parameters", f"{len(experts)} LoRAs on parameters (MoE experts; first: "
                                f"{experts[0]}): {why}", fix))
    if adapter.token_rows:
        ids = sum(len(ids) for ids, _ in adapter.token_rows.values())
        problems.append(Problem("trainable_tokens", f"{ids} trainable token rows on {', '.join(adapter.token_rows)}",
                                merge_fix))
    if adapter.mutated_init:
        init = adapter.config.get("init_lora_weights")
        problems.append(Problem("init_lora_weights", f"init_lora_weights={init!r}: on the original base it computes "
                                "something else than it was trained to", f"adaptkit convert {src} --initial "
                                "INITIAL_ADAPTER --to peft -o PLAIN  (the plain LoRA of the same change)"))
    if adapter.alora_tokens and target != "llamacpp":  # llama.cpp: see ALORA_SUPPORT; the GGUF export carries them
        problems.append(Problem("alora", f"aLoRA (invocation tokens {adapter.alora_tokens}): {ALORA_SUPPORT[target]}",
                                f"serve it with peft or llama-server (adaptkit convert {src} --to gguf --base BASE "
                                "-o A.gguf); an aLoRA cannot be merged"))
    if target == "vllm":
        high = [m for m in mods if m.shape_rank > max_lora_rank]
        if high:
            worst = max(high, key=lambda m: m.shape_rank)
            problems.append(Problem(
                "max_lora_rank", f"{len(high)} modules above rank {max_lora_rank} (up to {worst.shape_rank} in "
                f"{worst.name})", f"adaptkit combine {src} --method linear --rank {max_lora_rank} -o REDUCED  "
                f"(best rank-{max_lora_rank} approximation, energy kept is reported), or start vLLM with "
                f"--max-lora-rank {vllm_rank(max(m.shape_rank for m in high))}"))
        own = lora.scaling(adapter.lora_alpha, adapter.r, adapter.use_rslora)  # what PEFTHelper applies
        off = [m for m in mods if m.kind == "linear" and not m.param and abs(m.scaling - own) > 1e-12 * abs(own)]
        if off:
            problems.append(Problem(
                "scaling", f"vLLM applies one scaling, lora_alpha / r = {own:g}, to every module (its PEFTHelper "
                f"reads r, lora_alpha and use_rslora only); {len(off)} modules have another (first: {off[0].name}, "
                f"{off[0].scaling:g})", f"adaptkit convert {src} --to vllm -o VLLM  (each module's scaling folded "
                "into its lora_B, exact)"))
        per_expert = [m for m in mods if m.kind == "linear" and not m.param and PER_EXPERT.match(m.name + ".weight")]
        if per_expert:  # vLLM stacks them per projection (PackedLoRALayerWeights.pack_moe): all there, one rank
            gap = missing_expert_pair([m.name for m in per_expert])
            if gap or len({m.shape_rank for m in per_expert}) > 1:
                what = f"no LoRA on {gap}" if gap else "their ranks differ"
                problems.append(Problem("moe_experts", f"{len(per_expert)} per-expert LoRAs, {what}: vLLM stacks one "
                                        "pair per expert and projection, all present, at one rank",
                                        f"adaptkit convert {src} --to vllm --base BASE -o VLLM  (zero pairs and "
                                        "padding, exact)"))
        # Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2, GLM-4-MoE-Lite): vLLM wraps kv_b_proj but never
        # calls the wrapper, decode using the weight split into W_UK/W_UV at load and prefill a reference taken
        # before wrapping (vllm-project/vllm issue #48974, open; fix PR #56718 open, both as of 2026-12)
        latent = [m.name for m in mods if m.name.endswith(".kv_b_proj")]
        if latent:
            problems.append(Problem("mla_kv_b_proj", f"{len(latent)} LoRAs on kv_b_proj (first: {latent[0]}), which "
                                    "vLLM loads and applies nowhere (its MLA attention bypasses the module: issue "
                                    "#48974)", merge_fix))
        odd = sorted({m.name.rsplit(".", 1)[-1] for m in mods if not m.param and m.kind != "param"} - VLLM_MODULES)
        if odd:
            problems.append(Problem("target_modules", f"modules vLLM does not adapt: {', '.join(odd)}", merge_fix))
    else:
        emb = [m.name for m in mods if m.kind == "embedding"
               and not (target == "llamacpp" and m.name.endswith("embed_tokens"))]
        if emb:
            problems.append(Problem("embedding", f"embedding LoRA on {', '.join(emb)}", merge_fix))
        if target == "mlx":
            outside = [m.name for m in mods if not re.search(r"\.layers\.\d+\.", m.name)]
            if outside:
                problems.append(Problem("layers", f"modules outside numbered layers: {', '.join(outside[:3])}",
                                        merge_fix))
            # a vision-language model's: mlx-lm's VLM classes load the language model alone (their sanitize drops
            # the vision tower), so an adapter tensor elsewhere is refused on load ("not an adapter parameter")
            if any("language_model." in m.name for m in mods):
                tower = [m.name for m in mods if "language_model." not in m.name]
                if tower:
                    problems.append(Problem("vision_tower", f"modules outside the language model, which is all "
                                            f"mlx-lm loads of a vision-language model: {', '.join(tower[:3])}",
                                            merge_fix))
        # llama.cpp: gpt2.py transposes Conv1D weights to (out, in), the orientation of peft's B·A there, and the
        # GGUF export runs in llama.cpp (tests/test_llama_cpp.py gpt2); mlx-lm's GPT-2 not checked
        if target != "llamacpp" and any(m.fan_in_fan_out for m in mods):
            problems.append(Problem("conv1d", "Conv1D (GPT-2 family) modules", merge_fix))
    return Readiness(target, not problems, problems)


def require(adapter: Adapter, target: str) -> None:
    """Raise the first reason ``target`` cannot take the adapter, with its fix (the exports' guard)."""
    result = check(adapter, target)
    if not result.ok:
        p = result.problems[0]
        raise AdaptkitError(f"{TARGETS[target]} cannot take this adapter: {p.rule}: {p.detail} (fix: {p.fix})",
                            adapter.path)
