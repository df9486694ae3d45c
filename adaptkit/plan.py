"""The merge plan: every output tensor, its shard, dtype and the operations on it, decided and
checked against the base before a byte is written.

:func:`plan_merge` matches each adapter module to a base tensor (shapes, orientation, DoRA
magnitude, LoRA bias, modules_to_save), handles tied embeddings and 4-bit (bitsandbytes) weights,
and lays out the output shards. :mod:`.merge` streams the plan.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import Adapter, LoraModule, adapter_weights
from .architecture import conv1d_modules
from .io.checkpoint import Checkpoint
from .errors import AdaptkitError
from .io.files import is_regular, read_json
from .quant import QuantizedWeight, QuantSettings, check_quantization, find_quantized, weights_bnb_would_quantize
from .io.safetensors_file import itemsize, numel

DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INPUT_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                            "tok_embeddings.weight")
OUTPUT_EMBEDDING = "lm_head.weight"


@dataclass
class Op:
    """One change to one tensor, applied in order."""

    kind: str  # "replace", "lora" or "bias"
    adapter: Adapter
    weight: float = 1.0
    module: LoraModule | None = None
    key: str | None = None  # for "replace": the adapter tensor that replaces the base one
    transposed: bool = False  # for "lora": the base stores (in, out)


@dataclass
class TensorJob:
    name: str  # output tensor name
    source: str  # base tensor it starts from
    shape: tuple[int, ...]
    in_dtype: torch.dtype
    out_dtype: torch.dtype
    ops: list[Op] = field(default_factory=list)
    quant: QuantizedWeight | None = None  # the 4-bit weight read (packed) or written (settings, names)
    packed_source: bool = False  # the base stores this weight 4-bit: dequantize first
    requantize: bool = False  # write it 4-bit (with its components) instead of dense
    qlora: bool = False  # round-trip the dense base weight through 4-bit before adding ΔW
    settings: QuantSettings | None = None  # for requantize/qlora of a dense weight

    @property
    def computed(self) -> bool:
        return bool(self.ops) or self.in_dtype != self.out_dtype or self.quant is not None

    def _nbytes(self, packed: bool, dtype: torch.dtype) -> int:
        """Bytes of this tensor: packed 4-bit (two values a byte; an estimate, components aside) or dense."""
        return numel(self.shape) // 2 + 1 if packed else numel(self.shape) * itemsize(dtype)

    @property
    def in_bytes(self) -> int:
        return self._nbytes(self.packed_source, self.in_dtype)

    @property
    def out_names(self) -> list[str]:
        return [self.name, *self.quant.components] if self.requantize else [self.name]

    @property
    def out_bytes(self) -> int:
        return self._nbytes(self.requantize, self.out_dtype)


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
    variable_sizes: bool = False  # requantized layers: sizes known only once written

    @property
    def jobs(self) -> list[TensorJob]:
        return [j for s in self.shards for j in s.jobs]

    @property
    def modules_merged(self) -> int:
        return sum(1 for j in self.jobs for op in j.ops if op.kind == "lora")


def parse_size(size: str | int | None) -> int | None:
    """'5GB', '500MB', '2GiB', '1000000' -> bytes (positive), None for None."""
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise AdaptkitError(f"cannot read size {size!r} (examples: 5GB, 500MB, 2GiB)")
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(I?B?)\s*", size.upper())
        if not m or (m[3] == "I" or (m[3].startswith("I") and not m[2])):
            raise AdaptkitError(f"cannot read size {size!r} (examples: 5GB, 500MB, 2GiB)")
        base = 1024 if m[3].startswith("I") else 1000
        n = int(float(m[1]) * base ** "_KMGT".index(m[2] or "_"))
    if n <= 0:
        raise AdaptkitError(f"a shard size must be positive, got {size!r}")
    return n


def _out_shard_name(name: str) -> str:
    if name.endswith(".bin"):
        name = name[: -len(".bin")] + ".safetensors"
        name = name.replace("pytorch_model", "model", 1)
    return name


def _input_embedding(base: Checkpoint) -> str | None:
    for suffix in INPUT_EMBEDDING_SUFFIXES:
        for name in base.tensors:
            if name.endswith(suffix):
                return name
    return None


def plan_merge(base: Checkpoint, adapters: list[Adapter], weights: list[float] | None = None,
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
    for adapter in adapters:
        adapter.require_exact()
    if quantize not in (None, "nf4"):
        raise AdaptkitError(f"unknown --quantize {quantize!r} (nf4)")
    qconfig = check_quantization(base.config, base.path / "config.json")
    qweights = find_quantized(base.tensors, base.read) if qconfig else {}
    if qlora and qweights:
        raise AdaptkitError("--qlora is for dense bases (a 4-bit base already is what QLoRA trained on)", base.path)
    if qlora and quantize:
        raise AdaptkitError("give --qlora or --quantize, not both")
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
    owner = {c: q for q in qweights.values() for c in q.components}
    out_dtype = resolve_dtype(dtype)
    dense_dtype = out_dtype or (resolve_dtype(qconfig.get("bnb_4bit_compute_dtype")) if qconfig else None)
    warnings: list[str] = []
    ops: dict[str, list[Op]] = {}
    problems: list[str] = []
    missing: dict[str, list[str]] = {}
    tied = base.config.get("tie_word_embeddings", True) and OUTPUT_EMBEDDING not in base
    input_emb = _input_embedding(base) if tied else None

    def base_shape(name):
        if name in qweights:
            return qweights[name].shape
        if name in base:
            return base.info(name).shape
        if tied and input_emb and name == OUTPUT_EMBEDDING:
            return base.info(input_emb).shape
        return None

    # peft decides a linear LoRA's orientation by the layer's class (Conv1D stores (in, out)), whatever
    # the adapter's fan_in_fan_out says: ask transformers which layers are Conv1D when it can matter
    flagged = any(m.fan_in_fan_out for a in adapters for m in a.modules.values())
    conv1d = conv1d_modules(base.config) if flagged or base.config.get("model_type") in CONV1D_MODEL_TYPES else None
    overridden: dict[str, list[str]] = {}
    for adapter, weight in zip(adapters, weights):
        _warn_base_name(adapter, base, warnings)
        label = adapter.path
        for name, key in adapter.full_tensors.items():
            shape = base_shape(name)
            if shape is None:
                problems.append(f"{label}: modules_to_save tensor {name} is not in the base")
                continue
            if tuple(adapter.source.shape(key)) != tuple(shape):
                problems.append(f"{label}: {name} is {list(adapter.source.shape(key))} in the adapter "
                                f"but {list(shape)} in the base")
                continue
            ops.setdefault(name, []).append(Op("replace", adapter, weight, key=key))
        for m in adapter.modules.values():
            if base_shape(m.weight_name) is None:
                missing.setdefault(str(label), []).append(m.name)
                continue
            transposed = _orientation(m, base_shape(m.weight_name), conv1d)
            problem = _check_module(m, base_shape(m.weight_name), transposed)
            if problem:
                problems.append(f"{label}: {problem}")
                continue
            if m.kind == "linear" and conv1d is not None and transposed != m.fan_in_fan_out:
                overridden.setdefault(str(label), []).append(m.name)
            ops.setdefault(m.weight_name, []).append(Op("lora", adapter, weight, module=m, transposed=transposed))
            if m.bias_key is not None:
                bias_shape = base_shape(m.name + ".bias")
                if bias_shape is None:
                    problems.append(f"{label}: {m.name} has a LoRA bias but the base layer has no bias")
                elif tuple(bias_shape) != (m.out_features,):
                    problems.append(f"{label}: {m.name}.bias is {list(bias_shape)} in the base, LoRA bias is "
                                    f"[{m.out_features}]")
                else:
                    ops.setdefault(m.name + ".bias", []).append(Op("bias", adapter, weight, module=m))
        for w in adapter.notes:
            warnings.append(f"{label}: {w}")
        if str(label) in overridden:
            names = overridden[str(label)]
            flag = any(m.fan_in_fan_out for m in adapter.modules.values())
            warnings.append(f"{label}: fan_in_fan_out is {str(flag).lower()} in its config but {len(names)} modules "
                            f"(first: {names[0]}) are {'nn.Linear' if flag else 'Conv1D'} layers in the base: merged "
                            "as their layer type says, as peft does")
        if adapter.unclaimed:
            warnings.append(f"{label}: {len(adapter.unclaimed)} tensors belong to no LoRA module and are ignored "
                            f"(first: {adapter.unclaimed[0]})")
    if missing:
        for label, names in missing.items():
            total = len(adapters[[str(a.path) for a in adapters].index(label)].modules)
            problems.insert(0, f"{label}: {len(names)} of its {total} modules are not in the base "
                               f"(first: {', '.join(names[:3])}); was it trained on another model?")
    if problems:
        more = f" (and {len(problems) - 3} more problems)" if len(problems) > 3 else ""
        raise AdaptkitError(f"adapter does not fit the base {base.path}: " + "; ".join(problems[:3]) + more)

    config = json.loads(json.dumps(base.config))
    materialize = None
    if tied and input_emb and (OUTPUT_EMBEDDING in ops or input_emb in ops):
        materialize = OUTPUT_EMBEDDING
        config["tie_word_embeddings"] = False
        warnings.append(f"the adapter changes one of the tied tensors {input_emb} / {OUTPUT_EMBEDDING}: both are "
                        f"written and tie_word_embeddings is set to false, so the merged model computes what base + "
                        f"adapter computes (peft's merge changes both through the tie)")

    shards = []
    for shard in base.shards:
        jobs = []
        for info in shard.tensors:
            if info.name in owner:  # a 4-bit component: dropped (dense), produced by its weight, or copied
                if quantize and not ops.get(owner[info.name].name):
                    jobs.append(_job(info.name, info.name, info.shape, info.dtype, None, []))
                continue
            if info.name in qweights:
                q = qweights[info.name]
                job_ops = ops.get(info.name, [])
                if quantize and not job_ops:
                    jobs.append(_job(info.name, info.name, info.shape, info.dtype, None, []))
                else:
                    target = info.dtype if quantize else (dense_dtype or q.dtype)
                    jobs.append(TensorJob(info.name, info.name, q.shape, info.dtype, target, list(job_ops),
                                          quant=q, packed_source=True, requantize=bool(quantize)))
                continue
            if info.name in to_quantize:
                job = _job(info.name, info.name, info.shape, info.dtype, out_dtype, ops.get(info.name, []))
                job.settings = settings
                if quantize:  # dense → 4-bit
                    job.quant = settings.target(info.name, info.shape, out_dtype or settings.compute_dtype)
                    job.requantize = True
                else:
                    job.qlora = True
                    job.quant = settings.target(info.name, info.shape, info.dtype)
                jobs.append(job)
                continue
            jobs.append(_job(info.name, info.name, info.shape, info.dtype, out_dtype, ops.get(info.name, [])))
            if materialize and info.name == input_emb:
                jobs.append(_job(OUTPUT_EMBEDDING, input_emb, info.shape, info.dtype, out_dtype,
                                 ops.get(OUTPUT_EMBEDDING, [])))
        shards.append(OutShard(_out_shard_name(shard.path.name), jobs, dict(shard.metadata) or {"format": "pt"}))
    write_index = base.index_file is not None
    limit = parse_size(max_shard_size)
    if limit:
        shards = _reshard([j for s in shards for j in s.jobs], limit)
        write_index = len(shards) > 1
    if qweights and not quantize:
        config.pop("quantization_config", None)
        out_dtype = out_dtype or dense_dtype
    if quantize and not qweights:
        config["quantization_config"] = settings.quantization_config(skip)
    if out_dtype is not None and not (quantize and qweights):
        name = next((k for k, v in DTYPES.items() if v == out_dtype and "float" in k), str(out_dtype))
        for key in ("dtype", "torch_dtype"):
            if key in config or key == "dtype":
                config[key] = name
    variable = any(j.requantize for s in shards for j in s.jobs)
    if variable and limit:
        raise AdaptkitError("--max-shard-size cannot be combined with --quantize nf4 yet")
    return MergePlan(base, adapters, weights, shards, config, write_index, warnings, variable_sizes=variable)


def resolve_dtype(dtype) -> torch.dtype | None:
    """'auto'/None (keep each tensor's own), a torch dtype, or a name such as 'bfloat16'."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise AdaptkitError(f"unknown dtype {dtype!r} (choose auto, float16, bfloat16 or float32)") from None


# models whose linear layers are transformers' Conv1D, weight stored (in, out)
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}


def _job(name, source, shape, in_dtype, out_dtype, ops) -> TensorJob:
    target = out_dtype if (out_dtype is not None and in_dtype in FLOAT_DTYPES) else in_dtype
    return TensorJob(name, source, tuple(shape), in_dtype, target, list(ops))


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


def _check_module(m: LoraModule, shape, transposed: bool) -> str | None:
    src = m.source
    a_shape, b_shape = src.shape(m.a_key), src.shape(m.b_key)
    if len(a_shape) != 2 or len(b_shape) != 2:
        return f"{m.name}: only Linear, Conv1D and Embedding LoRA are supported (A is {list(a_shape)})"
    if a_shape[0] != b_shape[1]:
        return f"{m.name}: A {list(a_shape)} and B {list(b_shape)} do not fit together"
    if shape is None:
        return f"module {m.name} is not in the base (no tensor {m.weight_name})"
    canonical = (m.out_features, m.in_features)
    expected = canonical[::-1] if transposed else canonical
    if tuple(shape) != expected:
        return f"{m.weight_name} is {list(shape)} in the base but the LoRA gives {list(expected)}"
    if m.magnitude_key is not None and tuple(src.shape(m.magnitude_key)) != (m.out_features,):
        return f"{m.name}: DoRA magnitude is {list(src.shape(m.magnitude_key))}, expected [{m.out_features}]"
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


def _reshard(jobs: list[TensorJob], limit: int) -> list[OutShard]:
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
        return [OutShard("model.safetensors", groups[0], {"format": "pt"})]
    return [OutShard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g, {"format": "pt"}) for i, g in enumerate(groups)]
