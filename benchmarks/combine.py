"""Combine benchmark: adaptkit TIES on exact deltas against peft's add_weighted_adapter("ties_svd").

    python benchmarks/combine.py --shape tinyllama --device cpu [--layers 4]
    python benchmarks/combine.py --shape tinyllama --device cuda

Three r=16 all-linear adapters on the given shape; TIES, density 0.5, output rank 16. Each side
runs in its own process (time and peak RSS). Quality: for a few modules, the relative Frobenius
error of each result against the exact TIES ΔW (peft.utils.merge_utils.ties on the full deltas,
equal weights), next to the best possible rank-16 error (Eckart–Young).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import torch

from common import ROOT, SHAPES, build_adapter, build_base, parser, run

PEFT_SCRIPT = r"""
import sys, time, json, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, out, device, *adapters = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, device_map=device)
pm = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
for i, a in enumerate(adapters[1:], 1):
    pm.load_adapter(a, adapter_name=f"a{i}")
names = [f"a{i}" for i in range(len(adapters))]
t0 = time.perf_counter()
pm.add_weighted_adapter(names, [1.0] * len(names), "combined", combination_type="ties_svd", svd_rank=16, density=0.5)
if device.startswith("cuda"):
    torch.cuda.synchronize()
t = time.perf_counter() - t0
pm.add_weighted_adapter(names, [1.0] * len(names), "combined_ab", combination_type="ties", density=0.5)
pm.save_pretrained(out, selected_adapters=["combined", "combined_ab"])
print(json.dumps({"add_weighted_adapter": t}))
"""


def quality(adapters, ours, peft_out, peft_ab, modules):
    from peft.utils import merge_utils

    from adaptkit.adapter import load_adapter

    ins = [load_adapter(a) for a in adapters]
    mine = load_adapter(ours)
    theirs = load_adapter(peft_out)
    theirs_ab = load_adapter(peft_ab)
    rows = []
    for name in modules:
        ds = [a.modules[name].delta() for a in ins]
        exact = merge_utils.ties(ds, torch.ones(len(ds)), 0.5)
        s = torch.linalg.svdvals(exact.double())
        best = float((s[16:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
        norm = exact.double().norm()
        rows.append({
            "module": name,
            "best_rank16_rel_error": best,
            "adaptkit_rel_error": float((mine.modules[name].delta().double() - exact.double()).norm() / norm),
            "peft_rel_error": float((theirs.modules[name].delta().double() - exact.double()).norm() / norm),
            "peft_ties_on_A_B_rel_error": float((theirs_ab.modules[name].delta().double() - exact.double()).norm() / norm),
        })
    return rows


def main():
    ap = parser(__doc__, "tinyllama", "cpu")
    ap.add_argument("--layers", type=int, default=None, help="adapt only the first N layers (quicker on a CPU)")
    args = ap.parse_args()
    s = SHAPES[args.shape]
    work = args.workdir / args.shape
    base = work / "base"
    if not (base / "config.json").exists():
        build_base(base, s, "cuda" if args.device.startswith("cuda") else "cpu")
    tag = f"L{args.layers}" if args.layers else "all"
    adapters = [work / f"combine-{tag}-{i}" for i in range(3)]
    for i, a in enumerate(adapters):
        if not (a / "adapter_config.json").exists():
            build_adapter(a, s, seed=10 + i, layers=args.layers)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out_ak, out_peft = work / "combined-adaptkit", work / "combined-peft"
    for d in (out_ak, out_peft):
        shutil.rmtree(d, ignore_errors=True)
    ak = run([sys.executable, "-m", "adaptkit", "combine", *map(str, adapters), "--method", "ties", "--density", "0.5",
              "--rank", "16", "--device", args.device, "-o", str(out_ak), "--json"], env=env)
    ak["summary"] = json.loads(ak.pop("stdout"))
    pf = run([sys.executable, "-c", PEFT_SCRIPT, str(base), str(out_peft), args.device, *map(str, adapters)], env=env)
    pf["steps"] = json.loads(pf.pop("stdout").strip().splitlines()[-1])
    peft_adapter = out_peft / "combined" if (out_peft / "combined").exists() else out_peft
    mods = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj"]
    q = quality(adapters, out_ak, peft_adapter, out_peft / "combined_ab", mods)
    modules = len(ak["summary"]["modules"])
    results = {"shape": args.shape, "layers": args.layers or s["layers"], "modules": modules, "device": args.device,
               "adaptkit": ak, "peft": pf, "quality": q, "torch": torch.__version__}
    if torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name(0)
    print(f"\nTIES density 0.5, rank 16, three r=16 adapters, {modules} modules ({args.shape}, "
          f"{results['layers']} layers), device {args.device}")
    print(f"{'':22} {'seconds':>8} {'peak RSS':>10}")
    print(f"{'adaptkit combine':22} {ak['seconds']:8.1f} {ak['peak_rss_bytes'] / 1e9:8.2f} GB "
          f"(combine itself {ak['summary']['seconds']:.1f} s)")
    print(f"{'peft ties_svd':22} {pf['seconds']:8.1f} {pf['peak_rss_bytes'] / 1e9:8.2f} GB "
          f"(add_weighted_adapter {pf['steps']['add_weighted_adapter']:.1f} s)")
    print(f"time peft/adaptkit {pf['seconds'] / ak['seconds']:.1f}x (process), "
          f"{pf['steps']['add_weighted_adapter'] / ak['summary']['seconds']:.1f}x (combine step)")
    print("relative error against the exact TIES ΔW "
          "(best possible at rank 16 | adaptkit | peft ties_svd | peft ties on A,B):")
    for r in q:
        print(f"  {r['module']:36} {r['best_rank16_rel_error']:.4f} | {r['adaptkit_rel_error']:.4f} | "
              f"{r['peft_rel_error']:.4f} | {r['peft_ties_on_A_B_rel_error']:.4f}")
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))
    for d in (out_ak, out_peft):
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
