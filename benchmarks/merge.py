"""Merge benchmark: adaptkit against the copy floor and peft's path, side by side in one run.

    python benchmarks/merge.py --shape tinyllama --workdir /tmp/bench            # CPU machine
    python benchmarks/merge.py --shape llama7b --workdir /data/bench --device cuda  # GPU machine

Builds a base of the given shape (random fp16, HF layout) and an r=16 all-linear adapter in the PEFT
layout, then times, each in its own process with cold page cache for the base (posix_fadvise):
  floor    `cp -r BASE` + sync, and the physical floor: bytes read / read bandwidth + bytes written /
           write bandwidth, both measured here in the same run;
  adaptkit `adaptkit merge BASE ADAPTER -o OUT --device D` + sync;
  peft     load (transformers) → PeftModel.from_pretrained → merge_and_unload → save_pretrained + sync.
`--pairs N` repeats the (cp, adaptkit) pair N times and reports each ratio and their median (the
disk of a VM swings between runs); `--verify` also times `adaptkit verify --no-model` and `adaptkit
verify` on adaptkit's output (both cold), as ratios to the merge.
Peak RSS of each child comes from wait4. Prints a table and writes JSON (--json-out).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

import statistics

from common import SHAPES, build_adapter, build_base, child_env, disk_bandwidth, evict, parser, run

PEFT_SCRIPT = r"""
import sys, time, json, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out, device = sys.argv[1:5]
t = {}
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(base, dtype="auto", device_map=device)
t["load"] = time.perf_counter() - t0
t0 = time.perf_counter()
pm = PeftModel.from_pretrained(model, adapter)
t["from_pretrained"] = time.perf_counter() - t0
t0 = time.perf_counter()
merged = pm.merge_and_unload()
if device.startswith("cuda"):
    torch.cuda.synchronize()
t["merge_and_unload"] = time.perf_counter() - t0
t0 = time.perf_counter()
merged.save_pretrained(out)
t["save_pretrained"] = time.perf_counter() - t0
print(json.dumps(t))
"""


def compare(out_a: Path, out_b: Path, names: list[str]) -> float:
    """Largest |difference| over a few tensors of the two merged outputs (a correctness spot check)."""
    from safetensors import safe_open

    def find(folder, name):
        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), "pt") as h:
                if name in h.keys():
                    return h.get_tensor(name).float()
        raise KeyError(name)

    return max((find(out_a, n) - find(out_b, n)).abs().max().item() for n in names)


def main():
    ap = parser(__doc__, "tinyllama", "cpu")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--pairs", type=int, default=1, help="(cp, adaptkit) pairs to run; the median ratio is reported")
    ap.add_argument("--verify", action="store_true", help="also time adaptkit verify (--no-model, then full)")
    args = ap.parse_args()
    s = SHAPES[args.shape]
    work = args.workdir / args.shape
    base, adapter = work / "base", work / "adapter"
    build_dev = "cuda" if args.device.startswith("cuda") else "cpu"
    if not (base / "config.json").exists():
        t0 = time.perf_counter()
        build_base(base, s, build_dev)
        build_adapter(adapter, s)
        print(f"built {args.shape} base in {time.perf_counter() - t0:.1f} s", flush=True)
    base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    adapter_bytes = sum(p.stat().st_size for p in adapter.glob("*.safetensors"))  # read too (0.5 GB for moe)
    env = child_env()
    results = {"shape": args.shape, "device": args.device, "base_bytes": base_bytes, "adapter_bytes": adapter_bytes,
               "machine": f"{os.cpu_count()} cores", "torch": torch.__version__}
    if torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name(0)
    read_bw, write_bw = disk_bandwidth(work)
    results.update(read_bw=read_bw, write_bw=write_bw, physical_floor_s=(base_bytes + adapter_bytes) / read_bw + base_bytes / write_bw)

    for d in ("out-cp", "out-adaptkit", "out-peft"):
        shutil.rmtree(work / d, ignore_errors=True)
    merge = [sys.executable, "-m", "adaptkit", "merge", str(base), str(adapter), "-o", str(work / "out-adaptkit"),
             "--device", args.device, "--json"]
    pairs = []
    for k in range(max(1, args.pairs)):
        evict(base)
        cp = run(["cp", "-r", str(base), str(work / "out-cp")])
        cp.pop("stdout", None)
        shutil.rmtree(work / "out-cp")
        if k:
            shutil.rmtree(work / "out-adaptkit")
        evict(base, adapter)
        r = run(merge, env=env)
        r["summary"] = json.loads(r.pop("stdout"))
        pairs.append({"copy": cp, "adaptkit": r, "ratio": r["seconds"] / cp["seconds"]})
    results["pairs"] = pairs
    results["median_ratio"] = statistics.median(p["ratio"] for p in pairs)
    results["median_merge_s"] = statistics.median(p["adaptkit"]["seconds"] for p in pairs)
    results["copy"], results["adaptkit"] = pairs[0]["copy"], pairs[0]["adaptkit"]
    if args.verify:
        for label, extra in (("verify_no_model", ["--no-model"]), ("verify", [])):
            evict(base, adapter, work / "out-adaptkit")
            r = run([sys.executable, "-m", "adaptkit", "verify", str(base), str(adapter), str(work / "out-adaptkit"),
                     "--device", args.device, "--json", *extra], env=env)
            r["summary"] = json.loads(r.pop("stdout"))
            results[label] = r
    if not args.skip_peft:
        evict(base, adapter)
        r = run([sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(work / "out-peft"), args.device], env=env)
        r["steps"] = json.loads(r.pop("stdout").strip().splitlines()[-1])
        results["peft"] = r
        names = ["model.layers.0.self_attn.q_proj.weight", "lm_head.weight"] + (
            ["model.layers.1.mlp.experts.5.up_proj.weight", "model.layers.2.mlp.experts.100.down_proj.weight"]
            if s.get("kind") == "moe" else ["model.layers.1.mlp.down_proj.weight"])
        results["max_abs_diff_vs_peft"] = compare(work / "out-adaptkit", work / "out-peft", names)
        shutil.rmtree(work / "out-peft")
    shutil.rmtree(work / "out-adaptkit")

    ak, cp = results["adaptkit"], results["copy"]
    rows = [("cp -r + sync", cp), ("adaptkit merge", ak)] + ([("peft path", results["peft"])] if "peft" in results else [])
    print(f"\n{args.shape} base {base_bytes / 1e9:.2f} GB + adapter {adapter_bytes / 1e9:.2f} GB, device {args.device}, "
          f"disk read {read_bw / 1e9:.2f} GB/s, write {write_bw / 1e9:.2f} GB/s, "
          f"physical floor {results['physical_floor_s']:.1f} s")
    print(f"{'':16} {'seconds':>8} {'peak RSS':>10} {'vs cp':>7} {'vs floor':>9}")
    for label, r in rows:
        print(f"{label:16} {r['seconds']:8.1f} {r['peak_rss_bytes'] / 1e9:8.2f} GB {r['seconds'] / cp['seconds']:6.2f}x "
              f"{r['seconds'] / results['physical_floor_s']:8.2f}x")
    if len(pairs) > 1:
        print("pairs (adaptkit / cp -r): " + ", ".join(f"{p['adaptkit']['seconds']:.1f}/{p['copy']['seconds']:.1f} s "
                                                      f"= {p['ratio']:.2f}x" for p in pairs)
              + f"; median {results['median_ratio']:.2f}x")
    for label in ("verify_no_model", "verify"):
        if label in results:
            v = results[label]
            print(f"{label.replace('_', ' '):16} {v['seconds']:8.1f} {v['peak_rss_bytes'] / 1e9:8.2f} GB "
                  f"{v['seconds'] / results['median_merge_s']:6.2f}x the merge (median of the pairs)")
    summary = ak["summary"]
    print(f"adaptkit: {summary['tensors']} tensors, {summary['seconds'] * 1e6 / summary['tensors']:.0f} µs per tensor "
          f"(read + merge + write, inside the merge)")
    if "peft" in results:
        p = results["peft"]
        print(f"peft / adaptkit: time {p['seconds'] / ak['seconds']:.1f}x, peak RSS "
              f"{p['peak_rss_bytes'] / ak['peak_rss_bytes']:.1f}x; peft steps {json.dumps({k: round(v, 2) for k, v in p['steps'].items()})}; "
              f"max |adaptkit - peft| {results['max_abs_diff_vs_peft']:.3g}")
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
