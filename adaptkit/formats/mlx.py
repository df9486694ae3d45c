"""mlx-lm LoRA adapters: ``adapters.safetensors`` + ``adapter_config.json``.

mlx-lm's LoRALinear computes y = W·x + scale · (x @ lora_a) @ lora_b with lora_a (in × r) and
lora_b (r × out), the transposes of PEFT's A and B, and one absolute ``scale`` in
``lora_parameters`` (no alpha). Each module's own scaling sₘ is folded into its lora_b so one scale
is exact: lora_b = (sₘ / scale) · Bᵀ. mlx-lm builds every LoRA layer with the one ``rank`` of the
config and refuses a tensor of another shape (mlx-lm 0.32, ``tuner/utils.py`` ``load_adapters``):
modules of a smaller rank are padded with zeros, which adds nothing to ΔW. LoRA goes on the last
``num_layers`` layers for the ``keys`` listed (module paths inside a layer), so ``num_layers`` must be
the model's layer count (from the base's config; never guessed); weights it finds no tensor for
start at zero (no change). DoRA is mlx-lm's ``fine_tune_type: dora`` (``tuner/dora.py``: the
magnitude ``m`` over ‖W + scale·lora_bᵀ·lora_aᵀ‖ per output row, peft's formula).

MoE experts: mlx-lm's Qwen2/3-MoE, OLMoE, DeepSeek-V3 and Mixtral stack the checkpoint's per-expert
tensors into one ``SwitchLinear`` per projection (their ``sanitize``: ``mlp.experts.N.gate_proj`` →
``mlp.switch_mlp.gate_proj``; Mixtral's ``block_sparse_moe.experts.N.w1/w3/w2`` →
``block_sparse_moe.switch_mlp.gate_proj/up_proj/down_proj``), and its ``LoRASwitchLinear``
(``tuner/lora.py``) holds lora_a (E, r, in) and lora_b (E, out, r), not transposed, at the same one
rank and scale. A peft ``target_parameters`` LoRA on the fused expert parameters is laid out there
from the base's own checkpoint (gate and up take their rows of each expert's ΔW). mlx-lm's
DeepSeek-V3 splits ``kv_b_proj`` into other modules, so a LoRA there is refused. mlx-lm's Qwen3.5-MoE
splits experts stored fused (``gate_up_proj`` (E, 2I, H) in halves) into the same switch_mlp.

Vision-language models: mlx-lm holds their language model as ``language_model.model.`` (see
:func:`mlx_name`), where peft says ``model.language_model.``.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch

from .. import lora
from ..adapter import Adapter, build_adapter
from ..errors import AdaptkitError
from ..readiness import PER_EXPERT, check
from ..io.files import read_json
from .sources import DictSource, open_source

WEIGHTS = "adapters.safetensors"
CONFIG = "adapter_config.json"
_LAYER = re.compile(r"^(?P<prefix>.*?\.layers\.)(?P<i>\d+)\.(?P<key>.+)$")


def mlx_name(name: str, base=None, config: dict | None = None, path=None) -> str:
    """mlx-lm's path of a module peft names ``name`` (in memory): its vision-language models (Gemma 3,
    Mistral 3, Qwen2.5-VL, Qwen3-VL, Qwen3.5, Llama 4…) hold the language model as
    ``language_model.model.`` whatever the checkpoint calls it (their ``sanitize`` maps it there); its
    text models are built on the checkpoint's names (``base``: Nemotron-H's backbone.layers.N.mixer…,
    model.layers.N.mixer… in memory)."""
    if "language_model." in name:
        return "language_model.model." + name.split("language_model.", 1)[1].removeprefix("model.")
    if config and config.get("text_config") is not None:
        raise AdaptkitError(f"{name}: outside the language model, the only part of a vision-language model "
                            "mlx-lm loads", path)
    from ..plan import disk_module

    return disk_module(base, name)


def peft_name(name: str) -> str:
    """The inverse of :func:`mlx_name`: transformers 5's in-memory ``model.language_model.`` (a Llama 4
    vision-language model, which keeps ``language_model.model.`` in memory too, is not told apart without
    its config: the merge then refuses those names in one line, naming the base's closest tensor)."""
    return "model.language_model." + name.removeprefix("language_model.model.") \
        if name.startswith("language_model.model.") else name


def is_mlx_dir(path: Path) -> bool:
    cfg = path / CONFIG
    if not (path / WEIGHTS).exists() or not cfg.exists():
        return False
    try:
        return "lora_parameters" in read_json(cfg, "adapter config")
    except AdaptkitError:
        return False


def layer_count(config: dict | None) -> int | None:
    """The model's layer count, from its config (a multimodal model's ``text_config`` too)."""
    for cfg in (config or {}, (config or {}).get("text_config") or {}):
        n = cfg.get("num_hidden_layers") if isinstance(cfg, dict) else None
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
        kinds = cfg.get("layers_block_type") if isinstance(cfg, dict) else None  # Nemotron-H: its layers' kinds only
        if isinstance(kinds, list) and kinds:
            return len(kinds)
    return None


MOE_TYPES = {"qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3", "mixtral",  # mlx-lm models read off their sanitize
             "nemotron_h"}  # (models/nemotron_h.py: backbone.layers.N.mixer.experts.E.up/down_proj -> switch_mlp.fc1/fc2)
# mlx-lm models whose sanitize splits experts stored fused (….experts.gate_up_proj (E, 2I, H) in halves along its
# rows, gate first; down_proj (E, H, I) as it is) into a switch layer, by model_type -> where, from the experts'
# module (mlx-lm 0.32 models/qwen3_5_moe.py: mlp.experts -> mlp.switch_mlp; gemma4_text.py: experts ->
# experts.switch_glu, its router's per_expert_scale on the routing weights as transformers has it)
FUSED_TYPES = {"qwen3_5_moe": (".experts", ".switch_mlp"), "gemma4": ("", ".switch_glu"),
               "gemma4_text": ("", ".switch_glu")}  # (mlx-lm 0.32 has no qwen3_5_moe_text model type)
_MIXTRAL = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_SWITCH_NAMES = {"mixtral": _MIXTRAL, "nemotron_h": {"up_proj": "fc1", "down_proj": "fc2"}}  # mlx-lm's, by model_type


def _switch_factors(adapter: Adapter, base, base_config: dict | None, path) -> dict[str, list]:
    """Each expert LoRA's per-expert (A_e (r, in), sₘ·B_e (out, r)), by mlx-lm's switch_mlp module (errors about
    the base name ``path``, the base's)."""
    from .gguf import per_expert_pairs

    out: dict[str, list] = {}
    for m in adapter.modules.values():
        if not (m.param and m.experts > 1):
            continue
        model_type = (base_config or {}).get("model_type")
        if base is None or model_type not in MOE_TYPES | set(FUSED_TYPES):
            raise AdaptkitError(f"{m.name}: LoRAs on MoE experts go to mlx-lm's stacked experts (switch_mlp, "
                                f"switch_glu) for {', '.join(sorted(MOE_TYPES | set(FUSED_TYPES)))} models, given the "
                                f"base (this one: {model_type or 'none given'})", adapter.path)
        if m.weight_name in base.tensors and model_type in FUSED_TYPES:  # stored fused: split as mlx-lm splits it
            a3, b3 = lora.expert_factors(m.A.to(torch.float32), m.B.to(torch.float32), m.experts)  # (E,r,in), (out,r,E)
            root, _, param = m.weight_name.removesuffix(".weight").rpartition(".")
            shape = tuple(base.info(m.weight_name).shape)
            if param not in ("gate_up_proj", "down_proj") or shape != (m.experts, b3.shape[0], a3.shape[2]):
                raise AdaptkitError(f"{m.name}: mlx-lm's {model_type} splits experts stored (E, out, in) as "
                                    f"gate_up_proj / down_proj; the base stores {param} as {list(shape)}", path)
            cut, switch = FUSED_TYPES[model_type]
            half = b3.shape[0] // 2
            parts = [("gate_proj", slice(0, half)), ("up_proj", slice(half, None))] if param == "gate_up_proj" \
                else [("down_proj", slice(None))]
            for proj, rows in parts:
                out[f"{root.removesuffix(cut)}{switch}.{proj}"] = [(a3[e], m.scaling * b3[:, :, e][rows])
                                                                 for e in range(m.experts)]
            continue
        for disk, e, a_e, sb_e in per_expert_pairs(m, base, "mlx-lm", path):
            hit = PER_EXPERT.match(disk + ".weight")
            proj = _SWITCH_NAMES.get(model_type, {}).get(hit["proj"], hit["proj"])
            stack = out.setdefault(f"{hit['stem'].removesuffix('.experts')}.switch_mlp.{proj}", [None] * m.experts)
            stack[e] = (a_e, sb_e)
    for name, stack in out.items():
        if any(x is None for x in stack):
            raise AdaptkitError(f"{name}: not every expert has its LoRA", adapter.path)
    return out


def _falcon_h1_rows(module: str, b: torch.Tensor, config: dict, path) -> torch.Tensor:
    """B (out, r) of a Falcon-H1 module times the µP multipliers mlx-lm's falcon_h1.py ``sanitize`` multiplies
    into that weight on load (mlx-lm 0.32: q_proj and k_proj by attention_in, o_proj, out_proj, gate_proj,
    down_proj by theirs, in_proj by ssm_in and its [z x B C dt] row segments; not v_proj, nor key_multiplier,
    unlike transformers): mlx-lm then adds m·ΔW to m·W, as it computes the merged weights."""
    def get(key):
        value = config.get(key)
        if value is None:
            raise AdaptkitError(f"config.json: Falcon-H1 without {key}, which mlx-lm multiplies into the weights",
                                path)
        return value

    tail = module.rsplit(".", 1)[-1]
    factor = {"q_proj": "attention_in_multiplier", "k_proj": "attention_in_multiplier",
              "o_proj": "attention_out_multiplier", "out_proj": "ssm_out_multiplier"}.get(tail)
    if factor:
        return b * get(factor)
    if tail in ("gate_proj", "down_proj"):
        return b * get("mlp_multipliers")[0 if tail == "gate_proj" else 1]
    if tail == "in_proj":
        from .gguf import falcon_h1_ssm_rows

        inner, state = get("mamba_d_ssm"), get("mamba_n_groups") * get("mamba_d_state")
        if 2 * inner + 2 * state + get("mamba_n_heads") != b.shape[0]:
            raise AdaptkitError(f"{module}: {b.shape[0]} rows, but mlx-lm's Falcon-H1 lays out "
                                f"{2 * inner + 2 * state + get('mamba_n_heads')} from the config", path)
        return b * get("ssm_in_multiplier") * falcon_h1_ssm_rows(config, b.shape[0], path)[:, None]
    return b


def write(adapter: Adapter, out: Path, *, base_config: dict | None = None, base=None, **_) -> dict:
    """``adapters.safetensors`` + ``adapter_config.json`` as mlx-lm reads them: one rank (smaller ones
    zero-padded), one scale (folded into lora_b), DoRA as ``dora``, ``num_layers`` the base's layer
    count (mlx-lm adapts the last ``num_layers`` layers)."""
    from safetensors.torch import save_file

    problems = [p for p in check(adapter, "mlx").problems if p.rule != "target_parameters"]
    if problems:  # Linear LoRA inside numbered layers, and expert LoRAs (below), only
        p = problems[0]
        raise AdaptkitError(f"mlx-lm cannot take this adapter: {p.rule}: {p.detail} (fix: {p.fix})", adapter.path)
    num_layers = layer_count(base_config)
    if num_layers is None:
        raise AdaptkitError("mlx-lm adapts the last num_layers layers of the model: give the base (its config.json "
                            "says how many layers it has; adaptkit does not guess it)", adapter.path)
    if (base_config or {}).get("model_type") in ("deepseek_v2", "deepseek_v3"):
        kv_b = next((m.name for m in adapter.modules.values() if m.name.endswith("kv_b_proj")), None)
        if kv_b:  # mlx-lm's deepseek models split it into embed_q / unembed_out in sanitize
            raise AdaptkitError(f"{kv_b}: mlx-lm's DeepSeek splits kv_b_proj into other modules, where this LoRA "
                                "would not load: merge instead", adapter.path)
    base_path = base.path if base is not None else None
    switch = _switch_factors(adapter, base, base_config, base_path)
    mods = [m for m in adapter.modules.values() if not (m.param and m.experts > 1)]
    if not mods and not switch:
        raise AdaptkitError("no LoRA modules to write", adapter.path)
    dora = {m.use_dora for m in mods}
    if len(dora) > 1:
        raise AdaptkitError("some modules use DoRA and some do not: mlx-lm's fine_tune_type is one for all",
                            adapter.path)
    dora = dora.pop() if dora else False
    if dora and switch:
        raise AdaptkitError("DoRA beside expert LoRAs: mlx-lm has no DoRA on its switch_mlp", adapter.path)
    scalings = [m.scaling for m in mods] + [m.scaling for m in adapter.modules.values() if m.param]
    scale = Counter(scalings).most_common(1)[0][0]
    rank = max([m.shape_rank for m in mods] + [a.shape[0] for stack in switch.values() for a, _ in stack])
    tensors, keys = {}, set()
    for name, stack in switch.items():
        match = _LAYER.match(name)
        keys.add(match["key"])
        pad = [rank - a.shape[0] for a, _ in stack]
        name = mlx_name(name, None, base_config, adapter.path)  # (the checkpoint's name already)
        tensors[f"{name}.lora_a"] = torch.stack([torch.nn.functional.pad(a, (0, 0, 0, k))
                                                 for (a, _), k in zip(stack, pad)]).contiguous()
        tensors[f"{name}.lora_b"] = torch.stack([torch.nn.functional.pad(sb / scale, (0, k))
                                                 for (_, sb), k in zip(stack, pad)]).contiguous()
    for m in mods:
        match = _LAYER.match(m.name)
        keys.add(match["key"])
        if int(match["i"]) >= num_layers:
            raise AdaptkitError(f"{m.name} is beyond the base's {num_layers} layers", adapter.path)
        pad = rank - m.shape_rank  # zero rows of A, columns of B: B·A is unchanged
        name = mlx_name(m.name, base, base_config, adapter.path)
        b = m.B.to(torch.float32)
        if (base_config or {}).get("model_type") == "falcon_h1":
            b = _falcon_h1_rows(m.name, b, base_config, base_path)
        tensors[f"{name}.lora_a"] = torch.nn.functional.pad(m.A.to(torch.float32).T, (0, pad)).contiguous()
        tensors[f"{name}.lora_b"] = torch.nn.functional.pad(
            lora.fold(b.T, m.scaling, scale), (0, 0, 0, pad)).contiguous()
        if dora:
            tensors[f"{name}.m"] = m.magnitude.to(torch.float32).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "mlx"})
    config = {"fine_tune_type": "dora" if dora else "lora", "num_layers": num_layers,
              "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": sorted(keys)},
              "base_model_name_or_path": adapter.config.get("base_model_name_or_path")}
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return config


def read(path: Path, base_names=None) -> Adapter:
    """An mlx-lm adapter folder."""
    config = read_json(path / CONFIG, "adapter config")
    ftype = config.get("fine_tune_type", "lora")
    if ftype not in ("lora", "dora"):
        raise AdaptkitError(f"mlx-lm fine_tune_type {ftype!r} is not supported (lora and dora)", path / CONFIG)
    params = config.get("lora_parameters") or {}
    scale = params.get("scale", 20.0) if isinstance(params, dict) else None  # 20: mlx-lm's default scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise AdaptkitError(f"malformed mlx-lm config: lora_parameters.scale must be a finite number, got {scale!r}",
                            path / CONFIG)
    source = open_source(path / WEIGHTS)
    tensors, alphas = {}, {}
    for key in source.keys():
        if key.endswith(".lora_a"):
            stem = key[: -len(".lora_a")]  # mlx-lm's module path; mod: peft's
            mod = peft_name(stem)
            if stem + ".lora_b" not in source.keys():
                raise AdaptkitError(f"{stem}: lora_a without lora_b", path / WEIGHTS)
            if len(source.shape(key)) != 2:
                raise AdaptkitError(f"{stem}: a LoRA on mlx-lm's stacked experts (switch_mlp) is not read back by "
                                    "adaptkit", path / WEIGHTS)
            a = source.get(key).T.contiguous()
            b = source.get(stem + ".lora_b").T.contiguous()
            tensors[f"{mod}.lora_A.weight"] = a
            tensors[f"{mod}.lora_B.weight"] = b
            alphas[mod] = scale * a.shape[0]  # scaling = alpha / r = scale
            if ftype == "dora":
                if stem + ".m" not in source.keys():
                    raise AdaptkitError(f"{stem}: a DoRA module without its magnitude m", path / WEIGHTS)
                tensors[f"{mod}.lora_magnitude_vector"] = source.get(stem + ".m")
        elif key.endswith(".m") and ftype == "dora":
            continue
        elif not key.endswith(".lora_b"):
            raise AdaptkitError(f"unexpected tensor {key!r} in an mlx-lm adapter", path / WEIGHTS)
    cfg = {"peft_type": "LORA", "base_model_name_or_path": config.get("base_model_name_or_path")}
    adapter = build_adapter(path, path / WEIGHTS, {}, DictSource(path / WEIGHTS, tensors), fmt="mlx",
                            infer_alpha=alphas)
    adapter.config = cfg
    return adapter
