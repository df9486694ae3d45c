"""``adaptkit.merge``: fold LoRA adapters into a base model, streaming tensor by tensor."""

from __future__ import annotations

import contextlib
import gc
import json
import resource
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import __version__
from ..adapter import Adapter
from ..device import resolve_device
from ..errors import AdaptkitError
from ..io.checkpoint import Checkpoint, is_weight_file
from ..io.files import is_regular
from ..io.output import atomic_output_dir, check_output
from ..plan import MergePlan, plan_merge
from ..quant import QuantSettings
from ..reporting import Collected, Reporter
from ..stream import stream_plan
from .inputs import open_adapters, open_base, read_paths


@dataclass
class MergeResult:
    """What :func:`merge` did. ``quantization``: per-layer relative error of what was written against
    the exact fp32 merge, when the codecs add one (4-bit bases and outputs, ``qlora``)."""

    out: str
    device: str
    tensors: int
    tensors_merged: int
    modules_merged: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    warnings: list[str] = field(default_factory=list)
    quantization: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def merge(base, adapters, out, *, weights=None, dtype="auto", device="auto", max_shard_size=None,
          quantize=None, qlora=False, quant_settings: QuantSettings | None = None, force=False,
          reporter: Reporter | None = None) -> MergeResult:
    """Fold LoRA adapters into a base model and write the merged model to ``out``.

    Each adapted weight becomes W + w·s·B@A (peft's formulas: rsLoRA, rank/alpha patterns, DoRA,
    Conv1D, embedding LoRA, modules_to_save and lora_bias included), computed in fp32 and rounded
    once to the output dtype. One tensor at a time is read, merged and written, so memory follows
    the largest tensor, not the model; untouched tensors are copied file to file. Every adapter is
    checked against the base before a byte is written, and the output appears at ``out`` only when
    complete.

    Args:
        base: the base model: a folder in the Hugging Face layout (safetensors, sharded or not, or
            ``pytorch_model*.bin``), a Hub id ``org/name[@revision]``, or an open :class:`Checkpoint`.
        adapters: one adapter or a list, folded in order: PEFT folders, single ``.safetensors``
            files (PEFT or kohya names), mlx-lm folders, Hub ids, or loaded :class:`Adapter` objects.
        out: the folder to write. It must not exist unless ``force``, and may never be, hold or lie
            inside an input.
        weights: one number per adapter, scaling its ΔW (default 1 each).
        dtype: ``"auto"`` (each tensor keeps its dtype), ``"float16"``, ``"bfloat16"`` or ``"float32"``.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        max_shard_size: re-shard the output (``"5GB"``, ``"500MB"``, bytes); by default the base's
            shard layout is kept.
        quantize: write a quantized model. ``"same"`` (or the base's format by name: ``"nf4"``,
            ``"fp8"``, ``"mxfp4"``) keeps a quantized base in its format: merged layers requantized
            with its own scheme, the rest copied byte for byte. ``"nf4"`` on a dense base quantizes
            it as transformers would. Without it a quantized base (bitsandbytes 4-bit, FP8,
            compressed-tensors FP8, MXFP4) is merged into a dense model: dequant(W) + ΔW in fp32,
            in its compute dtype (bf16 for FP8/MXFP4 unless config.json names another).
        qlora: merge onto each dense weight's 4-bit round trip, as QLoRA training saw it.
        quant_settings: how to quantize a dense base (``quantize`` or ``qlora``);
            :meth:`QuantSettings.load` reads them from a BitsAndBytesConfig JSON.
        force: replace an existing ``out`` (only once the new one is complete).
        reporter: receives progress (bytes written) and warnings (:class:`adaptkit.Reporter`).

    Returns:
        A :class:`MergeResult`: counts, bytes, seconds, peak memory, warnings and, for 4-bit work,
        the error each merged layer carries.

    Raises:
        AdaptkitError: a bad input or option, an adapter that does not fit the base, NaN/Inf in a
            merged tensor, or an OS error, each in one line; nothing is left behind.

    Example:
        >>> import adaptkit
        >>> r = adaptkit.merge("fixtures/tiny-llama", "fixtures/adapters/llama-lora", "out/doc-merged",
        ...                    force=True)
        >>> (r.modules_merged, r.tensors_merged, r.tensors)
        (14, 14, 21)
    """
    t0 = time.perf_counter()
    report = Collected(reporter)
    adapters = adapters if isinstance(adapters, (list, tuple)) else [adapters]
    if not adapters:
        raise AdaptkitError("give at least one adapter", param="adapters")
    given = [base.path if isinstance(base, Checkpoint) else base]
    given += [a.path if isinstance(a, Adapter) else a for a in adapters]
    check_output(out, force, inputs=given)
    with _no_collections():
        dev = resolve_device(device)
        ckpt = open_base(base)
        try:
            loaded = open_adapters(adapters)
            plan = plan_merge(ckpt, loaded, weights, dtype=dtype, max_shard_size=max_shard_size, quantize=quantize,
                              qlora=qlora, settings=quant_settings)
            for w in plan.warnings:
                report.warn(w)
            report.start("merging", sum(j.out_bytes for j in plan.jobs), "bytes")
            errors: dict[str, tuple[str, float]] = {}
            with atomic_output_dir(out, force, inputs=read_paths(ckpt, loaded)) as tmp:
                written = stream_plan(plan, tmp, dev, report.advance, errors)
                _write_side_files(plan, tmp, dict(dtype=dtype, device=str(dev), quantize=quantize, qlora=qlora,
                                                  max_shard_size=max_shard_size))
        finally:
            ckpt.close()
    return MergeResult(out=str(out), device=str(dev), tensors=len(plan.jobs),
                       tensors_merged=sum(1 for j in plan.jobs if j.ops), modules_merged=plan.modules_merged,
                       bytes_read=sum(j.in_bytes for j in plan.jobs), bytes_written=written,
                       seconds=time.perf_counter() - t0,
                       peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                       warnings=report.warnings, quantization=_summarise(errors))


@contextlib.contextmanager
def _no_collections():
    """No cyclic garbage collection while a merge plans and streams: planning imports transformers and builds
    a job per tensor (18,867 for Qwen3-30B-A3B's layout), the stream allocates per tensor, neither makes more than
    a few reference cycles, and each full collection walks every object alive: 8 of them took 0.75-1.0 s of an
    MoE merge's ~11 s on a 2-core VM (session 13, gc.callbacks). Collections resume after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _summarise(errors: dict[str, tuple[str, float]]) -> dict | None:
    """Relative error, per layer, of what was written against the exact fp32 merge."""
    if not errors:
        return None
    vals = [e for _, e in errors.values()]
    return {"what": next(iter(errors.values()))[0], "layers": len(vals), "worst": max(vals),
            "median": statistics.median(vals), "per_layer": {k: e for k, (_, e) in sorted(errors.items())}}


def _write_side_files(plan: MergePlan, tmp: Path, options: dict) -> None:
    """config.json (updated), the index, the base's other files (tokenizer…) and a model card."""
    from ..io.safetensors_file import read_header

    base = plan.base
    for p in sorted(base.path.iterdir()):
        if is_regular(p) and not is_weight_file(p.name) and p.name not in ("config.json", "README.md"):
            shutil.copy2(p, tmp / p.name)
    if plan.config:
        (tmp / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
    if plan.write_index:
        weight_map = {n: s.file for s in plan.shards for j in s.jobs for n in j.out_names}
        total = sum(t.nbytes for s in plan.shards for t in read_header(tmp / s.file).tensors)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    base_name = next((a.base_model for a in plan.adapters if isinstance(a.base_model, str)), None) or base.path.name
    lines = [
        "---", f"base_model: {base_name}", "library_name: transformers",
        "tags:", "- adaptkit", "- merge", "- lora", "---", "",
        "# Merged model", "",
        f"Produced by adaptkit {__version__} (`adaptkit merge`): the LoRA adapters below folded into the base,",
        "ΔW computed in fp32 and rounded once to the output dtype.", "",
        f"- base: `{base.path}`",
    ]
    for a, w in zip(plan.adapters, plan.weights):
        lines.append(f"- adapter: `{a.path}` (weight {w:g}, trained on `{a.base_model or 'unknown'}`)")
    shown = {k: v for k, v in options.items() if v not in (None, False, "auto")}
    if shown:
        lines += ["", "Options: " + ", ".join(f"{k}={v}" for k, v in shown.items()) + "."]
    for w in plan.warnings:
        lines.append(f"\nNote: {w}")
    (tmp / "README.md").write_text("\n".join(lines) + "\n")

