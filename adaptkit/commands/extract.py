"""``adaptkit.extract``: a LoRA from a fine-tuned model, streamed, with the error each module keeps.

For every tensor the fine-tune changed, ΔW = W_ft − W_base in fp32 is factored into its best rank-R
approximation (Eckart–Young: truncated SVD; randomized, with oversampling and power iterations,
where R ≪ min(out, in); :func:`adaptkit.methods.factor`), split as A = √Σ·Vᵀ, B = U·√Σ with
``lora_alpha`` = r (scaling 1), so peft loads it as is. ``energy`` picks each module's smallest rank
keeping that share of ‖ΔW‖²_F (``rank_pattern``). What a LoRA cannot hold is saved whole
(``modules_to_save``): changed norms and other 1-D tensors, embeddings and the output head (unless
``embeddings="factor"``), a vocabulary resized by the fine-tune. Identical tensors are skipped after
a byte comparison.

Both models are read tensor by tensor (safetensors or ``.bin``, sharded or not, Hub ids), compared
and factored in a read → compute → collect stream; the factors stay in memory (r·(in + out) values
a module) and tensors saved whole are copied file to file from the fine-tune at the end.
"""

from __future__ import annotations

import json
import re
import resource
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..adapter import PEFT_PREFIX
from ..architecture import named_class
from ..device import resolve_device
from ..errors import AdaptkitError
from ..io.checkpoint import Checkpoint
from ..io.files import is_regular
from ..io.output import atomic_output_dir, check_output
from ..io.pipeline import Pool, run_stream
from ..io.safetensors_file import StreamingWriter
from ..plan import INPUT_EMBEDDING_SUFFIXES, VOCAB_TENSORS
from ..reporting import Collected, Reporter
from .inputs import open_base

EMBEDDINGS = ("save", "factor")
DTYPES = ("float32", "float16", "bfloat16")
LOW_ENERGY = 0.9  # below this share of ‖ΔW‖² kept, a module is named in a warning
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json", "spiece.model")
EMBEDDINGS_BY_NAME = tuple(s.rsplit(".", 1)[0] for s in INPUT_EMBEDDING_SUFFIXES)  # module names, not tensors
HEADS = tuple(s.rsplit(".", 1)[0] for s in VOCAB_TENSORS if s not in INPUT_EMBEDDING_SUFFIXES)  # lm_head, embed_out


@dataclass
class ModuleExtract:
    """One module of the extracted adapter. ``energy``: the share of ‖ΔW‖²_F its factors keep (1 for
    a tensor saved whole); ``rel_error`` = ‖ΔW − B·A‖_F / ‖ΔW‖_F = √(1 − energy)."""

    name: str  # module name (the base model's, as peft names it)
    kind: str  # "lora", "embedding" (a LoRA on an embedding) or "saved" (modules_to_save)
    rank: int
    energy: float
    shape: tuple[int, ...]

    @property
    def rel_error(self) -> float:
        return max(0.0, 1.0 - self.energy) ** 0.5


@dataclass
class ExtractResult:
    """What :func:`extract` did: each module's rank and energy kept, tensors saved whole, counts."""

    out: str
    device: str
    modules: list[ModuleExtract]
    base: str  # the base and the fine-tune, as given
    finetuned: str
    identical: int  # tensors the fine-tune left as they were (skipped)
    excluded: list[str]  # changed tensors left out by include/exclude: the adapter does not carry them
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    warnings: list[str] = field(default_factory=list)

    @property
    def lora_modules(self) -> list[ModuleExtract]:
        return [m for m in self.modules if m.kind != "saved"]

    @property
    def worst_energy(self) -> float | None:
        return min((m.energy for m in self.lora_modules), default=None)

    @property
    def median_energy(self) -> float | None:
        vals = [m.energy for m in self.lora_modules]
        return statistics.median(vals) if vals else None

    def to_dict(self) -> dict:
        d = asdict(self)
        for m, src in zip(d["modules"], self.modules):
            m["rel_error"] = src.rel_error
        d.update(worst_energy=self.worst_energy, median_energy=self.median_energy)
        return d


def _options(rank, energy, max_rank, embeddings, dtype, include, exclude):
    if (rank is None) == (energy is None):
        raise AdaptkitError("give one of rank (a fixed rank for every module) or energy (each module's smallest "
                            "rank keeping that share of ‖ΔW‖²)", param="rank")
    if max_rank is not None and energy is None:
        raise AdaptkitError("caps the ranks energy picks; with rank every module takes that rank", param="max_rank")
    for value, name in ((rank, "rank"), (max_rank, "max_rank")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise AdaptkitError(f"must be a positive integer, got {value!r}", param=name)
    if energy is not None and not (isinstance(energy, (int, float)) and not isinstance(energy, bool)
                                   and 0 < energy <= 1):
        raise AdaptkitError(f"must be in (0, 1], got {energy!r}", param="energy")
    if embeddings not in EMBEDDINGS:
        raise AdaptkitError(f"must be one of {', '.join(EMBEDDINGS)}, got {embeddings!r}", param="embeddings")
    if dtype not in DTYPES:
        raise AdaptkitError(f"must be one of {', '.join(DTYPES)}, got {dtype!r}", param="dtype")
    patterns = []
    for value, name in ((include, "include"), (exclude, "exclude")):
        try:
            patterns.append(re.compile(value) if value else None)
        except re.error as e:
            raise AdaptkitError(f"not a regular expression ({e})", param=name) from None
    return patterns


def _kind_by_name(module: str, shape) -> str:
    """The kind of a module transformers does not describe, from its name and shape."""
    last = module.rsplit(".", 1)[-1]
    if last in EMBEDDINGS_BY_NAME:
        return "embedding"
    return "linear" if len(shape) == 2 else "other"


def extract(base, finetuned, out, *, rank: int | None = None, energy: float | None = None,
            max_rank: int | None = None, embeddings: str = "save", dtype: str = "float32", include: str | None = None,
            exclude: str | None = None, device="auto", force: bool = False,
            reporter: Reporter | None = None) -> ExtractResult:
    """Extract a LoRA adapter from a fine-tuned model: ``out`` + base ≈ ``finetuned``, as close as the
    rank allows, with every module's error reported.

    Args:
        base: the base model (folder or Hub id ``org/name[@revision]``).
        finetuned: the fine-tuned model, of the same architecture.
        out: the PEFT adapter folder to write (``PeftModel.from_pretrained(base, out)`` loads it).
        rank: one rank for every module (the best rank-R approximation of each ΔW).
        energy: instead of ``rank``, each module's smallest rank keeping this share of ‖ΔW‖²_F.
        max_rank: with ``energy``, the largest rank any module may take.
        embeddings: ``"save"`` (changed embeddings and the output head saved whole, as
            ``modules_to_save``) or ``"factor"`` (LoRAs on them too; a resized vocabulary is saved whole).
        dtype: of the factors written: ``"float32"`` (default), ``"float16"`` or ``"bfloat16"``.
        include, exclude: regular expressions on tensor names: only tensors matching ``include``,
            none matching ``exclude``, are extracted (changed tensors left out are reported).
        device: where ΔW is computed and factored (``"auto"``: CUDA when present).
        force: replace an existing ``out``.
        reporter: receives progress (bytes read) and warnings.

    Returns:
        An :class:`ExtractResult`: per module its rank and the share of ‖ΔW‖² kept.

    Raises:
        AdaptkitError: bad options, models of different architectures or shapes, a change no LoRA
            or saved module can carry (MoE experts stored one tensor per expert), each in one line.

    Example:
        >>> import adaptkit
        >>> _ = adaptkit.merge("fixtures/tiny-llama", "fixtures/adapters/llama-lora", "out/doc-ft", force=True)
        >>> r = adaptkit.extract("fixtures/tiny-llama", "out/doc-ft", "out/doc-extracted", rank=8, force=True)
        >>> len(r.lora_modules), r.worst_energy > 0.99
        (14, True)
    """
    t0 = time.perf_counter()
    report = Collected(reporter)
    keep, drop = _options(rank, energy, max_rank, embeddings, dtype, include, exclude)
    out_dtype = getattr(torch, dtype)
    given = [b.path if isinstance(b, Checkpoint) else b for b in (base, finetuned)]
    check_output(out, force, inputs=given)
    dev = resolve_device(device)
    base_ck, ft_ck = open_base(base), open_base(finetuned)
    try:
        plan = _plan(base_ck, ft_ck, keep, drop, embeddings, report)
        results = _stream(plan, base_ck, ft_ck, dev, rank, energy, max_rank, report)
        label = str(base_ck.path) if isinstance(base, Checkpoint) else str(base)
        modules, tensors, saved, config = _assemble(plan, results, base_ck, ft_ck, rank, energy, out_dtype, label,
                                                    report)
        inputs = [base_ck.path, ft_ck.path, *(s.path for s in base_ck.shards), *(s.path for s in ft_ck.shards)]
        with atomic_output_dir(out, force, inputs=inputs) as tmp:
            written = _write(tmp, tensors, saved, ft_ck, config)
            _side_files(tmp, ft_ck, base, finetuned, modules, rank, energy)
    finally:
        base_ck.close()
        ft_ck.close()
    low = [m for m in modules if m.kind != "saved" and m.energy < LOW_ENERGY]
    if low:
        worst = min(low, key=lambda m: m.energy)
        report.warn(f"{len(low)} modules keep less than {LOW_ENERGY:.0%} of their change (worst: {worst.name}, "
                    f"{worst.energy:.1%} at rank {worst.rank}): a higher rank or energy keeps more")
    return ExtractResult(out=str(out), device=str(dev), modules=modules, base=str(given[0]),
                         finetuned=str(given[1]), identical=plan.identical,
                         excluded=plan.excluded, bytes_read=plan.bytes, bytes_written=written,
                         seconds=time.perf_counter() - t0,
                         peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                         warnings=report.warnings)


# ------------------------------------------------------------------------------------------- plan

@dataclass
class _Pair:
    disk: str  # the tensor's on-disk name (in both models)
    memory: str  # its in-memory name (peft's)
    module: str  # the in-memory module it belongs to
    param: str  # "weight", "bias", …
    kind: str  # the module's kind: linear, conv1d, embedding, other
    resized: bool = False  # the fine-tune has more rows (a grown vocabulary)


@dataclass
class _Plan:
    pairs: list[_Pair]
    embeddings: str
    filters: tuple = (None, None)  # (include, exclude) patterns
    excluded: list[str] = field(default_factory=list)
    bytes: int = 0
    identical: int = 0


def _plan(base: Checkpoint, ft: Checkpoint, keep, drop, embeddings: str, report) -> _Plan:
    """Which tensors to compare, and what each is: checks both models against each other first."""
    from ..architecture import module_kinds
    from ..plan import renames

    for key in ("model_type", "architectures"):
        a, b = base.config.get(key), ft.config.get(key)
        if a and b and a != b:
            raise AdaptkitError(f"the fine-tune is {key} {b!r} but the base is {a!r}: a LoRA is a change of one "
                                "model", ft.path)
    only_ft = sorted(set(ft.tensors) - set(base.tensors))
    if only_ft:
        raise AdaptkitError(f"the fine-tune has {len(only_ft)} tensors the base lacks (first: {only_ft[0]}): a LoRA "
                            "cannot add modules to the base", ft.path)
    only_base = sorted(set(base.tensors) - set(ft.tensors))
    if only_base:
        report.warn(f"{len(only_base)} base tensors are not in the fine-tune (first: {only_base[0]}): left as the "
                    "base has them")
    dtypes = {(info.dtype, ft.info(name).dtype) for name, (_, info) in base.tensors.items() if name in ft.tensors}
    if any(a != b for a, b in dtypes):
        report.warn("the fine-tune stores other dtypes than the base (" + ", ".join(
            sorted({f"{str(a).removeprefix('torch.')} → {str(b).removeprefix('torch.')}" for a, b in dtypes if a != b}))
                    + "): tensors are compared by value")
    kinds = module_kinds(base.config)
    memory_of = {disk: mem for mem, disk in renames(base).items()}
    plan = _Plan([], embeddings, (keep, drop))
    for name, (_, info) in base.tensors.items():
        if name not in ft.tensors:
            continue
        other = ft.info(name)
        memory = memory_of.get(name, name)
        module, _, param = memory.rpartition(".")
        kind = _kind_by_name(module, info.shape) if kinds is None else kinds.get(module, "unknown")
        resized = False
        if tuple(other.shape) != tuple(info.shape):
            grown = (len(info.shape) == 2 and tuple(other.shape[1:]) == tuple(info.shape[1:])
                     and other.shape[0] > info.shape[0]
                     and (kind == "embedding" or module.rsplit(".", 1)[-1] in HEADS))
            if not grown:
                raise AdaptkitError(f"{name} is {list(other.shape)} in the fine-tune but {list(info.shape)} in the "
                                    "base: not a change a LoRA can carry", ft.path)
            resized = True
        plan.pairs.append(_Pair(name, memory, module, param, kind, resized))
        plan.bytes += info.nbytes + other.nbytes
    return plan


def _filtered(pair: _Pair, keep, drop) -> bool:
    return (keep is not None and not keep.search(pair.disk)) or (drop is not None and drop.search(pair.disk) is not None)


# ------------------------------------------------------------------------------------------ stream

def _stream(plan: _Plan, base: Checkpoint, ft: Checkpoint, dev: torch.device, rank, energy, max_rank, report):
    """Read each pair, skip identical ones by their bytes, compute ΔW in fp32 and factor the
    weights a LoRA takes. Returns {disk name: ("same" | "excluded" | "save" | (A, B, energy) |
    ("delta", ΔW on the CPU))}."""
    from ..methods import factor

    keep, drop = plan.filters
    largest = max((max(base.info(p.disk).nbytes, ft.info(p.disk).nbytes) for p in plan.pairs), default=1)
    cuda = dev.type == "cuda"
    pool = Pool(lambda: torch.empty(max(largest, 1), dtype=torch.uint8, pin_memory=cuda), 4)
    results: dict[str, object] = {}
    report.start("extracting", plan.bytes, "bytes")

    def read(pair):
        a, b = pool.take(), pool.take()
        try:
            return a, b, base.read(pair.disk, out=a), ft.read(pair.disk, out=b)
        except BaseException:
            pool.give(a)
            pool.give(b)
            raise

    def compute(pair, data):
        bufa, bufb, wa, wb = data
        try:
            same = wa.dtype == wb.dtype and wa.shape == wb.shape and torch.equal(
                wa.reshape(-1).view(torch.uint8), wb.reshape(-1).view(torch.uint8))
            if same:
                return "same"
            if not (wa.is_floating_point() and wb.is_floating_point()):
                if _filtered(pair, keep, drop):
                    return "excluded"
                raise AdaptkitError(f"{pair.disk} ({wa.dtype}) changed: only floating-point tensors can be "
                                    "extracted", ft.path)
            if not pair.resized and (torch.equal(wa, wb) if wa.dtype == wb.dtype else torch.equal(wa.float(), wb.float())):
                return "same"  # equal values in other bytes (another dtype, -0.0)
            if _filtered(pair, keep, drop):
                return "excluded"
            if pair.kind == "unknown":
                raise AdaptkitError(f"{pair.disk} changed but belongs to no module transformers builds for this "
                                    "model (MoE experts stored one tensor per expert are fused in memory): LoRAs on "
                                    "experts (target_parameters) are not extracted yet; leave them out with exclude "
                                    "to extract the rest", ft.path)
            if pair.resized or not _factored(pair, plan.embeddings):
                return "save"
            delta = wb.to(dev, torch.float32, copy=True).sub_(wa.to(dev, torch.float32))
            if not bool(torch.isfinite(delta).all()):
                raise AdaptkitError(f"{pair.disk}: NaN or Inf in the fine-tune's change", ft.path)
            if pair.param != "weight" or delta.dim() != 2:
                return ("delta", delta.cpu())  # a bias beside a LoRA (lora_bias), or saved whole
            if pair.kind in ("conv1d", "embedding"):
                delta = delta.T  # stored (in, out): the LoRA factors (out, in)
            r = min(rank or max_rank or min(delta.shape), min(delta.shape))
            a, b, kept = factor(delta, rank=r if energy is None else None, energy=energy)
            if energy is not None and max_rank is not None and a.shape[0] > max_rank:
                a, b, kept = factor(delta, rank=max_rank)
            return a.cpu(), b.cpu(), kept
        finally:
            pool.give(bufa)
            pool.give(bufb)

    def collect(pair, result):
        results[pair.disk] = result
        report.advance(base.info(pair.disk).nbytes + ft.info(pair.disk).nbytes)

    run_stream(plan.pairs, lambda p: True, read, compute, collect, depth=1, on_stop=pool.close)
    return results


def _factored(pair: _Pair, embeddings: str) -> bool:
    """Whether a changed tensor becomes (part of) a LoRA, rather than saved whole."""
    last = pair.module.rsplit(".", 1)[-1]
    if pair.kind == "embedding" or last in HEADS:
        return embeddings == "factor"
    return pair.kind in ("linear", "conv1d")


# ---------------------------------------------------------------------------------------- assemble

def _assemble(plan: _Plan, results: dict, base: Checkpoint, ft: Checkpoint, rank, energy, out_dtype, base_label,
              report):
    """The adapter: modules, tensors under peft's names, tensors saved whole and the config."""
    factors: dict[str, tuple] = {}  # module -> (A, B, energy, kind, shape)
    biases: dict[str, torch.Tensor] = {}  # module -> Δb beside its LoRA
    saved_modules: set[str] = set()
    by_module: dict[str, list[_Pair]] = {}
    identical = 0
    for pair in plan.pairs:
        by_module.setdefault(pair.module, []).append(pair)
        res = results[pair.disk]
        if isinstance(res, str):
            if res == "same":
                identical += 1
            elif res == "excluded":
                plan.excluded.append(pair.disk)
            elif res == "save":
                saved_modules.add(pair.module)
            continue
        if res[0] == "delta":
            if pair.param == "bias" and pair.kind in ("linear", "conv1d"):
                biases[pair.module] = res[1]
            else:
                saved_modules.add(pair.module)
            continue
        a, b, kept = res
        shape = tuple(base.info(pair.disk).shape)
        factors[pair.module] = (a, b, kept, "embedding" if pair.kind == "embedding" else "lora", shape)
    plan.identical = identical
    for module in saved_modules:  # a module saved whole carries every change of its own
        factors.pop(module, None)
        biases.pop(module, None)
    # peft's lora_bias is one flag for every LoRA module; it cannot merge into a layer without a bias,
    # and peft refuses it on embedding LoRAs
    orphan = sorted(m for m in biases if m not in factors)
    lacking = [m for m in factors if factors[m][3] == "embedding"
               or m + ".bias" not in {p.memory for p in by_module[m]}]
    if biases and (orphan or lacking):
        moved = sorted(biases)
        for module in moved:
            factors.pop(module, None)
            saved_modules.add(module)
        biases = {}
        report.warn(f"{len(moved)} linear layers changed their bias (first: {moved[0]}) but peft's lora_bias needs a "
                    "bias on every LoRA layer: those layers are saved whole (modules_to_save)")
    if plan.excluded:
        report.warn(f"{len(plan.excluded)} changed tensors are left out by include/exclude (first: "
                    f"{plan.excluded[0]}): the adapter does not carry their change")
    resized = [p for p in plan.pairs if p.resized]
    if resized:
        report.warn(f"the fine-tune resized {resized[0].disk} from {list(base.info(resized[0].disk).shape)} to "
                    f"{list(ft.info(resized[0].disk).shape)}: saved whole; resize the base's embeddings "
                    f"(model.resize_token_embeddings({ft.info(resized[0].disk).shape[0]})) before loading the "
                    "adapter in peft (adaptkit merge does it)")
    if not factors and not saved_modules:
        raise AdaptkitError("the fine-tune equals the base (after include/exclude): nothing to extract", ft.path)
    tensors: dict[str, torch.Tensor] = {}
    modules: list[ModuleExtract] = []
    for module in sorted(factors, key=_natural):
        a, b, kept, kind, shape = factors[module]
        if kind == "embedding":
            tensors[f"{module}.lora_embedding_A"] = a.to(out_dtype).contiguous()
            tensors[f"{module}.lora_embedding_B"] = b.to(out_dtype).contiguous()
        else:
            tensors[f"{module}.lora_A.weight"] = a.to(out_dtype).contiguous()
            tensors[f"{module}.lora_B.weight"] = b.to(out_dtype).contiguous()
            if biases:
                bias = biases.get(module)
                tensors[f"{module}.lora_B.bias"] = (bias if bias is not None else torch.zeros(b.shape[0])).to(
                    out_dtype).contiguous()
        modules.append(ModuleExtract(module, kind, int(a.shape[0]), kept, shape))
    saved = []  # (peft key, on-disk tensor of the fine-tune)
    for module in sorted(saved_modules, key=_natural):
        for pair in by_module[module]:
            saved.append((f"{pair.memory}", pair.disk))
        shape = tuple(ft.info(by_module[module][0].disk).shape)
        modules.append(ModuleExtract(module, "saved", 0, 1.0, shape))
    config = _config(factors, biases, saved_modules, plan, base, base_label)
    return modules, tensors, saved, config


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _config(factors: dict, biases: dict, saved_modules: set[str], plan: _Plan, base: Checkpoint, base_label: str):
    """peft's LoraConfig: scaling 1 everywhere (lora_alpha = r), rank_pattern/alpha_pattern for modules
    of another rank."""
    from importlib.metadata import version

    ranks = {m: int(f[0].shape[0]) for m, f in factors.items()}
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    pattern = {m: v for m, v in sorted(ranks.items()) if v != r}
    arch = named_class(base.config) or ""
    task = "CAUSAL_LM" if arch.endswith("ForCausalLM") else None
    conv1d = any(p.kind == "conv1d" for p in plan.pairs if p.module in factors)
    return {
        "peft_type": "LORA", "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(factors, key=_natural) or None, "modules_to_save": sorted(saved_modules) or None,
        "lora_bias": bool(biases), "fan_in_fan_out": conv1d, "use_rslora": False, "use_dora": False,
        "bias": "none", "lora_dropout": 0.0, "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": base_label, "task_type": task, "peft_version": version("peft"),
    }


# ------------------------------------------------------------------------------------------- write

def _write(tmp: Path, tensors: dict[str, torch.Tensor], saved: list[tuple[str, str]], ft: Checkpoint,
           config: dict) -> int:
    """adapter_model.safetensors (factors from memory, saved tensors copied from the fine-tune's
    files) and adapter_config.json."""
    entries = [(PEFT_PREFIX + k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    entries += [(PEFT_PREFIX + key, ft.info(disk).dtype, tuple(ft.info(disk).shape)) for key, disk in saved]
    writer = StreamingWriter(tmp / "adapter_model.safetensors", entries, {"format": "pt"})
    try:
        for k, t in tensors.items():
            writer.write(PEFT_PREFIX + k, t)
        for key, disk in saved:
            shard, info = ft.tensors[disk]
            if shard.kind == "safetensors":
                writer.copy_from(PEFT_PREFIX + key, shard.fd(), info.offset, info.nbytes, info.dtype, info.shape)
            else:
                writer.write(PEFT_PREFIX + key, ft.read(disk))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return writer.bytes_written


def _side_files(tmp: Path, ft: Checkpoint, base, finetuned, modules: list[ModuleExtract], rank, energy) -> None:
    """The fine-tune's tokenizer (a grown vocabulary needs it) and a model card."""
    import shutil

    for name in TOKENIZER_FILES:
        p = ft.path / name
        if is_regular(p):
            shutil.copy2(p, tmp / name)
    loras = [m for m in modules if m.kind != "saved"]
    how = f"rank {rank}" if rank is not None else f"energy {energy:g}"
    lines = ["---", "library_name: peft", f"base_model: {base}", "tags:", "- adaptkit", "- lora", "- extracted",
             "---", "", "# Extracted LoRA", "",
             f"Extracted by adaptkit {__version__} (`adaptkit extract`, {how}) from the fine-tune `{finetuned}` "
             f"against `{base}`: ΔW = W_ft − W_base factored per module by truncated SVD.", ""]
    if loras:
        energies = sorted(m.energy for m in loras)
        lines.append(f"- {len(loras)} LoRA modules; share of ‖ΔW‖² kept: worst {energies[0]:.2%}, median "
                     f"{statistics.median(energies):.2%}")
    saved = [m.name for m in modules if m.kind == "saved"]
    if saved:
        lines.append(f"- saved whole (modules_to_save): {', '.join(saved[:8])}{' …' if len(saved) > 8 else ''}")
    (tmp / "README.md").write_text("\n".join(lines) + "\n")

