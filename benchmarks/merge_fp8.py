"""FP8 merge benchmark: adaptkit on a block-wise FP8 base, beside the disk floor and the peer.

    python benchmarks/merge_fp8.py --shape llama7b --device cuda     # the GPU machine (issue 20's target)
    python benchmarks/merge_fp8.py --shape tinyllama --device cpu    # ratios on a CPU machine

Builds a checkpoint of the shape in transformers' ``fp8`` layout (DeepSeek-V3 style: every linear
projection in float8_e4m3fn with a ``weight_scale_inv`` per 128x128 block, the rest bf16;
quantized with adaptkit's FP8 quantizer, which tests/test_scaled.py proves byte-identical to
transformers' Fp8Quantize) and an r=16 all-linear adapter, then measures in one run:

  (a) the GPU work alone: every adapted layer dequantized, ΔW added, requantized (the weights
      already on the device);
  (b) the whole ``adaptkit merge --quantize same`` command, cold, against the physical floor (bytes
      read / read bandwidth + bytes written / write bandwidth, measured here) and ``cp -r`` + sync;
  (c) the dense merge (``adaptkit merge``, bf16 output) against the peer: transformers' dequantized
      load in bf16 + peft ``merge_and_unload`` + ``save_pretrained`` (how it is done without
      adaptkit), time and peak RSS. ``--skip-peer`` leaves it out.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

from common import (ROOT, SHAPES, TARGETS, build_adapter, child_env, disk_bandwidth, evict, llama_config, parser,
                    run, tensor_shapes)

BLOCK = (128, 128)


def build_fp8_base(path: Path, s: dict, device: str, shard_gb: float = 5.0):
    """A block-wise FP8 checkpoint of shape ``s``, streamed to disk shard by shard."""
    from adaptkit.io.safetensors_file import StreamingWriter
    from adaptkit.scaled import ScaledWeight, quantize

    path.mkdir(parents=True, exist_ok=True)
    cfg = llama_config(s).to_dict()
    cfg["dtype"] = "bfloat16"
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                  "weight_block_size": list(BLOCK), "modules_to_not_convert": ["lm_head"]}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    entries = []  # (name, dtype, shape, quantized)
    for name, shape in tensor_shapes(s):
        mod = name[: -len(".weight")]
        if len(shape) == 2 and mod.rsplit(".", 1)[-1] in TARGETS:
            grid = tuple(-(-n // b) for n, b in zip(shape, BLOCK))
            entries += [(name, torch.float8_e4m3fn, shape, True), (name + "_scale_inv", torch.float32, grid, None)]
        else:
            entries.append((name, torch.bfloat16, shape, False))
    shards, cur, size = [], [], 0
    for e in entries:
        n = torch.Size(e[2]).numel() * torch.empty(0, dtype=e[1]).element_size()
        if cur and size + n > shard_gb * 1e9 and e[3] is not None:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += n
    shards.append(cur)
    gen = torch.Generator(device=device).manual_seed(0)
    weight_map = {}
    for i, group in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        w = StreamingWriter(path / fname, [(n, d, sh) for n, d, sh, _ in group], {"format": "pt"})
        for name, dtype, shape, quantized in group:
            if quantized is None:
                continue  # written with its weight
            t = torch.randn(shape, generator=gen, device=device).mul_(0.02)
            if quantized:
                grid = tuple(-(-n // b) for n, b in zip(shape, BLOCK))
                sw = ScaledWeight(name, name, name + "_scale_inv", tuple(shape), BLOCK, "fp8", torch.float32, grid)
                stored = quantize(sw, t)
                w.write(name, stored[name].cpu())
                w.write(name + "_scale_inv", stored[name + "_scale_inv"].cpu())
            else:
                w.write(name, t.to(torch.bfloat16).cpu())
        w.close()
        weight_map.update({n: fname for n, *_ in group})
    if len(shards) > 1:
        total = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                       "weight_map": weight_map}))


GPU_WORK = r"""
import sys, time, json, torch
sys.path.insert(0, sys.argv[4])
from adaptkit.io.checkpoint import Checkpoint
from adaptkit.formats import load_adapter
from adaptkit.plan import scaled_weights
from adaptkit.scaled import dequantize_, quantize
base, adapter, device = sys.argv[1:4]
ck = Checkpoint.open(base)
_, found, _ = scaled_weights(ck)
ad = load_adapter(adapter)
layers = []
for m in ad.modules.values():
    w = found[m.weight_name]
    layers.append((w, ck.read(w.data).clone().to(device), ck.read(w.scales).clone().to(device),
                   m.A.to(device, torch.float32), m.B.to(device, torch.float32), m.scaling))
work = torch.empty(max(w.shape[0] * w.shape[1] for w, *_ in layers), device=device)
def one(w, q, s, a, b, scale):
    dense = dequantize_(w, q, s, work[: w.shape[0] * w.shape[1]].view(w.shape))
    dense.addmm_(b, a, alpha=scale)
    return quantize(w, dense)
one(*layers[0])
sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
sync()
t0 = time.perf_counter()
for layer in layers:
    one(*layer)
sync()
print(json.dumps({"layers": len(layers), "seconds": time.perf_counter() - t0}))
"""

PEER = r"""
import sys, time, json, torch, warnings
warnings.filterwarnings("ignore")
from transformers import AutoModelForCausalLM, FineGrainedFP8Config
from peft import PeftModel
base, adapter, out, device = sys.argv[1:5]
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map=device,
                                             quantization_config=FineGrainedFP8Config(dequantize=True))
merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
merged.config.quantization_config = None
if hasattr(merged, "hf_quantizer"):
    merged.hf_quantizer = None
merged.save_pretrained(out)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def main():
    ap = parser(__doc__, "llama7b", "cuda")
    ap.add_argument("--skip-peer", action="store_true", help="Leave out the transformers + peft dense merge.")
    args = ap.parse_args()
    s = SHAPES[args.shape]
    work = args.workdir / f"{args.shape}-fp8"
    base, adapter = work / "base", work / "adapter"
    if not (base / "config.json").exists():
        t0 = time.perf_counter()
        build_fp8_base(base, s, args.device)
        build_adapter(adapter, s)
        print(f"built FP8 {args.shape} in {time.perf_counter() - t0:.1f} s", flush=True)
    env = child_env()
    run([sys.executable, "-c", "import torch, transformers, peft, adaptkit.commands.merge"], env=env)  # warm caches
    base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    read_bw, write_bw = disk_bandwidth(work)
    res = {"shape": args.shape, "device": args.device, "base_bytes": base_bytes, "read_bw": read_bw,
           "write_bw": write_bw, "physical_floor_s": base_bytes / read_bw + base_bytes / write_bw}
    if torch.cuda.is_available():
        res["gpu"] = torch.cuda.get_device_name(0)
    gw = run([sys.executable, "-c", GPU_WORK, str(base), str(adapter), args.device, str(ROOT)], env=env)
    res["gpu_work"] = json.loads(gw["stdout"].strip().splitlines()[-1])
    for d in ("out-cp", "out-same", "out-dense", "out-peer"):
        shutil.rmtree(work / d, ignore_errors=True)
    evict(base, adapter)
    res["copy"] = run(["cp", "-r", str(base), str(work / "out-cp")])
    res["copy"].pop("stdout")
    shutil.rmtree(work / "out-cp")
    for how, flags in (("same", ["--quantize", "same"]), ("dense", [])):
        evict(base, adapter)
        r = run([sys.executable, "-m", "adaptkit", "merge", str(base), str(adapter), "-o", str(work / f"out-{how}"),
                 "--device", args.device, "--json", *flags], env=env)
        r["summary"] = json.loads(r.pop("stdout"))
        res[how] = r
        if how == "dense":
            res["dense_bytes"] = sum(p.stat().st_size for p in (work / "out-dense").glob("*.safetensors"))
        shutil.rmtree(work / f"out-{how}")
    if not args.skip_peer:
        evict(base, adapter)
        peer = run([sys.executable, "-c", PEER, str(base), str(adapter), str(work / "out-peer"), args.device], env=env)
        peer.pop("stdout")
        res["peer"] = peer
        shutil.rmtree(work / "out-peer")
    g, same, dense = res["gpu_work"], res["same"], res["dense"]
    floor = res["physical_floor_s"]
    print(f"\nFP8 {args.shape}: {base_bytes / 1e9:.2f} GB, {g['layers']} layers, {res.get('gpu', args.device)}")
    print(f"(a) {args.device} work (dequantize, add ΔW, requantize): {g['seconds']:.2f} s")
    print(f"(b) merge --quantize same: {same['seconds']:.1f} s (peak RSS {same['peak_rss_bytes'] / 1e9:.2f} GB); "
          f"physical floor {floor:.1f} s (read {read_bw / 1e9:.2f} GB/s, write {write_bw / 1e9:.2f} GB/s) -> "
          f"{same['seconds'] / floor:.2f}x floor; cp -r + sync {res['copy']['seconds']:.1f} s -> "
          f"{same['seconds'] / res['copy']['seconds']:.2f}x cp")
    q = same["summary"].get("quantization") or {}
    if q:
        print(f"    requantization error per layer: median {q['median']:.3e}, worst {q['worst']:.3e}")
    dense_floor = base_bytes / read_bw + res["dense_bytes"] / write_bw
    line = (f"(c) dense merge (bf16, {res['dense_bytes'] / 1e9:.2f} GB written): {dense['seconds']:.1f} s "
            f"(peak RSS {dense['peak_rss_bytes'] / 1e9:.2f} GB), {dense['seconds'] / dense_floor:.2f}x its floor")
    if "peer" in res:
        p = res["peer"]
        line += (f"; transformers + peft {p['seconds']:.1f} s (peak RSS {p['peak_rss_bytes'] / 1e9:.2f} GB) -> "
                 f"{p['seconds'] / dense['seconds']:.1f}x slower, {p['peak_rss_bytes'] / dense['peak_rss_bytes']:.1f}x "
                 "the memory")
    print(line)
    if args.json_out:
        args.json_out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
