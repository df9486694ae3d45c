"""NF4 merge benchmark (GPU machine): adaptkit against peft's merge into a 4-bit model.

    python benchmarks/merge_nf4.py --shape llama7b --device cuda

Builds a bitsandbytes NF4 checkpoint of the given shape in transformers' layout (packed weight,
absmax, quant_map, nested_*, quant_state JSON; double quantization, blocksize 64) and an r=16
all-linear adapter, then measures in one run:
  (a) the GPU work of the merge: every adapted layer dequantized, ΔW added, requantized, with the
      weights already on the GPU (adaptkit's functions), against peft's ``merge_and_unload`` on the
      same checkpoint loaded in 4-bit by transformers;
  (b) the whole ``adaptkit merge --quantize nf4`` command, streaming from and to disk, against the
      disk floor (bytes read / read bandwidth + bytes written / write bandwidth, measured here) and
      ``cp -r``; and, beside it, the start-up a process pays before its first byte of work (Python,
      torch, CUDA, bitsandbytes imported and first called, as adaptkit does it and plainly).

``--skip-peft`` leaves out peft's side of (a) (for shapes where loading the model takes minutes).
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


def build_nf4_base(path: Path, s: dict, device: str, shard_gb: float = 2.0):
    import bitsandbytes.functional as F
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    cfg = llama_config(s).to_dict()
    cfg["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "_load_in_4bit": True,
        "_load_in_8bit": False, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "float16", "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator(device=device).manual_seed(0)
    shards, cur, size = [], {}, 0
    for name, shape in tensor_shapes(s):
        t = torch.randn(shape, generator=gen, device=device).mul_(0.02).half()
        mod = name[: -len(".weight")]
        if len(shape) == 2 and mod.rsplit(".", 1)[-1] in TARGETS:
            packed, state = F.quantize_4bit(t, blocksize=64, compress_statistics=True, quant_type="nf4",
                                            quant_storage=torch.uint8)
            items = {name: packed.cpu()} | {f"{name}.{k}": v.cpu() for k, v in state.as_dict(packed=True).items()}
        else:
            items = {name: t.cpu()}
        n = sum(v.numel() * v.element_size() for v in items.values())
        if cur and size + n > shard_gb * 1e9:
            shards.append(cur)
            cur, size = {}, 0
        cur.update(items)
        size += n
    shards.append(cur)
    weight_map = {}
    for i, sh in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sh, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in sh})
    total = sum(v.numel() * v.element_size() for sh in shards for v in sh.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))


GPU_WORK = r"""
import sys, time, json, torch
sys.path.insert(0, sys.argv[4])
from adaptkit.io.checkpoint import Checkpoint
from adaptkit.adapter import load_adapter
from adaptkit.quant import find_quantized, dequantize, quantize
base, adapter, device = sys.argv[1:4]
ck = Checkpoint.open(base)
q = find_quantized(ck.tensors, ck.read)
ad = load_adapter(adapter)
layers = []
for m in ad.modules.values():
    w = q[m.weight_name]
    comps = {c[len(w.name) + 1:]: ck.read(c).clone().to(device) for c in w.components}
    layers.append((w, ck.read(w.name).clone().to(device), comps, m.A.to(device), m.B.to(device), m.scaling))
def one(w, packed, comps, a, b, s):
    dense = dequantize(packed, comps, device).float()
    dense.addmm_(b, a, alpha=s)
    quantize(dense, w, True, torch.uint8)
one(*layers[0])  # warm-up: the first call imports bitsandbytes' kernels (seconds), not merge work
torch.cuda.synchronize() if device.startswith("cuda") else None
t0 = time.perf_counter()
for w, packed, comps, a, b, s in layers:
    dense = dequantize(packed, comps, device).float()
    dense.addmm_(b, a, alpha=s)
    quantize(dense, w, True, torch.uint8)
torch.cuda.synchronize() if device.startswith("cuda") else None
print(json.dumps({"layers": len(layers), "seconds": time.perf_counter() - t0}))
"""

PEFT_MERGE = r"""
import sys, time, json, torch, warnings
warnings.filterwarnings("ignore")
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, device = sys.argv[1:4]
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(base, device_map=device)
pm = PeftModel.from_pretrained(model, adapter)
t_load = time.perf_counter() - t0
t0 = time.perf_counter()
pm.merge_and_unload()
torch.cuda.synchronize() if device.startswith("cuda") else None
print(json.dumps({"load": t_load, "merge_and_unload": time.perf_counter() - t0}))
"""


STARTUP = r"""
import sys, torch
if sys.argv[2] == "adaptkit":
    from adaptkit.bnb_import import functional
    F = functional()
else:
    import bitsandbytes.functional as F
packed, state = F.quantize_4bit(torch.ones(64, 64, device=sys.argv[1]), blocksize=64)
F.dequantize_4bit(packed, state)
torch.cuda.synchronize() if torch.cuda.is_available() else None
"""


def main():
    ap = parser(__doc__, "llama7b", "cuda")
    ap.add_argument("--skip-peft", action="store_true", help="Measure adaptkit only.")
    args = ap.parse_args()
    s = SHAPES[args.shape]
    work = args.workdir / f"{args.shape}-nf4"
    base, adapter = work / "base", work / "adapter"
    if not (base / "config.json").exists():
        t0 = time.perf_counter()
        build_nf4_base(base, s, args.device)
        build_adapter(adapter, s)
        print(f"built NF4 {args.shape} in {time.perf_counter() - t0:.1f} s", flush=True)
    env = child_env()
    # compile-and-cache the imports once (bitsandbytes pulls in torch._dynamo): every step below
    # then starts as it would on a machine that has run Python before
    run([sys.executable, "-c", "import torch, bitsandbytes.functional, transformers, peft, adaptkit.merge"], env=env)
    base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    read_bw, write_bw = disk_bandwidth(work)
    res = {"shape": args.shape, "device": args.device, "base_bytes": base_bytes, "read_bw": read_bw,
           "write_bw": write_bw, "physical_floor_s": base_bytes / read_bw + base_bytes / write_bw}
    if torch.cuda.is_available():
        res["gpu"] = torch.cuda.get_device_name(0)
    gw = run([sys.executable, "-c", GPU_WORK, str(base), str(adapter), args.device, str(ROOT)], env=env)
    res["gpu_work"] = json.loads(gw["stdout"].strip().splitlines()[-1])
    if not args.skip_peft:
        pf = run([sys.executable, "-c", PEFT_MERGE, str(base), str(adapter), args.device], env=env)
        res["peft"] = json.loads(pf["stdout"].strip().splitlines()[-1]) | {"peak_rss_bytes": pf["peak_rss_bytes"]}
    for how in ("adaptkit", "plain"):  # bitsandbytes imported and first called as adaptkit does, and plainly
        res[f"startup_{how}_s"] = min(run([sys.executable, "-c", STARTUP, args.device, how], env=env)["seconds"]
                                      for _ in range(2))
    for d in ("out-cp", "out-adaptkit"):
        shutil.rmtree(work / d, ignore_errors=True)
    evict(base)
    res["copy"] = run(["cp", "-r", str(base), str(work / "out-cp")])
    res["copy"].pop("stdout")
    shutil.rmtree(work / "out-cp")
    evict(base)
    ak = run([sys.executable, "-m", "adaptkit", "merge", str(base), str(adapter), "-o", str(work / "out-adaptkit"),
              "--quantize", "nf4", "--device", args.device, "--json"], env=env)
    ak["summary"] = json.loads(ak.pop("stdout"))
    res["adaptkit"] = ak
    shutil.rmtree(work / "out-adaptkit")
    g = res["gpu_work"]["seconds"]
    print(f"\nNF4 {args.shape}: {base_bytes / 1e9:.2f} GB, {res['gpu_work']['layers']} layers, {res.get('gpu', args.device)}")
    if "peft" in res:
        p = res["peft"]["merge_and_unload"]
        print(f"(a) GPU work: adaptkit {g:.2f} s vs peft merge_and_unload {p:.2f} s -> {p / g:.1f}x")
    else:
        print(f"(a) GPU work: adaptkit {g:.2f} s (peft not run)")
    print(f"(b) whole command: adaptkit {ak['seconds']:.1f} s (peak RSS {ak['peak_rss_bytes'] / 1e9:.2f} GB), "
          f"cp -r {res['copy']['seconds']:.1f} s, physical floor {res['physical_floor_s']:.1f} s "
          f"(read {read_bw / 1e9:.2f} GB/s, write {write_bw / 1e9:.2f} GB/s) -> "
          f"{ak['seconds'] / res['physical_floor_s']:.2f}x floor, {ak['seconds'] / res['copy']['seconds']:.2f}x cp")
    st = res["startup_adaptkit_s"]
    print(f"    start-up before any work (python, torch, CUDA, bitsandbytes imported and first called as adaptkit "
          f"does; {res['startup_plain_s']:.1f} s with a plain import): {st:.1f} s = "
          f"{st / res['physical_floor_s']:.2f}x floor; the command after it: {ak['seconds'] - st:.1f} s "
          f"-> {(ak['seconds'] - st) / res['physical_floor_s']:.2f}x floor")
    q = ak["summary"].get("quantization") or {}
    if q:
        print(f"requantization error per layer: median {q['median']:.3e}, worst {q['worst']:.3e}")
    if args.json_out:
        args.json_out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
