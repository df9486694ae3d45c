"""Shared fixtures: the committed tiny models/adapters, and more variants made by peft in temp folders."""

from __future__ import annotations

import os

# huggingface_hub reads this at import: the local test Hub speaks the LFS protocol, not Xet.
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import glob
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from fixtures import build

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
TINY_LLAMA = FIXTURES / "tiny-llama"
TINY_GPT2 = FIXTURES / "tiny-gpt2"
ADAPTERS = {name: FIXTURES / "adapters" / name for name in build.ADAPTERS}
BASE_OF = {name: FIXTURES / base for name, (base, _) in build.ADAPTERS.items()}

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", category=UserWarning)
torch.set_num_threads(2)


def load_dir(path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in a folder, read with the safetensors package."""
    out = {}
    for f in sorted(glob.glob(str(Path(path) / "*.safetensors"))):
        out.update(load_file(f))
    return out


def assert_merge_close(ours: torch.Tensor, ref: torch.Tensor, base: torch.Tensor, ulps: float = 2.0, name="",
                       atol: float = 0.0):
    """|ours - ref| within ``ulps`` units of the output dtype, measured on the size of W and ΔW.

    peft rounds the base into the output dtype, rounds ΔW, then rounds the sum; adaptkit rounds once,
    so they can differ by a few units at the scale of |W| + |ΔW|.
    """
    assert ours.dtype == ref.dtype, name
    assert ours.shape == ref.shape, name
    eps = torch.finfo(ours.dtype).eps if ours.is_floating_point() else 0
    o, r, b = ours.double(), ref.double(), base.double()
    bound = ulps * eps * (b.abs() + (r - b).abs() + r.abs()) + atol + 1e-30
    excess = ((o - r).abs() - bound).max().item()
    assert excess <= 0, f"{name}: off by more than {ulps} ulps (worst excess {excess:.3g})"


def peft_merged(base_path, adapter_paths, dtype=torch.float32):
    """peft's own merge: base in ``dtype`` + adapters loaded with PeftModel, merge_and_unload."""
    from peft import PeftModel

    model = build.load_model(base_path, dtype=dtype)
    names = []
    pm = None
    for i, path in enumerate(adapter_paths):
        name = f"a{i}"
        if pm is None:
            pm = PeftModel.from_pretrained(model, path, adapter_name=name)
        else:
            pm.load_adapter(path, adapter_name=name)
        names.append(name)
    pm.base_model.set_adapter(names)
    return pm, pm.merge_and_unload()


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture(scope="session")
def variants(tmp_path_factory):
    """Adapters made by peft on the fly for the cases not committed to fixtures/."""
    root = tmp_path_factory.mktemp("variants")
    out = {}
    # GPT-2 (Conv1D, tied embeddings) in fp32, with a bias on c_attn.
    gpt2 = root / "gpt2-fp32"
    build.build_model(build.gpt2_config(), gpt2, dtype=torch.float32)
    out["gpt2-fp32"] = gpt2
    out["gpt2-lora-bias"] = build.build_adapter(gpt2, root / "gpt2-lora-bias", seed=5, r=4, lora_alpha=8,
                                                target_modules=["c_attn"], fan_in_fan_out=True, lora_bias=True)
    out["gpt2-embed"] = build.build_adapter(gpt2, root / "gpt2-embed", seed=6, r=4, lora_alpha=8,
                                            target_modules=["wte", "c_attn"], fan_in_fan_out=True)
    # Llama in bf16 and fp32 (one shard), layers_to_transform, a second adapter for multi-merges.
    llama32 = root / "llama-fp32"
    build.build_model(build.llama_config(), llama32, dtype=torch.float32)
    out["llama-fp32"] = llama32
    out["llama-layers"] = build.build_adapter(llama32, root / "llama-layers", seed=7, r=4, lora_alpha=8,
                                              target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    out["llama-second"] = build.build_adapter(llama32, root / "llama-second", seed=8, r=2, lora_alpha=4,
                                              target_modules=["q_proj", "o_proj"])
    out["llama-dora-embed"] = build.build_adapter(llama32, root / "llama-dora-embed", seed=9, r=4, lora_alpha=8,
                                                  target_modules=["embed_tokens", "k_proj"], use_dora=True)
    bf16 = root / "llama-bf16"
    build.build_model(build.llama_config(), bf16, dtype=torch.bfloat16)
    out["llama-bf16"] = bf16
    return out
