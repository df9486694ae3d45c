"""What transformers builds from a config.json, asked of transformers itself (no weights, no memory).

The model is instantiated on the meta device: every module exists with its class and name, no
parameter has storage. Callers ask which layers are ``Conv1D`` (GPT-2's transposed linear layers:
peft decides ``fan_in_fan_out`` by that class, whatever the adapter config says) or which would be
quantized by bitsandbytes (:mod:`.quant`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch

from .errors import AdaptkitError


def named_class(config: dict) -> str | None:
    """The transformers class a config.json names (its first ``architectures`` entry); None when it
    names none, or when ``architectures`` is not a list of names (a bare string is not read letter by letter)."""
    names = config.get("architectures")
    return names[0] if isinstance(names, list) and names and isinstance(names[0], str) else None


def meta_model(config: dict, required: bool = True):
    """The transformers model of ``config`` on the meta device; None (or a one-line error when
    ``required``) when transformers cannot build it from this config."""
    model = _meta_model(json.dumps({k: v for k, v in config.items() if k != "quantization_config"}, sort_keys=True))
    if model is None and required:
        raise AdaptkitError(f"transformers cannot build a {config.get('model_type', 'model without model_type')!r} "
                            "from this config.json")
    return model


@functools.lru_cache(maxsize=4)
def _meta_model(config_json: str):
    import warnings

    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads(config_json)
    if "model_type" not in cfg:
        return None
    # what transformers' own from_pretrained does to the file: floats JSON cannot hold, which it writes
    # {"__float__": "Infinity"} (GraniteMoeHybrid's time_step_limit), decoded
    decode = getattr(transformers.PretrainedConfig, "_decode_special_floats", None)
    cfg = decode(cfg) if decode is not None else cfg
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf_config = AutoConfig.for_model(**cfg)
            arch = named_class(cfg)
            cls = getattr(transformers, arch, None) if arch else None
            with torch.device("meta"):
                return cls._from_config(hf_config) if cls is not None else AutoModelForCausalLM.from_config(hf_config)
    except Exception:  # noqa: BLE001 - an unknown or custom-code architecture, a config it rejects
        return None


def module_kinds(config: dict) -> dict[str, str] | None:
    """Each module's kind as transformers builds the model: ``linear`` (nn.Linear), ``conv1d``
    (transformers' Conv1D, weight stored (in, out)), ``embedding`` (nn.Embedding) or ``other``; None
    when transformers cannot build it."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    model = meta_model(config, required=False)
    if model is None:
        return None
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            kinds[name] = "conv1d"
        elif isinstance(module, nn.Linear):
            kinds[name] = "linear"
        elif isinstance(module, nn.Embedding):
            kinds[name] = "embedding"
        else:
            kinds[name] = "other"
    return kinds


def conv1d_modules(config: dict) -> set[str] | None:
    """Names of the modules that are transformers' ``Conv1D`` (weight stored (in, out)), or None when
    transformers cannot build the model."""
    kinds = module_kinds(config)
    return None if kinds is None else {name for name, kind in kinds.items() if kind == "conv1d"}


def checkpoint_renames(config: dict, disk_names) -> dict[str, str]:
    """In-memory tensor name -> on-disk name, for every on-disk tensor transformers renames on load
    (a Llava's ``language_model.model.layers.0…`` is ``model.language_model.layers.0…`` in memory).

    Asks transformers itself: the rules it applies when loading this architecture
    (``conversion_mapping.py`` in transformers 5, ``_checkpoint_conversion_mapping`` before), applied
    to the checkpoint's own names. Tensors that transformers merges on load (MoE experts fused into
    one parameter) are not renames and are left out. Empty when transformers cannot build the model.
    """
    model = meta_model(config, required=False)
    if model is None:
        return {}
    disk_names = list(disk_names)
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: one dict of regexes per class
        import re

        rules = getattr(model, "_checkpoint_conversion_mapping", None) or {}
        out = {}
        for name in disk_names:
            memory = name
            for pattern, replacement in rules.items():
                memory = re.sub(pattern, replacement, memory)
            if memory != name:
                out[memory] = name
        return out
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    out = {}
    for name in disk_names:
        memory, converted = rename_source_key(name, renamings, converters, model.base_model_prefix, meta)
        if converted is None and memory != name:
            out[memory] = name
    return out


@dataclass(frozen=True)
class Transposed:
    """An in-memory weight transformers reads transposed from one on-disk tensor (``disk``, stored (in, out))."""

    disk: str


def converted_rows(config: dict, shapes: dict[str, tuple[int, ...]]) -> dict[str, list[tuple[str, torch.Tensor,
                                                                                       torch.Tensor]] | str | Transposed]:
    """For each in-memory weight (or bias) transformers builds on load from the rows of on-disk tensors
    (a fused ``query_key_value`` chunked or split into q/k/v, ``gate_proj`` beside ``up_proj``
    concatenated, ``wq`` permuted for RoPE): [(on-disk name, disk_rows, memory_rows)] per on-disk tensor
    it takes rows of, both int64: in-memory row ``memory_rows[i]`` is that tensor's row ``disk_rows[i]``.
    A 2-D weight transformers transposes from one tensor (Transpose alone) is :class:`Transposed`. Where
    transformers builds it any other way (an op adaptkit does not follow through), a one-line reason
    instead.

    Found by transformers itself: its converters for this model, run as it runs them on load on
    stand-in tensors whose values are (tensor, row) codes, one column wide. Only row operations
    (Chunk / Split / Concatenate on dim 0, PermuteForRope) and a lone Transpose are followed; MoE experts
    (MergeModulelist, 3-D parameters: :func:`fused_from_disk`) are not described here.
    """
    from copy import deepcopy

    model = meta_model(config, required=False)
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (Chunk, Concatenate, MergeModulelist, PermuteForRope, Split,
                                                     Transpose, WeightConverter, WeightRenaming, rename_source_key)
    except ImportError:
        return {}
    if model is None:
        return {}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if not converters:
        return {}
    by_pattern = {k: conv for conv in converters for k in conv.source_patterns}
    meta = model.state_dict()
    groups: dict[str, tuple] = {}  # first in-memory name -> (converter copy, [its on-disk names])
    for name in shapes:  # (``shapes``: the checkpoint's, by on-disk name)
        memory, pattern = rename_source_key(name, renamings, converters, model.base_model_prefix, meta)
        if pattern is None or memory not in meta:
            continue
        conv = by_pattern[pattern]
        if conv.operations and isinstance(conv.operations[0], MergeModulelist) or meta[memory].dim() > 2:
            continue  # MoE experts: fused_from_disk
        group = groups.setdefault(memory, (deepcopy(conv), []))
        group[1].append((name, pattern))

    def row_op(op) -> bool:
        return isinstance(op, PermuteForRope) or (isinstance(op, (Chunk, Split, Concatenate)) and op.dim == 0)

    out: dict[str, list | str | Transposed] = {}
    for first, (conv, names) in groups.items():
        targets = [first.replace(conv.target_patterns[0], t) for t in conv.target_patterns]
        [op, *more] = conv.operations
        if (not more and isinstance(op, Transpose) and {op.dim0, op.dim1} == {0, 1} and not op.check_dims
                and len(names) == 1 and len(targets) == 1 and len(shapes[names[0][0]]) == 2):
            out[targets[0]] = Transposed(names[0][0])  # Ergo's shared experts and router: stored (in, out)
            continue
        odd = next((type(op).__name__ for op in conv.operations if not row_op(op)), None)
        if odd is not None:
            for t in targets:
                out[t] = (f"transformers builds it on load from {', '.join(n for n, _ in names)} with {odd}, "
                          "which adaptkit does not lay a LoRA across")
            continue
        codes = {}
        for i, (name, pattern) in enumerate(names):
            code = torch.arange(shapes[name][0], dtype=torch.float64) + float(i) * 2.0 ** 32  # exact in fp64
            conv.add_tensor(first, name, pattern, code[:, None] if len(shapes[name]) == 2 else code)
            codes[i] = name
        try:
            made = conv.convert(first, model=model, config=model.config)
        except Exception as e:  # a converter that does not run on stand-ins: not followed
            for t in targets:
                out[t] = f"transformers builds it on load from {', '.join(codes.values())} ({type(e).__name__})"
            continue
        for target, t in made.items():
            t = (t[0] if isinstance(t, list) else t).reshape(-1)
            code = t.to(torch.int64)
            src, disk_row = code >> 32, code & (2 ** 32 - 1)
            parts = []
            for i in sorted(set(src.tolist())):
                hit = (src == i).nonzero().reshape(-1)
                parts.append((codes[i], disk_row[hit], hit))
            out[target] = parts
    return out


def parameter_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter of the model transformers builds from ``config``, by its in-memory name."""
    model = meta_model(config, required=False)
    return {} if model is None else {name: tuple(p.shape) for name, p in model.named_parameters()}


def is_transposed(config: dict, module: str) -> bool | None:
    """Whether transformers marks the expert module ``module`` as storing (E, in, out) (gpt-oss)."""
    model = meta_model(config, required=False)
    if model is None:
        return None
    try:
        return bool(getattr(model.get_submodule(module), "is_transposed", False))
    except AttributeError:
        return None


def fused_from_disk(config: dict, disk_names) -> dict[str, list[tuple[str, int, int, list[str], int | None]]]:
    """For each in-memory parameter transformers builds by merging several on-disk tensors (MoE experts
    stored one tensor per expert, fused into one 3-D parameter on load): its sources, each
    (on-disk name, expert index, part index, the converter's source patterns, concat dim or None).

    The rules are transformers' own, for this model type (``get_checkpoint_conversion_mapping``; the
    model is built, on the meta device, only when the model type has none of its own). Only
    stack-then-concatenate conversions (MergeModulelist(dim=0), optionally followed by Concatenate)
    and concatenations of whole 3-D tensors (Step 3.7's moe.gate_proj beside moe.up_proj: expert index
    None) are described; a parameter built any other way is left out, and a LoRA on it is refused
    rather than guessed.
    """
    import re

    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping, get_model_conversion_mapping
        from transformers.core_model_loading import (Concatenate, MergeModulelist, WeightConverter, WeightRenaming,
                                                     rename_source_key)
    except ImportError:
        return {}
    transforms, prefix, meta = get_checkpoint_conversion_mapping(config.get("model_type")), None, None
    if not transforms:
        model = meta_model(config, required=False)
        if model is None:
            return {}
        transforms, prefix, meta = get_model_conversion_mapping(model), model.base_model_prefix, model.state_dict()
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if not converters:
        return {}
    described = {}  # source pattern -> (its expert-index regex, part index, all patterns, concat dim)
    for conv in converters:
        ops = list(conv.operations)
        stacked = bool(ops) and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0 and (
            len(ops) == 1 or (len(ops) == 2 and isinstance(ops[1], Concatenate)))
        if len(ops) == 1 and isinstance(ops[0], Concatenate) and ops[0].dim > 0:  # whole 3-D parts side by side
            ops, stacked = [None, ops[0]], True
        patterns = list(conv.source_patterns)
        # the first converter naming a pattern is the one applied; transformers reads a pattern as a regex whose
        # * is a wildcard (DeepSeek-V4's and Kimi-Linear's are written \.experts.*.w1.weight), here the expert
        for part, pattern in enumerate(patterns):
            described.setdefault(pattern, (re.compile(pattern.replace("*", r"(\d+)") + "$"), part,
                                           patterns, ops[1].dim if len(ops) == 2 else None) if stacked else None)
    out: dict[str, list] = {}
    for name in disk_names:
        memory, pattern = rename_source_key(name, renamings, converters, prefix, meta)
        if described.get(pattern) is None:
            continue
        regex, part, patterns, concat = described[pattern]
        found = regex.search(name)
        if found is not None:
            expert = int(found.group(1)) if regex.groups else None
            out.setdefault(memory, []).append((name, expert, part, patterns, concat))
    return out


def part_spans(sources, shape_of) -> list[tuple[int, int] | None]:
    """For each of ``sources`` (:func:`fused_from_disk`): the (start, stop) its part spans along the dim its
    expert's parts are concatenated on (gate's rows, then up's), None where they are not concatenated."""
    sizes = {(e, part): tuple(shape_of(name))[concat - (e is not None)]  # concat: a dim of the stacked parameter
             for name, e, part, _, concat in sources if concat is not None}
    spans = []
    for _, e, part, _, concat in sources:
        if concat is None:
            spans.append(None)
            continue
        start = sum(sizes[(e, p)] for p in range(part))
        spans.append((start, start + sizes[(e, part)]))
    return spans


def fused_shape(sources, shape_of) -> tuple[int, ...]:
    """The shape transformers gives a parameter it fuses from ``sources`` (:func:`fused_from_disk`):
    experts stacked on dim 0 (or each part 3-D already: expert None), the parts concatenated on their dim."""
    whole = sources[0][1] is None
    first = {part: tuple(shape_of(name))[1 if whole else 0:] for name, e, part, _, _ in sources if e in (0, None)}
    experts = tuple(shape_of(sources[0][0]))[0] if whole else 1 + max(e for _, e, _, _, _ in sources)
    per_expert = list(first[0])
    concat = sources[0][4]
    if concat is not None:
        per_expert[concat - 1] = sum(shape[concat - 1] for shape in first.values())
    return (experts, *per_expert)
