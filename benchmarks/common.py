"""Shared pieces of the benchmarks: model shapes, synthetic base and adapter builders, cold-cache
runs with each process's own peak RSS, and the disk's bandwidth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adaptkit.io.safetensors_file import StreamingWriter  # noqa: E402

SHAPES = {
    # TinyLlama-1.1B: one 2.2 GB shard
    "tinyllama": dict(vocab=32000, hidden=2048, inter=5632, layers=22, heads=32, kv=4, shard_gb=10),
    # Llama-2-7B: 13.5 GB in three ~5 GB shards
    "llama7b": dict(vocab=32000, hidden=4096, inter=11008, layers=32, heads=32, kv=32, shard_gb=5),
    # LLaMA-30B: 65 GB in fp16 (for NF4 runs: 17 GB, where fixed start-up costs weigh less)
    "llama30b": dict(vocab=32000, hidden=6656, inter=17920, layers=60, heads=52, kv=52, shard_gb=5),
    # a small shape to try the script itself
    "small": dict(vocab=1000, hidden=256, inter=688, layers=2, heads=4, kv=2, shard_gb=10),
    # Qwen3-30B-A3B's layer and expert counts (48 layers x 128 experts: ~18.9 k tensors, one per expert
    # on disk) with its dims scaled down to ~1.9 GB in bf16
    "moe": dict(kind="moe", vocab=32000, hidden=512, inter=96, layers=48, heads=8, kv=2, head_dim=64, experts=128,
                shard_gb=5),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def moe_tensor_shapes(s):
    """A Qwen3-MoE checkpoint as transformers saves it: attention, router, one tensor per expert."""
    h, i, hd = s["hidden"], s["inter"], s["head_dim"]
    out = [("model.embed_tokens.weight", (s["vocab"], h))]
    for l in range(s["layers"]):
        p = f"model.layers.{l}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (s["heads"] * hd, h)), (p + "self_attn.k_proj.weight", (s["kv"] * hd, h)),
                (p + "self_attn.v_proj.weight", (s["kv"] * hd, h)), (p + "self_attn.o_proj.weight", (h, s["heads"] * hd)),
                (p + "self_attn.q_norm.weight", (hd,)), (p + "self_attn.k_norm.weight", (hd,)),
                (p + "mlp.gate.weight", (s["experts"], h))]
        for e in range(s["experts"]):
            out += [(p + f"mlp.experts.{e}.down_proj.weight", (h, i)), (p + f"mlp.experts.{e}.gate_proj.weight", (i, h)),
                    (p + f"mlp.experts.{e}.up_proj.weight", (i, h))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (s["vocab"], h))]
    return out


def model_config(s: dict):
    """transformers' config of a shape (untied embeddings)."""
    if s.get("kind") == "moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=4 * s["hidden"],
                              moe_intermediate_size=s["inter"], num_hidden_layers=s["layers"],
                              num_attention_heads=s["heads"], num_key_value_heads=s["kv"], head_dim=s["head_dim"],
                              num_experts=s["experts"], num_experts_per_tok=8, mlp_only_layers=[],
                              decoder_sparse_step=1, tie_word_embeddings=False, dtype="bfloat16")
    return llama_config(s)


def tensor_shapes(s):
    if s.get("kind") == "moe":
        return moe_tensor_shapes(s)
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


def llama_config(s: dict):
    """transformers' LlamaConfig of a shape (fp16, untied embeddings)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                       num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                       tie_word_embeddings=False, dtype="float16")


def build_base(path: Path, s: dict, device: str):
    path.mkdir(parents=True, exist_ok=True)
    model_config(s).save_pretrained(path)
    shapes = tensor_shapes(s)
    dtype = torch.bfloat16 if s.get("kind") == "moe" else torch.float16
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
        w = StreamingWriter(path / fname, [(n, dtype, sh) for n, sh in group], {"format": "pt"})
        for name, shape in group:
            t = torch.randn(shape, generator=gen, device=device).mul_(0.02)
            w.write(name, t.to(dtype).cpu())
            weight_map[name] = fname
        w.close()
    if len(groups) > 1:
        total = sum(2 * torch.Size(sh).numel() for _, sh in shapes)
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def build_moe_adapter(path: Path, s: dict, r: int = 16, seed: int = 1):
    """An r=16 LoRA on attention and on every expert, in peft's target_parameters layout (peft 0.21:
    gate_up_proj (E, 2I, H) in the inner wrapper, down_proj (E, H, I) in the outer; A (r·E, in),
    B (out, r·E))."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    h, i, hd, e = s["hidden"], s["inter"], s["head_dim"], s["experts"]
    tensors = {}
    for layer in range(s["layers"]):
        p = f"base_model.model.model.layers.{layer}."
        for mod, out_f, in_f in (("q_proj", s["heads"] * hd, h), ("k_proj", s["kv"] * hd, h),
                                 ("v_proj", s["kv"] * hd, h), ("o_proj", h, s["heads"] * hd)):
            tensors[p + f"self_attn.{mod}.lora_A.weight"] = torch.randn(r, in_f, generator=gen) * 0.01
            tensors[p + f"self_attn.{mod}.lora_B.weight"] = torch.randn(out_f, r, generator=gen) * 0.01
        for key, out_f, in_f in (("mlp.experts.base_layer", 2 * i, h), ("mlp.experts", h, i)):
            tensors[p + key + ".lora_A.weight"] = torch.randn(r * e, in_f, generator=gen) * 0.01
            tensors[p + key + ".lora_B.weight"] = torch.randn(out_f, r * e, generator=gen) * 0.01
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], "lora_dropout": 0.0,
        "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": "base", "peft_version": "0.21.2"}))


def build_adapter(path: Path, s: dict, r: int = 16, seed: int = 1, layers=None):
    if s.get("kind") == "moe":
        return build_moe_adapter(path, s, r, seed)
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in tensor_shapes(s):
        mod = name[: -len(".weight")]
        if layers is not None and not any(f".layers.{l}." in mod for l in range(layers)):
            continue
        if mod.rsplit(".", 1)[-1] in TARGETS:
            out_f, in_f = shape
            tensors[f"base_model.model.{mod}.lora_A.weight"] = torch.randn(r, in_f, generator=gen) * 0.01
            tensors[f"base_model.model.{mod}.lora_B.weight"] = torch.randn(out_f, r, generator=gen) * 0.01
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": TARGETS, "lora_dropout": 0.0,
        "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": "base"}))


def parser(doc: str, shape: str, device: str):
    """The options every benchmark takes: --shape, --workdir, --device, --json-out."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default=shape)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench-work")
    ap.add_argument("--device", default=device)
    ap.add_argument("--json-out", type=Path)
    return ap


def child_env() -> dict:
    """The environment of each measured process: this checkout importable, one shared bytecode cache.

    Where bytecode is not written (PYTHONDONTWRITEBYTECODE, as on the CI machines), a cache prefix
    would stay empty and hide the installed packages' own ``__pycache__``: every measured process
    would compile torch and transformers from source (measured: +2.2 s for ``import torch``, +5 s on
    the MoE merge), so then none is set."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if not sys.flags.dont_write_bytecode and not os.environ.get("PYTHONDONTWRITEBYTECODE"):
        env.setdefault("PYTHONPYCACHEPREFIX", "/tmp/pycache")
    return env


def evict(*paths: Path):
    """Drop folders' pages from the page cache (no root needed): every run starts cold."""
    os.sync()
    for p in (p for path in paths for p in path.rglob("*")):
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
