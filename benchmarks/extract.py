"""Extraction benchmark: ``adaptkit extract`` against ``mergekit-extract-lora`` in one run.

    python benchmarks/extract.py --shape tinyllama --mergekit /path/to/venv/bin/mergekit-extract-lora
    python benchmarks/extract.py --shape llama7b --device cuda --skip-mergekit    # the GPU machine

Builds a base of the shape (fp16, random) and a fine-tune of it: every linear weight plus a
full-rank perturbation and a rank-8 component, everything else unchanged. Then, each process cold
(page cache dropped) and measured with its own peak RSS:

  - the floor: reading both models from disk (``cat`` of every shard);
  - ``adaptkit extract BASE FT -o OUT --rank 16``;
  - ``mergekit-extract-lora --model FT --base-model BASE --out-path OUT --max-rank 16`` (mergekit
    0.1.5 from the package registry: install it in its own venv, it pins other versions);
  - quality: on a sample of modules (``--sample``), each tool's ‖ΔW − B·A‖_F / ‖ΔW‖_F against the
    Eckart–Young optimum (torch.linalg.svdvals of ΔW).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import SHAPES, TARGETS, child_env, evict, model_config, parser, run, tensor_shapes

RANK = 16


def build_pair(base: Path, ft: Path, s: dict, device: str, noise=0.002, low=0.02):
    """A base of shape ``s`` and its fine-tune, one shard each, streamed to disk."""
    from adaptkit.io.safetensors_file import StreamingWriter

    cfg = model_config(s)
    cfg.architectures = ["Qwen3MoeForCausalLM" if s.get("kind") == "moe" else "LlamaForCausalLM"]  # mergekit needs it
    for p in (base, ft):
        p.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(p)
    shapes = tensor_shapes(s)
    entries = [(n, torch.float16, sh) for n, sh in shapes]
    wb = StreamingWriter(base / "model.safetensors", entries, {"format": "pt"})
    wf = StreamingWriter(ft / "model.safetensors", entries, {"format": "pt"})
    gen = torch.Generator(device=device).manual_seed(0)
    for name, shape in shapes:
        w = torch.randn(shape, generator=gen, device=device).mul_(0.02)
        wb.write(name, w.half().cpu())
        if len(shape) == 2 and name[: -len(".weight")].rsplit(".", 1)[-1] in TARGETS:
            d = torch.randn(shape, generator=gen, device=device).mul_(noise)
            u = torch.randn(shape[0], 8, generator=gen, device=device)
            v = torch.randn(8, shape[1], generator=gen, device=device)
            w = w + d + (u @ v).mul_(low / 8 ** 0.5)
        wf.write(name, w.half().cpu())
    wb.close()
    wf.close()


def read_floor(*folders: Path) -> float:
    """Seconds to read every shard of ``folders`` cold."""
    evict(*folders)
    t0 = time.perf_counter()
    for f in folders:
        for p in sorted(f.glob("*.safetensors")):
            subprocess.run(["cat", str(p)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def quality(base: Path, ft: Path, adapters: dict[str, Path], sample: int) -> dict:
    """Per tool, err / optimum over ``sample`` modules spread through the model."""
    from safetensors import safe_open

    from adaptkit import load_adapter

    loaded = {k: load_adapter(v) for k, v in adapters.items()}
    names = sorted(next(iter(loaded.values())).modules)
    step = max(1, len(names) // sample)
    out = {k: [] for k in loaded}
    with safe_open(str(base / "model.safetensors"), "pt") as fb, safe_open(str(ft / "model.safetensors"), "pt") as ff:
        for name in names[::step][:sample]:
            d = (ff.get_tensor(name + ".weight").double() - fb.get_tensor(name + ".weight").double())
            s = torch.linalg.svdvals(d)
            optimum = float(s[RANK:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
            for k, ad in loaded.items():
                m = ad.modules.get(name)
                got = m.delta().double() if m is not None else torch.zeros_like(d)
                out[k].append(float((got - d).norm() / d.norm()) / optimum)
    return {k: {"modules": len(v), "worst_ratio": max(v), "median_ratio": sorted(v)[len(v) // 2]}
            for k, v in out.items()}


def main():
    ap = parser(__doc__, "tinyllama", "cpu")
    ap.add_argument("--mergekit", default=shutil.which("mergekit-extract-lora"),
                    help="The mergekit-extract-lora executable (default: on PATH).")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--sample", type=int, default=14, help="Modules whose error is compared with the optimum.")
    args = ap.parse_args()
    s = SHAPES[args.shape]
    work = args.workdir / f"{args.shape}-extract"
    base, ft = work / "base", work / "ft"
    if not (ft / "config.json").exists():
        t0 = time.perf_counter()
        build_pair(base, ft, s, args.device)
        print(f"built {args.shape} base and fine-tune in {time.perf_counter() - t0:.1f} s", flush=True)
    env = child_env()
    bytes_read = sum(p.stat().st_size for f in (base, ft) for p in f.glob("*.safetensors"))
    res = {"shape": args.shape, "device": args.device, "bytes_read": bytes_read,
           "read_floor_s": min(read_floor(base, ft) for _ in range(2))}
    if torch.cuda.is_available():
        res["gpu"] = torch.cuda.get_device_name(0)
    outs = {}
    shutil.rmtree(work / "out-adaptkit", ignore_errors=True)
    evict(base, ft)
    ak = run([sys.executable, "-m", "adaptkit", "extract", str(base), str(ft), "-o", str(work / "out-adaptkit"),
              "--rank", str(RANK), "--device", args.device, "--json"], env=env)
    summary = json.loads(ak.pop("stdout"))
    ak.update(worst_energy=summary["worst_energy"], median_energy=summary["median_energy"])
    res["adaptkit"], outs["adaptkit"] = ak, work / "out-adaptkit"
    if not args.skip_mergekit:
        if not args.mergekit:
            raise SystemExit("mergekit-extract-lora not found: give --mergekit PATH or --skip-mergekit")
        shutil.rmtree(work / "out-mergekit", ignore_errors=True)
        evict(base, ft)
        dev = ["--cuda"] if args.device.startswith("cuda") else []
        mk = run([args.mergekit, "--model", str(ft), "--base-model", str(base), "--out-path",
                  str(work / "out-mergekit"), "--max-rank", str(RANK), "--no-copy-tokenizer", "--quiet", *dev])
        mk.pop("stdout")
        res["mergekit"], outs["mergekit"] = mk, work / "out-mergekit"
    res["quality"] = quality(base, ft, outs, args.sample)
    print(f"\nextract rank {RANK}, {args.shape}: {bytes_read / 1e9:.2f} GB read (both models), "
          f"{res.get('gpu', args.device)}; reading both cold: {res['read_floor_s']:.1f} s")
    a = res["adaptkit"]
    print(f"adaptkit: {a['seconds']:.1f} s ({a['seconds'] / res['read_floor_s']:.2f}x the read), peak RSS "
          f"{a['peak_rss_bytes'] / 1e9:.2f} GB; energy kept worst {a['worst_energy']:.3f}, median "
          f"{a['median_energy']:.3f}")
    if "mergekit" in res:
        m = res["mergekit"]
        print(f"mergekit-extract-lora: {m['seconds']:.1f} s, peak RSS {m['peak_rss_bytes'] / 1e9:.2f} GB -> adaptkit "
              f"{m['seconds'] / a['seconds']:.1f}x faster at {a['peak_rss_bytes'] / m['peak_rss_bytes']:.2f}x its memory")
    for k, q in res["quality"].items():
        print(f"error / Eckart–Young optimum, {k} ({q['modules']} modules): worst {q['worst_ratio']:.4f}, "
              f"median {q['median_ratio']:.4f}")
    if args.json_out:
        args.json_out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
