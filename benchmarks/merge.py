"""Merge benchmark: adaptkit against the copy floor and peft's path, side by side in one run.

    python benchmarks/merge.py --shape tinyllama --workdir /tmp/bench            # CPU machine
    python benchmarks/merge.py --shape llama7b --workdir /data/bench --device cuda  # GPU machine

Builds a base of the given shape (random fp16, HF layout) and an r=16 all-linear adapter in the PEFT
layout, then times, each in its own process with cold page cache for the base (posix_fadvise):
  floor    `cp -r BASE` + sync, and the physical floor: bytes read / read bandwidth + bytes written /
           write bandwidth, both measured here in the same run;
  adaptkit `adaptkit merge BASE ADAPTER -o OUT --device D` + sync;
  peft     load (transformers) → PeftModel.from_pretrained → merge_and_unload → save_pretrained + sync.
Peak RSS of each child comes from wait4. Prints a table and writes JSON (--json-out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adaptkit.safetensors_file import StreamingWriter  # noqa: E402

SHAPES = {
    # TinyLlama-1.1B: one 2.2 GB shard
    "tinyllama": dict(vocab=32000, hidden=2048, inter=5632, layers=22, heads=32, kv=4, shard_gb=10),
    # Llama-2-7B: 13.5 GB in three ~5 GB shards
    "llama7b": dict(vocab=32000, hidden=4096, inter=11008, layers=32, heads=32, kv=32, shard_gb=5),
    # a small shape to try the script itself
    "small": dict(vocab=1000, hidden=256, inter=688, layers=2, heads=4, kv=2, shard_gb=10),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tensor_shapes(s):
    h, i, kvd = s["hidden"], s["inter"], s["hidden"] // s["heads"] * s["kv"]
    out = [("model.embed_tokens.weight", (s["vocab"], h))]
    for l in range(s["layers"]):
        p = f"model.layers.{l}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "mlp.down_proj.weight", (h, i)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "post_attention_layernorm.weight", (h,)), (p + "self_attn.k_proj.weight", (kvd, h)),
                (p + "self_attn.o_proj.weight", (h, h)), (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.v_proj.weight", (kvd, h))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (s["vocab"], h))]
    return out


def build_base(path: Path, s: dict, device: str):
    from transformers import LlamaConfig

    path.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                      tie_word_embeddings=False, dtype="float16")
    cfg.save_pretrained(path)
    shapes = tensor_shapes(s)
    limit = s["shard_gb"] * 1e9
    groups, size = [[]], 0
    for name, shape in shapes:
        n = 2 * torch.Size(shape).numel()
        if groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += n
    gen = torch.Generator(device=device).manual_seed(0)
    weight_map = {}
    for gi, group in enumerate(groups):
        fname = "model.safetensors" if len(groups) == 1 else f"model-{gi + 1:05d}-of-{len(groups):05d}.safetensors"
        w = StreamingWriter(path / fname, [(n, torch.float16, sh) for n, sh in group], {"format": "pt"})
        for name, shape in group:
            t = torch.randn(shape, generator=gen, device=device).mul_(0.02)
            w.write(name, t.half().cpu())
            weight_map[name] = fname
        w.close()
    if len(groups) > 1:
        total = sum(2 * torch.Size(sh).numel() for _, sh in shapes)
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def build_adapter(path: Path, s: dict, r: int = 16):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for name, shape in tensor_shapes(s):
        mod = name[: -len(".weight")]
        if mod.rsplit(".", 1)[-1] in TARGETS:
            out_f, in_f = shape
            tensors[f"base_model.model.{mod}.lora_A.weight"] = torch.randn(r, in_f, generator=gen) * 0.01
            tensors[f"base_model.model.{mod}.lora_B.weight"] = torch.randn(out_f, r, generator=gen) * 0.01
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": TARGETS, "lora_dropout": 0.0,
        "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": "base"}))


def evict(path: Path):
    """Drop a folder's pages from the page cache (no root needed): every run starts cold."""
    os.sync()
    for p in path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


_LAUNCHER = (
    "import os, subprocess, sys, json\n"
    "p = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "open(sys.argv[1], 'w').write(json.dumps([os.waitstatus_to_exitcode(status), usage.ru_maxrss]))\n")


def run(cmd: list[str], env=None) -> dict:
    """Run a command, then sync; wall time including the sync, and the command's own peak RSS.

    A tiny launcher process starts the command, so its peak RSS is not inflated by the pages a
    fork inherits from this (torch-importing) process.
    """
    rss_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-rss-{os.getpid()}.json"
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, str(rss_file), *cmd], env=env,
                       capture_output=True, text=True)
    os.sync()
    wall = time.perf_counter() - t0
    code, maxrss_kb = json.loads(rss_file.read_text())
    rss_file.unlink()
    if code != 0:
        raise SystemExit(f"{cmd[:3]} failed ({code}):\n{p.stderr[-3000:]}")
    return {"seconds": wall, "peak_rss_bytes": maxrss_kb * 1024, "stdout": p.stdout}


def disk_bandwidth(workdir: Path, size=1 << 30) -> tuple[float, float]:
    """Sequential write (with fsync) and cold read bandwidth of the work folder, bytes/s."""
    probe = workdir / "bw.probe"
    buf = os.urandom(64 << 20)
    t0 = time.perf_counter()
    with open(probe, "wb", buffering=0) as f:
        for _ in range(size // len(buf)):
            f.write(buf)
        os.fsync(f.fileno())
    write_bw = size / (time.perf_counter() - t0)
    fd = os.open(probe, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    t0 = time.perf_counter()
    while os.read(fd, 16 << 20):
        pass
    read_bw = size / (time.perf_counter() - t0)
    os.close(fd)
    probe.unlink()
    return read_bw, write_bw


PEFT_SCRIPT = r"""
import sys, time, json, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out, device = sys.argv[1:5]
t = {}
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16, device_map=device)
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="tinyllama")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench-work")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--json-out", type=Path)
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
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    results = {"shape": args.shape, "device": args.device, "base_bytes": base_bytes,
               "machine": f"{os.cpu_count()} cores", "torch": torch.__version__}
    if torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name(0)
    read_bw, write_bw = disk_bandwidth(work)
    results.update(read_bw=read_bw, write_bw=write_bw, physical_floor_s=base_bytes / read_bw + base_bytes / write_bw)

    for d in ("out-cp", "out-adaptkit", "out-peft"):
        shutil.rmtree(work / d, ignore_errors=True)
    evict(base)
    results["copy"] = run(["cp", "-r", str(base), str(work / "out-cp")])
    shutil.rmtree(work / "out-cp")
    evict(base)
    r = run([sys.executable, "-m", "adaptkit", "merge", str(base), str(adapter), "-o", str(work / "out-adaptkit"),
             "--device", args.device, "--json"], env=env)
    r["summary"] = json.loads(r.pop("stdout"))
    results["adaptkit"] = r
    if not args.skip_peft:
        evict(base)
        r = run([sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(work / "out-peft"), args.device], env=env)
        r["steps"] = json.loads(r.pop("stdout").strip().splitlines()[-1])
        results["peft"] = r
        results["max_abs_diff_vs_peft"] = compare(work / "out-adaptkit", work / "out-peft",
                                                  ["model.layers.0.self_attn.q_proj.weight",
                                                   "model.layers.1.mlp.down_proj.weight", "lm_head.weight"])
        shutil.rmtree(work / "out-peft")
    results["copy"].pop("stdout", None)
    shutil.rmtree(work / "out-adaptkit")

    ak, cp = results["adaptkit"], results["copy"]
    rows = [("cp -r + sync", cp), ("adaptkit merge", ak)] + ([("peft path", results["peft"])] if "peft" in results else [])
    print(f"\n{args.shape} fp16 base {base_bytes / 1e9:.2f} GB, device {args.device}, "
          f"disk read {read_bw / 1e9:.2f} GB/s, write {write_bw / 1e9:.2f} GB/s, "
          f"physical floor {results['physical_floor_s']:.1f} s")
    print(f"{'':16} {'seconds':>8} {'peak RSS':>10} {'vs cp':>7} {'vs floor':>9}")
    for label, r in rows:
        print(f"{label:16} {r['seconds']:8.1f} {r['peak_rss_bytes'] / 1e9:8.2f} GB {r['seconds'] / cp['seconds']:6.2f}x "
              f"{r['seconds'] / results['physical_floor_s']:8.2f}x")
    if "peft" in results:
        p = results["peft"]
        print(f"peft / adaptkit: time {p['seconds'] / ak['seconds']:.1f}x, peak RSS "
              f"{p['peak_rss_bytes'] / ak['peak_rss_bytes']:.1f}x; peft steps {json.dumps({k: round(v, 2) for k, v in p['steps'].items()})}; "
              f"max |adaptkit - peft| {results['max_abs_diff_vs_peft']:.3g}")
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
