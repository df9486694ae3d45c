"""The merge's math alone, in memory, in seconds per billion parameters (no disk, no start-up).

    python benchmarks/merge_math.py            # TinyLlama's MLP and attention shapes, r=16, fp16

Four routes on the same fp16 weight and r=16 LoRA, best of several repeats each:
  naive     `w.float().addmm_(B, A, alpha=s).half()` (fresh tensors each time: issue 18's "today")
  buffer    the stream's fp32-buffer route before session 10: upcast into a reused buffer, one
            whole-tensor addmm_, range check, round into a reused output (lora.add_delta_ + stream.fits;
            the buffer route now runs merge_rows' blocks in place)
  rows xN   ops.merge_rows with N worker threads (1, and every core)
Every route's output is compared with the naive one: the values that differ are counted (none on an
AMD EPYC; MKL's blocked and whole products can differ in fp32's last bit on other CPUs) and may be
one fp16 ulp away at most.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from adaptkit import lora, ops, stream  # noqa: E402

SHAPES = [(5632, 2048), (2048, 5632), (2048, 2048), (256, 2048)]
R = 16


def best(fn, repeats: int = 7, inner: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return min(times)


def main():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    results = {"machine": f"{cores} cores", "torch": torch.__version__, "shapes": {}}
    totals: dict[str, float] = {}
    params = 0
    pools = {n: ops.RowWorkers(n) for n in sorted({1, cores})}
    for out_f, in_f in SHAPES:
        w = (torch.randn(out_f, in_f, generator=gen) * 0.02).half()
        a, b = torch.randn(R, in_f, generator=gen) * 0.01, torch.randn(out_f, R, generator=gen) * 0.01
        op = ops.Op(kind="lora", adapter=None, module=SimpleNamespace(A=a, B=b, scaling=2.0, name="m", use_dora=False))
        buf, out = torch.empty(out_f, in_f), torch.empty_like(w)
        naive = w.float().addmm_(b, a, alpha=2.0).half()

        def buffered():
            buf.copy_(w)
            lora.add_delta_(buf, a, b, 2.0, False)
            stream.fits(buf, torch.float16)
            out.copy_(buf)

        routes = {"naive": lambda: w.float().addmm_(b, a, alpha=2.0).half(), "buffer": buffered}
        for n, pool in pools.items():
            routes[f"rows x{n}"] = (lambda p: lambda: ops.merge_rows(w, out, op, p))(pool)
        row, differing = {}, {}
        for name, fn in routes.items():
            torch.set_num_threads(threads if name in ("naive", "buffer") else 1)
            s = best(fn)
            torch.set_num_threads(threads)
            if name != "naive":
                off = int((out.view(torch.int16) != naive.view(torch.int16)).sum())
                assert (out.float() - naive.float()).abs().le(torch.finfo(torch.float16).eps * naive.float().abs()
                                                              + 2.0 ** -24).all(), name
                differing[name] = off
            row[name] = s / w.numel() * 1e9
            totals[name] = totals.get(name, 0.0) + s
        params += w.numel()
        results["shapes"][f"{out_f}x{in_f}"] = dict(row, values_differing_from_naive=differing)
        print(f"{out_f:5}x{in_f:<5} " + "  ".join(f"{k} {v:.2f}" for k, v in row.items()) + "  s per billion; "
              "values differing from naive: " + ", ".join(f"{k} {v}" for k, v in differing.items()))
    for pool in pools.values():
        pool.close()
    results["all"] = {k: v / params * 1e9 for k, v in totals.items()}
    print("all shapes   " + "  ".join(f"{k} {v:.2f}" for k, v in results["all"].items())
          + f"  s per billion (torch threads {threads}); naive / rows x{cores}: "
          f"{results['all']['naive'] / results['all'][f'rows x{cores}']:.1f}x")
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
