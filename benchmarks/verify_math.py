"""verify's layer-level probe math alone, in memory, in seconds per billion parameters (no disk).

    python benchmarks/verify_math.py            # TinyLlama's MLP and attention shapes, fp16

For each shape, an fp16 base W and a merged W' (W plus a small change):
  W·x  N=8      the probe product as W (rows, in) @ x (in, 8), one 1 MB block of fp32 rows
  xᵀ·Wᵀ         the same flops with the probes as rows, (8, in) @ (in, rows): what _probe_rows uses
  probe_rows xN verify's _probe_rows (W·x, (W'−W)·x and the rounding-noise sum), N workers
Best of several repeats each. The two products are also compared (fp32 sums in another order:
‖difference‖ / ‖W·x‖ is printed, ~1e-6).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from adaptkit.commands.verify import PROBES, _probe_rows  # noqa: E402
from adaptkit.ops import RowWorkers  # noqa: E402

SHAPES = [(5632, 2048), (2048, 5632), (2048, 2048), (256, 2048)]


def best(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    pools = {n: RowWorkers(n) for n in sorted({1, cores})}
    results = {"machine": f"{cores} cores", "torch": torch.__version__, "shapes": {}}
    for rows, cols in SHAPES:
        w = (torch.randn(rows, cols, generator=gen) * 0.02).half()
        got = (w.float() + torch.randn(rows, cols, generator=gen) * 1e-4).half()
        x = torch.randn(cols, PROBES, generator=gen)
        step = RowWorkers.step(cols)
        block = w[:step].float()
        xt = x.T.contiguous()
        torch.set_num_threads(1)
        per = 1e9 / block.numel()
        row = {"W·x N=8": best(lambda: block @ x) * per, "xᵀ·Wᵀ": best(lambda: xt @ block.T) * per}
        torch.set_num_threads(threads)
        a, b = block @ x, (xt @ block.T).T
        row["rel diff"] = float((a - b).norm() / a.norm())
        for n, pool in pools.items():
            row[f"probe_rows x{n}"] = best(lambda: _probe_rows(w, got, x, False, pool)) * 1e9 / w.numel()
        results["shapes"][f"{rows}x{cols}"] = row
        print(f"{rows:5}x{cols:<5} " + "  ".join(f"{k} {v:.3g}" for k, v in row.items()) + "  (s per billion)")
    for pool in pools.values():
        pool.close()
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
