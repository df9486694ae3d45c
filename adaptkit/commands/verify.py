"""Prove that a merged model is base + adapters: layer by layer (any architecture, streamed) and,
when transformers knows the architecture, on the model's logits.

Layer level. For every adapted module, seeded random probes x are pushed through the merged
weight and compared with what base + adapter computes, written from the factors and never from a
materialised ΔW (an independent route from the merge's): y = W·x + w·s·B(A·x), and for DoRA
y = m / ‖W + ΔW‖_row ⊙ (W·x + ΔW·x) with the row norms also taken from the factors. A correct merge
differs from y only by rounding its weights into the output dtype; the expected size of that
rounding noise, ε·sqrt((W'²)·(x²)/12) per output, is computed alongside, and a module passes when
its error stays within ``ROUNDING_FACTOR`` times it (or within ``tolerance``, a relative error,
when given). Tensors the adapters do not touch must be bit-identical to the base.

4-bit (bitsandbytes) bases and outputs are dequantized with bitsandbytes, FP8 and MXFP4 ones by
their formats' definitions (:mod:`adaptkit.scaled`). A 4-bit output module is judged against the
error of quantizing the exact merged weight itself, and that error is reported; an FP8 or MXFP4
output module must be what the format's own quantizer makes of the exact merged weight (its
quantizer is deterministic, so a dropped delta cannot hide in the requantization noise). A dense
merge checked against a quantized base that it was not made from (a merge into the 16-bit
original) fails with the quantization gap named.

Model level. Base + adapters unmerged in peft against the merged model in transformers, both in
fp32 on the same prompts: max |Δlogits|, mean KL(base+adapter ‖ merged), top-1 agreement.
"""

from __future__ import annotations

import contextlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import bnb_import, lora
from ..adapter import Adapter, adapter_weights
from ..architecture import named_class
from ..codecs import FourBitRead, ScaledRead
from ..device import resolve_device
from ..dtypes import SIXTEEN_BIT
from ..errors import AdaptkitError
from ..io import readahead
from ..io.checkpoint import Checkpoint
from ..ops import RowWorkers
from ..plan import VOCAB_TENSORS, plan_merge, scaled_weights
from ..quant import check_quantization, dequantize, find_quantized, quantize
from ..reporting import Collected, Reporter
from ..io.files import read_json
from ..io.output import atomic_output_file
from ..hub import VERIFY_REPORT
from .inputs import open_adapters, open_base, read_paths

SPIKE_FACTOR = 100.0  # beyond the KL tolerance, the worst position may be this many times the typical one
ROUNDING_FACTOR = 3.0  # a correct merge's error is at most about 1x the expected rounding noise
PROBES = 8


@dataclass
class ModuleCheck:
    name: str  # tensor name in the merged model
    kind: str  # "lora", "dora", "replace", "bias", "untouched"
    rel_error: float
    allowed: float
    rounding_noise: float
    ok: bool
    note: str = ""


@dataclass
class ModelCheck:
    prompts: int
    tokens: int
    max_abs_logit_diff: float  # of the outputs compared (logits, or hidden states)
    mean_kl: float
    top1_agreement: float
    ok: bool
    source: str  # "tokenizer" or "random token ids"
    compared: str = "logits"  # what was compared, and with which class
    max_kl: float = 0.0  # the worst position's KL: a few wrong tokens (trainable ones) stand out there
    restored: list[str] = field(default_factory=list)  # modules peft's own load left unloaded, filled in by name


@dataclass
class VerifyReport:
    base: str
    adapters: list[str]
    merged: str
    modules: list[ModuleCheck]
    untouched_checked: int
    untouched_mismatched: list[str]
    model: ModelCheck | None
    ok: bool
    warnings: list[str] = field(default_factory=list)

    @property
    def worst(self) -> ModuleCheck | None:
        checked = [m for m in self.modules if m.kind != "untouched"]
        return max(checked, key=lambda m: m.rel_error / max(m.allowed, 1e-30), default=None)

    def to_dict(self) -> dict:
        d = asdict(self)
        errs = [m.rel_error for m in self.modules if m.kind in ("lora", "dora")]
        d["summary"] = {"modules": len(errs), "worst_rel_error": max(errs, default=0.0),
                        "median_rel_error": statistics.median(errs) if errs else 0.0,
                        "failed": [m.name for m in self.modules if not m.ok] + self.untouched_mismatched}
        return d


def _canonical(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    return t.T if transposed else t


def _expected(w: torch.Tensor, ops, x: torch.Tensor | None, transposed: bool,
              wx: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
    """Base + adapters in ``w``'s dtype (fp64, or fp32 for 16-bit outputs), canonical (out, in)
    orientation, written from the factors: applied to probes x (columns), or, with ``x`` None, the
    merged weight itself. ``wx``: W·x when the caller has it already."""
    dt = w.dtype

    def on(t):
        return t if x is None else t @ x

    kind = "lora"
    cur = w
    y = wx if wx is not None else on(cur)
    ref_w = w  # DoRA norms are taken on the weight before any adapter (as peft does)
    for op in ops:
        if op.kind == "replace":
            cur = _canonical(op.adapter.source.get(op.key).to(dt), transposed)
            ref_w, y = cur, on(cur)
            kind = "replace"
            continue
        m = op.module
        a, b = m.A.to(dt), op.part_of(m.B).to(dt)  # a split base's part: its rows of B
        s = m.scaling * op.weight
        dx = s * (b @ on(a))
        y = y.clone()
        rows = op.window(y)  # a fused base: the rows of this module's part
        if m.use_dora:
            kind = "dora"
            # ‖W + ΔW‖² per row = ‖W‖² + 2 s (W Aᵀ)·B + s² B (A Aᵀ) Bᵀ, from the factors
            wr = op.window(ref_w)  # (canonical already, as w)
            norm2 = (wr * wr).sum(1) + 2 * s * ((wr @ a.T) * b).sum(1) + s * s * ((b @ (a @ a.T)) * b).sum(1)
            factor = op.part_of(m.magnitude).to(dt) / norm2.clamp(min=0).sqrt()
            rows.copy_(factor[:, None] * (rows + dx))
        else:
            rows.add_(dx)
    return y, kind


def _expert_expected(op) -> torch.Tensor:
    """What a ``target_parameters`` LoRA adds to one on-disk tensor, in fp64, from its factors: expert
    e's s·B_e·A_e (peft's layout: A rows expert-major, B columns rank-major), transposed where the
    parameter stores (in, out), the part this tensor holds; all experts stacked for a fused tensor."""
    m = op.module
    a, b = m.A.double(), m.B.double()
    r = a.shape[0] // m.experts
    s = m.scaling * op.weight

    def one(e):
        d = s * (b[:, e::m.experts] @ a[e * r:(e + 1) * r])  # B's columns k·E + e, A's rows e·r + k
        return d.T if op.transposed else d

    return lora.place_expert(one, m.experts, op.expert, op.part)


def _dense(ck: Checkpoint, name: str, decoders: dict, buffers: list | None = None, slot: int = 0) -> torch.Tensor:
    """A weight as the model computes with it: 4-bit weights dequantized (their codec, bitsandbytes).
    A stored dense weight is read into ``buffers[slot]`` (a uint8 buffer, grown as needed) when given:
    a fresh tensor per read costs its page faults."""
    dec = decoders.get(name)
    if dec is not None:
        return dec.load(ck, name, "cpu")
    if buffers is None:
        return ck.read(name)
    size = ck.info(name).nbytes
    if buffers[slot] is None or buffers[slot].numel() < size:
        buffers[slot] = None  # the old one freed first
        buffers[slot] = torch.empty(max(size, 1), dtype=torch.uint8)
    return ck.read(name, out=buffers[slot])


def _four_bit_noise(exact: torch.Tensor, like, x: torch.Tensor, double: bool, storage, transposed: bool) -> float:
    """Error, on probes x, of quantizing the exact merged weight itself: the best a 4-bit merge can do.

    ``exact``: the merged weight by verify's own route (fp64, canonical orientation)."""
    stored = _canonical(exact, transposed).float()
    packed, comps = quantize(stored, like, double, storage)
    diff = dequantize(packed, comps, "cpu").double() - stored.double()
    return float((_canonical(diff, transposed) @ x.double()).norm())


def _prefetched(jobs, load):
    """(job, load(job)) for each job, in order, the next job's ``load`` running in a thread while the
    caller works on this one (reads overlap the probes); ``load`` returns None for a job it skips."""
    with ThreadPoolExecutor(1, thread_name_prefix="adaptkit-verify-read") as pool:
        pending = pool.submit(load, jobs[0]) if jobs else None
        try:
            for k, job in enumerate(jobs):
                done = pending.result()
                pending = pool.submit(load, jobs[k + 1]) if k + 1 < len(jobs) else None
                yield job, done
        finally:
            if pending is not None:
                pending.cancel()


def _probe_rows(src: torch.Tensor, got: torch.Tensor, x: torch.Tensor, transposed: bool, workers: RowWorkers):
    """W·x, (W' − W)·x and Σᵢⱼ W'ᵢⱼ² Σₚ xⱼₚ² (the rounding-noise sum of :func:`check_layers`: the same
    number as ((W'∘W')·(x∘x)).sum()) in fp32, canonical (out, in) orientation, for the 16-bit base
    ``src`` and merged ``got`` as stored: a block of stored rows at a time, upcast in cache (never a
    tensor-sized fp32 copy), the blocks shared among ``workers``.

    The products are taken as xᵀ·Wᵀ (probes × outputs), not W·x: MKL's kernel for a product only
    8 columns wide ran at 1.1–1.4 s per billion parameters on a 2-core AMD EPYC, the same flops with
    the probes as rows at 0.45–0.55 (benchmarks/verify_math.py)."""
    rows, cols = src.shape
    probes = x.shape[1]
    c = (x * x).sum(1)  # Σₚ x², per input
    xt = x.T.contiguous()  # (probes, in)
    step = RowWorkers.step(cols)
    starts = list(range(0, rows, step))
    out_f = cols if transposed else rows
    wxt = torch.zeros(probes, out_f)
    dwxt = torch.zeros(probes, out_f)

    def part(span):
        acc_wx = torch.zeros(probes, out_f) if transposed else None
        acc_dwx = torch.zeros(probes, out_f) if transposed else None
        noise = 0.0
        for i in span:
            j = min(i + step, rows)
            wb, gb, sq = (workers.scratch((j - i) * cols, slot=k).view(j - i, cols) for k in range(3))
            wb.copy_(src[i:j])
            gb.copy_(got[i:j])
            torch.square(gb, out=sq)
            if transposed:  # stored (in, out): these rows are inputs
                noise += float(sq.sum(1) @ c[i:j])
                acc_wx.addmm_(xt[:, i:j], wb)
                acc_dwx.addmm_(xt[:, i:j], gb.sub_(wb))
            else:
                noise += float((sq @ c).sum())
                wxt[:, i:j] = xt @ wb.T
                dwxt[:, i:j] = xt @ gb.sub_(wb).T
        return acc_wx, acc_dwx, noise

    total = 0.0
    for acc_wx, acc_dwx, noise in workers.share(part, starts):
        total += noise
        if transposed:
            wxt += acc_wx
            dwxt += acc_dwx
    return wxt.T.contiguous(), dwxt.T.contiguous(), total


def _row_probed(job, got: torch.Tensor, src: torch.Tensor) -> bool:
    """Whether :func:`_probe_rows` checks this job: plain LoRAs only (no DoRA, nothing replaced) on a
    2-D weight, 16-bit in the merged model, dense in both."""
    return all(op.kind == "lora" and not op.module.use_dora for op in job.ops) and got.dim() == 2 \
        and got.dtype in SIXTEEN_BIT and src.dtype in (*SIXTEEN_BIT, torch.float32) \
        and src.shape == got.shape


def check_layers(base: Checkpoint, adapters: list[Adapter], merged: Checkpoint, weights=None,
                 tolerance: float | None = None, device="cpu", seed: int = 0, plan=None, progress=None):
    plan = plan or plan_merge(base, adapters, weights)
    base_q = {j.source: j.decoder for j in plan.jobs if isinstance(j.decoder, (FourBitRead, ScaledRead))}
    _, scaled_out, scaled_extra = scaled_weights(merged)  # an FP8 / MXFP4 output (merge --quantize same)
    quantized = {} if scaled_out else (
        find_quantized(merged.tensors, merged.read) if check_quantization(merged.config, merged.path) else {})
    merged_q = {n: FourBitRead(merged.info(n).dtype, quant=q) for n, q in quantized.items()}
    merged_q.update({n: ScaledRead(merged.info(w.data).dtype, weight=w) for n, w in scaled_out.items()})
    skip = {c for d in merged_q.values() if isinstance(d, FourBitRead) for c in d.quant.components}
    skip |= {w.scales for w in scaled_out.values()} | scaled_extra
    checks: list[ModuleCheck] = []
    mismatched: list[str] = []
    untouched = 0
    warnings: list[str] = list(plan.warnings)
    gen = torch.Generator().manual_seed(seed)
    workers = RowWorkers(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())

    def ranges(job):
        """The file ranges of the job's tensors (and their companions), merged then base."""
        out = []
        if job.name in skip or (job.name not in merged.tensors and job.name not in merged_q):
            return out
        for ck, name, decoders in ((merged, job.name, merged_q), (base, job.source, base_q)):
            dec = decoders.get(name)
            for n in (dec.names(name) if dec is not None else [name]):
                if n in ck.tensors and ck.tensors[n][0].kind == "safetensors":
                    shard, info = ck.tensors[n]
                    out.append((shard.path, info.offset, info.nbytes))
        return out

    job_ranges = {id(j): ranges(j) for j in plan.jobs}
    ahead = readahead.Readahead([r for j in plan.jobs for r in job_ranges[id(j)]]).start()  # the disk never idles

    # two sets of read buffers (merged, base), in turn: one holds the tensors being checked while the
    # next pair is read into the other (see _prefetched)
    buffers: list = [None] * 4
    turn = [0]

    def load(job):
        if job.name in skip or (job.name not in merged.tensors and job.name not in merged_q):
            return None
        k = 2 * (turn[0] % 2)
        turn[0] += 1
        pair = _dense(merged, job.name, merged_q, buffers, k), _dense(base, job.source, base_q, buffers, k + 1)
        ahead.consumed(sum(n for _, _, n in job_ranges[id(job)]))
        return pair

    try:
        for job, loaded in _prefetched(plan.jobs, load):
            if progress:
                progress(1)
            if job.name in skip:
                continue
            if loaded is None:
                checks.append(ModuleCheck(job.name, "missing", float("inf"), 0.0, 0.0, False, "not in the merged model"))
                continue
            got, src = loaded
            untouched += _check_job(job, got, src, merged, base, base_q, merged_q, gen, tolerance, workers, checks,
                                    mismatched)
    finally:
        ahead.close()
        workers.close()
    gaps = [c.rel_error for c in checks if c.note.startswith("differs from the") and "quantization gap" in c.note]
    if base_q and gaps:
        warnings.append(f"{len(gaps)} modules differ from the quantized base + adapter by {100 * min(gaps):.1f}–"
                        f"{100 * max(gaps):.1f} %: the size of the base's quantization error. A merge into the "
                        "16-bit original is not what the adapter computes on the quantized base (see docs/nf4.md, "
                        "docs/fp8.md)")
    return checks, untouched, mismatched, warnings


def _check_job(job, got, src, merged, base, base_q, merged_q, gen, tolerance, workers, checks, mismatched) -> bool:
    """One tensor of the layer-level check: its verdict appended to ``checks`` (or its name to
    ``mismatched``: an untouched tensor that differs from the base). Returns whether it was an
    untouched tensor."""
    if tuple(got.shape) != tuple(job.shape):  # the base's, or a grown vocabulary's the adapter saved
        checks.append(ModuleCheck(job.name, "shape", float("inf"), 0.0, 0.0, False,
                                  f"shape {list(got.shape)}, expected {list(job.shape)}"))
        return False
    if not job.ops:
        if job.name in merged_q and job.source in base_q:  # quantized in both: the stored bytes must match
            names = base_q[job.source].names(job.source)
            same = all(n in merged.tensors and torch.equal(merged.read(n).reshape(-1).view(torch.uint8),
                                                           base.read(n).reshape(-1).view(torch.uint8))
                       for n in names)
        else:
            same = torch.equal(got, src.to(got.dtype))
        if not same:
            mismatched.append(job.name)
        return True
    lora_ops = [op for op in job.ops if op.kind == "lora"]
    if isinstance(merged_q.get(job.name), ScaledRead):  # FP8 / MXFP4 output: the quantizer's bytes
        checks.append(_check_scaled(job, src, got, merged_q[job.name], tolerance))
        return False
    if not lora_ops:  # modules_to_save, trainable token rows or a LoRA bias: compared in full
        exp = _exact(job, src)
        err = float((got.double() - exp).norm() / exp.norm().clamp(min=1e-30))
        if exp.dim() == 3:  # a fused expert tensor: each expert on its own scale, so one cannot hide
            err = max(err, *(float((got.double()[e] - exp[e]).norm() / exp[e].norm().clamp(min=1e-30))
                             for e in range(exp.shape[0])))
        for op in job.ops:  # replaced rows on their own scale: a few tokens in a large vocabulary still count
            if op.kind == "rows":
                rows = exp[op.rows]
                err = max(err, float((got.double()[op.rows] - rows).norm() / rows.norm().clamp(min=1e-30)))
        noise = _noise_vec(exp, got.dtype)
        allowed = tolerance if tolerance is not None else max(ROUNDING_FACTOR * noise, 1e-12)
        kind = next(op.kind for op in reversed(job.ops))
        checks.append(ModuleCheck(job.name, kind, err, allowed, noise, err <= allowed))
        return False
    transposed = lora_ops[0].transposed
    if job.name not in merged_q and job.source not in base_q and _row_probed(job, got, src):
        checks.append(_check_rows(job, got, src, gen, tolerance, workers, transposed))
        return False
    # the probe products in fp64 where the output is fp32 (its rounding noise is fp32's); for a
    # 16-bit output fp32 products are a thousand times finer than its noise, at a quarter of the cost
    cdt = torch.float64 if got.dtype in (torch.float32, torch.float64) else torch.float32
    w = _canonical(src.to(cdt), transposed)
    wm = _canonical(got.to(cdt), transposed)
    x = torch.randn(w.shape[1], PROBES, generator=gen, dtype=torch.float64).to(cdt)
    wx = w @ x
    y_exp, kind = _expected(w, job.ops, x, transposed, wx=wx)
    y_got = wm @ x
    norm = y_exp.norm().clamp(min=1e-30)
    err = float((y_got - y_exp).norm() / norm)
    note = ""
    if job.name in merged_q:  # a 4-bit output: its noise is quantizing the exact merged weight
        q = merged_q[job.name].quant
        exact_w, _ = _expected(w, job.ops, None, transposed)
        double = any(c.endswith(".nested_absmax") for c in q.components)
        noise = _four_bit_noise(exact_w, q, x, double, merged.info(job.name).dtype, transposed) / float(norm)
        note = "4-bit output: the error is its requantization"
    else:
        eps = torch.finfo(got.dtype).eps if got.is_floating_point() else 0.0
        noise = float(((wm * wm) @ (x * x)).sum().sqrt() * eps / (12 ** 0.5) / norm)
    allowed = tolerance if tolerance is not None else max(ROUNDING_FACTOR * noise, 1e-6)
    if job.name in merged_q and tolerance is None:
        allowed = max(1.05 * noise, 1e-6)  # the same quantizer on the same weight: at most a hair above
    effect = float((y_exp - wx).norm() / norm)
    if effect < noise and not note:
        note = "the adapter's effect is below the output dtype's rounding noise"
    if err > allowed and job.source in base_q and job.name not in merged_q:
        what = "4-bit" if isinstance(base_q[job.source], FourBitRead) else base_q[job.source].weight.label
        note = f"differs from the {what} base + adapter: was it merged into the 16-bit base? (quantization gap)"
    checks.append(ModuleCheck(job.name, kind, err, allowed, noise, err <= allowed, note))
    return False


def _check_rows(job, got, src, gen, tolerance, workers, transposed) -> ModuleCheck:
    """The probe check of a 16-bit merge of plain LoRAs into a dense base, by :func:`_probe_rows`:
    the same probes, expected outputs and noise as the general route, in fp32, a block at a time."""
    in_f = got.shape[0] if transposed else got.shape[1]
    x = torch.randn(in_f, PROBES, generator=gen, dtype=torch.float64).float()
    wx, dwx, noise2 = _probe_rows(src, got, x, transposed, workers)
    y_exp, kind = _expected(wx, job.ops, x, transposed, wx=wx)  # plain LoRAs: from W·x and the factors alone
    effect_y = y_exp - wx
    norm = y_exp.norm().clamp(min=1e-30)
    err = float((dwx - effect_y).norm() / norm)  # = ‖W'x − (Wx + Σ s·B(Ax))‖ / ‖…‖
    noise = float(max(noise2, 0.0) ** 0.5 * torch.finfo(got.dtype).eps / (12 ** 0.5) / norm)
    allowed = tolerance if tolerance is not None else max(ROUNDING_FACTOR * noise, 1e-6)
    effect = float(effect_y.norm() / norm)
    note = "the adapter's effect is below the output dtype's rounding noise" if effect < noise else ""
    return ModuleCheck(job.name, kind, err, allowed, noise, err <= allowed, note)


def _exact(job, src: torch.Tensor) -> torch.Tensor:
    """The merged tensor by verify's own route (fp64, stored orientation): base + each op from its
    factors."""
    exp = src.double()
    for op in job.ops:
        if op.kind == "lora":
            full, _ = _expected(_canonical(exp, op.transposed), [op], None, op.transposed)
            exp = _canonical(full, op.transposed)
        elif op.kind == "replace":
            exp = op.adapter.source.get(op.key).double()
        elif op.kind == "rows":
            exp = exp.clone()
            exp[op.rows] = op.adapter.source.get(op.key).double()
        elif op.kind == "bias":
            exp = exp.clone()
            op.window(exp).add_(op.part_of(op.module.lora_bias).double() * (op.module.scaling * op.weight))
        elif op.kind == "experts":
            exp = exp + _expert_expected(op)
    return exp


def _check_scaled(job, src: torch.Tensor, got: torch.Tensor, dec: ScaledRead, tolerance) -> ModuleCheck:
    """An FP8 / MXFP4 output tensor against what the format's own quantizer makes of the exact merged
    weight. The merge computes in fp32, verify in fp64, so a value on a rounding boundary may land one
    step apart: allowed is a quarter of the requantization noise (a dropped or wrong delta moves
    whole blocks, far more)."""
    exact = _exact(job, src)
    want = dec.requantized(exact.float()).double()
    scale = exact.norm().clamp(min=1e-30)
    noise = float((want - exact).norm() / scale)
    err = float((got.double() - want).norm() / scale)
    if exact.dim() == 3:  # each expert on its own scale, so one cannot hide
        err = max(err, *(float((got.double()[e] - want[e]).norm() / exact[e].norm().clamp(min=1e-30))
                         for e in range(exact.shape[0])))
    allowed = tolerance if tolerance is not None else max(0.25 * noise, 1e-6)
    kind = next(op.kind for op in reversed(job.ops))
    return ModuleCheck(job.name, kind, err, allowed, noise, err <= allowed,
                       f"{dec.weight.label} output: the requantization error is {noise:.2e}")


def _noise_vec(exp: torch.Tensor, dtype: torch.dtype) -> float:
    if not dtype.is_floating_point:
        return 0.0
    return float(torch.finfo(dtype).eps / (12 ** 0.5) * exp.norm() / exp.norm().clamp(min=1e-30))


@contextlib.contextmanager
def _quiet_transformers(hf_logging):
    """transformers' warnings and progress bars off while loading, then as they were."""
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _model_class(config: dict):
    """The transformers class to load a checkpoint with: the one its config names (a causal LM when it
    names none transformers knows)."""
    import transformers

    arch = named_class(config)
    cls = getattr(transformers, arch, None) if arch else None
    return cls if cls is not None and hasattr(cls, "from_pretrained") else transformers.AutoModelForCausalLM


def _load(path: Path, cls, dev: torch.device, dtype: torch.dtype = torch.float32):
    """(model in ``dtype`` (fp32) on ``dev``, names of weights the checkpoint lacks: newly initialised)."""
    quantized = "quantization_config" in read_json(Path(path) / "config.json", "config.json")
    kwargs = {"device_map": str(dev)} if quantized else {}
    model, info = cls.from_pretrained(path, dtype=dtype, output_loading_info=True, **kwargs)
    model = model.eval() if quantized else model.eval().to(dev)
    return model, list(info.get("missing_keys") or [])


class Fp32Compute:
    """Run a model that transformers loaded in its stored 16-bit dtype with fp32 arithmetic, without
    holding an fp32 copy of it: each unit (a child of an outermost ``nn.ModuleList``: a decoder layer)
    gets its 16-bit parameters upcast, exactly, into reused fp32 buffers as its forward starts and
    back when it ends; the parameters outside the units (embeddings, head, final norm) are upcast once
    and kept. Everything a unit computes then sees the same fp32 values a model loaded in fp32 would
    (peft's layers inside a unit included: their base weights are fp32 while they run), and memory is
    the 16-bit model plus the embeddings in fp32 plus one unit's buffers: about half of an fp32 model,
    and transformers memory-maps the 16-bit checkpoint instead of allocating and filling fresh fp32
    pages (most of a 1.1B model's load on a 2-core VM, docs/benchmarks.md). Buffers stay as
    transformers makes them for the 16-bit dtype, the same for the reference and the merged model."""

    def __init__(self, model: torch.nn.Module):
        lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
        inner = {id(x) for ml in lists for x in ml.modules() if x is not ml}
        self.units = [u for ml in lists if id(ml) not in inner for u in ml]
        in_units = {id(p) for u in self.units for p in u.parameters()}
        with torch.no_grad():
            for p in model.parameters():
                if id(p) not in in_units and p.dtype in SIXTEEN_BIT:
                    p.data = p.data.float()
        self.free: dict[tuple, list[torch.Tensor]] = {}
        self.lent: dict[int, list] = {}
        for u in self.units:
            u.register_forward_pre_hook(self._lend)
            u.register_forward_hook(self._give_back)

    def _lend(self, unit, args):
        lent = []
        with torch.no_grad():
            for p in unit.parameters():
                if p.dtype in SIXTEEN_BIT:
                    key = (tuple(p.shape), p.device)
                    pool = self.free.get(key)
                    buf = pool.pop() if pool else torch.empty(p.shape, dtype=torch.float32, device=p.device)
                    buf.copy_(p.data)
                    lent.append((p, p.data, key, buf))
                    p.data = buf
        self.lent[id(unit)] = lent

    def _give_back(self, unit, args, out):
        for p, own, key, buf in self.lent.pop(id(unit), []):
            p.data = own
            self.free.setdefault(key, []).append(buf)


_CONFIG_NOISE = ("dtype", "torch_dtype", "_name_or_path", "transformers_version")


def _into_reference(ref, merged) -> bool:
    """Copy the weights of ``merged`` (loaded by transformers in the dtype it is stored in) into the
    model ``ref`` (the reference, peft's layers unloaded; fp32, or that same dtype run through
    :class:`Fp32Compute`), when both are the same class with the same config, the same parameters,
    buffers and ties: the copy is exact (a tensor of ``ref``'s own dtype is taken over, not copied), so
    ``ref`` then computes what the merged model loaded on its own would, without building a second
    model (on a 2-core VM 1.3-2.4 s for TinyLlama's shape in fp32, against 0.3 s for the copy).
    Returns False, copying nothing, when anything differs: the caller then loads the merged model on
    its own."""
    if type(ref) is not type(merged):
        return False
    cfg = [{k: v for k, v in m.config.to_dict().items() if k not in _CONFIG_NOISE} for m in (ref, merged)]
    if cfg[0] != cfg[1]:
        return False

    def layout(m):
        groups: dict[int, list[str]] = {}
        for n, t in m.named_parameters(remove_duplicate=False):
            groups.setdefault(id(t), []).append(n)
        return sorted(tuple(sorted(g)) for g in groups.values())

    if layout(ref) != layout(merged):  # a tie the reference lost (peft's modules_to_save copy), say
        return False
    want, have = ref.state_dict(keep_vars=True), merged.state_dict(keep_vars=True)
    if set(want) != set(have) or any(want[k].shape != have[k].shape or want[k].dtype not in (torch.float32,
                                                                                             have[k].dtype)
                                     for k in have if have[k].is_floating_point()):
        return False
    with torch.no_grad():
        for k, t in have.items():
            if want[k].dtype == t.dtype and want[k].device == t.device:
                # taken as it is: no copy, and no write into the base's memory-mapped (copy-on-write) pages
                want[k].data = t.data
            else:
                want[k].copy_(t)  # into the fp32 reference: exact
    return True


def _restore_dropped(pm, adapter: Adapter, name: str) -> list[str]:
    """The LoRA modules of ``adapter`` whose factors peft's own load (as adapter ``name`` of ``pm``) left unloaded,
    by peft's own account (the missing keys of its set_peft_model_state_dict, run once more on the same file),
    filled in from the adapter by module name; returns their names. peft 0.21 passes an adapter's keys, already
    in-memory names, through transformers' renames for the model once more, and a rename written as an unescaped
    regex (Laguna's ``mlp.shared_expert.``) turns ``mlp.shared_experts.down_proj`` into
    ``mlp.shared_experts..down_proj``, which loads nowhere: the reference is then the model that saved the
    adapter, not one without those deltas. A LoRA peft did load is never replaced by adaptkit's reading of it."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    result = set_peft_model_state_dict(pm, load_peft_weights(str(adapter.path), device="cpu"), adapter_name=name)
    unloaded = {k.removeprefix("base_model.model.").split(".lora_")[0] for k in result.missing_keys
                if f".{name}." in k and ".lora_" in k}
    root, restored = pm.base_model.model, []
    for m in adapter.modules.values():
        if m.name not in unloaded or m.param or m.kind != "linear":
            continue
        layer = root.get_submodule(m.name)
        if not isinstance(layer, LoraLayer) or name not in layer.lora_A or m.use_dora or m.bias_key is not None:
            raise ReferenceFailed(f"peft's load of {adapter.path} leaves {m.name} unloaded")
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        if a.shape != m.A.shape or b.shape != m.B.shape:
            raise ReferenceFailed(f"peft's load of {adapter.path} leaves {m.name} unloaded")
        with torch.no_grad():
            a.copy_(m.A.to(a.dtype))
            b.copy_(m.B.to(b.dtype))
        restored.append(m.name)
    return restored


class ReferenceFailed(Exception):
    """transformers or peft could not run base + adapters (a bug of theirs on this model, say): the
    model level has nothing to compare with and is skipped, the layer level stands."""


def check_model(base_path: Path, adapters: list[Adapter], merged_path: Path, weights, prompts: list[str] | None,
                seed: int = 0, kl_tolerance: float = 1e-3, device: torch.device | str = "cpu",
                progress=None, merged_dtype: torch.dtype | None = None,
                base_dtype: torch.dtype | None = None) -> ModelCheck:
    """Base + adapters (peft, unmerged) against the merged model (transformers), in fp32 arithmetic.

    fp32 is the smallest dtype here that leaves the comparison to the merge alone (a 16-bit forward
    pass would add its own rounding to both sides, ~1e-3 of the logits), but the weights need not be
    held in it: when base and merged model are stored in the same 16-bit dtype (``base_dtype`` ==
    ``merged_dtype``), both load in it and run through :class:`Fp32Compute` (about half the memory
    of an fp32 model, and no fp32 load). Otherwise the base loads in fp32. The reference runs every
    prompt; then, for a merged model stored in one 16-bit dtype, transformers loads it in that dtype
    and its weights are copied, exactly, into the reference's own modules once peft's layers are
    unloaded (:func:`_into_reference`: same class, config, parameters and ties, else the merged model
    is loaded on its own after the reference is freed). Prompts of one length run as one batch.
    ``progress(1)`` after each load and each run (:data:`MODEL_STEPS`).

    Both load with the class the base's config names. When it has a head, its outputs (logits) are
    compared: the check passes when the mean KL divergence is within ``kl_tolerance`` (top-1
    agreement is reported, not judged: on near-tied logits rounding alone flips a few). When that
    class would initialise weights the checkpoint lacks (a head missing from an encoder's
    checkpoint), outputs of random weights would be compared: the backbone (``AutoModel``) is loaded
    instead and its last hidden states are compared, relative to the adapters' own effect on them.
    The prompts include the token ids the adapters' trainable tokens replace. When transformers or peft
    fail on base + adapters, :class:`ReferenceFailed` (verify then skips this level with a warning); a
    merged model they fail on raises what they raise."""
    import gc
    import warnings

    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    bnb_import.preload()  # before peft imports it with torch._dynamo
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    dev = torch.device(device)
    config = read_json(Path(base_path) / "config.json", "config.json")
    cls = _model_class(config)
    step = progress or (lambda n: None)
    low = merged_dtype if merged_dtype is not None and merged_dtype == base_dtype else None  # the 16-bit route

    def load(path, cls):
        model, missing = _load(path, cls, dev, low or torch.float32)
        if low is not None:
            Fp32Compute(model)
        return model, missing

    restored: list[str] = []

    def reference(cls):
        """Base + adapters in peft: each prompt's outputs (and, without a head, the base's alone)."""
        with warnings.catch_warnings(), _quiet_transformers(hf_logging):
            warnings.simplefilter("ignore")
            ref, missing = load(base_path, cls)
            why = ""
            if missing:  # a head the checkpoint lacks would be random in each load: compare the backbone
                why = f"; {cls.__name__}'s head is not in the checkpoint"
                cls = AutoModel
                ref, missing = load(base_path, cls)
            rows = max((a.source.shape(key)[0] for a in adapters for n, key in a.full_tensors.items()
                        if n.endswith(VOCAB_TENSORS)), default=0)
            if rows > ref.get_input_embeddings().weight.shape[0]:  # an adapter that grew the vocabulary (extract)
                ref.resize_token_embeddings(rows, mean_resizing=False)  # its new rows come from the adapter
            names = []
            pm = None
            for i, a in enumerate(adapters):
                name = f"adapter{i}"
                if pm is None:
                    pm = PeftModel.from_pretrained(ref, a.path, adapter_name=name)
                else:
                    pm.load_adapter(a.path, adapter_name=name)
                names.append(name)
                restored.extend(_restore_dropped(pm, a, name))
            pm.base_model.set_adapter(names)
            for mod in pm.modules():  # each adapter's weight scales its ΔW
                if isinstance(mod, LoraLayer):
                    for name, w in zip(names, weights):
                        if name in mod.scaling:
                            mod.scaling[name] *= w
            pm.eval()
        step(1)
        batches, source = _prompts(base_path, ref.config, adapters, prompts, seed)
        runs = _runs(batches)
        run_ref = _text_model(pm.base_model.model)  # peft's layers are in place: running a part of it runs them
        with torch.no_grad():
            want, plain = [], []
            for ids in runs:
                out = run_ref(input_ids=ids.to(dev))
                heads = getattr(out, "logits", None) is not None
                want.append(out.logits if heads else out.last_hidden_state)
                if not heads:
                    with pm.disable_adapter():
                        plain.append(run_ref(input_ids=ids.to(dev)).last_hidden_state)
            step(1)
        return cls, why, heads, want, plain, runs, batches, source, ref, pm

    try:
        cls, why, heads, want, plain, runs, batches, source, ref, pm = reference(cls)
    except AdaptkitError:
        raise
    except Exception as e:  # transformers or peft failing on base + adapters: nothing to compare with
        raise ReferenceFailed(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    with torch.no_grad():
        with warnings.catch_warnings(), _quiet_transformers(hf_logging):
            warnings.simplefilter("ignore")
            merged = None
            if merged_dtype is not None and all(p.dtype in (torch.float32, low) for p in ref.parameters()):
                ref = pm.unload()  # the base's own modules back, peft's layers out
                stored, _ = _load(merged_path, cls, dev, merged_dtype)
                if _into_reference(ref, stored):
                    merged = ref
                del stored
            del pm, ref
            gc.collect()
            if merged is None:
                merged, _ = load(merged_path, cls)
        step(1)
        run_merged = _text_model(merged)
        got = [(o.logits if heads else o.last_hidden_state) for o in (run_merged(input_ids=ids.to(dev)) for ids in runs)]
        step(1)
    diffs, kls, agree, total, errs, position_kls = [], [], 0, 0, [], []
    for k in range(len(runs)):
        for row in range(runs[k].shape[0]):  # each prompt on its own, as if run alone
            if heads:
                a, b = want[k][row:row + 1].double(), got[k][row:row + 1].double()
                pa, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
                kl = (pa.exp() * (pa - lb)).sum(-1)
                kls.append(float(kl.mean()))
                position_kls.append(kl.reshape(-1))
                agree += int((a.argmax(-1) == b.argmax(-1)).sum())
                total += int(a.argmax(-1).numel())
            else:
                a, b = want[k][row:row + 1].double(), got[k][row:row + 1].double()
                base_h = plain[k][row:row + 1].double()
                errs.append((float((a - b).norm()), float((a - base_h).norm()), float(a.norm())))
            diffs.append(float((a - b).abs().max()))
    if kls:
        mean_kl, top1 = sum(kls) / len(kls), agree / total
        per_position = torch.cat(position_kls)
        worst_kl, typical = float(per_position.max()), float(per_position.median())
        # a few wrong positions (tokens an adapter replaced, say) hide in the mean: the worst position
        # must stay within the tolerance too, unless it is merely a hundred typical ones (rounding)
        ok = mean_kl <= kl_tolerance and worst_kl <= max(kl_tolerance, SPIKE_FACTOR * typical)
        return ModelCheck(len(batches), sum(ids.numel() for ids in batches), max(diffs), mean_kl, top1, ok,
                          source, f"logits ({cls.__name__}{why})", worst_kl, restored)
    err, effect, norm = (sum(e[i] for e in errs) for i in range(3))
    rel = err / max(norm, 1e-30)
    # the merge must reproduce the adapters' effect on the hidden states to within 2 % of it (or to
    # within rounding, 1e-3 of their size, when the effect itself is that small)
    ok = err <= max(0.02 * effect, 1e-3 * norm)
    return ModelCheck(len(batches), sum(ids.numel() for ids in batches), max(diffs), 0.0, 1.0, ok, source,
                      f"hidden states ({type(merged).__name__}{why}): relative error {rel:.2e}, the adapters move "
                      f"them by {effect / max(norm, 1e-30):.2e}", 0.0, restored)


def _text_model(model):
    """What runs the text-only prompts: the model, or the whole causal LM (with its head) a vision-language
    model wraps as ``language_model`` (Llama 4), which is what the wrapper runs for text without images.
    transformers 5.24's Llama4ForConditionalGeneration.forward fails on text alone (it reads
    ``image_outputs`` off its language model's output); classes whose ``language_model`` is a headless
    backbone (Llava, Gemma 3: transformers 5 keeps their head on the wrapper) run whole."""
    inner = getattr(model, "language_model", None)
    return inner if isinstance(inner, torch.nn.Module) and getattr(inner, "lm_head", None) is not None else model


MODEL_STEPS = 4  # loading the reference, running it, loading the merged model, running it


def _runs(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The prompts as forward passes: those of one length stacked into one batch (each model's
    weights are streamed once per pass, not once per prompt)."""
    by_len: dict[int, list[torch.Tensor]] = {}
    for ids in batches:
        by_len.setdefault(ids.shape[-1], []).append(ids)
    return [torch.cat(group, 0) for group in by_len.values()]


def _prompts(base_path, config, adapters: list[Adapter], prompts, seed: int):
    """Token ids to run: the prompts through the base's tokenizer, else seeded random ids, with every
    token id an adapter's trainable tokens replace placed in the first."""
    from transformers import AutoTokenizer

    if prompts:
        try:
            tok = AutoTokenizer.from_pretrained(base_path)
            return [tok(p, return_tensors="pt")["input_ids"] for p in prompts], "tokenizer"
        except (OSError, ValueError, KeyError, ImportError):  # no usable tokenizer: random token ids instead
            pass
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, text.vocab_size, (1, 32), generator=gen) for _ in range(4)]
    # tokens that stand for an image, a video or audio would need those inputs too: none in a text prompt
    media = {v for k, v in config.to_dict().items() if isinstance(v, int) and k.endswith(("_token_index", "_token_id"))
             and k.split("_")[0] in ("image", "video", "audio", "boi", "eoi", "vision")}
    for ids in batches:
        for m in media:
            ids[ids == m] = next(i for i in range(text.vocab_size) if i not in media)
    special = [i for a in adapters for ids, _ in a.token_rows.values() for i in ids if i < text.vocab_size][:32]
    if special:
        batches[0][0, : len(special)] = torch.tensor(special)
        return batches, "random token ids, with the trainable tokens"
    return batches, "random token ids"


def same_architecture(base: Checkpoint, merged: Checkpoint) -> None:
    """Refuse a MERGED of another architecture than BASE: comparing them would mean nothing."""
    for key in ("model_type", "architectures"):
        a, b = base.config.get(key), merged.config.get(key)
        if a and b and a != b:
            raise AdaptkitError(f"the merged model is {key} {b!r} but the base is {a!r}: verify compares a merge "
                                "with the base it was made from", merged.path)
    if base.tensors and not set(base.tensors) & set(merged.tensors):
        raise AdaptkitError("the merged model shares no tensor name with the base: it was not made from it",
                            merged.path)


def verify(base, adapters, merged, *, weights=None, prompts: list[str] | None = None, device="auto",
           tolerance: float | None = None, model: bool = True, seed: int = 0, write_report: bool = False,
           reporter: Reporter | None = None) -> VerifyReport:
    """Check that ``merged`` is ``base`` + ``adapters``: layer by layer, then on the model's logits.

    Layer level (any architecture, streamed): seeded random probes x go through each merged weight
    and are compared with W·x + w·s·B(A·x) (the DoRA formula for DoRA) computed from the factors, a
    route independent of the merge's; each error is judged against the rounding noise the output
    dtype alone must cause. Tensors no adapter touches must be bit-identical to the base. 4-bit
    weights are dequantized with bitsandbytes; a 4-bit output is judged against quantizing the exact
    merged weight itself. Model level (when transformers knows the architecture): the logits of
    base + adapters unmerged in peft against the merged model, in fp32.

    Args:
        base: the base model (folder or Hub id), as given to :func:`adaptkit.merge`.
        adapters: the adapters merged, in order (paths, Hub ids or :class:`Adapter` objects).
        merged: the merged model folder (or Hub id).
        weights: the weight each adapter was merged with (default 1 each).
        prompts: texts for the model-level check (default: random token ids).
        device: where the model-level check runs (``"auto"``, ``"cpu"``, ``"cuda"``…); the layer
            probes run on the CPU.
        tolerance: the largest relative error a module may show (default: 3x its rounding noise).
        model: run the model-level check (it loads the model twice).
        seed: seed of the probes and of the random prompts.
        write_report: save the report as ``adaptkit_verify.json`` in ``merged`` (a local folder);
            :func:`adaptkit.push` then puts its numbers in the model card.
        reporter: receives progress (tensors checked) and warnings.

    Returns:
        A :class:`VerifyReport`; ``report.ok`` says whether the merge is verified.

    Raises:
        AdaptkitError: bad input, or a merged model of another architecture than the base.

    Example:
        >>> import adaptkit
        >>> _ = adaptkit.merge("fixtures/tiny-llama", "fixtures/adapters/llama-lora", "out/doc-verify", force=True)
        >>> report = adaptkit.verify("fixtures/tiny-llama", "fixtures/adapters/llama-lora", "out/doc-verify",
        ...                          model=False)
        >>> report.ok, len(report.modules), report.untouched_checked
        (True, 14, 7)
    """
    report = Collected(reporter)
    adapters = adapters if isinstance(adapters, (list, tuple)) else [adapters]
    dev = resolve_device(device)  # the model-level check runs there; the layer probes are cheap on the CPU
    if tolerance is not None and not tolerance > 0:
        raise AdaptkitError(f"must be positive, got {tolerance}", param="tolerance")
    if write_report and not Path(str(merged)).is_dir():
        raise AdaptkitError("write_report needs the merged model to be a local folder", merged)
    base_ck = open_base(base)
    merged_ck = open_base(merged)
    same_architecture(base_ck, merged_ck)
    loaded = open_adapters(adapters)
    weights = adapter_weights(weights, len(loaded))
    plan = plan_merge(base_ck, loaded, weights)
    report.start("checking layers", len(plan.jobs))
    checks, untouched, mismatched, warnings = check_layers(base_ck, loaded, merged_ck, weights, tolerance, seed=seed,
                                                           plan=plan, progress=report.advance)
    q = [c for c in checks if c.note.startswith("4-bit output")]
    if q:
        errs = sorted(c.rel_error for c in q)
        warnings.append(f"{len(q)} modules are 4-bit in the merged model: their requantization error is "
                        f"{errs[len(errs) // 2]:.2e} (median), {errs[-1]:.2e} (worst), as expected of 4-bit weights")
    q = [c for c in checks if "output: the requantization error" in c.note]
    if q:
        errs = sorted(c.rounding_noise for c in q)
        warnings.append(f"{len(q)} modules are requantized in the merged model ({q[0].note.split(' output')[0]}): "
                        f"each equals the format's quantizer on the exact merge; that requantization's error is "
                        f"{errs[len(errs) // 2]:.2e} (median), {errs[-1]:.2e} (worst) of the weight")
    planned = {n for j in plan.jobs for n in j.out_names}
    extra = sorted(set(merged_ck.tensors) - planned - set(base_ck.tensors))
    if extra:
        warnings.append(f"the merged model has {len(extra)} tensors the base lacks (first: {extra[0]})")
    model_check = None
    if model and _transformers_knows(base_ck):
        report.start("model-level check (load and run base + adapters, then the merged model)", MODEL_STEPS, "steps")
        with tempfile.TemporaryDirectory(prefix="adaptkit-verify-") as tmp:
            # a LoRA trained on the other fused/split projection layout: peft would load it only in part,
            # so the reference gets it re-laid out in the base's layout (families.relayout, exact)
            refs = [_in_layout_of(base_ck, a, Path(tmp) / str(i)) for i, a in enumerate(loaded)]
            if all(isinstance(r, Adapter) for r in refs):
                try:
                    model_check = check_model(base_ck.path, refs, merged_ck.path, weights, prompts, seed=seed,
                                              device=dev, progress=report.advance,
                                              merged_dtype=_stored_16bit(merged_ck), base_dtype=_stored_16bit(base_ck))
                    if model_check.restored:
                        first = model_check.restored[0]
                        warnings.append(f"peft's own load of the adapter leaves {len(model_check.restored)} LoRA "
                                        f"modules unloaded (first: {first}; it renames their keys with transformers' "
                                        "rules for this model once more): the model-level reference loads them by "
                                        "name, as the model that saved the adapter had them, and peft's own "
                                        "merge_and_unload would lose them")
                except ReferenceFailed as e:
                    warnings.append(f"model-level check skipped: transformers and peft could not run the base with "
                                    f"the adapters ({e}); every merged tensor was checked at the layer level")
            else:
                warnings.append(f"model-level check skipped: {next(r for r in refs if isinstance(r, str))}; every "
                                "merged tensor was checked at the layer level")
    elif model:
        warnings.append("model-level check skipped: transformers does not know this architecture")
    for w in warnings:
        report.warn(w)
    ok = all(c.ok for c in checks) and not mismatched and (model_check is None or model_check.ok)
    result = VerifyReport(str(base), [str(a.path) for a in loaded], str(merged), checks, untouched, mismatched,
                          model_check, ok, report.warnings)
    if write_report:
        with atomic_output_file(Path(str(merged)) / VERIFY_REPORT, force=True,
                                inputs=read_paths(base_ck, loaded)) as tmp:
            tmp.write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    return result


def _in_layout_of(base: Checkpoint, adapter: Adapter, folder: Path) -> Adapter | str:
    """``adapter``, or its re-laid-out copy written to ``folder`` (peft layout) when the base stores its
    projections fused where it has them split, or the reverse; or why peft cannot load it on this base."""
    from ..families import relayout_for
    from ..formats import TARGETS, load_adapter

    try:
        moved, names = relayout_for(adapter, base)
    except AdaptkitError as e:
        return f"peft cannot load {adapter.path} on this base's projection layout ({e.message})"
    if not names:
        return adapter
    folder.mkdir(parents=True)
    TARGETS["peft"].write(moved, folder, dtype=None)
    return load_adapter(folder)


def _stored_16bit(ck: Checkpoint) -> torch.dtype | None:
    """The one 16-bit dtype every floating tensor of a dense (unquantized) checkpoint is stored in, or None."""
    if "quantization_config" in ck.config:
        return None
    dtypes = {info.dtype for _, info in ck.tensors.values() if info.dtype.is_floating_point}
    return dtypes.pop() if len(dtypes) == 1 and dtypes <= set(SIXTEEN_BIT) else None


def _transformers_knows(ck: Checkpoint) -> bool:
    try:
        from transformers import CONFIG_MAPPING
    except ImportError:
        return False
    return ck.config.get("model_type") in CONFIG_MAPPING
