"""`adaptkit merge` against peft's merge_and_unload, tensor by tensor, and against the model's logits."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import (
    ADAPTERS,
    BASE_OF,
    TINY_GPT2,
    TINY_LLAMA,
    assert_merge_close,
    assert_one_line_error,
    invoke,
    load_dir,
    peft_merged,
)
from safetensors.torch import load_file, save_file

import adaptkit
from adaptkit import merge
from adaptkit.cli import main
from adaptkit.errors import AdaptkitError
from fixtures import build

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def compare_with_peft(out, base_path, adapters, dtype, ulps=None):
    # 16-bit outputs: within 2 units of the output dtype. fp32 outputs: 4, because on CUDA the
    # fp32 accumulation order of B·A differs from peft's CPU product (on the CPU they agree exactly).
    ulps = ulps or (4.0 if dtype == torch.float32 else 2.0)
    ours = load_dir(out)
    base = build.load_model(base_path, dtype=dtype).state_dict()
    _, merged = peft_merged(base_path, adapters, dtype)
    ref = merged.state_dict()
    for name, t in ours.items():
        assert name in ref, name
        # fp32: B·A's own cancellation shows at ~1e-9 when CUDA accumulates in another order
        atol = 1e-8 if dtype == torch.float32 else 0.0
        assert_merge_close(t, ref[name].contiguous(), base[name], ulps=ulps, name=name, atol=atol)
    return ours, ref


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(ADAPTERS))
def test_merge_matches_peft(tmp_path, name, dtype):
    out = tmp_path / "out"
    merge(BASE_OF[name], [ADAPTERS[name]], out, dtype=dtype)
    ours, ref = compare_with_peft(out, BASE_OF[name], [ADAPTERS[name]], DTYPES[dtype])
    # every tensor of the base is there, under its own name (tied lm_head stays tied)
    base_names = set(load_dir(BASE_OF[name]))
    assert set(ours) == base_names


def test_16bit_output_is_rounded_once_from_the_exact_sum(tmp_path):
    """fp16 output equals round(W + ΔW computed in fp64), but for near-ties decided by fp32 rounding."""
    from adaptkit import load_adapter

    out = tmp_path / "out"
    merge(TINY_LLAMA, [ADAPTERS["llama-lora"]], out)
    ours, base = load_dir(out), load_dir(TINY_LLAMA)
    mismatched = total = 0
    for mod in load_adapter(ADAPTERS["llama-lora"]).modules.values():
        w, delta = base[mod.weight_name].double(), mod.scaling * (mod.B.double() @ mod.A.double())
        exact = (w + delta).half()
        diff = (ours[mod.weight_name].double() - exact.double()).abs()
        # ≤ 1 ulp, or within fp32's own rounding where W and ΔW cancel
        ulp = torch.clamp(torch.finfo(torch.float16).eps * exact.double().abs(), min=2.0 ** -24)  # subnormals
        bound = torch.maximum(ulp, 1e-6 * (w.abs() + delta.abs()))
        assert (diff <= bound).all(), mod.name
        mismatched += int((diff > 0).sum())
        total += diff.numel()
    assert mismatched <= total * 1e-3


@pytest.mark.parametrize("name", ["llama-layers", "gpt2-lora-bias", "llama-dora-embed"])
def test_variants_match_peft(tmp_path, variants, name):
    base = variants["gpt2-fp32"] if name.startswith("gpt2") else variants["llama-fp32"]
    out = tmp_path / "out"
    merge(base, [variants[name]], out)
    ours, ref = compare_with_peft(out, base, [variants[name]], torch.float32)
    if name == "llama-layers":
        b = load_dir(base)
        assert torch.equal(ours["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.q_proj.weight"])
        assert not torch.equal(ours["model.layers.1.self_attn.q_proj.weight"], b["model.layers.1.self_attn.q_proj.weight"])
    if name == "gpt2-lora-bias":
        b = load_dir(base)
        assert not torch.equal(ours["transformer.h.0.attn.c_attn.bias"], b["transformer.h.0.attn.c_attn.bias"])


def test_several_adapters_with_weights(tmp_path, variants):
    base = variants["llama-fp32"]
    a, b = ADAPTERS["llama-lora"], variants["llama-second"]
    merge(base, [a, b], tmp_path / "both")
    compare_with_peft(tmp_path / "both", base, [a, b], torch.float32)
    merge(base, [a, b], tmp_path / "weighted", weights=[0.5, -2.0])
    merge(base, [a], tmp_path / "a")
    merge(base, [b], tmp_path / "b")
    w, oa, ob, w0 = (load_dir(tmp_path / d) for d in ("weighted", "a", "b", "a"))
    w0 = load_dir(base)
    for k in w:
        expect = w0[k].double() + 0.5 * (oa[k].double() - w0[k].double()) - 2.0 * (ob[k].double() - w0[k].double())
        assert torch.allclose(w[k].double(), expect, atol=1e-5), k


def test_logits_equal_peft_merged_and_unmerged(tmp_path):
    out = tmp_path / "out"
    merge(TINY_LLAMA, [ADAPTERS["llama-dora"]], out, dtype="float32")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = build.load_model(out)(ids).logits
    pm, merged = peft_merged(TINY_LLAMA, [ADAPTERS["llama-dora"]], torch.float32)
    assert torch.allclose(ours, merged(ids).logits, atol=1e-5)
    pm2, _ = peft_merged(TINY_LLAMA, [ADAPTERS["llama-dora"]], torch.float32)
    pm2.unmerge_adapter() if False else None


def test_tied_embedding_is_untied_and_matches_unmerged_inference(tmp_path, variants):
    from peft import PeftModel

    base = variants["gpt2-fp32"]
    out = tmp_path / "out"
    seen = merge(base, [variants["gpt2-embed"]], out).warnings
    assert any("tie_word_embeddings" in w for w in seen)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    ours = load_dir(out)
    assert "lm_head.weight" in ours
    assert torch.equal(ours["lm_head.weight"], load_dir(base)["transformer.wte.weight"])
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    unmerged = PeftModel.from_pretrained(build.load_model(base), variants["gpt2-embed"])
    expected = unmerged(ids).logits
    got = build.load_model(out)(ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    # peft's own merge changes lm_head through the tie, so it does not compute base + adapter
    peft_logits = unmerged.merge_and_unload()(ids).logits
    assert not torch.allclose(peft_logits, expected, atol=1e-3)


def test_output_layout_and_side_files(tmp_path):
    out = tmp_path / "out"
    merge(TINY_LLAMA, [ADAPTERS["llama-lora"]], out)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                     "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] == \
        json.loads((TINY_LLAMA / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert list(load_file(out / shard)) == list(load_file(TINY_LLAMA / shard))
        assert {v.dtype for v in load_file(out / shard).values()} == {torch.float16}
    readme = (out / "README.md").read_text()
    assert "llama-lora" in readme and "weight 1" in readme
    assert oct((out).stat().st_mode & 0o777) != oct(0o700)


def test_untouched_tensors_are_bit_identical(tmp_path):
    out = tmp_path / "out"
    merge(TINY_LLAMA, [ADAPTERS["llama-dora"]], out)
    ours, base = load_dir(out), load_dir(TINY_LLAMA)
    touched = {"q_proj", "v_proj", "down_proj"}
    for k in base:
        if not any(t in k for t in touched):
            assert torch.equal(ours[k], base[k]), k


def test_reshard_and_dtype(tmp_path):
    out = tmp_path / "out"
    merge(TINY_LLAMA, [ADAPTERS["llama-lora"]], out, dtype="bfloat16", max_shard_size="50KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((out / f).exists() for f in files)
    tensors = load_dir(out)
    assert set(tensors) == set(load_dir(TINY_LLAMA))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = build.load_model(out, dtype=torch.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_one_shard_output(tmp_path):
    out = tmp_path / "out"
    merge(TINY_LLAMA, [ADAPTERS["llama-lora"]], out, max_shard_size="10GB")
    assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()


def test_bin_base(tmp_path, variants):
    base = tmp_path / "binbase"
    shutil.copytree(variants["llama-fp32"], base)
    sd = load_file(base / "model.safetensors")
    (base / "model.safetensors").unlink()
    torch.save(sd, base / "pytorch_model.bin")
    merge(base, [ADAPTERS["llama-lora"]], tmp_path / "from-bin")
    merge(variants["llama-fp32"], [ADAPTERS["llama-lora"]], tmp_path / "from-st")
    a, b = load_dir(tmp_path / "from-bin"), load_dir(tmp_path / "from-st")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_mismatched_adapter_fails_before_writing(runner, tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(main, ["merge", str(TINY_GPT2), str(ADAPTERS["llama-lora"]), "-o", str(out)])
    assert res.exit_code == 2
    line = res.stderr.strip()
    assert "\n" not in line and "14 of its 14 modules are not in the base" in line and "down_proj" in line
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_shape_mismatch_is_reported(tmp_path, variants):
    small = tmp_path / "small-llama"
    build.build_model(build.llama_config(hidden=32, intermediate=64), small, dtype=torch.float32)
    with pytest.raises(AdaptkitError, match="in the base but the LoRA gives"):
        merge(small, [ADAPTERS["llama-lora"]], tmp_path / "out")


def test_existing_output_needs_force(runner, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    res = runner.invoke(main, ["merge", str(TINY_LLAMA), str(ADAPTERS["llama-lora"]), "-o", str(out)])
    assert res.exit_code == 2 and "--force" in res.stderr
    assert (out / "keep.txt").exists()
    res = runner.invoke(main, ["merge", str(TINY_LLAMA), str(ADAPTERS["llama-lora"]), "-o", str(out), "--force"])
    assert res.exit_code == 0, res.output
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_nan_adapter_fails_and_leaves_nothing(runner, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ADAPTERS["llama-lora"], bad)
    t = load_file(bad / "adapter_model.safetensors")
    t["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"][3, 1] = float("inf")
    save_file(t, bad / "adapter_model.safetensors")
    out = tmp_path / "out"
    res = runner.invoke(main, ["merge", str(TINY_LLAMA), str(bad), "-o", str(out)])
    assert res.exit_code == 2
    assert "NaN or Inf" in res.stderr and "layers.1.mlp.up_proj" in res.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_weight_count_must_match(runner, tmp_path):
    res = runner.invoke(main, ["merge", str(TINY_LLAMA), str(ADAPTERS["llama-lora"]), "--weight", "1",
                               "--weight", "2", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--weight: 2 given for 1 adapters" in res.stderr


def test_cli_json_summary(runner, tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(main, ["merge", str(TINY_LLAMA), str(ADAPTERS["llama-rslora-patterns"]), "-o", str(out),
                               "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["modules_merged"] == 14 and summary["tensors"] == 21 and summary["device"] == "cpu"
    assert summary["bytes_written"] == sum(p.stat().st_size for p in out.glob("*.safetensors"))


def test_base_name_mismatch_only_warns(tmp_path, variants):
    """Another folder name, dtype or seed of the same model is the same model (configs compared); a
    config that differs is worth a warning, not a refusal."""
    seen = merge(variants["llama-fp32"], [ADAPTERS["llama-lora"]], tmp_path / "o").warnings
    assert not any("trained on" in w for w in seen), seen
    other = tmp_path / "other-llama"
    shutil.copytree(TINY_LLAMA, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "rope_theta": 1234.0}))
    heard = []

    class Listen(adaptkit.Reporter):
        def warn(self, message):
            heard.append(message)

    seen = merge(other, [ADAPTERS["llama-lora"]], tmp_path / "o2", reporter=Listen()).warnings
    assert any("whose config.json differs" in w for w in seen) and heard == seen, seen


def test_peak_memory_follows_largest_tensor(tmp_path):
    """A 256 MB model of 16 MB tensors merges with far less than the model's size in memory."""
    base = tmp_path / "big"
    base.mkdir()
    n, dim = 16, 2048
    gen = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.proj.weight": torch.randn(dim, dim, generator=gen) for i in range(n)}
    save_file(tensors, base / "model.safetensors")
    (base / "config.json").write_text("{}")
    del tensors
    ad = tmp_path / "ad"
    ad.mkdir()
    lora = {}
    for i in range(n):
        lora[f"base_model.model.model.layers.{i}.proj.lora_A.weight"] = torch.randn(8, dim, generator=gen)
        lora[f"base_model.model.model.layers.{i}.proj.lora_B.weight"] = torch.randn(dim, 8, generator=gen)
    save_file(lora, ad / "adapter_model.safetensors")
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 8}))
    script = (
        "import resource, torch, json, sys\n"
        "from adaptkit import merge\n"
        "torch.randn(10) @ torch.randn(10)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        f"merge({str(base)!r}, [{str(ad)!r}], {str(tmp_path / 'out')!r}, device='cpu')\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "print(json.dumps([before, after]))\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    before, after = json.loads(res.stdout.strip().splitlines()[-1])
    model_bytes = n * dim * dim * 4
    assert after - before < 0.5 * model_bytes, (before, after)
    assert load_file(tmp_path / "out" / "model.safetensors")["model.layers.3.proj.weight"].shape == (dim, dim)


def test_interrupted_merge_leaves_nothing(tmp_path):
    """Ctrl-C mid-stream: no OUT, no temporary folder beside it, an existing OUT untouched."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    calls = []

    class Interrupt(adaptkit.Reporter):
        def advance(self, n=1):
            calls.append(n)
            if len(calls) == 5:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge(TINY_LLAMA, [ADAPTERS["llama-lora"]], out, force=True, reporter=Interrupt())
    assert len(calls) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "old.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


@pytest.mark.parametrize("limit", [0, 1 << 20])  # every tensor alone, or in runs (stream.batches)
def test_a_merged_tensor_beyond_the_output_dtype_fails_naming_it(runner, tmp_path, monkeypatch, limit):
    import adaptkit.stream as stream

    monkeypatch.setattr(stream, "BATCH_BYTES", limit)
    ad = tmp_path / "big"
    shutil.copytree(ADAPTERS["llama-lora"], ad)
    t = load_file(ad / "adapter_model.safetensors")
    key = next(k for k in t if "layers.1.self_attn.k_proj.lora_B" in k)
    t[key] = t[key] * 1e6  # finite factors whose ΔW overflows fp16
    save_file(t, ad / "adapter_model.safetensors")
    res = invoke(runner, "merge", TINY_LLAMA, ad, "-o", tmp_path / "o")
    assert_one_line_error(res, "into model.layers.1.self_attn.k_proj.weight gives NaN or Inf", "float16")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


def test_untouched_tensors_copy_without_the_kernel_once_it_refuses(tmp_path, monkeypatch):
    """A base on another file system (copy_file_range: EXDEV): each output file asks once, then copies
    through its reused buffer; the bytes are the base's."""
    import errno
    import os

    calls = []

    def refuse(*args):
        calls.append(args)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    out = tmp_path / "out"
    merge(TINY_LLAMA, [ADAPTERS["llama-lora"]], out)
    ours, base = load_dir(out), load_dir(TINY_LLAMA)
    untouched = [k for k in base if "norm" in k or "embed" in k]
    assert untouched and all(torch.equal(ours[k], base[k]) for k in untouched)
    assert 0 < len(calls) <= len(list(out.glob("*.safetensors")))
