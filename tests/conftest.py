"""Shared fixtures: the committed tiny models/adapters, and more variants made by peft in temp folders."""

from __future__ import annotations

import os

# huggingface_hub reads this at import: the local test Hub speaks the LFS protocol, not Xet.
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at test time
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import warnings

import pytest
import torch
from click.testing import CliRunner

from fixtures import build

warnings.filterwarnings("ignore", category=UserWarning)
torch.set_num_threads(2)


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
