"""The merge plan: every output tensor, its shard, its codecs and the operations on it, decided and
checked against the base before a byte is written.

:func:`plan_merge` runs four steps, each its own function:

1. :func:`match_adapters`: each adapter module to a base tensor (shapes, orientation, DoRA
   magnitude, LoRA bias, modules_to_save) → the operations (:mod:`.ops`) per tensor;
2. :func:`quant_mode`: what quantization means for this merge (a bitsandbytes 4-bit, FP8 or MXFP4
   base read, merged dense or kept in its format; a dense base quantized; QLoRA's round trip);
3. :func:`tensor_jobs`: per base tensor, its decoder and encoder (:mod:`.codecs`), tied embeddings
   materialised when an adapter changes one of them;
4. :func:`layout_shards` and :func:`output_config`: the output's files and config.json.

:mod:`.stream` carries the plan out.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import Adapter, LoraModule, adapter_weights
from .architecture import conv1d_modules, meta_model
from . import scaled
from .codecs import DenseRead, DenseWrite, FourBitRead, FourBitWrite, NoRead, QLoRARead, ScaledRead, ScaledWrite
from .dtypes import FLOAT_DTYPES, name_of, resolve_dtype
from .errors import AdaptkitError
from .families import fused_parent, place
from .io.checkpoint import Checkpoint
from .io.files import is_regular, read_json
from .ops import Op
from .quant import QuantizedWeight, QuantSettings, check_quantization, find_quantized, weights_bnb_would_quantize

INPUT_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                            "tok_embeddings.weight")
OUTPUT_EMBEDDING = "lm_head.weight"
VOCAB_TENSORS = INPUT_EMBEDDING_SUFFIXES + (OUTPUT_EMBEDDING, "embed_out.weight")  # rows = the vocabulary
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}  # linear layers are Conv1D
QUANTIZE = ("nf4", "same", "fp8", "mxfp4")  # "same": the base's own format (its name says the same)


@dataclass
class TensorJob:
    """One output tensor: read ``source`` with ``decoder``, apply ``ops`` in fp32, write with ``encoder``."""

    name: str  # output tensor name
    source: str  # base tensor it starts from
    shape: tuple[int, ...]  # dense shape
    decoder: DenseRead
    encoder: DenseWrite | FourBitWrite | ScaledWrite
    ops: list[Op] = field(default_factory=list)

    @property
    def computed(self) -> bool:
        """Whether the tensor goes through fp32 (else its stored bytes are copied)."""
        return bool(self.ops) or not self.decoder.passes_through(self.encoder)

    @property
    def in_bytes(self) -> int:
        return self.decoder.nbytes(self.shape)

    @property
    def out_bytes(self) -> int:
        return self.encoder.nbytes(self.shape)

    @property
    def out_names(self) -> list[str]:
        return self.encoder.names(self.name)


@dataclass
class OutShard:
    file: str
    jobs: list[TensorJob]
    metadata: dict[str, str]


@dataclass
class MergePlan:
    base: Checkpoint
    adapters: list[Adapter]
    weights: list[float]
    shards: list[OutShard]
    config: dict
    write_index: bool
    warnings: list[str]

    @property
    def jobs(self) -> list[TensorJob]:
        return [j for s in self.shards for j in s.jobs]

    @property
    def variable_sizes(self) -> bool:
        """Some outputs (requantized 4-bit layers) are sized only once written."""
        return any(j.encoder.variable for j in self.jobs)

    @property
    def modules_merged(self) -> int:
        """Adapter modules applied (a module on experts counts once, however many tensors it reaches)."""
        return len({(id(op.adapter), op.module.name) for j in self.jobs for op in j.ops if op.kind in ("lora", "experts")})


def plan_merge(base: Checkpoint, adapters: list[Adapter], weights: list[float] | None = None, *,
               dtype: str | torch.dtype | None = "auto", max_shard_size: str | int | None = None,
               quantize: str | None = None, qlora: bool = False, settings: QuantSettings | None = None) -> MergePlan:
    """Check the adapters against the base and lay out every output tensor; raise before any write.

    A bitsandbytes 4-bit base is merged dense (in its compute dtype, or ``dtype``) unless
    ``quantize="nf4"``, which keeps it 4-bit: merged layers requantized with the base's settings,
    untouched ones copied byte for byte. On a dense base, ``quantize="nf4"`` quantizes every weight
    transformers would (with ``settings``), and ``qlora`` round-trips those weights through 4-bit
    before adding ΔW, as the adapter saw them in QLoRA training, writing a dense model.
    """
    weights = adapter_weights(weights, len(adapters))
    resolve_parameters(base, adapters)
    for adapter, weight in zip(adapters, weights):
        adapter.require_exact()
        if adapter.alora_tokens:
            raise AdaptkitError(f"this is an aLoRA (alora_invocation_tokens {adapter.alora_tokens}): its change applies "
                                "only after the invocation tokens, so no merged weight is equivalent (peft refuses "
                                "to merge it too); serve it unmerged", adapter.path)
        if weight != 1.0 and (adapter.full_tensors or adapter.token_rows):
            raise AdaptkitError(f"a weight of {weight:g} cannot scale the tensors this adapter replaces "
                                "(modules_to_save, trainable tokens); merge it with weight 1", adapter.path,
                                param="weights")
    out_dtype = resolve_dtype(dtype)
    limit = parse_size(max_shard_size)
    mode = quant_mode(base, adapters, quantize, qlora, settings)
    if mode.quantize and limit:
        raise AdaptkitError("cannot re-shard a quantized output yet (its sizes are known only once written)",
                            param="max_shard_size")
    warnings: list[str] = list(mode.notes)
    ops = match_adapters(base, adapters, weights, {**mode.qweights, **mode.scaled}, warnings)
    tied, config = tied_embeddings(base, ops, warnings)
    shards = [OutShard(_out_shard_name(shard.path.name), tensor_jobs(shard.tensors, ops, mode, out_dtype, tied),
                       dict(shard.metadata) or {"format": "pt"}) for shard in base.shards]
    write_index = base.index_file is not None
    if limit:
        shards, write_index = layout_shards([j for s in shards for j in s.jobs], limit)
    output_config(config, mode, out_dtype)
    grown = [j for s in shards for j in s.jobs if isinstance(j.decoder, NoRead)]
    if grown:  # the vocabulary an adapter grew (modules_to_save of embed_tokens / lm_head, checked above)
        rows = grown[0].shape[0]
        for cfg in (config, config.get("text_config")):
            if isinstance(cfg, dict) and "vocab_size" in cfg:
                cfg["vocab_size"] = rows
        warnings.append(f"the adapter grows the vocabulary to {rows} tokens ({', '.join(j.name for j in grown)}): "
                        "vocab_size is set to it; use the adapter's tokenizer with the merged model")
    return MergePlan(base, adapters, weights, shards, config, write_index, warnings)


# --------------------------------------------------------------------------------- 1. match adapters

def match_adapters(base: Checkpoint, adapters: list[Adapter], weights: list[float],
                   qweights: dict, warnings: list[str]) -> dict[str, list[Op]]:
    """The operations on each base tensor, from every adapter in order; every misfit named at once.

    ``qweights``: the base's quantized weights by their dense name (each with its dense ``shape``):
    an adapter lands on those names whatever the checkpoint stores (an MXFP4 ``X`` as ``X_blocks``)."""
    ops: dict[str, list[Op]] = {}
    problems: list[str] = []
    missing: dict[str, list[str]] = {}
    tied = _tied_input(base)
    names = _disk_names(base, adapters)

    def disk(name):
        """The on-disk name of an (in-memory) tensor name."""
        return name if name in base or name in qweights else names.get(name, name)

    def base_shape(name):
        name = disk(name)
        if name in qweights:
            return tuple(qweights[name].shape)
        if name in base:
            return base.info(name).shape
        if tied and name == OUTPUT_EMBEDDING:
            return base.info(tied).shape
        return None

    # peft decides a linear LoRA's orientation by the layer's class (Conv1D stores (in, out)), whatever
    # the adapter's fan_in_fan_out says: ask transformers which layers are Conv1D when it can matter
    flagged = any(m.fan_in_fan_out for a in adapters for m in a.modules.values())
    conv1d = conv1d_modules(base.config) if flagged or base.config.get("model_type") in CONV1D_MODEL_TYPES else None
    for adapter, weight in zip(adapters, weights):
        _warn_base_name(adapter, base, warnings)
        label = adapter.path
        for name, key in adapter.full_tensors.items():
            shape = base_shape(name)
            if shape is None:
                problems.append(f"{label}: modules_to_save tensor {name} is not in the base")
            elif tuple(adapter.source.shape(key)) != tuple(shape):
                new = tuple(adapter.source.shape(key))
                grown = name.endswith(VOCAB_TENSORS) and len(new) == 2 and new[1:] == tuple(shape[1:]) \
                    and new[0] > shape[0]
                if grown and (tied or (base.config.get("tie_word_embeddings") and OUTPUT_EMBEDDING not in base)):
                    problems.append(f"{label}: {name} grows the vocabulary from {shape[0]} to {new[0]} rows on a base "
                                    "with tied embeddings: not supported yet")
                elif grown:  # a vocabulary the fine-tune grew: written in its new shape (see tensor_jobs)
                    ops.setdefault(disk(name), []).append(Op("replace", adapter, weight, key=key))
                else:
                    problems.append(f"{label}: {name} is {list(adapter.source.shape(key))} in the adapter "
                                    f"but {list(shape)} in the base")
            else:
                ops.setdefault(disk(name), []).append(Op("replace", adapter, weight, key=key))
        overridden, relaid = [], []

        def record(m, problem):
            """A module matched elsewhere than its own base tensor: None (done), "missing", or a problem."""
            if problem == "missing":
                missing.setdefault(str(label), []).append(m.name)
            elif problem:
                problems.append(f"{label}: {problem}")
            return problem is None

        for m in adapter.modules.values():
            if m.param and m.experts > 1:  # transformers' view of the experts: read once per base (cached)
                record(m, _match_experts(base, m, adapter, weight, disk, base_shape, ops, *expert_parameters(base)))
                continue
            shape = base_shape(m.weight_name)
            if shape is None:
                problem = _match_fused(base, m, adapter, weight, disk, base_shape, ops)
                if problem == "missing" and m.kind == "linear" and not m.fan_in_fan_out:  # the model's own layout
                    record(m, _match_converted(base, m, adapter, weight, ops))
                elif record(m, problem):
                    relaid.append(m.name)
                continue
            transposed = _orientation(m, shape, conv1d)
            problem = _check_module(m, shape, transposed)
            if problem:
                problems.append(f"{label}: {problem}")
                continue
            if m.kind == "linear" and conv1d is not None and transposed != m.fan_in_fan_out:
                overridden.append(m.name)
            ops.setdefault(disk(m.weight_name), []).append(Op("lora", adapter, weight, module=m, transposed=transposed))
            if m.bias_key is not None:
                problem = _check_bias(m, base_shape(m.name + ".bias"))
                if problem:
                    problems.append(f"{label}: {problem}")
                else:
                    ops.setdefault(disk(m.name + ".bias"), []).append(Op("bias", adapter, weight, module=m))
        for mod, (ids, key) in adapter.token_rows.items():
            name = disk(mod + ".weight")
            shape = base_shape(name)
            if shape is None:
                problems.append(f"{label}: trainable tokens on {mod}, which is not in the base")
            elif any(op.kind == "lora" and op.adapter is adapter for op in ops.get(name, [])):
                problems.append(f"{label}: LoRA and trainable tokens on the same layer {mod} are not supported yet")
            elif max(ids) >= shape[0] or tuple(adapter.source.shape(key))[1:] != tuple(shape[1:]):
                problems.append(f"{label}: trainable tokens {max(ids)} / rows of {list(adapter.source.shape(key))} "
                                f"do not fit {name} {list(shape)}")
            else:
                ops.setdefault(name, []).append(Op("rows", adapter, weight, key=key, rows=ids))
                if tied and name == tied:  # peft ties the output head's adapter to the embedding's
                    ops.setdefault(OUTPUT_EMBEDDING, []).append(Op("rows", adapter, weight, key=key, rows=ids))
        warnings += [f"{label}: {w}" for w in adapter.notes]
        if overridden:
            flag = str(any(m.fan_in_fan_out for m in adapter.modules.values())).lower()
            warnings.append(f"{label}: fan_in_fan_out is {flag} in its config but {len(overridden)} modules (first: "
                            f"{overridden[0]}) are {'nn.Linear' if flag == 'true' else 'Conv1D'} layers in the base: "
                            "merged as their layer type says, as peft does")
        if relaid:
            onto = "its rows of the fused weight" if fused_parent(base.config, relaid[0]) else "each split weight its rows"
            warnings.append(f"{label}: {len(relaid)} modules merged across the fused/split projection layout "
                            f"(first: {relaid[0]}, onto {onto})")
        if adapter.unclaimed:
            warnings.append(f"{label}: {len(adapter.unclaimed)} tensors belong to no LoRA module and are ignored "
                            f"(first: {adapter.unclaimed[0]})")
    rows = {n: shape[0] for n, o in ops.items() if n.endswith(VOCAB_TENSORS) and (shape := _replaced_shape(o))}
    vocab = {n: base.info(n).shape[0] for n in base.tensors if n.endswith(VOCAB_TENSORS)}
    if rows and {rows.get(n, v) for n, v in vocab.items()} != {max(rows.values())}:
        problems.append("the adapters resize " + ", ".join(f"{n} to {r} rows" for n, r in sorted(rows.items()))
                        + " but leave " + ", ".join(f"{n} at {v}" for n, v in sorted(vocab.items()) if n not in rows)
                        + ": the merged model's vocabulary would disagree with itself")
    for label, mods in missing.items():
        total = len(adapters[[str(a.path) for a in adapters].index(label)].modules)
        near = _closest(base, mods[0] + ".weight")
        tried = " (with transformers' renames for this architecture)" if names else ""
        if not names and meta_model(base.config, required=False) is None:
            tried = " (transformers cannot build a model from the base's config.json, so none of its renames were tried)"
        problems.insert(0, f"{label}: {len(mods)} of its {total} modules are not in the base{tried} (first: "
                           f"{', '.join(mods[:3])}{'; closest base tensor: ' + near if near else ''}); was it "
                           "trained on another model?")
    if problems:
        more = f" (and {len(problems) - 3} more problems)" if len(problems) > 3 else ""
        raise AdaptkitError(f"adapter does not fit the base {base.path}: " + "; ".join(problems[:3]) + more)
    return ops


def expert_parameters(base: Checkpoint) -> tuple[dict[str, tuple[int, ...]], dict]:
    """(shape of every parameter a LoRA can target, by its in-memory name; the on-disk sources of those
    transformers fuses on load): the checkpoint's own tensors plus the fused ones, whose shapes come
    from their parts, so no model has to be built."""
    from .architecture import fused_from_disk, fused_shape

    cached = getattr(base, "_expert_parameters", None)
    if cached is None:
        fused = fused_from_disk(base.config, base.tensors)
        shapes = {name: tuple(info.shape) for name, (_, info) in base.tensors.items()}
        shapes.update({name: w.shape for name, w in scaled_weights(base)[1].items()})  # MXFP4 X from X_blocks
        shapes.update({name: fused_shape(sources, lambda n: base.info(n).shape) for name, sources in fused.items()})
        cached = base._expert_parameters = (shapes, fused)
    return cached


def renames(base: Checkpoint) -> dict[str, str]:
    """In-memory -> on-disk names of the tensors transformers renames on load
    (:func:`adaptkit.architecture.checkpoint_renames`), asked once per base (cached)."""
    cached = getattr(base, "_renames", None)
    if cached is None:
        from .architecture import checkpoint_renames

        cached = base._renames = checkpoint_renames(base.config, base.tensors)
    return cached


def converted(base: Checkpoint) -> dict:
    """The in-memory weights transformers builds from rows of on-disk tensors on load
    (:func:`adaptkit.architecture.converted_rows`), asked once per base (cached)."""
    cached = getattr(base, "_converted", None)
    if cached is None:
        from .architecture import converted_rows

        cached = base._converted = converted_rows(base.config, {n: tuple(i.shape) for n, (_, i) in base.tensors.items()})
    return cached


def _rows_window(disk_rows: torch.Tensor, memory_rows: torch.Tensor):
    """(into, take) of an Op for a module whose rows ``memory_rows`` are rows ``disk_rows`` of an on-disk tensor:
    the window of that tensor (contiguous, else None) and the module's rows in its order (a range where it is one)."""
    order = torch.argsort(disk_rows)
    lo, hi = int(disk_rows[order[0]]), int(disk_rows[order[-1]]) + 1
    if hi - lo != len(disk_rows) or len(torch.unique(disk_rows)) != len(disk_rows):
        return None, None
    take = memory_rows[order]
    if torch.equal(take, torch.arange(int(take[0]), int(take[0]) + len(take))):
        take = (int(take[0]), int(take[0]) + len(take))
    return (lo, hi), take


def disk_module(base: Checkpoint | None, name: str) -> str:
    """The checkpoint's name of a module transformers names ``name`` in memory (``name`` where the base
    stores it so, or no base is given; else through :func:`renames`)."""
    if base is None or name + ".weight" in base.tensors:
        return name
    return renames(base).get(name + ".weight", name + ".weight").removesuffix(".weight")


def renamed_parameters(base: Checkpoint, shapes: dict) -> dict[str, tuple[int, ...]]:
    """The shapes of the parameters transformers renames on load, by their in-memory names (those
    ``shapes`` lacks)."""
    return {memory: tuple(base.info(disk).shape) for memory, disk in renames(base).items() if memory not in shapes}


def resolve_parameters(base: Checkpoint, adapters: list[Adapter]) -> None:
    """Tell each ``target_parameters`` LoRA which parameter it adapts, from the base model's shapes."""
    if not any(m.kind == "param" for a in adapters for m in a.modules.values()):
        return
    from .architecture import is_transposed

    shapes, fused = expert_parameters(base)

    def transposed(module: str) -> bool | None:
        return is_transposed(base.config, module)

    for adapter in adapters:
        problems = adapter.resolve_parameters(shapes, transposed)
        if problems and (renamed := renamed_parameters(base, shapes)):
            # a parameter transformers renames on load (GraniteMoe's block_sparse_moe.input_linear is
            # experts.gate_up_proj in memory): asked of transformers only now (it builds a meta model)
            shapes = {**shapes, **renamed}
            base._expert_parameters = (shapes, fused)
            problems = adapter.resolve_parameters(shapes, transposed)
        if problems:
            raise AdaptkitError(f"target_parameters that do not fit the base {base.path}: " + "; ".join(problems[:2]),
                                adapter.path)


def _expert_orientation(m: LoraModule, dims: tuple[int, int], base: Checkpoint) -> bool | None:
    """Whether each expert's (out, in) delta lands transposed on a parameter of per-expert shape ``dims``."""
    delta = (m.out_features, m.in_features)
    if dims == delta and dims != delta[::-1]:
        return False
    if dims == delta[::-1] and dims != delta:
        return True
    if dims == delta:  # square: peft reads (E, out, in) unless the module is marked is_transposed
        from .architecture import is_transposed

        marked = is_transposed(base.config, m.name.rsplit(".", 1)[0])
        return None if marked is None else marked
    return None


def _match_experts(base: Checkpoint, m: LoraModule, adapter: Adapter, weight: float, disk, base_shape, ops,
                   shapes: dict, fused: dict) -> str | None:
    """Ops for a LoRA on a 3-D expert parameter: on the fused on-disk tensor (gpt-oss), or on each
    expert's own on-disk tensors (Qwen3-MoE, Mixtral…) that transformers merges into it on load
    (``fused``: :func:`adaptkit.architecture.fused_from_disk`). Returns a problem, "missing", or None."""
    shape = shapes.get(m.weight_name)
    if shape is None or len(shape) != 3 or shape[0] != m.experts:
        return "missing"
    transposed = _expert_orientation(m, tuple(shape[1:]), base)
    if transposed is None:
        return f"{m.name}: cannot tell how the LoRA's (out, in) lands on {list(shape)}"
    name = disk(m.weight_name)
    stored = base_shape(name)
    if stored is not None:
        if tuple(stored) != tuple(shape):
            return f"{name} is {list(stored)} on disk, {list(shape)} in memory"
        ops.setdefault(name, []).append(Op("experts", adapter, weight, module=m, transposed=transposed))
        return None
    sources = fused.get(m.weight_name)
    if not sources:
        return "missing"
    from .architecture import part_spans

    per_expert = tuple(shape[1:])
    for (disk_name, e, _, _, concat), span in zip(sources, part_spans(sources, lambda n: base.info(n).shape)):
        if span is None:
            slot = None
            expected = per_expert
        else:
            dim = concat - 1
            slot = (dim, *span)
            expected = tuple(span[1] - span[0] if i == dim else n for i, n in enumerate(per_expert))
        if e is None:  # a 3-D part of every expert (Step 3.7's moe.gate_proj)
            expected = (m.experts, *expected)
        if tuple(base.info(disk_name).shape) != expected:
            return f"{disk_name} is {list(base.info(disk_name).shape)}, expected {list(expected)} from {m.name}"
        ops.setdefault(disk_name, []).append(Op("experts", adapter, weight, module=m, transposed=transposed,
                                                expert=e, part=slot))
    return None


def _match_fused(base: Checkpoint, m: LoraModule, adapter: Adapter, weight: float, disk, base_shape,
                 ops: dict) -> str | None:
    """Ops for a LoRA whose module the base stores fused with others (a split ``k_proj`` on Phi-3's
    ``qkv_proj``: ΔW on its rows) or apart (a ``qkv_proj`` LoRA on a llama-fied base: each of q, k, v
    takes its rows of ΔW); :func:`adaptkit.families.place` says which. Returns a problem, "missing",
    or None."""
    if m.kind != "linear" or m.fan_in_fan_out:
        return "missing"
    targets = place(base.config, m, lambda module: base_shape(module + ".weight"))
    if targets is None:
        return "missing"
    if isinstance(targets, str):
        return targets
    problem = _check_factors(m)
    if problem:
        return problem
    if m.bias_key is not None and any(base_shape(module + ".bias") is None for module, _, _ in targets):
        return f"{m.name} has a lora_bias but the base's {targets[0][0]} has no bias"
    for module, take, into in targets:
        ops.setdefault(disk(module + ".weight"), []).append(Op("lora", adapter, weight, module=m, take=take, into=into))
        if m.bias_key is not None:
            ops.setdefault(disk(module + ".bias"), []).append(Op("bias", adapter, weight, module=m, take=take,
                                                                into=into))
    return None


def _match_converted(base: Checkpoint, m: LoraModule, adapter: Adapter, weight: float, ops: dict) -> str | None:
    """Ops for a LoRA on a module transformers builds on load from rows of on-disk tensors (Sarvam's
    query_key_value split into q/k/v, Mistral Large 4's wq permuted for RoPE, a vision tower's in_proj_weight
    chunked and permuted): each disk tensor takes its rows of ΔW, in the order transformers reads them
    (:func:`converted`). Returns a problem, "missing", or None."""
    from .architecture import Transposed

    found = converted(base).get(m.weight_name)
    if found is None:
        return "missing"
    if isinstance(found, str):
        return f"{m.name}: {found}"
    problem = _check_factors(m)
    if problem:
        return problem
    if isinstance(found, Transposed):  # stored (in, out): ΔW lands transposed, as on a Conv1D weight
        shape = tuple(base.info(found.disk).shape)
        if shape != (m.in_features, m.out_features):
            return f"{m.name} ({m.out_features}×{m.in_features}) does not fit {found.disk} {list(shape)}, stored (in, out)"
        if m.bias_key is not None:
            return f"{m.name} has a lora_bias, but transformers reads its weight transposed from {found.disk}"
        ops.setdefault(found.disk, []).append(Op("lora", adapter, weight, module=m, transposed=True))
        return None
    bias = converted(base).get(m.name + ".bias") if m.bias_key is not None else None
    if m.bias_key is not None and not isinstance(bias, list):
        return f"{m.name} has a lora_bias, but transformers does not build its bias from rows of the checkpoint's"
    planned = []
    for kind, parts in (("lora", found), ("bias", bias or [])):
        for name, disk_rows, memory_rows in parts:
            into, take = _rows_window(disk_rows, memory_rows)
            shape = tuple(base.info(name).shape)
            if into is None or (kind == "lora" and (len(shape) != 2 or shape[1] != m.in_features)):
                return f"{m.name} ({m.out_features}×{m.in_features}) does not fit {name} {list(shape)}"
            planned.append((name, Op(kind, adapter, weight, module=m, take=take, into=into)))
    if sum(len(r) for _, r, _ in found) != m.out_features:
        return f"{m.name} has {m.out_features} rows, transformers builds {sum(len(r) for _, r, _ in found)}"
    for name, op in planned:
        ops.setdefault(name, []).append(op)
    return None


def _disk_names(base: Checkpoint, adapters: list[Adapter]) -> dict[str, str]:
    """In-memory -> on-disk names by transformers' own rules, asked only when some adapter names a
    tensor the checkpoint does not hold under that name (peft saves in-memory names)."""
    wanted = {m.weight_name for a in adapters for m in a.modules.values()} | {
        n for a in adapters for n in a.full_tensors} | {mod + ".weight" for a in adapters for mod in a.token_rows}
    if all(n in base for n in wanted):
        return {}
    if any(m.param for a in adapters for m in a.modules.values()):  # experts fused from per-expert tensors
        wanted -= set(expert_parameters(base)[1])
        if all(n in base for n in wanted):
            return {}
    return renames(base)


def _closest(base: Checkpoint, name: str) -> str | None:
    import difflib

    found = difflib.get_close_matches(name, list(base.tensors), n=1, cutoff=0.5)
    return found[0] if found else None


def _orientation(m: LoraModule, shape, conv1d: set[str] | None) -> bool:
    """Whether ΔW (out, in) lands transposed on the base weight: embeddings and Conv1D layers store (in, out).

    ``conv1d``: the base's Conv1D layers, when transformers could tell; otherwise the adapter's
    fan_in_fan_out, or the shape (a Conv1D base whose adapter config lacks the flag).
    """
    if m.kind == "embedding":
        return True
    if conv1d is not None:
        return m.name in conv1d
    if m.fan_in_fan_out:
        return True
    return shape is not None and tuple(shape) == (m.in_features, m.out_features) != (m.out_features, m.in_features)


def _check_factors(m: LoraModule) -> str | None:
    """A problem with the module's own tensors: A and B that do not fit together, a DoRA magnitude
    of another length than B's rows."""
    src = m.source
    a_shape, b_shape = src.shape(m.a_key), src.shape(m.b_key)
    if a_shape[0] != b_shape[1]:
        return f"{m.name}: A {list(a_shape)} and B {list(b_shape)} do not fit together"
    if m.magnitude_key is not None and tuple(src.shape(m.magnitude_key)) != (m.out_features,):
        return f"{m.name}: DoRA magnitude is {list(src.shape(m.magnitude_key))}, expected [{m.out_features}]"
    return None


def _check_module(m: LoraModule, shape, transposed: bool) -> str | None:
    canonical = (m.out_features, m.in_features)
    expected = canonical[::-1] if transposed else canonical
    if tuple(shape) != expected:
        return f"{m.weight_name} is {list(shape)} in the base but the LoRA gives {list(expected)}"
    return _check_factors(m)


def _check_bias(m: LoraModule, bias_shape) -> str | None:
    if bias_shape is None:
        return f"{m.name} has a LoRA bias but the base layer has no bias"
    if tuple(bias_shape) != (m.out_features,):
        return f"{m.name}.bias is {list(bias_shape)} in the base, LoRA bias is [{m.out_features}]"
    return None


# config.json keys that differ between copies of one model (a re-save, another dtype, a 4-bit copy)
VOLATILE_CONFIG_KEYS = {"transformers_version", "torch_dtype", "dtype", "use_cache", "quantization_config"}


def same_model_config(a: dict, b: dict) -> bool:
    """Whether two config.json describe the same model, whatever its folder name, dtype or quantization."""
    def core(c):
        return {k: v for k, v in c.items() if not k.startswith("_") and k not in VOLATILE_CONFIG_KEYS}

    return core(a) == core(b)


def _warn_base_name(adapter: Adapter, base: Checkpoint, warnings: list[str]) -> None:
    """Warn when the adapter says it was trained on another model than ``base``.

    When the adapter's base model is a local folder, its config is compared with the base's (the same
    model under another folder name is the same model); otherwise names are compared: the folder's,
    config's ``_name_or_path`` and, for a Hub cache folder, the repository's.
    """
    want = adapter.base_model
    if not want or not isinstance(want, str):
        return
    theirs = Path(want) / "config.json"
    if is_regular(theirs):
        try:
            other = read_json(theirs, "config.json")
        except AdaptkitError:
            other = None
        if other is not None:
            if not same_model_config(other, base.config):
                warnings.append(f"{adapter.path} was trained on {want!r}, whose config.json differs from the base's "
                                f"({base.path}): merging anyway")
            return
    real = base.path.resolve()
    names = {real.name, Path(str(base.config.get("_name_or_path", ""))).name}
    names |= {part.split("--")[-1] for part in real.parts if part.startswith("models--")}
    if Path(want).name not in names:
        warnings.append(f"{adapter.path} was trained on {want!r}, not {base.path.name!r}: merging anyway")


# ------------------------------------------------------------------------------------- 2. 4-bit mode

@dataclass
class QuantMode:
    """What quantization means for one merge."""

    qweights: dict[str, QuantizedWeight]  # the base's 4-bit weights (empty for a dense base)
    quantize: bool  # write quantized (a 4-bit, FP8 or MXFP4 base kept in its format; a dense base in NF4)
    qlora: bool  # merge onto the 4-bit round trip of a dense base
    settings: QuantSettings | None  # for quantizing or round-tripping a dense base
    to_quantize: set[str]  # dense weights transformers would quantize
    skip: list[str]  # the modules it would not
    dense_dtype: torch.dtype | None  # a quantized base's compute dtype (its dense output's)
    scaled: dict[str, scaled.ScaledWeight] = field(default_factory=dict)  # an FP8/MXFP4 base's, by dense name
    scaled_extra: set[str] = field(default_factory=set)  # their static activation scales
    notes: list[str] = field(default_factory=list)  # warnings the mode brings

    @property
    def owner(self) -> dict[str, QuantizedWeight]:
        return {c: q for q in self.qweights.values() for c in q.components}


def scaled_weights(base: Checkpoint) -> tuple[scaled.Scheme | None, dict[str, scaled.ScaledWeight], set[str]]:
    """An FP8 / MXFP4 base's scheme, its scaled weights by dense name and their activation scales
    (None, {}, set() for any other base); read once per base."""
    cached = getattr(base, "_scaled", None)
    if cached is None:
        q = base.config.get("quantization_config")
        cached = (None, {}, set())
        if isinstance(q, dict) and q.get("quant_method") in scaled.METHODS:
            path = base.path / "config.json"
            scheme = scaled.parse_scheme(q, path)
            infos = {name: info for name, (_, info) in base.tensors.items()}
            found = scaled.find_scaled(scheme, infos, base.path)
            if not found:
                raise AdaptkitError(f"config.json says {scheme.name} but no tensor is stored that way", path)
            cached = (scheme, found, scaled.companions(infos, found))
        base._scaled = cached
    return cached


def _dense_dtype(config: dict) -> torch.dtype:
    """The dtype a quantized checkpoint's dense output takes: its config's, when a float, else bf16."""
    named = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    try:
        return resolve_dtype(named) or torch.bfloat16
    except AdaptkitError:
        return torch.bfloat16


def quant_mode(base: Checkpoint, adapters: list[Adapter], quantize: str | None, qlora: bool,
               settings: QuantSettings | None) -> QuantMode:
    if quantize not in (None, *QUANTIZE):
        raise AdaptkitError(f"unknown value {quantize!r} (choose {', '.join(QUANTIZE)})", param="quantize")
    scheme, found, extra = scaled_weights(base)
    if scheme is not None:
        return _scaled_mode(base, scheme, found, extra, quantize, qlora)
    if quantize in ("fp8", "mxfp4"):
        raise AdaptkitError(f"{quantize} keeps an {quantize} base in its format; the base {base.path} is not {quantize} "
                            "(quantizing a dense base to it is not supported yet)", param="quantize")
    qconfig = check_quantization(base.config, base.path / "config.json")
    if quantize == "same" and not qconfig:
        raise AdaptkitError(f"same keeps a quantized base in its format, but {base.path} is not quantized",
                            param="quantize")
    qweights = find_quantized(base.tensors, base.read) if qconfig else {}
    if qlora and qweights:
        raise AdaptkitError("qlora is for dense bases (a 4-bit base already is what QLoRA trained on)", base.path)
    if qlora and quantize:
        raise AdaptkitError("give qlora or quantize, not both", param="qlora")
    if qweights and (base.config.get("model_type") in CONV1D_MODEL_TYPES or any(
            m.transposed and m.weight_name in qweights for a in adapters for m in a.modules.values())):
        # transformers quantizes a Conv1D weight transposed, (out, in): merging into it and writing
        # it back in the Conv1D layout is not implemented, and a square weight would merge wrongly
        raise AdaptkitError("4-bit bases of Conv1D models (GPT-2 family) are not supported yet: merge into the "
                            "16-bit base instead", base.path)
    to_quantize: set[str] = set()
    skip: list[str] = []
    if (quantize or qlora) and not qweights:
        settings = settings or QuantSettings()
        to_quantize, skip = weights_bnb_would_quantize(base.config, settings.skip_modules)
        to_quantize &= set(base.tensors)
    dense = resolve_dtype(qconfig.get("bnb_4bit_compute_dtype")) if qconfig else None
    return QuantMode(qweights, bool(quantize), qlora, settings, to_quantize, skip, dense)


def _scaled_mode(base: Checkpoint, scheme: scaled.Scheme, found: dict, extra: set[str], quantize: str | None,
                 qlora: bool) -> QuantMode:
    """An FP8 / MXFP4 base: merged into a dense model, or (quantize "same" or the format's name) kept
    in its format, merged weights requantized with its own scheme."""
    if qlora:
        raise AdaptkitError(f"qlora is for dense bases (a {scheme.name} base already is what the adapter trained on)",
                            base.path)
    family = "mxfp4" if scheme.method == "mxfp4" else "fp8"
    if quantize not in (None, "same", family):
        raise AdaptkitError(f"the base is {scheme.name}: merge it dense (no quantize) or keep its format with "
                            f"quantize same, not {quantize}", param="quantize")
    notes = []
    if quantize and scheme.static_inputs:
        notes.append(f"the base's static activation scales ({len(extra)} tensors) are kept as they are: they were "
                     "calibrated on the base, whose activations the merge changes slightly")
    return QuantMode({}, bool(quantize), False, None, set(), [], _dense_dtype(base.config), found, extra, notes)


# ------------------------------------------------------------------------------ 3. codecs per tensor

def _tied_input(base: Checkpoint) -> str | None:
    """The input embedding that lm_head shares, when the base ties them (and stores only the former)."""
    if not base.config.get("tie_word_embeddings", True) or OUTPUT_EMBEDDING in base:
        return None
    for suffix in INPUT_EMBEDDING_SUFFIXES:
        for name in base.tensors:
            if name.endswith(suffix):
                return name
    return None


def tied_embeddings(base: Checkpoint, ops: dict[str, list[Op]], warnings: list[str]) -> tuple[str | None, dict]:
    """The input embedding to write a second time as lm_head (or None), and the output's config.

    When an adapter changes one of two tied tensors, both are written and the tie is cut, so the
    merged model computes what base + adapter computes (peft's merge changes both through the tie).
    """
    config = json.loads(json.dumps(base.config))
    tied = _tied_input(base)
    both = [[(op.kind, op.key) for op in ops.get(name, [])] for name in (tied, OUTPUT_EMBEDDING)]
    if tied and both[0] == both[1] and all(kind == "rows" for kind, _ in both[0]):
        return None, config  # trainable tokens on a tied embedding change both alike (peft ties them): still tied
    if tied and (OUTPUT_EMBEDDING in ops or tied in ops):
        config["tie_word_embeddings"] = False
        warnings.append(f"the adapter changes one of the tied tensors {tied} / {OUTPUT_EMBEDDING}: both are "
                        f"written and tie_word_embeddings is set to false, so the merged model computes what base + "
                        f"adapter computes (peft's merge changes both through the tie)")
        return tied, config
    return None, config


def _replaced_shape(ops: list[Op]) -> tuple[int, ...] | None:
    """The shape of the last tensor that replaces this one whole (modules_to_save), if any."""
    keys = [op for op in ops if op.kind == "replace"]
    return tuple(keys[-1].adapter.source.shape(keys[-1].key)) if keys else None


def _dense_job(name, source, shape, dtype, out_dtype, ops) -> TensorJob:
    target = out_dtype if (out_dtype is not None and dtype in FLOAT_DTYPES) else dtype
    new = _replaced_shape(ops)
    if new is not None and new != tuple(shape):  # a grown vocabulary: nothing of the base is read
        return TensorJob(name, source, new, NoRead(dtype), DenseWrite(target), list(ops))
    return TensorJob(name, source, tuple(shape), DenseRead(dtype), DenseWrite(target), list(ops))


def tensor_jobs(infos, ops: dict[str, list[Op]], mode: QuantMode, out_dtype: torch.dtype | None,
                tied: str | None) -> list[TensorJob]:
    """The jobs of one base shard, in its order, each with its decoder and encoder."""
    jobs = []
    owner = mode.owner
    by_data = {w.data: w for w in mode.scaled.values()}
    scales_of = {w.scales: w for w in mode.scaled.values()}
    for info in infos:
        name, job_ops = info.name, ops.get(info.name, [])
        if name in by_data:  # an FP8 / MXFP4 weight: decoded from its data and scales
            w = by_data[name]
            job_ops = ops.get(w.name, [])
            dec = ScaledRead(info.dtype, weight=w)
            if mode.quantize and not job_ops:  # kept in its format, untouched: copied byte for byte
                jobs.append(_dense_job(name, name, info.shape, info.dtype, None, []))
            elif mode.quantize:  # merged, requantized with the base's own scheme
                jobs.append(TensorJob(w.name, name, w.shape, dec, ScaledWrite(w), list(job_ops)))
            else:  # dense output
                enc = DenseWrite(out_dtype or mode.dense_dtype, measure=bool(job_ops))
                jobs.append(TensorJob(w.name, name, w.shape, dec, enc, list(job_ops)))
        elif name in scales_of or name in mode.scaled_extra:  # copied when kept and not rewritten, else dropped
            if mode.quantize and not (name in scales_of and ops.get(scales_of[name].name)):
                jobs.append(_dense_job(name, name, info.shape, info.dtype, None, []))
        elif name in owner:  # a 4-bit component: dropped (dense output), written by its weight, or copied
            if mode.quantize and not ops.get(owner[name].name):
                jobs.append(_dense_job(name, name, info.shape, info.dtype, None, []))
        elif name in mode.qweights:
            q = mode.qweights[name]
            if mode.quantize and not job_ops:  # untouched: copied byte for byte
                jobs.append(_dense_job(name, name, info.shape, info.dtype, None, []))
            elif mode.quantize:  # merged and requantized with the base's own settings
                double = any(c.endswith(".nested_absmax") for c in q.components)
                jobs.append(TensorJob(name, name, q.shape, FourBitRead(info.dtype, quant=q),
                                      FourBitWrite(q, double, info.dtype), list(job_ops)))
            else:  # merged dense
                enc = DenseWrite(out_dtype or mode.dense_dtype or q.dtype, measure=bool(job_ops))
                jobs.append(TensorJob(name, name, q.shape, FourBitRead(info.dtype, quant=q), enc, list(job_ops)))
        elif name in mode.to_quantize:
            st = mode.settings
            if mode.quantize:  # dense → 4-bit
                target = st.target(name, info.shape, out_dtype or st.compute_dtype)
                jobs.append(TensorJob(name, name, tuple(info.shape), DenseRead(info.dtype),
                                      FourBitWrite(target, st.double_quant, st.storage), list(job_ops)))
            else:  # QLoRA: onto the weight as training saw it
                dec = QLoRARead(info.dtype, settings=st, target=st.target(name, info.shape, info.dtype),
                                measure=bool(job_ops))
                job = _dense_job(name, name, info.shape, info.dtype, out_dtype, job_ops)
                jobs.append(TensorJob(name, name, job.shape, dec, job.encoder, job.ops))
        else:
            jobs.append(_dense_job(name, name, info.shape, info.dtype, out_dtype, job_ops))
            if tied and name == tied:
                jobs.append(_dense_job(OUTPUT_EMBEDDING, tied, info.shape, info.dtype, out_dtype,
                                       ops.get(OUTPUT_EMBEDDING, [])))
    return jobs


# ---------------------------------------------------------------------------------- 4. files, config

def parse_size(size: str | int | None, param: str = "max_shard_size") -> int | None:
    """'5GB', '500MB', '2GiB', '1000000' -> bytes (positive), None for None."""
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise AdaptkitError(f"cannot read size {size!r} (examples: 5GB, 500MB, 2GiB)", param=param)
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(I?B?)\s*", size.upper())
        if not m or (m[3] == "I" or (m[3].startswith("I") and not m[2])):
            raise AdaptkitError(f"cannot read size {size!r} (examples: 5GB, 500MB, 2GiB)", param=param)
        base = 1024 if m[3].startswith("I") else 1000
        n = int(float(m[1]) * base ** "_KMGT".index(m[2] or "_"))
    if n <= 0:
        raise AdaptkitError(f"a shard size must be positive, got {size!r}", param=param)
    return n


def _out_shard_name(name: str) -> str:
    if name.endswith(".bin"):
        name = name[: -len(".bin")] + ".safetensors"
        name = name.replace("pytorch_model", "model", 1)
    return name


def layout_shards(jobs: list[TensorJob], limit: int) -> tuple[list[OutShard], bool]:
    """Jobs in order, cut into shards of at most ``limit`` bytes (a larger tensor alone); whether an
    index is needed."""
    groups: list[list[TensorJob]] = [[]]
    size = 0
    for j in jobs:
        if groups[-1] and size + j.out_bytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(j)
        size += j.out_bytes
    n = len(groups)
    if n == 1:
        return [OutShard("model.safetensors", groups[0], {"format": "pt"})], False
    return [OutShard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g, {"format": "pt"})
            for i, g in enumerate(groups)], True


def output_config(config: dict, mode: QuantMode, out_dtype: torch.dtype | None) -> None:
    """config.json of the output, updated in place: quantization and dtype."""
    kept = mode.quantize and (mode.qweights or mode.scaled)  # a quantized base kept in its format
    if (mode.qweights or mode.scaled) and not mode.quantize:
        config.pop("quantization_config", None)
        out_dtype = out_dtype or mode.dense_dtype
    if mode.quantize and not kept:
        config["quantization_config"] = mode.settings.quantization_config(mode.skip)
    if out_dtype is not None and not kept:
        for key in ("dtype", "torch_dtype"):
            if key in config or key == "dtype":
                config[key] = name_of(out_dtype)
