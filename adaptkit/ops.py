"""What a merge does to one tensor, in fp32: the plan's operations and how they apply.

Each operation names its inputs (an adapter module, a saved tensor) and applies one formula of
:mod:`.lora`. :func:`apply_ops` runs a tensor's operations in order; a lone plain LoRA is one fused
``addmm_`` (W += s·B@A, ΔW never materialised), anything else goes through ΔW.

On the CPU a lone plain LoRA from a dense (out, in) tensor into a dense one takes :func:`merge_rows`: the same
arithmetic a block of rows at a time, from the stored bytes straight into the output buffer, the
blocks shared among :class:`RowWorkers` (same bits, a fraction of the memory traffic).
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import lora
from .adapter import FP32_MAX, Adapter, LoraModule
from .errors import AdaptkitError


@dataclass
class Op:
    """One change to one tensor: ``lora`` (W += w·s·B@A, DoRA when the module has magnitudes),
    ``bias`` (b += w·s·lora_B.bias), ``replace`` (a tensor the adapter saved, modules_to_save) or
    ``rows`` (trainable tokens: the rows of some token ids replaced by the values the adapter saved)."""

    kind: str  # "replace", "lora", "bias" or "rows"
    adapter: Adapter
    weight: float = 1.0
    module: LoraModule | None = None
    key: str | None = None  # for "replace": the adapter tensor that replaces the base one
    transposed: bool = False  # for "lora": the base stores (in, out)
    rows: list[int] | None = None  # for "rows": the token ids whose rows ``key`` holds
    expert: int | None = None  # for "experts": the expert whose delta goes here (None: all, a fused 3-D tensor)
    part: tuple[int, int, int] | None = None  # for "experts": (dim, start, stop) of that expert's delta
    into: tuple[int, int] | None = None  # for "lora"/"bias": the rows of this tensor the delta lands on (fused base)
    # for "lora"/"bias": the rows of the delta this tensor takes (split base), (start, stop) or, where transformers
    # permutes them on load (PermuteForRope), an int64 index: window row i takes the delta's row take[i]
    take: tuple[int, int] | torch.Tensor | None = None

    def window(self, w: torch.Tensor) -> torch.Tensor:
        """The rows of ``w`` this op changes (a view; ``w`` itself unless the base fuses the module)."""
        return w if self.into is None else w[self.into[0]:self.into[1]]

    def part_of(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """The rows of a per-output tensor (B, DoRA magnitude, lora_bias) for this tensor's part."""
        if self.take is None or t is None:
            return t
        return t[self.take] if isinstance(self.take, torch.Tensor) else t[self.take[0]:self.take[1]]

    @property
    def scale(self) -> float:
        """w·s, the factor of this op's term; refused when not a finite fp32 number (``addmm_`` on the
        CPU would silently ignore a NaN alpha)."""
        s = self.module.scaling * self.weight
        if not (math.isfinite(s) and abs(s) <= FP32_MAX):
            raise AdaptkitError(f"the scale of {self.module.name} is not a finite fp32 number "
                                f"({self.module.scaling} × {self.weight})", self.adapter.path)
        return s


def _fused(ops: list[Op]) -> Op | None:
    """The one plain-LoRA op of a tensor, when it can be a single ``addmm_``."""
    if len(ops) == 1 and ops[0].kind == "lora" and not ops[0].module.use_dora:
        return ops[0]
    return None


def fused_op(ops: list[Op]) -> Op | None:
    """The op :func:`merge_rows` can carry out for a tensor with these ``ops``, or None."""
    op = _fused(ops)
    # a base stored (in, out) (Conv1D, experts stored transposed) is not blocked: MKL's addmm with A's
    # columns as the output's rows gives other fp32 bits for a block of rows than for the whole tensor
    # (about a quarter of random shapes, widths that are multiples of 16 too), so it stays on the buffer route
    if op is None or op.transposed:
        return None
    return op


def apply_ops(w: torch.Tensor, ops: list[Op], device, workers: "RowWorkers | None" = None) -> None:
    """Apply ``ops`` in order to the fp32 tensor ``w`` (on ``device``), in place. On the CPU a lone
    plain LoRA of a 2-D (out, in) tensor runs :func:`merge_rows`' blocks (on ``workers``, else in this
    thread), so that both routes of the stream give the same bits by construction."""
    if not ops:
        return
    if all(op.kind == "experts" for op in ops):  # additions only: in place, no copy of the weight
        for op in ops:
            w += expert_term(op, device)
        return
    op = _fused(ops)
    if op is not None and w.device.type == "cpu" and w.dim() == 2 and fused_op(ops) is op:
        # the blocked route's own blocks, in place: a tensor gets the same bits whichever route it takes
        merge_rows(w, w, op, workers or _solo())
        return
    if op is not None:
        m = op.module
        lora.add_delta_(op.window(w), m.A.to(device, torch.float32), op.part_of(m.B).to(device, torch.float32),
                        op.scale, op.transposed)
        return
    w.copy_(_general(w.clone(), ops, device))


def _general(w: torch.Tensor, ops: list[Op], device) -> torch.Tensor:
    needs_ref = any(op.kind == "lora" and op.module.use_dora for op in ops)
    ref = w.clone() if needs_ref else None  # DoRA's W₀: the weight before any adapter
    for op in ops:
        if op.kind == "replace":
            w = op.adapter.source.get(op.key).to(device=device, dtype=torch.float32, copy=True)
            ref = w.clone() if needs_ref else None
        elif op.kind == "lora":
            m = op.module
            _ = op.scale  # refuses a scale that is not finite
            d = lora.delta(m.A, op.part_of(m.B), m.scaling, device)
            if op.weight != 1.0:
                d.mul_(op.weight)
            if op.transposed:
                d = d.T
            target = op.window(w)  # rows windows only on nn.Linear weights (see families)
            if m.use_dora:
                target.copy_(lora.dora(target, op.window(ref), d, op.part_of(m.magnitude), op.transposed))
            else:
                target.add_(d)
        elif op.kind == "bias":
            op.window(w).add_(lora.bias_delta(op.part_of(op.module.lora_bias), op.scale, device))
        elif op.kind == "rows":
            w[op.rows] = op.adapter.source.get(op.key).to(device=device, dtype=torch.float32)
        elif op.kind == "experts":
            w += expert_term(op, device)
    return w


def expert_term(op: Op, device) -> torch.Tensor:
    """What a ``target_parameters`` LoRA adds to this tensor: one expert's w·s·B_e@A_e ((out, in), or
    transposed where the parameter stores (in, out)), the part this tensor holds, or every expert's,
    stacked, for a fused 3-D tensor."""
    m = op.module
    if op.expert is not None and op.part is not None:  # a part of one expert's ΔW: computed alone
        dim, start, stop = op.part
        cuts_rows = (dim == 0) != op.transposed  # the part's dim is ΔW's out (rows), else its in (columns)
        d = lora.expert_delta(m.A, m.B, op.scale, m.experts, op.expert, device,
                              rows=(start, stop) if cuts_rows else None, cols=None if cuts_rows else (start, stop))
        return d.T if op.transposed else d

    def one(e):
        d = lora.expert_delta(m.A, m.B, op.scale, m.experts, e, device)
        return d.T if op.transposed else d

    return lora.place_expert(one, m.experts, op.expert, op.part)


# ------------------------------------------------------------------------- the CPU's blocked merge

def _row_block_bytes() -> int:
    """fp32 rows computed at once: 1 MB where a core's L2 cache holds 1 MB or less (or is not known),
    else twice the L2, at most 4 MB. Measured with benchmarks/merge_math.py, both cores: the AMD
    EPYC VMs of sessions 5 and 10 with 1 MB blocks (EPYC cores have 512 KB-1 MB of L2); on an Intel
    Xeon VM with 2 MB of L2 per core (session 11) 1 MB blocks ran at 0.78-0.81 s per billion
    parameters, 4 MB at 0.60-0.65 and 8 MB at 0.55-0.70, the per-block overhead of the two workers
    outweighing the cache there. The bits do not depend on it by more than MKL's choice of kernel for
    a block's shape (see :func:`merge_rows`)."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index2/size") as f:
            text = f.read().strip().upper()
        l2 = int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1:], 0)
    except (OSError, ValueError):
        return 1 << 20
    return 1 << 20 if l2 <= 1 << 20 else min(2 * l2, 4 << 20)


ROW_BLOCK_BYTES = _row_block_bytes()
ROW_ALIGN = 8  # rows per block are a multiple of this (see merge_rows)
ALIGN_FLOATS = 16  # torch's CPU allocations are 64-byte aligned: 16 fp32 values


def finite_limit(dtype: torch.dtype) -> float:
    """The magnitude from which an fp32 value rounds to infinity in ``dtype`` (round to nearest even:
    the largest finite value plus half its ulp; 65520 for fp16), or infinity for fp32 and wider."""
    if not dtype.is_floating_point:
        return math.inf
    info = torch.finfo(dtype)
    if info.bits >= 32:
        return math.inf
    top = info.max
    return top + info.eps * 2.0 ** math.floor(math.log2(top)) / 2


def _finite(rounded: torch.Tensor, t32: torch.Tensor) -> bool:
    """Whether every value of ``rounded`` (``t32`` rounded to its dtype) is finite: its sum in its own
    dtype (NaN and ±inf propagate) is, or, when that sum itself overflows, ``t32``'s extremes are
    within :func:`finite_limit` (the rule of :func:`.stream.fits`)."""
    if math.isfinite(float(rounded.sum())):
        return True
    lo, hi = (float(x) for x in torch.aminmax(t32))
    limit = finite_limit(rounded.dtype)
    return -limit < lo and hi < limit


@contextmanager
def one_thread():
    """One intra-op thread in this thread for the block (torch's setting is per calling thread)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_SOLO: "RowWorkers | None" = None


def _solo() -> "RowWorkers":
    """The workers of :func:`apply_ops` when it is given none: the calling thread alone."""
    global _SOLO
    if _SOLO is None:
        _SOLO = RowWorkers(1)
    return _SOLO


class RowWorkers:
    """Threads that share a tensor's row blocks (torch releases the GIL in its kernels), each with
    one intra-op thread and its own fp32 scratch block. ``count`` defaults to the usable cores but
    one: the kernel's copying of what is written keeps a core busy (on 2 cores, measured 4.4 s with
    one worker against 4.9 s with two for a TinyLlama-shape merge)."""

    def __init__(self, count: int | None = None):
        if count is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            count = cores - 1
        self.count = max(1, count)
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(self.count, thread_name_prefix="adaptkit-rows",
                                        initializer=torch.set_num_threads, initargs=(1,)) if self.count > 1 else None

    def scratch(self, n: int, shift: int = 0, slot: int = 0) -> torch.Tensor:
        """This thread's fp32 scratch number ``slot``, ``n`` values starting ``shift`` values past the
        buffer's (64-byte aligned) start. Reused from call to call: a fresh block each time costs its
        page faults (measured: upcasting into fresh 1 MB blocks 1.7 s per billion values on a 2-core
        VM, into a reused one 0.3)."""
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = self._local.bufs = {}
        buf = bufs.get(slot)
        if buf is None or buf.numel() < n + shift:
            buf = bufs[slot] = torch.empty(n + shift, dtype=torch.float32)
        return buf[shift:shift + n]

    @staticmethod
    def step(cols: int, block_bytes: int | None = None) -> int:
        """Rows per block of a tensor with ``cols`` columns: ``block_bytes`` (default
        :data:`ROW_BLOCK_BYTES`) of fp32, a multiple of :data:`ROW_ALIGN` rows (see :func:`merge_rows`)."""
        return max(ROW_ALIGN, (block_bytes or ROW_BLOCK_BYTES) // (4 * max(cols, 1)) // ROW_ALIGN * ROW_ALIGN)

    def share(self, fn, items: list) -> list:
        """``fn`` on each worker's run of consecutive ``items`` (as many runs as workers, at most one
        per item): the results, in order."""
        n = min(self.count, len(items))
        if n == 0:
            return []
        bounds = [len(items) * k // n for k in range(n + 1)]
        runs = [items[x:y] for x, y in zip(bounds, bounds[1:])]
        if self._pool is None or n == 1:
            with one_thread():  # as in the pool's threads: MKL's bits may follow its thread count
                return [fn(r) for r in runs]
        return list(self._pool.map(fn, runs))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def merge_rows(src: torch.Tensor, dst: torch.Tensor, op: Op, workers: RowWorkers, block_bytes: int | None = None) -> bool:
    """``dst`` = ``src`` + w·s·B@A rounded once to ``dst``'s dtype, for a plain-LoRA op (see
    :func:`fused_op`) on the CPU; returns whether every value is finite and within ``dst``'s range.

    Each block of rows is upcast into a scratch buffer that stays in cache, gets its rows of the
    same ``addmm_`` (:func:`.lora.add_delta_`), is rounded into ``dst`` and checked there (finite
    after rounding, the rule of :func:`.stream.fits`): about
    2 + 2 bytes of memory traffic per fp16 parameter instead of ~20. ``block_bytes``: the fp32
    block's size (default :data:`ROW_BLOCK_BYTES`).

    Blocks hold a multiple of :data:`ROW_ALIGN` rows counted from the first row the delta lands on,
    each placed in the scratch at the 64-byte alignment it has in a whole fp32 copy of ``src``, and
    run with one intra-op thread. :func:`apply_ops` runs the same blocks for the buffer route, so a
    tensor's bits do not depend on the route or on the number of workers (tests/test_rows.py). They
    are the fp32 sum rounded once; whether they also equal one ``addmm_`` of the whole tensor is
    MKL's choice of kernel per shape and CPU: on an AMD EPYC they did for every shape tried, on an
    Intel Xeon with AVX-512 30 of 11.5 M values of a 2048×5632 r=16 merge differed in fp16's last
    bit (fp32's last bit before rounding), so that is not promised.
    ``src`` may be ``dst`` (fp32, in place): only the rows the delta lands on are touched.
    """
    if op.transposed:
        raise ValueError("merge_rows takes no base stored (in, out): see fused_op")
    m = op.module
    a = m.A.to(torch.float32)
    b = op.part_of(m.B).to(torch.float32)
    scale = op.scale  # refuses a scale that is not finite
    rows, cols = src.shape
    lo, hi = op.into if op.into is not None else (0, rows)  # the rows the delta lands on
    step = RowWorkers.step(cols, block_bytes)
    spans = ((lo, hi, True),) if src is dst else ((0, lo, False), (lo, hi, True), (hi, rows, False))
    blocks = [(i, min(i + step, stop), merged) for start, stop, merged in spans for i in range(start, stop, step)]

    def part(group: list[tuple[int, int, bool]]) -> bool:
        ok = True
        for i, j, merged in group:
            # at the 64-byte alignment row i has in a whole fp32 copy of src: MKL's addmm kernel
            # follows the output's alignment, and its bits with it
            t = workers.scratch((j - i) * cols, (i * cols) % ALIGN_FLOATS).view(j - i, cols)
            t.copy_(src[i:j])
            if merged:
                lora.add_delta_(t, a, b[i - lo:j - lo], scale, False)
            dst[i:j].copy_(t)
            ok = _finite(dst[i:j], t) and ok
        return ok

    return all(workers.share(part, blocks))
