"""Move an adapter between layouts without changing its ΔW: PEFT folder ⇄ raw file ⇄ kohya file.

Every target keeps each module's exact scaling: a PEFT folder written from a file without a PEFT
config gets ``rank_pattern`` / ``alpha_pattern`` (full module names) wherever modules differ; a
kohya file gets a per-module ``.alpha`` = scaling · r (rsLoRA and patterns included, unlike peft's
own kohya scripts, which write the global alpha).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import Adapter, LoraModule, load_adapter
from .io.checkpoint import Checkpoint
from .errors import AdaptkitError
from .formats import kohya
from .formats.peft import write_peft_dir
from .formats.raw import write_raw_file
from .io.output import atomic_output_dir, atomic_output_file, check_output

TARGETS = ("peft", "raw", "kohya", "gguf", "mlx")


@dataclass
class ConvertResult:
    source: str
    source_format: str
    to: str
    out: str
    modules: int
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def peft_tensors(adapter: Adapter, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's names (without the ``base_model.model.`` prefix)."""
    def cast(t):
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    out = {}
    for m in adapter.modules.values():
        a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if m.kind == "embedding" else ("lora_A.weight", "lora_B.weight")
        out[f"{m.name}.{a_name}"] = cast(m.A)
        out[f"{m.name}.{b_name}"] = cast(m.B)
        if m.magnitude_key:
            out[f"{m.name}.lora_magnitude_vector"] = cast(m.magnitude)
        if m.bias_key:
            out[f"{m.name}.lora_B.bias"] = cast(m.lora_bias)
    embedding_modules = {m.name for m in adapter.modules.values() if m.kind == "embedding"}
    for name in adapter.full_tensors:
        mod, _, param = name.rpartition(".")
        key = f"{mod}.base_layer.{param}" if mod in embedding_modules else name
        out[key] = cast(adapter.full_tensor(name))
    return out


def peft_config(adapter: Adapter) -> dict:
    """A peft LoraConfig (as a dict) under which every module gets its exact rank and scaling."""
    original = adapter.config if adapter.format in ("peft", "raw") and "r" in adapter.config else None
    if original is not None and _config_reproduces(original, adapter):
        return dict(original)
    mods = list(adapter.modules.values())
    if not mods:
        raise AdaptkitError("the adapter holds no LoRA modules", adapter.path)
    dora = {m.use_dora for m in mods}
    if len(dora) > 1:
        raise AdaptkitError("some modules use DoRA and some do not: peft's config cannot express that", adapter.path)
    ranks = {m.name: m.shape_rank for m in mods}
    alphas = {m.name: _exact_alpha(m) for m in mods}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    embedding = {m.name for m in mods if m.kind == "embedding"}
    mts = sorted({n.rpartition(".")[0] for n in adapter.full_tensors} - embedding)
    cfg = {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha,
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
        "target_modules": sorted(ranks), "use_rslora": False, "use_dora": dora.pop(),
        "lora_bias": any(m.bias_key for m in mods), "fan_in_fan_out": any(m.fan_in_fan_out for m in mods),
        "modules_to_save": mts or None, "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True,
        "inference_mode": True, "base_model_name_or_path": adapter.config.get("base_model_name_or_path"),
        "task_type": adapter.config.get("task_type"),
    }
    return cfg


def _exact_alpha(m: LoraModule) -> float:
    """The alpha that gives m.scaling as alpha / r (no rsLoRA); an int when it is one."""
    a = m.scaling * m.shape_rank
    return int(a) if float(a).is_integer() else a


def _config_reproduces(config: dict, adapter: Adapter) -> bool:
    """Whether ``config`` still gives every module its rank and scaling (it does unless edited)."""
    from .adapter import lora_scaling, pattern_key

    rp, ap = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    for m in adapter.modules.values():
        k = pattern_key(rp, m.name)
        r = int(rp[k]) if k is not None else int(config["r"])
        k = pattern_key(ap, m.name)
        alpha = ap[k] if k is not None else config.get("lora_alpha", 8)
        if r != m.shape_rank or lora_scaling(alpha, r, bool(config.get("use_rslora"))) != m.scaling:
            return False
    return True


def convert(source: str | Path, to: str, out: str | Path, base: str | Path | None = None,
            dtype: str | torch.dtype | None = None, force: bool = False, prefix: str = kohya.DEFAULT_PREFIX,
            warn=None, outtype: str = "f32") -> ConvertResult:
    """Write ``source``'s adapter in the ``to`` layout at ``out`` (a folder for peft and mlx, else a file)."""
    if to not in TARGETS:
        raise AdaptkitError(f"unknown target {to!r} (choose {', '.join(TARGETS)})")
    from .plan import resolve_dtype

    torch_dtype = resolve_dtype(dtype)
    check_output(out, force, inputs=[source, base], folder=to in ("peft", "mlx"))
    base_ck = Checkpoint.open(base) if base is not None else None
    base_names = list(base_ck.tensors) if base_ck is not None else None
    adapter = load_adapter(source, base_names=base_names)
    adapter.require_exact()
    adapter.require_finite()
    warnings = list(adapter.notes)
    out = Path(out)
    inputs = [source, adapter.path, adapter.weights_path, base]
    if to in ("gguf", "mlx") and base_ck is None:
        guess = Path(str(adapter.base_model or ""))
        if adapter.base_model and (guess / "config.json").exists():
            base_ck = Checkpoint.open(guess)
        elif to == "gguf":
            raise AdaptkitError("GGUF export needs the base model's config: pass --base", adapter.path)
        else:
            warnings.append("no --base: mlx-lm's num_layers set to the adapter's last layer + 1 (pass --base "
                            "if the model has more layers)")
    for w in warnings:
        (warn or (lambda m: None))(w)
    if to == "gguf":
        from .formats.gguf import write_gguf

        with atomic_output_file(out, force, ".gguf", inputs=inputs) as tmp:
            write_gguf(adapter, base_ck.config, tmp, outtype, base_ck.path)
    elif to == "mlx":
        from .formats.mlx import write_mlx

        n = int(base_ck.config.get("num_hidden_layers", 0)) or None if base_ck is not None else None
        with atomic_output_dir(out, force, inputs=inputs) as tmp:
            write_mlx(adapter, tmp, num_layers=n)
    elif to == "peft":
        tensors, config = peft_tensors(adapter, torch_dtype), peft_config(adapter)
        with atomic_output_dir(out, force, inputs=inputs) as tmp:
            write_peft_dir(tmp, tensors, config)
    else:
        if to == "raw":
            tensors, config = peft_tensors(adapter, torch_dtype), peft_config(adapter)
            writer = lambda p: write_raw_file(p, tensors, config)  # noqa: E731
        else:
            from safetensors.torch import save_file

            tensors, metadata = kohya.kohya_tensors(adapter, prefix, torch_dtype)
            writer = lambda p: save_file(tensors, str(p), metadata=metadata)  # noqa: E731
        with atomic_output_file(out, force, ".safetensors", inputs=inputs) as tmp:
            writer(tmp)
    return ConvertResult(str(source), adapter.format, to, str(out), len(adapter.modules), warnings)
