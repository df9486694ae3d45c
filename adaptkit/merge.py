"""Fold LoRA adapters into a base checkpoint, streaming tensor by tensor.

Data flows one way: the plan (:mod:`.plan`) checks every adapter against the base and decides,
for each output tensor, its shard, dtype and the operations on it, before a byte is written. The
stream (:func:`merge`) then reads each touched tensor, computes in fp32 on the chosen device, rounds
once to the output dtype and writes it; untouched tensors are copied file-to-file by the kernel.

The math is peft's (``peft/tuners/lora/layer.py`` and ``variants.py``), see :func:`merged_weight`:
- LoRA: W' = W + w·s·B@A (transposed for Conv1D ``fan_in_fan_out`` and embeddings);
- DoRA: W' = (m / ‖W₀ + ΔW‖_row) · (W + ΔW), rows of the canonical (out, in) weight, W₀ the weight
  before any adapter (peft takes the norm of the unmerged weight too);
- lora_bias: b' = b + w·s·lora_B.bias; modules_to_save: the saved tensor replaces the base one.
``w`` is the per-adapter ``--weight``; it scales ΔW (a DoRA magnitude is not scaled).
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .io import readahead
from .adapter import FP32_MAX, Adapter, load_adapter
from .io.checkpoint import Checkpoint, is_weight_file
from .device import resolve_device
from .errors import AdaptkitError
from .io.output import atomic_output_dir, check_output
from .io.pipeline import limit_heap_growth, run_stream
from .plan import MergePlan, Op, OutShard, TensorJob, plan_merge  # noqa: F401 - plan_merge re-exported
from .quant import QuantSettings, dequantize, quantize, relative_error
from .io.safetensors_file import ReservedHeaderWriter, StreamingWriter, header_reserve, numel

OUTPUT_BUFFER_BUDGET = 160 << 20  # bytes of merged tensors that may wait for the writer


@dataclass
class MergeResult:
    out: str
    device: str
    tensors: int
    tensors_merged: int
    modules_merged: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    warnings: list[str]
    quantization: dict | None = None  # per-layer relative error of what was written vs the exact merge

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------------------------- math

def merged_weight(w: torch.Tensor, ops: list[Op], device: torch.device) -> torch.Tensor:
    """Apply ``ops`` to the fp32 tensor ``w`` (on ``device``) and return the fp32 result."""
    needs_ref = any(op.kind == "lora" and op.module.use_dora for op in ops)
    ref = w.clone() if needs_ref else None
    for op in ops:
        if op.kind == "replace":
            w = op.adapter.source.get(op.key).to(device=device, dtype=torch.float32, copy=True)
            ref = w.clone() if needs_ref else None
        elif op.kind == "lora":
            m = op.module
            delta = m.delta(device)
            if op.weight != 1.0:
                delta.mul_(op.weight)
            if op.transposed:
                delta = delta.T
            if m.use_dora:
                combined = ref + delta
                canonical = combined.T if op.transposed else combined
                norm = torch.linalg.vector_norm(canonical, dim=1)
                factor = m.magnitude.to(device=device, dtype=torch.float32) / norm
                w = (w + delta) * (factor[None, :] if op.transposed else factor[:, None])
            else:
                w += delta
        elif op.kind == "bias":
            m = op.module
            w += m.lora_bias.to(device=device, dtype=torch.float32) * (m.scaling * op.weight)
    return w


# --------------------------------------------------------------------------------------------- stream

class _Pool:
    """Reusable byte buffers (pinned on CUDA): no allocation churn, bounded memory."""

    def __init__(self, nbytes: int, count: int, pin: bool):
        import queue

        self._q: queue.Queue = queue.Queue()
        for _ in range(count):
            self._q.put(torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin))

    def take(self) -> torch.Tensor:
        return self._q.get()

    def give(self, buf: torch.Tensor) -> None:
        self._q.put(buf)


def merge(base: str | Path | Checkpoint, adapters: list, out: str | Path, weights: list[float] | None = None,
          device: str = "auto", dtype: str | torch.dtype | None = "auto", max_shard_size: str | int | None = None,
          force: bool = False, progress: Callable[[int], None] | None = None,
          warn: Callable[[str], None] | None = None, on_plan: Callable[[MergePlan], None] | None = None,
          command: str | None = None, quantize: str | None = None, qlora: bool = False,
          settings: QuantSettings | None = None) -> MergeResult:
    """Merge ``adapters`` (paths or :class:`Adapter`) into ``base`` and write the model to ``out``.

    Nothing is written until every adapter has been checked against the base; the output appears at
    ``out`` only when complete. ``progress`` is called with the bytes of each tensor written.
    """
    t0 = time.perf_counter()
    given = [base.path if isinstance(base, Checkpoint) else base] + [a.path if isinstance(a, Adapter) else a
                                                                      for a in adapters]
    check_output(out, force, inputs=given)
    dev = resolve_device(device)
    ckpt = base if isinstance(base, Checkpoint) else Checkpoint.open(base)
    try:
        loaded = [a if isinstance(a, Adapter) else load_adapter(a) for a in adapters]
        if not loaded:
            raise AdaptkitError("no adapter given")
        plan = plan_merge(ckpt, loaded, weights, dtype, max_shard_size, quantize=quantize, qlora=qlora,
                          settings=settings)
        for w in plan.warnings:
            (warn or _default_warn)(w)
        if on_plan:
            on_plan(plan)
        bytes_written = 0
        quant_errors: dict[str, float] = {}
        with atomic_output_dir(out, force, inputs=read_paths(ckpt, loaded)) as tmp:
            bytes_written += _stream_tensors(plan, tmp, dev, progress, quant_errors)
            _write_side_files(plan, tmp, command)
    finally:
        ckpt.close()
    return MergeResult(out=str(out), device=str(dev), tensors=len(plan.jobs),
                       tensors_merged=sum(1 for j in plan.jobs if j.ops), modules_merged=plan.modules_merged,
                       bytes_read=sum(j.in_bytes for j in plan.jobs), bytes_written=bytes_written,
                       seconds=time.perf_counter() - t0,
                       peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                       warnings=plan.warnings, quantization=_summarise(quant_errors, plan))


def read_paths(ckpt: Checkpoint, adapters: list[Adapter]) -> list[Path]:
    """Every file and folder a merge reads (an output may be none of them, nor hold or lie in one)."""
    return [ckpt.path, *(s.path for s in ckpt.shards), *(p for a in adapters for p in (a.path, a.weights_path))]


def _summarise(errors: dict[str, float], plan: MergePlan) -> dict | None:
    """Relative error, per merged 4-bit layer, of what was written against the exact fp32 merge."""
    if not errors:
        return None
    import statistics

    vals = list(errors.values())
    if any(j.requantize for j in plan.jobs):
        what = "requantized to 4-bit"
    elif any(j.qlora for j in plan.jobs):
        what = "merged on the 4-bit round trip of the base (vs a plain merge)"
    else:
        what = "rounded to the output dtype"
    return {"what": what, "layers": len(vals), "worst": max(vals), "median": statistics.median(vals),
            "per_layer": dict(sorted(errors.items()))}


def _default_warn(message: str) -> None:
    import warnings

    warnings.warn(message, stacklevel=3)


def _fast_lora(job: TensorJob) -> Op | None:
    """The one plain-LoRA op of a job, when it can be fused into a single ``addmm_``."""
    if len(job.ops) == 1 and job.ops[0].kind == "lora" and not job.ops[0].module.use_dora:
        return job.ops[0]
    return None


def _check_finite(w32: torch.Tensor, job: TensorJob) -> None:
    """NaN, Inf or overflow of the output dtype in a merged tensor fails the merge (peft's safe_merge).

    ``aminmax`` is one cheap pass over the fp32 result and propagates NaN.
    """
    if not job.ops or not w32.is_floating_point() or w32.numel() == 0:
        return
    lo, hi = (float(x) for x in torch.aminmax(w32))
    limit = torch.finfo(job.out_dtype).max if job.out_dtype.is_floating_point else float("inf")
    if not (-limit <= lo and hi <= limit):  # also false for NaN
        names = ", ".join(sorted({str(op.adapter.path) for op in job.ops}))
        raise AdaptkitError(f"merging {names} into {job.name} gives NaN or Inf values (in {job.out_dtype}): "
                            f"the adapter seems broken or overflows this dtype")


def _stream_tensors(plan: MergePlan, tmp: Path, dev: torch.device, progress, quant_errors: dict) -> int:
    """Read → merge → write every tensor; memory: a few buffers of the largest merged tensor."""
    limit_heap_growth()
    ckpt = plan.base
    computed = [j for j in plan.jobs if j.computed]
    cuda = dev.type == "cuda"
    largest_in = max((j.in_bytes for j in computed), default=1)
    largest_out = max((j.out_bytes for j in computed if not j.requantize), default=1)
    largest_numel = max((numel(j.shape) for j in computed), default=1)
    # Results queue up while the writer is busy (copying untouched tensors, say): as many output
    # buffers as fit OUTPUT_BUFFER_BUDGET, at least three; the reader stays at most two ahead.
    n_out = max(3, min(8, OUTPUT_BUFFER_BUDGET // max(largest_out, 1)))
    in_pool = _Pool(largest_in, 3, pin=cuda)
    out_pool = _Pool(largest_out, n_out, pin=cuda)
    work = torch.empty(largest_numel, dtype=torch.float32, device=dev)  # the fp32 accumulator, reused
    writers: dict[str, object] = {}
    shard_of = {id(j): s for s in plan.shards for j in s.jobs}
    remaining = {s.file: len(s.jobs) for s in plan.shards}
    total = 0

    # the disk keeps reading ahead of the reader: jobs' source bytes, in the order they are consumed
    ranges, ends, upto = [], {}, 0
    for j in plan.jobs:
        for name in (j.source, *(j.quant.components if j.packed_source else ())):
            src, info = ckpt.tensors[name]
            if src.kind == "safetensors":
                ranges.append((src.path, info.offset, info.nbytes))
                upto += info.nbytes
        ends[id(j)] = upto
    ahead = readahead.for_stream(ranges)
    read_so_far = 0

    def read(job: TensorJob):
        nonlocal read_so_far
        ahead.consumed(ends[id(job)] - read_so_far)
        read_so_far = ends[id(job)]
        buf = in_pool.take()
        comps = ({c[len(job.name) + 1:]: ckpt.read(c).clone() for c in job.quant.components}
                 if job.packed_source else None)
        return buf, ckpt.read(job.source, out=buf), comps

    def compute(job: TensorJob, data):
        buf, tensor, comps = data
        try:
            w32 = work[: numel(job.shape)].view(job.shape)
            if job.packed_source:
                w32.copy_(dequantize(tensor, comps, dev))
            else:
                w32.copy_(tensor, non_blocking=cuda)
        finally:
            if cuda:
                torch.cuda.current_stream(dev).synchronize()
            in_pool.give(buf)
        if job.qlora:  # the base weight as QLoRA training saw it: through 4-bit and back
            st = job.settings
            packed, comps_q = quantize(w32.to(job.in_dtype).float(), job.quant, st.double_quant, st.storage)
            exact_plain = w32.clone() if job.ops else None
            w32.copy_(dequantize(packed, comps_q, dev))
        op = _fast_lora(job)
        if op is not None:  # W += w·s·B@A in one BLAS call, no ΔW materialised
            m = op.module
            a = m.A.to(dev, torch.float32)
            b = m.B.to(dev, torch.float32)
            alpha = m.scaling * op.weight
            if not (math.isfinite(alpha) and abs(alpha) <= FP32_MAX):  # addmm_ on the CPU ignores a NaN alpha
                raise AdaptkitError(f"{job.name}: the scale of {m.name} is not finite ({m.scaling} × {op.weight})")
            if op.transposed:
                w32.addmm_(a.T, b.T, alpha=alpha)
            else:
                w32.addmm_(b, a, alpha=alpha)
        elif job.ops:
            w32.copy_(merged_weight(w32.clone(), job.ops, dev))
        _check_finite(w32, job)
        if job.requantize:
            if job.packed_source:
                double, storage = "nested_absmax" in comps, tensor.dtype
            else:
                double, storage = job.settings.double_quant, job.settings.storage
            packed, new = quantize(w32, job.quant, double, storage)
            expected = {c[len(job.name) + 1:] for c in job.quant.components}
            if set(new) != expected:
                raise AdaptkitError(f"{job.name}: requantizing gave components {sorted(new)}, expected "
                                    f"{sorted(expected)}")
            quant_errors[job.name] = relative_error(dequantize(packed, new, dev), w32)
            items = [(job.name, packed.cpu())] + [(c, new[c[len(job.name) + 1:]].cpu()) for c in job.quant.components]
            return None, items
        if job.qlora and job.ops:  # how far the QLoRA-faithful merge is from a plain one
            exact_plain += w32 - dequantize(packed, comps_q, dev)  # plain W + ΔW, reconstructed
            quant_errors[job.name] = relative_error(w32, exact_plain)
        elif job.packed_source and job.ops:  # what rounding to the dense dtype costs, on the device
            quant_errors[job.name] = relative_error(w32.to(job.out_dtype), w32)
        host = out_pool.take()
        view = host[: job.out_bytes].view(job.out_dtype).view(job.shape)
        view.copy_(w32, non_blocking=cuda)
        if cuda:
            torch.cuda.current_stream(dev).synchronize()
        return host, [(job.name, view)]

    def writer_for(shard: OutShard):
        writer = writers.get(shard.file)
        if writer is None:
            if plan.variable_sizes:
                names = [n for j in shard.jobs for n in j.out_names]
                writer = ReservedHeaderWriter(tmp / shard.file, names, header_reserve(names, shard.metadata),
                                              shard.metadata)
            else:
                entries = [(j.name, j.out_dtype, j.shape) for j in shard.jobs]
                writer = StreamingWriter(tmp / shard.file, entries, shard.metadata)
            writers[shard.file] = writer
        return writer

    def write(job: TensorJob, done):
        nonlocal total
        shard = shard_of[id(job)]
        writer = writer_for(shard)
        if done is None:
            src_shard, info = ckpt.tensors[job.source]
            if src_shard.kind == "safetensors":
                writer.copy_from(job.name, src_shard.fd(), info.offset, info.nbytes, info.dtype, info.shape)
            else:
                writer.write(job.name, ckpt.read(job.source))
        else:
            host, items = done
            try:
                for name, tensor in items:
                    writer.write(name, tensor)
            finally:
                if host is not None:
                    out_pool.give(host)
        remaining[shard.file] -= 1
        if remaining[shard.file] == 0:
            writer.close()
            total += writer.bytes_written
        if progress:
            progress(job.out_bytes)

    # Reading and writing keep one core busy in the kernel: leave it to them (measured faster on 2 cores).
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 2) - 1)))
    try:
        run_stream(plan.jobs, lambda j: j.computed, read, compute, write, depth=n_out - 2)
    finally:
        torch.set_num_threads(threads)
        ahead.close()
        for w in writers.values():
            w.abort()
    return total


def _write_side_files(plan: MergePlan, tmp: Path, command: str | None) -> None:
    base = plan.base
    for p in sorted(base.path.iterdir()):
        if p.is_file() and not is_weight_file(p.name) and p.name not in ("config.json", "README.md"):
            shutil.copy2(p, tmp / p.name)
    if plan.config:
        (tmp / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
    if plan.write_index:
        from .io.safetensors_file import read_header

        weight_map = {n: s.file for s in plan.shards for j in s.jobs for n in j.out_names}
        total = sum(t.nbytes for s in plan.shards for t in read_header(tmp / s.file).tensors)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    base_name = next((a.base_model for a in plan.adapters if a.base_model), None) or base.path.name
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
    if command:
        lines += ["", "Command:", "", f"    {command}"]
    for w in plan.warnings:
        lines.append(f"\nNote: {w}")
    (tmp / "README.md").write_text("\n".join(lines) + "\n")
