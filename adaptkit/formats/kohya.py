"""kohya / sd-scripts LoRA files: ``<prefix><module path, '.' → '_'>.lora_down.weight`` (r × in),
``.lora_up.weight`` (out × r) and a 0-dim ``.alpha``; scale = alpha / r (alpha missing or 0 means r).

Underscores cannot be turned back into dots without knowing the model's names. adaptkit's own
kohya files carry the exact module names in their metadata (``adaptkit.modules``); for other files
the names come from the base model (its checkpoint's tensor names), or else from a heuristic that
knows the usual transformer module names and refuses what it cannot resolve.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import lora
from ..adapter import Adapter, build_adapter
from ..errors import AdaptkitError
from .sources import DictSource, open_source

PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_te_", "lora_")
DEFAULT_PREFIX = "lora_te_"
MODULES_KEY = "adaptkit.modules"
PREFIX_KEY = "adaptkit.prefix"

# Names of module path components, longest first when they contain underscores.
KNOWN_PARTS = sorted({
    "model", "layers", "layer", "self_attn", "attn", "attention", "mlp", "q_proj", "k_proj", "v_proj", "o_proj",
    "qkv_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj", "embed_tokens", "lm_head", "transformer", "h",
    "c_attn", "c_proj", "c_fc", "wte", "wpe", "decoder", "encoder", "block", "blocks", "query_key_value", "dense",
    "dense_h_to_4h", "dense_4h_to_h", "fc1", "fc2", "out_proj", "query", "key", "value", "output", "intermediate",
    "self", "word_embeddings", "embeddings", "gpt_neox", "embed_in", "embed_out", "language_model", "text_model",
    "cross_attn", "w1", "w2", "w3", "wq", "wk", "wv", "wo", "feed_forward", "experts", "shared_expert", "router",
    "linear", "proj", "to_q", "to_k", "to_v", "to_out", "ff", "net", "proj_in", "proj_out", "attn1", "attn2",
    "transformer_blocks", "down_blocks", "up_blocks", "mid_block", "attentions", "resnets",
}, key=lambda s: -s.count("_"))


def is_kohya(keys) -> bool:
    return any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys)


def _strip_prefix(key: str) -> tuple[str, str]:
    for p in PREFIXES:
        if key.startswith(p):
            return p, key[len(p):]
    return "", key


def heuristic_module_name(flat: str) -> str | None:
    """'model_layers_0_self_attn_q_proj' -> 'model.layers.0.self_attn.q_proj', or None if unsure."""
    tokens = flat.split("_")
    parts, i = [], 0
    while i < len(tokens):
        if tokens[i].isdigit():
            parts.append(tokens[i])
            i += 1
            continue
        for j in range(len(tokens), i, -1):
            cand = "_".join(tokens[i:j])
            if cand in KNOWN_PARTS:
                parts.append(cand)
                i = j
                break
        else:
            return None
    return ".".join(parts)


def base_name_map(base_names) -> dict[str, str]:
    """flattened ('.' → '_') module name -> module name, from a base checkpoint's tensor names."""
    out: dict[str, str] = {}
    for name in base_names:
        if name.endswith(".weight"):
            mod = name[: -len(".weight")]
            out.setdefault(mod.replace(".", "_"), mod)
    return out


def _metadata_json(metadata: dict, key: str, path: Path) -> dict:
    """A JSON object adaptkit keeps in the file's metadata (empty when absent)."""
    if key not in metadata:
        return {}
    try:
        value = json.loads(metadata[key])
    except ValueError as e:
        raise AdaptkitError(f"malformed {key} in the file's metadata: {e}", path) from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise AdaptkitError(f"malformed {key} in the file's metadata: not a JSON object", path)
    return value


def read(path: Path, base_names=None) -> Adapter:
    """A kohya-style file; ``base_names`` (a base checkpoint's tensor names) map names back to modules."""
    source = open_source(path)
    keys = source.keys()
    metadata = getattr(source, "metadata", {}) or {}
    if any(k.endswith(".dora_scale") for k in keys):
        raise AdaptkitError("kohya file with DoRA (dora_scale): not supported; only plain LoRA converts exactly", path)
    exact = _metadata_json(metadata, MODULES_KEY, path)
    by_base = base_name_map(base_names) if base_names is not None else None
    groups: dict[str, dict[str, str]] = {}
    for key in keys:
        for suffix, role in ((".lora_down.weight", "A"), (".lora_up.weight", "B"), (".alpha", "alpha")):
            if key.endswith(suffix):
                groups.setdefault(key[: -len(suffix)], {})[role] = key
                break
        else:
            raise AdaptkitError(f"unexpected tensor {key!r} in a kohya LoRA file", path)
    tensors: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    unresolved = []
    for stem, roles in groups.items():
        if "A" not in roles or "B" not in roles:
            raise AdaptkitError(f"{stem}: lora_down and lora_up must both be present", path)
        _, flat = _strip_prefix(stem)
        name = exact.get(stem)
        if name is None and by_base is not None:
            name = by_base.get(flat)
        if name is None and by_base is None:
            name = heuristic_module_name(flat)
        if name is None:
            unresolved.append(stem)
            continue
        a, b = source.get(roles["A"]), source.get(roles["B"])
        if a.dim() != 2 or b.dim() != 2:
            raise AdaptkitError(f"{stem}: only Linear LoRA converts (got a {a.dim()}-d lora_down)", path)
        tensors[f"{name}.lora_A.weight"] = a
        tensors[f"{name}.lora_B.weight"] = b
        rank = a.shape[0]
        alpha = 0.0
        if "alpha" in roles:
            alpha_t = source.get(roles["alpha"])
            if alpha_t.numel() != 1:
                raise AdaptkitError(f"{stem}: alpha must be a single number, got shape {list(alpha_t.shape)}", path)
            alpha = float(alpha_t.reshape(()).item())
        alphas[name] = alpha if alpha else float(rank)
    if unresolved:
        hint = "give {param}, the model it was trained on" if by_base is None else "these are not in {param}"
        raise AdaptkitError(f"cannot map {len(unresolved)} kohya names back to module names (first: "
                            f"{unresolved[0]}): {hint}", path, param="base")
    config = _metadata_json(metadata, "adapter_config", path)
    adapter = build_adapter(path, path, {}, DictSource(path, tensors), fmt="kohya", infer_alpha=alphas)
    adapter.config = {k: v for k, v in config.items()
                      if k in ("base_model_name_or_path", "task_type", "fan_in_fan_out", "bias")}
    adapter.config.setdefault("peft_type", "LORA")
    if config.get("fan_in_fan_out"):
        for m in adapter.modules.values():
            m.fan_in_fan_out = True
    return adapter


def kohya_tensors(adapter: Adapter, prefix: str = DEFAULT_PREFIX, dtype=None):
    """The tensors and metadata of a kohya file holding exactly ``adapter``'s ΔW."""
    if adapter.use_dora:
        raise AdaptkitError("DoRA adapters cannot be written as kohya files (no magnitude vector there)", adapter.path)
    if adapter.full_tensors:
        raise AdaptkitError(f"modules_to_save ({', '.join(sorted(adapter.full_tensors))}) cannot be written as a "
                            "kohya file", adapter.path)
    if adapter.token_rows or adapter.alora_tokens:
        what = "trainable tokens" if adapter.token_rows else "aLoRA invocation tokens"
        raise AdaptkitError(f"{what} cannot be written as a kohya file (it has no place for them)", adapter.path)
    tensors, names = {}, {}
    for m in adapter.modules.values():
        if m.kind != "linear" or m.param:
            what = "embedding LoRA" if m.kind == "embedding" else "a LoRA on a parameter (target_parameters, MoE experts)"
            raise AdaptkitError(f"{m.name}: {what} cannot be written as a kohya file", adapter.path)
        if m.bias_key:
            raise AdaptkitError(f"{m.name}: lora_bias cannot be written as a kohya file", adapter.path)
        stem = prefix + m.name.replace(".", "_")
        a, b = m.A, m.B
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        tensors[stem + ".lora_down.weight"] = a.contiguous()
        tensors[stem + ".lora_up.weight"] = b.contiguous()
        tensors[stem + ".alpha"] = lora.kohya_alpha(m.scaling, m.shape_rank)  # exact whatever rsLoRA or patterns
        names[stem] = m.name
    ranks = {m.shape_rank for m in adapter.modules.values()}
    alphas = {float(tensors[s + ".alpha"]) for s in names}
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": f"{alphas.pop():g}" if len(alphas) == 1 else "Dynamic",
        MODULES_KEY: json.dumps(names),
        PREFIX_KEY: prefix,
        "adapter_config": json.dumps({k: v for k, v in adapter.config.items()
                                      if k in ("base_model_name_or_path", "task_type", "fan_in_fan_out")}),
    }
    return tensors, metadata


def write(adapter: Adapter, path: Path, *, dtype=None, prefix: str | None = None, **_) -> None:
    """One kohya-style safetensors file (module names prefixed with ``prefix``, lora_te_ by default)."""
    from safetensors.torch import save_file

    tensors, metadata = kohya_tensors(adapter, prefix or DEFAULT_PREFIX, dtype)
    save_file(tensors, str(path), metadata=metadata)
