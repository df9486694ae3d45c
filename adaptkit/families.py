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
