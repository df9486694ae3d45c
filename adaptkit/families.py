"""Projections that some checkpoints fuse into one weight and others keep apart.

Phi-3 stores attention's q, k and v as one ``qkv_proj`` (rows q, then k, then v) and the MLP's gate
and up as one ``gate_up_proj`` (rows gate, then up); the same model "llama-fied" (as Unsloth and
others ship it) keeps ``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj`` and ``up_proj`` apart. A
LoRA trained on either layout merges exactly into the other, because everything a LoRA does is
row-wise in the output dimension: a split module's ΔW = s·B·A lands on its rows of the fused weight,
and a fused module's ΔW gives each split weight its rows (B's rows, A whole); DoRA's per-row norms
and ``lora_bias`` split the same way.

A new family with fused projections is one entry of :data:`FUSED`: the fused module, its parts in
row order, and their row counts from the config. Layouts that interleave the parts (GPT-NeoX's and
Falcon's ``query_key_value``, head by head) are not rows windows and are not described here: their
LoRAs are refused, not guessed.
"""

from __future__ import annotations

from typing import Callable


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _qkv_rows(config: dict) -> list[int]:
    kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    return [config["num_attention_heads"] * _head_dim(config), kv * _head_dim(config), kv * _head_dim(config)]


def _gate_up_rows(config: dict) -> list[int]:
    return [config["intermediate_size"]] * 2


# model_type -> {fused module suffix: (its parts' suffixes in row order, their row counts from config.json)}
FUSED: dict[str, dict[str, tuple[tuple[str, ...], Callable[[dict], list[int]]]]] = {
    "phi3": {
        "self_attn.qkv_proj": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), _qkv_rows),
        "mlp.gate_up_proj": (("mlp.gate_proj", "mlp.up_proj"), _gate_up_rows),
    },
}


def fused_parent(config: dict, module: str) -> tuple[str, tuple[int, int]] | None:
    """For a split module (``…self_attn.k_proj``) of a base whose family fuses it: the fused module
    and the rows (start, stop) its part holds, from the base's config; else None."""
    for fused, (parts, rows_of) in FUSED.get(config.get("model_type"), {}).items():
        for i, part in enumerate(parts):
            if module.endswith("." + part):
                try:
                    rows = rows_of(config)
                except (KeyError, TypeError, ZeroDivisionError):
                    return None
                start = sum(rows[:i])
                return module[: -len(part)] + fused, (start, start + rows[i])
    return None


def split_parts(module: str, rows_of: Callable[[str], int | None]) -> list[tuple[str, tuple[int, int]]] | None:
    """For a fused module (``…self_attn.qkv_proj``) on a base that keeps its parts apart: each part's
    module and the rows (start, stop) of the fused ΔW it takes, in order, sized by the base's own
    weights (``rows_of(module)``: a part's row count, None when the base lacks it); else None.

    Every family that fuses a module of this name must agree on its parts, or none is chosen."""
    layouts = {parts for table in FUSED.values() for fused, (parts, _) in table.items() if module.endswith("." + fused)}
    if len(layouts) != 1:
        return None
    parts = layouts.pop()
    fused = next(f for table in FUSED.values() for f, (p, _) in table.items() if p == parts and module.endswith("." + f))
    prefix = module[: -len(fused)]
    rows = [rows_of(prefix + part) for part in parts]
    if any(n is None for n in rows):
        return None
    out, start = [], 0
    for part, n in zip(parts, rows):
        out.append((prefix + part, (start, start + n)))
        start += n
    return out


def place(config: dict, module, shape_of: Callable[[str], tuple | None]) -> list[tuple] | str | None:
    """Where a LoRA on ``module`` (a LoraModule, (out, in)) lands on a base that stores it fused with
    others or apart (``config``: the base's config.json; ``shape_of(name)``: the shape of the base's
    ``name.weight``, None when absent): [(base module, rows of ΔW it takes or None, its rows ΔW lands
    on or None)], a problem when it does not fit, or None when no layout of :data:`FUSED` applies."""
    out, inp = module.out_features, module.in_features
    parent = fused_parent(config, module.name)
    if parent is not None and shape_of(parent[0]) is not None:
        fused, (start, stop) = parent
        shape = tuple(shape_of(fused))
        if len(shape) != 2 or shape[1] != inp or stop > shape[0] or stop - start != out:
            return f"{module.name} ({out}×{inp}) does not fit rows {start}:{stop} of the base's fused {fused}.weight " \
                   f"{list(shape)}"
        return [(fused, None, (start, stop))]

    def rows_of(name):
        shape = shape_of(name)
        return shape[0] if shape is not None and len(shape) == 2 and shape[1] == inp else None

    parts = split_parts(module.name, rows_of)
    if parts is None:
        return None
    if parts[-1][1][1] != out:
        return f"{module.name} gives {out} rows, the base's {', '.join(p for p, _ in parts)} hold {parts[-1][1][1]}"
    return [(part, rows, None) for part, rows in parts]


def relayout(adapter, config: dict, shape_of: Callable[[str], tuple | None]):
    """``adapter`` with its projections laid out as a base stores them (``config``: its config.json;
    ``shape_of(module)``: the shape of its weight, None when absent, as :func:`place`): split LoRAs on a
    fused base become one LoRA per fused module (:func:`adaptkit.lora.stack_rows`, block-diagonal,
    rank Σrᵢ), a fused LoRA on a split base one LoRA per part (B's rows of that part, A and the scale
    unchanged). Every ΔW is kept exactly (the scales go into B, rounded once in fp32, where parts
    differ). Returns (the adapter, or the same one when nothing moves; the modules moved).
    """
    import torch

    from . import lora
    from .adapter import build_adapter
    from .errors import AdaptkitError
    from .formats.sources import DictSource

    def rows_of(name):
        return shape_of(name)[0]

    groups: dict[str, list] = {}  # fused module of the base -> [(split module of the adapter, its rows)]
    splits: dict[str, list] = {}  # fused module of the adapter -> [(split module of the base, its rows)]
    for m in adapter.modules.values():
        if m.kind != "linear" or m.param or shape_of(m.name) is not None:
            continue
        where = place(config, m, shape_of)
        if isinstance(where, str):
            raise AdaptkitError(where, adapter.path)
        for module, take, into in where or []:
            if into is not None:
                groups.setdefault(module, []).append((m, into))
            else:
                splits.setdefault(m.name, []).append((module, take))
    moved = sorted([m.name for g in groups.values() for m, _ in g] + list(splits))
    if not moved:
        return adapter, []
    if adapter.token_rows or adapter.alora_tokens or any(m.bias_key or m.kind != "linear" or m.param
                                                         for m in adapter.modules.values()):
        raise AdaptkitError("re-laying out the fused/split projections of an adapter with trainable tokens, aLoRA, "
                            "lora_bias, embedding or parameter LoRAs is not supported; merge it instead (the merge "
                            "handles it)", adapter.path)
    tensors, alphas = {}, {}

    def put(name, a, b, scale, magnitude=None):
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = a.clone(), b.contiguous()  # own storage
        alphas[name] = lora.alpha_for(scale, a.shape[0])
        if magnitude is not None:
            tensors[f"{name}.lora_magnitude_vector"] = magnitude

    for fused, parts in groups.items():
        scales = {m.scaling for m, _ in parts}
        shared = scales.pop() if len(scales) == 1 else None  # one scale: B unscaled; else each sᵢ folded in B
        if any(m.use_dora for m, _ in parts) and sum(stop - start for _, (start, stop) in parts) != rows_of(fused):
            raise AdaptkitError(f"a DoRA on some parts of {fused} only: DoRA's magnitude for the other rows would "
                                "be the base's norms, not exact; merge it instead", adapter.path)
        ordered = sorted(parts, key=lambda p: p[1][0])
        a, b = lora.stack_rows([(m.A, m.B, 1.0 if shared is not None else m.scaling, rows) for m, rows in ordered],
                               rows_of(fused))
        magnitude = torch.cat([m.magnitude.float() for m, _ in ordered]) if ordered[0][0].use_dora else None
        put(fused, a, b, shared if shared is not None else 1.0, magnitude)
    for m in adapter.modules.values():
        if m.name in splits:
            for part, (start, stop) in splits[m.name]:
                put(part, m.A, m.B[start:stop], m.scaling,
                    m.magnitude[start:stop] if m.use_dora else None)
        elif m.name not in moved:
            put(m.name, m.A, m.B, m.scaling, m.magnitude if m.use_dora else None)
    for name, key in adapter.full_tensors.items():
        tensors[name] = adapter.source.get(key)
    mts = sorted({n.rpartition(".")[0] for n in adapter.full_tensors}) or None
    config_in = {"peft_type": "LORA", "modules_to_save": mts, "use_dora": adapter.use_dora}
    out = build_adapter(adapter.path, adapter.weights_path, config_in, DictSource(adapter.path, tensors),
                        fmt="converted", infer_alpha=alphas)
    keep = {k: v for k, v in adapter.config.items() if k not in (
        "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "target_modules")}
    out.config = {**keep, **config_in}
    return out, moved


def relayout_for(adapter, base):
    """:func:`relayout` for a base :class:`~adaptkit.io.checkpoint.Checkpoint`."""
    def shape_of(module):
        name = module + ".weight"
        return tuple(base.info(name).shape) if name in base else None

    return relayout(adapter, base.config, shape_of)
