"""A PEFT folder every vLLM loads exactly.

vLLM's ``PEFTHelper`` (``vllm/lora/peft_helper.py``) reads only ``r``, ``lora_alpha`` and
``use_rslora`` from adapter_config.json and applies one scaling, lora_alpha / r (or / √r), to every
module: ``rank_pattern`` and ``alpha_pattern`` are ignored, so an adapter with per-module ranks or
alphas is scaled wrongly there. This writer folds each module's own scaling sₘ into its lora_B
(B' = sₘ·B, :func:`adaptkit.lora.fold`) and writes ``lora_alpha`` = ``r``, so the one scaling vLLM
applies is 1 and every module computes its own ΔW. ``pad_rank`` zero-pads every module to one rank
(exact: zero rows of A, zero columns of B add nothing). What vLLM cannot load at all
(modules_to_save, DoRA, LoRA biases, trainable tokens, aLoRA) is refused with the reason
(:mod:`adaptkit.readiness`).

MoE experts: vLLM's model classes for checkpoints that store experts apart (``is_3d_moe_weight``
False: Qwen2/3-MoE, Mixtral, OLMoE, DeepSeek…) read expert LoRAs as one 2-D pair per expert and
projection, ``….experts.{e}.{gate_proj,up_proj,down_proj}.lora_{A,B}.weight``, every projection of
every expert present (``vllm/lora/lora_model.py``, ``PackedLoRALayerWeights.pack_moe``). A peft 0.21
LoRA on transformers 5's fused expert parameters (``experts.gate_up_proj``: rows of every expert's
ΔW) is written that way from the base's own checkpoint: each expert's A, its B's rows for gate and
for up, zero pairs for a projection without a LoRA, every expert at the adapter's largest rank
(exact).

vLLM's classes for checkpoints that store experts fused (``is_3d_moe_weight`` True: gpt-oss,
Qwen3-VL-MoE, Qwen3.5-MoE, InternS1-Pro, GLM-4-MoE-Lite: :data:`VLLM_3D`) read peft's own 3-D layout
(``vllm/lora/model_manager.py`` ``_stack_moe_lora_weights``): per MoE layer ``….experts.base_layer.lora_{A,B}``
is gate_up_proj and ``….experts.lora_{A,B}`` down_proj, A (E·r, in) reshaped (E, r, in), B (out, r·E)
reshaped (out, r, E): peft's ParamWrapper order (:func:`adaptkit.lora.expert_factors`), B's rows in the
checkpoint's order (gpt-oss interleaves gate and up, the others concatenate; vLLM keeps each so). vLLM
asserts both are present, takes which is which from the name alone (peft names the first of
``target_parameters`` ``base_layer``: listed the other way round, down_proj's factors would be copied
into gate_up's buffers, silently where the shapes fit) and scales both by the one lora_alpha / r. The
writer puts gate_up_proj under ``base_layer`` whatever the adapter's order, folds each module's scaling
into B, fills a missing one of the two with zeros, and checks the factors' (out, in) against the
base's hidden size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import lora
from ..adapter import PEFT_PREFIX, Adapter
from ..errors import AdaptkitError
from ..readiness import PER_EXPERT, check, missing_expert_pair

# what this writer makes right; everything else is refused
FIXED_BY_EXPORT = {"scaling", "max_lora_rank", "target_parameters", "moe_experts"}
# vLLM model classes with is_3d_moe_weight = True (vllm/model_executor/models/{gpt_oss,qwen3_vl_moe,qwen3_5,
# interns1_pro,glm4_moe_lite}.py): they read expert LoRAs in peft's 3-D layout
VLLM_3D = {"GptOssForCausalLM", "Qwen3VLMoeForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration",
           "InternS1ProForConditionalGeneration", "Glm4MoeLiteForCausalLM"}
# the fused expert parameters vLLM's 3-D layout holds, in peft's wrapping order (the first is base_layer)
FUSED_3D = ("gate_up_proj", "down_proj")


def _fused_experts(adapter: Adapter, base, path) -> dict[str, dict[str, tuple]]:
    """LoRAs on expert parameters the base stores fused (3-D on disk), as vLLM's 3-D layout holds them:
    MoE module -> {parameter: (A (E·r, in), sₘ·B (out, r·E))}, both of :data:`FUSED_3D` present (zeros
    at the other's rank for a missing one)."""
    from ..architecture import named_class
    from .gguf import text_config

    fused = [m for m in adapter.modules.values() if m.param and m.experts > 1 and base is not None
             and m.weight_name in base.tensors]
    if not fused:
        return {}
    arch = named_class(base.config)
    if arch not in VLLM_3D:
        raise AdaptkitError(f"{fused[0].name}: the base ({arch or 'no architectures'}) stores these experts fused, "
                            f"and adaptkit knows vLLM's 3-D expert LoRA layout only for {', '.join(sorted(VLLM_3D))}: "
                            "merge instead", path)
    hidden = text_config(base.config).get("hidden_size")
    out: dict[str, dict[str, tuple]] = {}
    for m in fused:
        module, _, param = m.name.rpartition(".")
        if param not in FUSED_3D:
            raise AdaptkitError(f"{m.name}: vLLM's 3-D expert layout holds {' and '.join(FUSED_3D)} only", path)
        # vLLM's w13 is (2I, H) and w2 (H, I) per expert: hidden is gate_up's input and down's output
        side = m.in_features if param == "gate_up_proj" else m.out_features
        if side != hidden:
            raise AdaptkitError(f"{m.name}: its LoRA is ({m.out_features}, {m.in_features}) per expert, which is not "
                                f"vLLM's (out, in) for {param} with hidden size {hidden}: merge instead", path)
        out.setdefault(module, {})[param] = (m.A.to(torch.float32), lora.fold(m.B.to(torch.float32), m.scaling, 1.0),
                                             m.experts)
    for module, params in out.items():
        a, b, e = next(params[p] for p in FUSED_3D if p in params)
        for p in FUSED_3D:
            if p in params:
                continue
            shape = base.info(f"{module}.{p}").shape  # (E, d1, d2): one of d1, d2 is hidden, stored either way
            other = shape[1] + shape[2] - hidden
            in_f, out_f = (hidden, other) if p == "gate_up_proj" else (other, hidden)
            r = a.shape[0] // e
            params[p] = (torch.zeros(e * r, in_f), torch.zeros(out_f, r * e), e)
    return out


def _expert_pairs(adapter: Adapter, base, path) -> tuple[dict[str, tuple], dict[str, tuple[int, int]]]:
    """Each expert LoRA as per-expert pairs (A_e, s·B_e) by on-disk module name, and the (out, in) of
    every per-expert projection of the layers they touch (to fill the ones without a LoRA)."""
    from .gguf import per_expert_pairs

    if base is None and any(m.kind == "param" or m.param for m in adapter.modules.values()):
        raise AdaptkitError("LoRAs on parameters (MoE experts) need the base model for vLLM (its expert tensors): "
                            "give base", path)
    pairs: dict[str, tuple] = {}
    stems = set()
    for m in adapter.modules.values():
        if not (m.param and m.experts > 1) or base is not None and m.weight_name in base.tensors:
            continue  # (fused on disk: _fused_experts)
        if base is None:
            raise AdaptkitError("LoRAs on MoE experts need the base model for vLLM (its per-expert tensor names): "
                                "give base", path)
        for disk, _, a_e, sb_e in per_expert_pairs(m, base, "vLLM", base.path):  # (errors about its layout)
            pairs[disk] = (a_e, sb_e)
            stems.add(PER_EXPERT.match(disk + ".weight")["stem"])
    # per-expert nn.Linear LoRAs (transformers-4 era: experts.N.w1…) are such pairs already
    for m in adapter.modules.values():
        hit = PER_EXPERT.match(m.name + ".weight") if m.kind == "linear" and not m.param else None
        if hit:
            pairs[m.name] = (m.A.to(torch.float32), m.scaling * m.B.to(torch.float32))
            stems.add(hit["stem"])
    shapes = {}
    if base is not None:
        for name in base.tensors if stems else ():
            hit = PER_EXPERT.match(name)
            if hit and hit["stem"] in stems:
                shapes[name.removesuffix(".weight")] = tuple(base.info(name).shape)
    else:  # without the base, only an adapter holding every expert's every projection is complete
        shapes = {name: (b.shape[0], a.shape[1]) for name, (a, b) in pairs.items()}
        gap = missing_expert_pair(shapes)
        if gap:
            raise AdaptkitError(f"{gap}: vLLM needs a LoRA pair for every expert and projection; give base to fill "
                                "the missing ones with zeros", path)
    return pairs, shapes


def write(adapter: Adapter, out: Path, *, pad_rank: int | None = None, dtype: torch.dtype | None = None, base=None,
          **_) -> dict:
    """``adapter_config.json`` + ``adapter_model.safetensors`` with one scaling (1) for vLLM; ``base``
    (a :class:`~adaptkit.io.checkpoint.Checkpoint`) lays out LoRAs on MoE expert parameters."""
    from safetensors.torch import save_file

    problems = [p for p in check(adapter, "vllm").problems if p.rule not in FIXED_BY_EXPORT]
    if problems:
        p = problems[0]
        raise AdaptkitError(f"vLLM cannot take this adapter: {p.rule}: {p.detail} (fix: {p.fix})", adapter.path)
    experts, shapes = _expert_pairs(adapter, base, adapter.path)
    fused = _fused_experts(adapter, base, adapter.path)
    mods = [m for m in adapter.modules.values() if not (m.param and m.experts > 1) and m.name not in experts]
    if any(m.kind != "linear" or m.fan_in_fan_out for m in mods):
        odd = next(m.name for m in mods if m.kind != "linear" or m.fan_in_fan_out)
        raise AdaptkitError(f"{odd}: only nn.Linear LoRAs are written for vLLM (embedding and Conv1D LoRAs are not)",
                            adapter.path)
    top = max([m.shape_rank for m in mods] + [a.shape[0] for a, _ in experts.values()]
              + [a.shape[0] // e for params in fused.values() for a, _, e in params.values()])
    rank = pad_rank if pad_rank is not None else top
    if rank < top:
        raise AdaptkitError(f"pad_rank {pad_rank} is below the adapter's largest rank {top}", param="pad_rank")
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    tensors = {}

    def put(name: str, a: torch.Tensor, b: torch.Tensor, pad: int) -> None:
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = cast(torch.nn.functional.pad(a, (0, 0, 0, pad))).contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = cast(torch.nn.functional.pad(b, (0, pad))).contiguous()

    for m in mods:
        put(m.name, m.A.to(torch.float32), lora.fold(m.B.to(torch.float32), m.scaling, 1.0),
            (rank - m.shape_rank) if pad_rank is not None else 0)
    for name, (out_f, in_f) in sorted(shapes.items()):  # every expert and projection, at one rank (vLLM stacks them)
        a, b = experts.get(name, (torch.zeros(0, in_f), torch.zeros(out_f, 0)))
        put(name, a, b, rank - a.shape[0])
    for module, params in sorted(fused.items()):  # peft's 3-D layout: gate_up_proj is the inner wrapper
        for param, where in zip(FUSED_3D, (f"{module}.base_layer", module)):
            a, b, e = params[param]
            a3, b3 = lora.expert_factors(a, b, e)
            pad = (rank - a3.shape[1]) if pad_rank is not None else 0
            a3, b3 = torch.nn.functional.pad(a3, (0, 0, 0, pad)), torch.nn.functional.pad(b3, (0, 0, 0, pad))
            put(where, *lora.pack_experts(a3, b3), 0)

    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "r": rank, "lora_alpha": rank, "use_rslora": False, "rank_pattern": {},
        "alpha_pattern": {}, "target_modules": sorted({m.name.rsplit(".", 1)[-1] for m in mods if not m.param}
                                                       | {n.rsplit(".", 1)[-1] for n in shapes}), "use_dora": False,
        **({"target_parameters": [f"experts.{p}" for p in FUSED_3D],  # peft ≥ 0.21's layout (read back so)
            "peft_version": adapter.config.get("peft_version")} if fused else {}),
        "lora_bias": False, "fan_in_fan_out": False, "modules_to_save": None, "bias": "none", "lora_dropout": 0.0,
        "init_lora_weights": True, "inference_mode": True, "task_type": adapter.config.get("task_type") or "CAUSAL_LM",
        "base_model_name_or_path": adapter.config.get("base_model_name_or_path"),
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config
