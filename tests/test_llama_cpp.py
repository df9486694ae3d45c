"""llama.cpp itself on adaptkit's GGUF exports (opt-in: skipped unless ADAPTKIT_LLAMA_CPP names the
llama-cpp-python sdist folder built by fixtures/build_llama_cpp.sh).

Per architecture: a tiny model made by transformers with a sentencepiece tokenizer trained here,
turned into a GGUF base by llama.cpp's own convert_hf_to_gguf.py; an rsLoRA with rank and alpha
patterns made by peft; `adaptkit convert --to gguf`; llama.cpp (libllama through the sdist's
llama_cpp package, f32 weights and KV cache) runs base + LoRA and its logits are compared with
peft's unmerged model, against llama.cpp's own base-vs-transformers noise. And `llama-export-lora`
on that LoRA equals `adaptkit merge` converted by the same converter.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures.build import llama_config, phi3_config

ROOT = os.environ.get("ADAPTKIT_LLAMA_CPP")
pytestmark = [pytest.mark.llama_cpp,
              pytest.mark.skipif(not ROOT, reason="set ADAPTKIT_LLAMA_CPP (see fixtures/build_llama_cpp.sh)")]
IDS = [1, 5, 9, 17, 33, 60, 100, 7, 12, 44, 3, 250]


def _mistral():
    from transformers import MistralConfig

    return MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def _gemma():
    from transformers import GemmaConfig

    return GemmaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _qwen2():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def _qwen3():
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                       bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def _gemma3():
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                            sliding_window=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _granite():
    from transformers import GraniteConfig

    return GraniteConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2,
                         logits_scaling=4.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=False)


LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARCHS = {
    "llama": (llama_config, LINEAR),
    "mistral": (_mistral, LINEAR),
    "gemma": (_gemma, LINEAR),
    "phi3": (phi3_config, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    "qwen2": (_qwen2, LINEAR),
    "qwen3": (_qwen3, LINEAR),
    "gemma3": (_gemma3, LINEAR),
    "granite": (_granite, LINEAR),
    "llama-token-embd": (llama_config, LINEAR + ["embed_tokens"]),  # token_embd LoRA (llama.cpp PR #11131)
}


@pytest.fixture(scope="module")
def lc(tmp_path_factory):
    root = Path(ROOT)
    os.environ["LLAMA_CPP_LIB_PATH"] = str(root / "vendor/llama.cpp/build/bin")
    sys.path.insert(0, str(root))
    import llama_cpp
    import sentencepiece as spm

    work = tmp_path_factory.mktemp("sp")
    words = "the cat sat on a mat dog ran fast big red ball and blue sky".split()
    gen = np.random.default_rng(0)
    (work / "corpus.txt").write_text("\n".join(" ".join(gen.choice(words, 12)) for _ in range(2000)))
    spm.SentencePieceTrainer.train(input=str(work / "corpus.txt"), model_prefix=str(work / "sp"), vocab_size=256,
                                   model_type="bpe", hard_vocab_limit=False, character_coverage=1.0, bos_id=1,
                                   eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    return llama_cpp, root / "vendor/llama.cpp", work / "sp.model"


def _gguf_base(lc, folder: Path, out: Path) -> Path:
    """llama.cpp's own converter on an HF folder (f32)."""
    _, src, _ = lc
    res = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(folder), "--outtype", "f32",
                          "--outfile", str(out)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(src / "gguf-py")})
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def _base(lc, tmp_path: Path, arch: str) -> Path:
    from transformers import AutoModelForCausalLM, LlamaTokenizer

    torch.manual_seed(0)
    folder = tmp_path / "base"
    AutoModelForCausalLM.from_config(ARCHS[arch][0]()).float().save_pretrained(folder)
    LlamaTokenizer(vocab_file=str(lc[2])).save_pretrained(folder)
    shutil.copy(lc[2], folder / "tokenizer.model")  # what the converter reads for these architectures
    return folder


def _adapter(base: Path, out: Path, targets) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=targets,
                     rank_pattern={f"layers.1.self_attn.{targets[0]}": 4}, alpha_pattern={"layers.0.mlp.down_proj": 3})
    pm = get_peft_model(model, cfg)
    for name, p in pm.named_parameters():
        if "lora_B" in name or "lora_embedding_A" in name:  # peft starts both at zero
            torch.nn.init.normal_(p, std=0.3)
    pm.save_pretrained(out)
    return out


def _adaptkit(*args):
    res = subprocess.run([sys.executable, "-m", "adaptkit", *map(str, args)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


def _llama_logits(lc, model: Path, lora: Path | None = None) -> np.ndarray:
    llm = lc[0].Llama(model_path=str(model), lora_path=str(lora) if lora else None, logits_all=True, n_ctx=64,
                      n_threads=2, type_k=0, type_v=0, verbose=False)  # GGML_TYPE_F32 KV cache
    llm.eval(IDS)
    return np.array(llm.scores[: len(IDS)])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_llama_cpp_computes_what_peft_does(tmp_path, lc, arch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = _base(lc, tmp_path, arch)
    adapter = _adapter(base, tmp_path / "adapter", ARCHS[arch][1])
    base_gguf = _gguf_base(lc, base, tmp_path / "base.gguf")
    _adaptkit("convert", adapter, "--to", "gguf", "--base", base, "-o", tmp_path / "adapter.gguf")
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([IDS])).logits[0].double().numpy()
        with ref.disable_adapter():
            plain = ref(input_ids=torch.tensor([IDS])).logits[0].double().numpy()
    scale = np.abs(want).max()
    with_lora = _llama_logits(lc, base_gguf, tmp_path / "adapter.gguf")
    # llama.cpp's own noise on these weights: the merged model (adaptkit merge, fp32, through the
    # same converter) run in llama.cpp against peft (gemma's GELU goes through an f16 table there)
    _adaptkit("merge", base, adapter, "-o", tmp_path / "merged", "--dtype", "float32")
    merged = _llama_logits(lc, _gguf_base(lc, tmp_path / "merged", tmp_path / "merged.gguf"))
    noise = np.abs(merged - want).max() / scale
    err = np.abs(with_lora - want).max() / scale
    effect = np.abs(want - plain).max() / scale
    print(arch, f"llama.cpp base+LoRA vs peft {err:.2e}, merged model in llama.cpp vs peft {noise:.2e}, "
                f"LoRA vs merged in llama.cpp {np.abs(with_lora - merged).max() / scale:.2e}, effect {effect:.2f}")
    assert effect > 0.1  # the adapter moves the logits: a dropped or mis-scaled module would show
    assert err <= max(2 * noise, 2e-5), (err, noise)
    # the LoRA applied by llama.cpp equals the merged weights run by llama.cpp, whatever llama.cpp's own
    # distance to transformers (gemma3's tiny model: 0.85 of the largest logit on both, not the LoRA's doing)
    assert np.abs(with_lora - merged).max() / scale <= 2e-5


def test_llama_export_lora_equals_adaptkit_merge(tmp_path, lc):
    from gguf import GGUFReader

    base = _base(lc, tmp_path, "llama")
    adapter = _adapter(base, tmp_path / "adapter", LINEAR)
    base_gguf = _gguf_base(lc, base, tmp_path / "base.gguf")
    _adaptkit("convert", adapter, "--to", "gguf", "--base", base, "-o", tmp_path / "adapter.gguf")
    res = subprocess.run([str(lc[1] / "build/bin/llama-export-lora"), "-m", str(base_gguf), "--lora",
                          str(tmp_path / "adapter.gguf"), "-o", str(tmp_path / "exported.gguf")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    _adaptkit("merge", base, adapter, "-o", tmp_path / "merged", "--dtype", "float32")
    ours = _gguf_base(lc, tmp_path / "merged", tmp_path / "merged.gguf")

    def tensors(path):
        return {t.name: np.array(t.data, dtype=np.float64) for t in GGUFReader(str(path)).tensors}

    a, b = tensors(tmp_path / "exported.gguf"), tensors(ours)
    assert set(a) == set(b)
    changed = 0
    for name in a:
        diff = np.abs(a[name] - b[name]).max() / max(np.abs(b[name]).max(), 1e-30)
        assert diff <= 1e-6, name
        changed += ".attn_" in name or ".ffn_" in name
    assert changed >= 14
