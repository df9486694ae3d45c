"""Carry out a merge plan: read → decode → operations → encode → write, tensor by tensor.

Tensors that need no compute are copied file-to-file by the kernel. The others go through the
three-thread pipeline (:mod:`.io.pipeline`): the reader fills reusable byte buffers (pinned on
CUDA), the compute thread decodes into one reused fp32 buffer on the device, applies the job's
operations and encodes, the writer appends to the output shards (:mod:`.io.safetensors_file`).
On the CPU a dense tensor with one plain LoRA (or a cast alone) skips the fp32 buffer:
:func:`.ops.merge_rows` merges it a block of rows at a time from the read buffer into the output
buffer, on all cores but one (:class:`.ops.RowWorkers`; the last is left to the kernel's writing).
Memory stays at a few buffers of the largest merged tensor.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import AdaptkitError
from .io import readahead
from .io.pipeline import Pool, run_stream
from .codecs import DenseRead, DenseWrite
from .io.safetensors_file import (ReservedHeaderWriter, StreamingWriter, header_reserve, itemsize, numel,
                                  tensor_bytes)
from .ops import RowWorkers, apply_ops, finite_limit, fused_op, merge_rows
from .plan import MergePlan, OutShard, TensorJob

OUTPUT_BUFFER_BUDGET = 160 << 20  # bytes of merged tensors that may wait for the writer
BATCH_BYTES = 8 << 20  # small tensors travel the stream in runs of up to this many bytes


def _pool(nbytes: int, count: int, pin: bool) -> Pool:
    """Reusable byte buffers (pinned on CUDA)."""
    return Pool(lambda: torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin), count)


def fits(w32: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether every value rounds to a finite value of ``out_dtype`` (false for NaN): peft's
    safe_merge check on the merged weight, taken before rounding. See :func:`.ops.finite_limit`."""
    lo, hi = (float(x) for x in torch.aminmax(w32))
    limit = finite_limit(out_dtype)
    return -limit < lo and hi < limit


def check_finite(w32: torch.Tensor, job: TensorJob, out_dtype: torch.dtype) -> None:
    """NaN, Inf or overflow of the output dtype in a merged tensor fails the merge (peft's safe_merge).

    ``aminmax`` is one cheap pass over the fp32 result and propagates NaN.
    """
    if not job.ops or not w32.is_floating_point() or w32.numel() == 0:
        return
    if not fits(w32, out_dtype):
        raise _overflow(job, out_dtype)


def _overflow(job: TensorJob, out_dtype: torch.dtype) -> AdaptkitError:
    names = ", ".join(sorted({str(op.adapter.path) for op in job.ops}))
    return AdaptkitError(f"merging {names} into {job.name} gives NaN or Inf values (in {out_dtype}): "
                         f"the adapter seems broken or overflows this dtype")


def direct(job: TensorJob, dev: torch.device) -> tuple[bool, object]:
    """Whether a job goes from the read buffer straight into the output buffer on the CPU, and how:
    a dense 2-D tensor with one plain LoRA into a dense dtype (its op: :func:`.ops.merge_rows`), or
    a dense tensor with no op in another dense dtype (None: a cast)."""
    if dev.type != "cpu" or type(job.decoder) is not DenseRead or type(job.encoder) is not DenseWrite \
            or job.encoder.measure or numel(job.shape) == 0 or not job.decoder.dtype.is_floating_point:
        return False, None
    if not job.ops:
        return True, None
    op = fused_op(job.ops)
    return (op is not None and len(job.shape) == 2), op


def batches(jobs: list[TensorJob], shard_of: dict[int, OutShard], route=None) -> list[list[TensorJob]]:
    """The stream's units: runs of consecutive small dense tensors of one output shard travel together
    (up to :data:`BATCH_BYTES`: an MoE checkpoint's tens of thousands of expert tensors cost one read,
    one hand-over and one write a run, not one each); every other job travels alone. Each tensor of a
    run starts 8-byte aligned in the run's buffers, so its bytes can be viewed as its dtype. ``route(job)``
    (optional): a run holds jobs of one route only (an MoE layer's attention tensors, which the blocked
    route takes, apart from its expert tensors, which it does not)."""
    out: list[list[TensorJob]] = []
    run: list[TensorJob] = []
    run_in = run_out = 0
    key = {id(job): route(job) for job in jobs} if route else {}
    same = key.get
    for job in jobs:
        small = job.computed and type(job.decoder) is DenseRead and type(job.encoder) is DenseWrite
        if small and run and shard_of[id(job)] is shard_of[id(run[0])] and same(id(job)) == same(id(run[0])) \
                and run_in % 8 == 0 and run_out % 8 == 0 \
                and run_in + job.in_bytes <= BATCH_BYTES and run_out + job.out_bytes <= BATCH_BYTES:
            run.append(job)
            run_in, run_out = run_in + job.in_bytes, run_out + job.out_bytes
            continue
        if run:
            out.append(run)
            run = []
        if small:
            run, run_in, run_out = [job], job.in_bytes, job.out_bytes
        else:
            out.append([job])
    if run:
        out.append(run)
    return out


def stream_plan(plan: MergePlan, tmp: Path, dev: torch.device, progress, errors: dict[str, tuple[str, float]]) -> int:
    """Write every output shard of ``plan`` into the folder ``tmp``; return the bytes written.

    ``progress(n)`` after each tensor or run of tensors (their output bytes); ``errors[name] = (label,
    relative error)`` for every tensor whose codecs measure what they add.
    """
    ckpt = plan.base
    shard_of = {id(j): s for s in plan.shards for j in s.jobs}
    groups = batches(plan.jobs, shard_of, route=lambda job: direct(job, dev)[0])
    computed = [g for g in groups if g[0].computed]
    cuda = dev.type == "cuda"
    largest_in = max((sum(j.in_bytes for j in g) for g in computed), default=1)
    largest_out = max((sum(j.out_bytes for j in g) for g in computed if not g[0].encoder.variable), default=1)
    largest_numel = max((sum(numel(j.shape) for j in g) for g in computed), default=1)  # a run decodes at once
    # Results queue up while the writer is busy (copying untouched tensors, say): as many output
    # buffers as fit OUTPUT_BUFFER_BUDGET, at least three; the reader stays at most two ahead.
    n_out = max(3, min(8, OUTPUT_BUFFER_BUDGET // max(largest_out, 1)))
    in_pool = _pool(largest_in, 3, pin=cuda)
    out_pool = _pool(largest_out, n_out, pin=cuda)
    rowwise = {}
    for g in computed:
        routes = [direct(j, dev) for j in g]
        if all(ok for ok, _ in routes):
            rowwise.update((id(j), op) for j, (_, op) in zip(g, routes))
    work = torch.empty(largest_numel, dtype=torch.float32, device=dev) \
        if any(id(g[0]) not in rowwise for g in computed) else None  # the fp32 accumulator, reused
    workers = RowWorkers() if computed and not cuda else None  # both routes' blocks (see ops.apply_ops)
    writers: dict[str, object] = {}
    remaining = {s.file: len(s.jobs) for s in plan.shards}
    total = 0

    # the disk keeps reading ahead of the reader: jobs' source bytes, in the order they are consumed
    ranges, ends, upto = [], {}, 0
    for g in groups:
        for j in g:
            for name in j.decoder.names(j.source):
                src, info = ckpt.tensors[name]
                if src.kind == "safetensors":
                    ranges.append((src.path, info.offset, info.nbytes))
                    upto += info.nbytes
        ends[id(g)] = upto
    ahead = readahead.for_stream(ranges)
    read_so_far = 0

    def read(g: list[TensorJob]):
        nonlocal read_so_far
        ahead.consumed(ends[id(g)] - read_so_far)
        read_so_far = ends[id(g)]
        buf = in_pool.take()
        try:
            if len(g) == 1:
                return buf, [g[0].decoder.read(ckpt, g[0].source, buf)]
            return buf, ckpt.read_many([j.source for j in g], buf)  # plain dense tensors (see batches)
        except BaseException:
            in_pool.give(buf)
            raise

    def compute_run(g: list[TensorJob], buf) -> tuple[torch.Tensor, list]:
        """A run of one dtype in and one out (see :func:`compute`): its codecs decode and encode the
        whole run as one flat tensor, each tensor's ops apply to its slice, and one range check covers
        all (the same values as tensor by tensor)."""
        total = sum(numel(j.shape) for j in g)
        flat = work[:total]
        try:
            g[0].decoder.decode(buf[: total * itemsize(g[0].decoder.dtype)].view(g[0].decoder.dtype), flat, dev)
        finally:
            in_pool.give(buf)
        bounds = [0]
        for job in g:
            bounds.append(bounds[-1] + numel(job.shape))
            apply_ops(flat[bounds[-2]:bounds[-1]].view(job.shape), job.ops, dev, workers)
        if not fits(flat, g[0].encoder.result_dtype):  # which tensor: the per-tensor check names it
            for job, start, stop in zip(g, bounds, bounds[1:]):
                check_finite(flat[start:stop], job, job.encoder.result_dtype)
        host, [(_, out)], _ = g[0].encoder.encode(g[0].name, (total,), flat, dev, out_pool.take)
        return host, [(job.name, out[start:stop].view(job.shape)) for job, start, stop in zip(g, bounds, bounds[1:])]

    def compute_direct(g: list[TensorJob], buf, stored):
        """See :func:`direct`: each tensor from the read buffer into its place in the output buffer."""
        host = out_pool.take()
        items, pos = [], 0
        try:
            for job, st in zip(g, stored):
                out = host[pos: pos + job.out_bytes].view(job.encoder.dtype).view(job.shape)
                op = rowwise[id(job)]
                if op is None:
                    out.copy_(st)
                elif not merge_rows(st, out, op, workers):
                    raise _overflow(job, job.encoder.result_dtype)
                items.append((job.name, out))
                pos += job.out_bytes
        except BaseException:
            out_pool.give(host)
            raise
        finally:
            in_pool.give(buf)
        return host, items

    def compute(g: list[TensorJob], data):
        buf, stored = data
        if id(g[0]) in rowwise:
            return compute_direct(g, buf, stored)
        if len(g) > 1 and all(j.ops for j in g) and len({(j.decoder.dtype, j.encoder.dtype) for j in g}) == 1 \
                and not any(j.encoder.measure for j in g):
            return compute_run(g, buf)
        host, items, pos = None, [], 0
        try:
            for job, st in zip(g, stored):
                w32 = work[: numel(job.shape)].view(job.shape)
                state = job.decoder.decode(st, w32, dev)
                apply_ops(w32, job.ops, dev, workers)
                check_finite(w32, job, job.encoder.result_dtype)
                if len(g) == 1:
                    host, its, err = job.encoder.encode(job.name, job.shape, w32, dev, out_pool.take)
                else:  # each result right after the previous one in the run's output buffer
                    if host is None:
                        host = out_pool.take()
                    _, its, err = job.encoder.encode(job.name, job.shape, w32, dev, lambda: host[pos:])
                    pos += job.out_bytes
                items += its
                if err is None:
                    err, label = job.decoder.error(w32, state), job.decoder.label
                else:
                    label = job.encoder.label
                if err is not None:
                    errors[job.name] = (label, err)
        except BaseException:
            if host is not None:
                out_pool.give(host)
            raise
        finally:
            in_pool.give(buf)
        return host, items

    def writer_for(shard: OutShard):
        writer = writers.get(shard.file)
        if writer is None:
            if plan.variable_sizes:
                names = [n for j in shard.jobs for n in j.out_names]
                writer = ReservedHeaderWriter(tmp / shard.file, names, header_reserve(names, shard.metadata),
                                              shard.metadata)
            else:
                entries = [(j.name, j.encoder.dtype, j.shape) for j in shard.jobs]
                writer = StreamingWriter(tmp / shard.file, entries, shard.metadata)
            writers[shard.file] = writer
        return writer

    def write(g: list[TensorJob], done):
        nonlocal total
        shard = shard_of[id(g[0])]
        writer = writer_for(shard)
        if done is None:
            job = g[0]
            src_shard, info = ckpt.tensors[job.source]
            if src_shard.kind == "safetensors":
                writer.copy_from(job.name, src_shard.fd(), info.offset, info.nbytes, info.dtype, info.shape)
            else:
                writer.write(job.name, ckpt.read(job.source))
        else:
            host, items = done
            try:
                if len(g) > 1 and isinstance(writer, StreamingWriter):
                    size = sum(j.out_bytes for j in g)
                    writer.write_block([(name, t.nbytes) for name, t in items], tensor_bytes(host[:size]))
                else:
                    for name, tensor in items:
                        writer.write(name, tensor)
            finally:
                if host is not None:
                    out_pool.give(host)
        remaining[shard.file] -= len(g)
        if remaining[shard.file] == 0:
            writer.close()
            total += writer.bytes_written
        if progress:
            progress(sum(j.out_bytes for j in g))

    # Reading and writing keep one core busy in the kernel: leave it to them (measured faster on 2 cores
    # for dense merges), unless codecs do the heavy work (FP8/MXFP4/4-bit: measured 14.4 s → 8.6 s for
    # an FP8 --quantize same on 2 cores with both)
    threads = torch.get_num_threads()
    heavy = any(j.computed and not (type(j.decoder) is DenseRead and type(j.encoder) is DenseWrite) for j in plan.jobs)
    if not cuda:
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 2) - (0 if heavy else 1))))
    try:
        run_stream(groups, lambda g: g[0].computed, read, compute, write, depth=n_out - 2,
                   on_stop=lambda: (in_pool.close(), out_pool.close()))
    finally:
        torch.set_num_threads(threads)
        if workers is not None:
            workers.close()
        ahead.close()
        for w in writers.values():
            w.abort()
    return total
