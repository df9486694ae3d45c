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

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures.build import (afmoe_config, deepseek_v3_config, falcon_h1_config, gemma4_config, gpt_oss_config,
                            granite_moe_hybrid_config, hunyuan_moe_config, lfm2_moe_config, llama_config,
                            mixtral_config, nemotron_h_config, nemotron_hub_config, perturb_expert_scales, phi3_config,
                            qwen2_moe_config, qwen3_moe_config, qwen3_next_config, qwen35_config, qwen_vl_config)

ROOT = os.environ.get("ADAPTKIT_LLAMA_CPP")
pytestmark = [pytest.mark.llama_cpp,
              pytest.mark.skipif(not ROOT, reason="set ADAPTKIT_LLAMA_CPP (see fixtures/build_llama_cpp.sh)")]
IDS = [1, 5, 9, 17, 33, 60, 100, 7, 12, 44, 3, 250]


def _tiny(cls: str, **over):
    """A tiny config of the transformers class ``cls`` (the sizes every case here shares)."""
    import transformers

    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              tie_word_embeddings=False)
    return getattr(transformers, cls)(**{**kw, **over})


def _mistral():
    return _tiny("MistralConfig")


def _gemma():
    return _tiny("GemmaConfig", head_dim=16, tie_word_embeddings=True)


def _qwen2():
    return _tiny("Qwen2Config", pad_token_id=None)


def _qwen3():
    return _tiny("Qwen3Config", head_dim=16, pad_token_id=None)


def _gemma3():
    # query_pre_attn_scalar = head_dim, as Gemma's own models pair them (transformers' default, 256, with
    # a head_dim of 16 is a scaling llama.cpp's gemma graphs do not reproduce: 0.7 of the largest logit off)
    return _tiny("Gemma3TextConfig", head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                 tie_word_embeddings=True)


def _granite(cls: str = "GraniteConfig", **over):
    return _tiny(cls, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2,
                 logits_scaling=4.0, **over)


def _olmoe():
    # no GQA: llama.cpp's olmoe wants attn_k_norm over the whole hidden size, as OLMoE's models have it
    return _tiny("OlmoeConfig", intermediate_size=48, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2)


def _qwen3_moe():
    # llama.cpp's qwen3moe always renormalises the top-k routing weights (src/models/qwen3moe.cpp passes
    # norm_w = true to build_moe_ffn), as Qwen3-30B-A3B's config does; transformers' default is not to
    config = qwen3_moe_config()
    config.norm_topk_prob = True
    return config


def _llama4():
    # every layer MoE (interleave step 1) with one routed expert per token and a shared expert, as Scout; four
    # layers, the last without RoPE as every fourth of Scout's (with none, llama.cpp's graph leaves its
    # attention-scale input unallocated and aborts: "tensor buffer not set")
    return _tiny("Llama4TextConfig", head_dim=16, intermediate_size=48, intermediate_size_mlp=128, num_local_experts=4,
                 num_experts_per_tok=1, interleave_moe_layer_step=1, num_hidden_layers=4)


def _glm4_moe_lite():
    config = _tiny("Glm4MoeLiteConfig", moe_intermediate_size=48, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                   qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                   n_group=1, topk_group=1, mlp_layer_types=["dense", "sparse"], num_key_value_heads=4)
    config.first_k_dense_replace = 1
    config.scoring_func, config.topk_method = "sigmoid", "noaux_tc"  # transformers' router; the converter reads these
    return config


def _gpt2(cls: str = "GPT2Config", **over):
    # GPT-2's own names for the sizes; n_ctx as its config.json has it (llama.cpp's gpt2 converter reads it)
    import transformers

    kw = dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)
    return getattr(transformers, cls)(**{**kw, **over})


def _gpt_bigcode():
    return _gpt2("GPTBigCodeConfig")


LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]  # transformers 5's fused expert parameters
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
    # read off llama.cpp's converter registry (formats/gguf.py ARCHITECTURES), one case each
    "arcee": (lambda: _tiny("ArceeConfig"), ATTENTION + ["up_proj", "down_proj"]),
    "smollm3": (lambda: _tiny("SmolLM3Config"), LINEAR),
    "olmo": (lambda: _tiny("OlmoConfig", num_key_value_heads=4), LINEAR),
    "olmo2": (lambda: _tiny("Olmo2Config", num_key_value_heads=4), LINEAR),
    "olmo3": (lambda: _tiny("Olmo3Config", num_key_value_heads=4, sliding_window=16), LINEAR),
    "starcoder2": (lambda: _tiny("Starcoder2Config"), ATTENTION + ["c_fc", "c_proj"]),
    "cohere": (lambda: _tiny("CohereConfig", tie_word_embeddings=True), LINEAR),  # command-r has no output tensor
    "exaone4": (lambda: _tiny("Exaone4Config", sliding_window=16), LINEAR),
    "seed-oss": (lambda: _tiny("SeedOssConfig", head_dim=16), LINEAR),
    "stablelm": (lambda: _tiny("StableLmConfig"), LINEAR),  # partial rotary (a quarter), parallel residual off
    "gpt-bigcode": (_gpt_bigcode, ["c_attn", "c_proj", "c_fc"]),  # multi-query attention, c_attn an nn.Linear
    "gpt2": (lambda: _gpt2(n_ctx=128), ["c_attn", "c_proj", "c_fc"]),  # Conv1D weights, stored (in, out)
    "gemma2": (lambda: _tiny("Gemma2Config", head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                             tie_word_embeddings=True), LINEAR),  # query_pre_attn_scalar: see _gemma3
    "glm4": (lambda: _tiny("Glm4Config", head_dim=16), ATTENTION + ["gate_up_proj", "down_proj"]),  # gate, up fused
    "ernie4.5": (lambda: _tiny("Ernie4_5Config", head_dim=16), LINEAR),
    "ministral3": (lambda: _tiny("Ministral3Config", head_dim=16), LINEAR),  # its default yarn rope and scaling
    # phi.py Phi2Model writes feed_forward_length = 4 * hidden_size
    "phi2": (lambda: _tiny("PhiConfig", num_key_value_heads=4, intermediate_size=256),
             ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]),
    "gpt-neox": (lambda: _tiny("GPTNeoXConfig", rotary_pct=0.5),
                 ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
    # bloom.py regroups query_key_value per head as gptneox.py does; falcon.py from its kv groups
    "bloom": (lambda: _gpt2("BloomConfig", hidden_size=64), ["query_key_value", "dense", "dense_h_to_4h",
                                                            "dense_4h_to_h"]),
    "falcon": (lambda: _tiny("FalconConfig", new_decoder_architecture=True, num_kv_heads=2),
               ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
    "nemotron": (lambda: _tiny("NemotronConfig", head_dim=16), ATTENTION + ["up_proj", "down_proj"]),
    # rotary_pct as Command R7B's config.json has it (llama.cpp's converter reads it; transformers 5 keeps it as an
    # extra key, rotating whole heads)
    "cohere2": (lambda: _tiny("Cohere2Config", head_dim=16, sliding_window=16, tie_word_embeddings=True,
                              rotary_pct=1.0), LINEAR),
    "hunyuan-dense": (lambda: _tiny("HunYuanDenseV1Config", head_dim=16), LINEAR),
    # Nemotron 3 Nano: Mamba-2, attention (q/k permuted) and MoE layers, the shared expert, the router (a 2-D
    # parameter) and the routed experts (up/down, no gate)
    "nemotron-h": (nemotron_h_config, ["q_proj", "k_proj", "o_proj", "in_proj", "shared_experts.down_proj"],
                   ["mixer.experts.up_proj", "mixer.experts.down_proj", "mixer.gate.weight"]),
    # Hunyuan-A13B's layout: experts, a shared MLP and the router (mlp.gate.wg); moe_topk, moe_intermediate_size
    # and num_shared_expert per layer as its config.json has them (llama.cpp's converter reads those lists)
    "hunyuan-moe": (hunyuan_moe_config, ATTENTION + ["shared_mlp.down_proj", "gate.wg"], EXPERTS),
    "apertus": (lambda: _tiny("ApertusConfig", head_dim=16), ATTENTION + ["up_proj", "down_proj"]),  # xIELU MLP
    # Gemma 4's text model: sliding and full attention layers (the full ones with "proportional" partial RoPE),
    # global_head_dim as its config.json has it (the converter reads it), per-layer inputs off
    "gemma4": (gemma4_config, LINEAR),
    # Gemma 4's MoE layers (26B-A4B): a dense MLP beside fused 3-D experts (ffn_gate_up_exps kept fused), the
    # router's per-expert scale set away from one (llama.cpp scales W·x by it but not a LoRA's delta)
    "gemma4-moe": (lambda: gemma4_config(moe=True),
                   ATTENTION + ["mlp.down_proj", "router.proj"], ["experts.gate_up_proj", "experts.down_proj"]),
    # Qwen3.5: gated-delta-net layers (more value than key heads: llama.cpp reorders the value heads) and a
    # gated full-attention layer; its M-RoPE sections fitted to the rotary dims (a quarter of head_dim 64)
    "qwen3.5": (qwen35_config, LINEAR + ["in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj"]),
    "qwen3.5-moe": (lambda: qwen35_config(moe=True),
                    ATTENTION + ["in_proj_qkv", "in_proj_z", "in_proj_b", "out_proj", "shared_expert.up_proj",
                                 "shared_expert_gate"], EXPERTS + ["mlp.gate.weight"]),
    "jais2": (lambda: _tiny("Jais2Config", head_dim=16), ATTENTION + ["up_proj", "down_proj"]),  # a ReLU² MLP
    # AFMoE (Arcee Trinity): a dense lead layer, shared and routed experts, the router (a seeded one: transformers
    # starts it at zeros, which leaves top-k to each runtime's tie-breaking). (Its attention gate, also named
    # gate_proj, peft will not target beside experts: it takes the name for the experts' gate.)
    "afmoe": (afmoe_config, ATTENTION + ["shared_experts.down_proj", "router.gate"], EXPERTS),
    # Falcon-H1: attention and Mamba-2 side by side in every layer; µP multipliers set away from one (its converter
    # folds them into the weights, so the LoRAs carry them)
    "falcon-h1": (falcon_h1_config,
                  LINEAR + ["in_proj", "embed_tokens"]),  # (peft refuses out_proj on Mamba models)
    # MiniCPM3: latent attention, whose projections llama.cpp multiplies without a LoRA (refused), its output and MLP
    "minicpm3": (lambda: _tiny("MiniCPM3Config", head_dim=16, kv_lora_rank=16, q_lora_rank=32, qk_nope_head_dim=8,
                               qk_rope_head_dim=8, v_head_dim=16, num_key_value_heads=4),
                 ["o_proj", "gate_proj", "up_proj", "down_proj"]),
    # LFM2: short-convolution layers (conv.in_proj, conv.out_proj) and an attention layer
    "lfm2": (lambda: _tiny("Lfm2Config", layer_types=["conv", "full_attention"]),
             ["q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3"]),
    # LFM2-MoE (LFM2-8B-A1B): a dense first layer, then experts (feed_forward.experts.N.w1/w2/w3 on disk) and the
    # router; tied embeddings, as its models have them (the converter maps no lm_head)
    "lfm2-moe": (lfm2_moe_config,
                 ["q_proj", "out_proj", "in_proj", "w2"],
                 ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj", "feed_forward.gate.weight"]),
    # Qwen3-Next: its gated delta net's in_proj_qkvz (per key head [q k v z], split by the converter into attn_qkv
    # and attn_gate), in_proj_ba and out_proj, gated full attention, shared expert and routed experts
    "qwen3-next": (qwen3_next_config,
                   ATTENTION + ["in_proj_qkvz", "in_proj_ba", "out_proj", "shared_expert.down_proj"], EXPERTS),
    # GLM-4.7-Flash (deepseek2 in llama.cpp: latent attention, whose projections llama.cpp applies no LoRA to);
    # first_k_dense_replace, scoring_func and topk_method as its config.json has them (the converter reads those,
    # transformers mlp_layer_types and a sigmoid router of its own)
    "glm4-moe-lite": (_glm4_moe_lite, ["o_proj", "shared_experts.down_proj"], EXPERTS + ["mlp.gate.weight"]),
    # Solar Open: Glm4MoeModel in llama.cpp; partial_rotary_factor given (the converter's default is 0.5,
    # transformers' 1.0)
    "solar-open": (lambda: _tiny("SolarOpenConfig", head_dim=16, moe_intermediate_size=48, n_routed_experts=4,
                                 n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "partial_rotary_factor": 1.0}),
                   ATTENTION + ["shared_experts.down_proj"], EXPERTS),
    # Granite 4.0-H: a Mamba-2 layer and an attention layer (q/k permuted), the shared MLP (input_linear split
    # into gate and up) and experts (input_linear split too, output_linear, the router). Without positional
    # embeddings, as Granite 4.0-H has them: llama.cpp's granite-hybrid graph applies no RoPE (with
    # position_embedding_type "rope" it is 1.0 of the largest logit off transformers on the base alone)
    "granite-hybrid": (granite_moe_hybrid_config,
                       ATTENTION + ["mamba.in_proj", "mamba.out_proj", "shared_mlp.input_linear",
                                    "shared_mlp.output_linear"],
                       ["block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.experts.down_proj",
                        "block_sparse_moe.router.weight"]),
    # MoE: LoRAs on every expert (peft target_parameters), laid out as ffn_{gate,up,down}_exps
    "qwen3-moe": (_qwen3_moe, ATTENTION, EXPERTS),
    "mixtral": (mixtral_config, ATTENTION, EXPERTS),
    "olmoe": (_olmoe, ATTENTION, EXPERTS),
    "gpt-oss": (gpt_oss_config, ATTENTION, EXPERTS),  # experts stored fused (E, in, out), gate/up interleaved
    # the shared expert and its gate (nn.Linear), the router (a 2-D parameter) and the routed experts
    "qwen2-moe": (qwen2_moe_config, ATTENTION + ["shared_expert.gate_proj", "shared_expert.down_proj",
                                                 "shared_expert_gate"], EXPERTS + ["mlp.gate.weight"]),
    # deepseek2 in llama.cpp: latent attention (whose projections llama.cpp multiplies without a LoRA, so
    # the export refuses LoRAs there), the router and the experts of the MoE layer after the dense one
    "deepseek-v3": (deepseek_v3_config, ["o_proj"], EXPERTS + ["mlp.gate.weight"]),
    # experts stored 3-D as input_linear (gate, up halves) / output_linear and renamed on load, the router a
    # 2-D parameter (router.layer on disk); GraniteMoeShared adds a shared MLP whose input_linear splits too
    "granitemoe": (lambda: _granite("GraniteMoeConfig", intermediate_size=48, num_local_experts=4,
                                    num_experts_per_tok=2), ATTENTION,
                   ["block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.experts.down_proj",
                    "block_sparse_moe.router.weight"]),
    "granitemoe-shared": (lambda: _granite("GraniteMoeSharedConfig", intermediate_size=48, num_local_experts=4,
                                           num_experts_per_tok=2, shared_intermediate_size=32),
                          ATTENTION + ["shared_mlp.input_linear", "shared_mlp.output_linear"],
                          ["block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.experts.down_proj"]),
    # rotary_dim and scoring_func as MiniMax-M2's config.json has them (partial RoPE; a sigmoid router)
    "minimax-m2": (lambda: _tiny("MiniMaxM2Config", head_dim=16, rotary_dim=8, num_local_experts=4,
                                 num_experts_per_tok=2, scoring_func="sigmoid"),
                   ATTENTION, EXPERTS + ["mlp.gate.weight"]),
    # a dense first layer, then routed experts, a shared expert and the router (GLM-4.5's layout; its
    # multi-token-prediction layer is not in transformers' model, so none here)
    "glm4-moe": (lambda: _tiny("Glm4MoeConfig", head_dim=16, moe_intermediate_size=48, n_routed_experts=4,
                               num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                               num_nextn_predict_layers=0),
                 ATTENTION + ["shared_experts.down_proj"], EXPERTS + ["mlp.gate.weight"]),
    # ernie.py writes the shared experts' width as intermediate_size // num_key_value_heads, which ERNIE-4.5's
    # configs make equal to moe_intermediate_size * moe_num_shared_experts (12288 // 4 = 1536 * 2)
    "ernie4.5-moe": (lambda: _tiny("Ernie4_5_MoeConfig", head_dim=16, moe_intermediate_size=32, moe_num_experts=4,
                                   moe_k=2, moe_num_shared_experts=2, moe_layer_start_index=1),
                     ATTENTION + ["shared_experts.down_proj"], EXPERTS),
    # no GQA: llama.cpp's dots1 sizes attn_k/attn_v for as many kv heads as heads, as dots.llm1 has them;
    # scoring_func as its config.json has it (transformers' router is a sigmoid; llama.cpp's converter reads it)
    "dots1": (lambda: _tiny("Dots1Config", head_dim=16, num_key_value_heads=4, moe_intermediate_size=48,
                            n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                            scoring_func="sigmoid"),
              ATTENTION, EXPERTS + ["mlp.gate.weight"]),
    # experts fused on disk as (E, in, out) but not marked is_transposed: peft's LoRA is in the parameter's
    # orientation, llama.cpp's the transpose (gate and up halves); the router, an nn.Linear whose forward
    # returns a tuple (which peft's Linear LoRA cannot wrap), through its weight
    "llama4": (_llama4, ATTENTION + ["shared_expert.down_proj"],
               ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj", "feed_forward.router.weight"]),
}


def runtime(work: Path):
    """(the sdist's llama_cpp package, its llama.cpp folder, a 256-token sentencepiece model trained in
    ``work``): what every case here runs on (fixtures/probe_llama_cpp.py too)."""
    root = Path(ROOT)
    os.environ["LLAMA_CPP_LIB_PATH"] = str(root / "vendor/llama.cpp/build/bin")
    sys.path.insert(0, str(root))
    import llama_cpp
    import sentencepiece as spm

    if not (work / "sp.model").exists():
        words = "the cat sat on a mat dog ran fast big red ball and blue sky".split()
        gen = np.random.default_rng(0)
        (work / "corpus.txt").write_text("\n".join(" ".join(gen.choice(words, 12)) for _ in range(2000)))
        spm.SentencePieceTrainer.train(input=str(work / "corpus.txt"), model_prefix=str(work / "sp"), vocab_size=256,
                                       model_type="bpe", hard_vocab_limit=False, character_coverage=1.0, bos_id=1,
                                       eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    return llama_cpp, root / "vendor/llama.cpp", work / "sp.model"


@pytest.fixture(scope="module")
def lc(tmp_path_factory):
    return runtime(tmp_path_factory.mktemp("sp"))


# llama.cpp's converter, made to read our sentencepiece tokenizer where it would want a GPT-2 BPE one
# (it recognises those only by hashes of known models' tokenizers); the tokenizer does not matter to these
# tests, which feed token ids
CONVERT = """import runpy, sys
sys.argv[0] = sys.argv.pop(1)
sys.path.insert(0, sys.argv.pop(1))
from conversion.base import TextModel
from conversion.exaone import Exaone4Model
TextModel._set_vocab_gpt2 = TextModel._set_vocab_sentencepiece
Exaone4Model.set_vocab = TextModel._set_vocab_sentencepiece  # it reads a BPE vocabulary itself
from conversion.glm import Glm4Model
Glm4Model.set_vocab = TextModel._set_vocab_sentencepiece  # it wants GLM's special tokens
from conversion.glm import Glm4MoeModel, Glm4MoeLiteModel, SolarOpenModel
Glm4MoeModel.set_vocab = TextModel._set_vocab_sentencepiece
Glm4MoeLiteModel.set_vocab = SolarOpenModel.set_vocab = TextModel._set_vocab_sentencepiece  # their own BPE vocabularies
from conversion.hunyuan import HunYuanModel, HunYuanMoEModel
HunYuanModel.set_vocab = HunYuanMoEModel.set_vocab = TextModel._set_vocab_sentencepiece  # a tiktoken-style vocabulary
from conversion.gemma import Gemma4Model
Gemma4Model.set_vocab = TextModel._set_vocab_sentencepiece  # it wants Gemma 4's BPE merges
from conversion.qwen import _QwenMtpMixin
_QwenMtpMixin.no_mtp = True  # --no-mtp: transformers' Qwen3.5 models hold no multi-token-prediction layers
from conversion.nemotron import NemotronHModel
NemotronHModel.set_vocab = TextModel._set_vocab_sentencepiece  # it reads NVIDIA's own tokenizer
from conversion.gptneox import GPTNeoXModel
init = GPTNeoXModel.__init__
def neox_init(self, *args, **kwargs):  # it reads rotary_pct, which transformers 5's config keeps in rope_parameters
    init(self, *args, **kwargs)
    self.hparams.setdefault("rotary_pct", self.hparams["rope_parameters"]["partial_rotary_factor"])
GPTNeoXModel.__init__ = neox_init
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _gguf_base(lc, folder: Path, out: Path) -> Path:
    """llama.cpp's own converter on an HF folder (f32)."""
    _, src, _ = lc
    res = subprocess.run([sys.executable, "-c", CONVERT, str(src / "convert_hf_to_gguf.py"), str(src),
                          str(folder), "--outtype", "f32", "--outfile", str(out)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(src / "gguf-py")})
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def _base(lc, tmp_path: Path, arch: str) -> Path:
    from transformers import AutoModelForCausalLM, LlamaTokenizer

    torch.manual_seed(0)
    folder = tmp_path / "base"
    model = AutoModelForCausalLM.from_config(ARCHS[arch][0]()).float()
    perturb_expert_scales(model)  # Gemma 4's, ones when initialised
    model.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("model_type") == "nemotron_h":
        nemotron_hub_config(folder)
    if cfg.get("model_type") == "granitemoehybrid":  # the layer names of Granite 4's config.json, which llama.cpp's
        # converter reads (transformers 5 reads them too, and saves its own: linear_attention, full_attention)
        cfg["layer_types"] = ["mamba" if t == "linear_attention" else "attention" for t in cfg["layer_types"]]
        (folder / "config.json").write_text(json.dumps(cfg))
    LlamaTokenizer(vocab_file=str(lc[2])).save_pretrained(folder)
    shutil.copy(lc[2], folder / "tokenizer.model")  # what the converter reads for these architectures
    return folder


def _adapter(base: Path, out: Path, targets, parameters=None) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ranks = {f"layers.1.self_attn.{targets[0]}": 4}
    if parameters:  # patterns on the experts too (peft matches them on module.parameter; its "did not match"
        # warning for them looks only at module names)
        ranks[f"layers.1.{parameters[0]}"] = 4
        extra = dict(target_parameters=parameters, alpha_pattern={parameters[1]: 3})
    else:
        extra = dict(alpha_pattern={"layers.0.mlp.down_proj": 3})
    cfg = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=targets, rank_pattern=ranks, **extra)
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


def _check(lc, tmp_path: Path, base: Path, adapter: Path, label: str, peft: bool = True) -> None:
    """llama.cpp + our GGUF of ``adapter`` computes what peft's unmerged model does, and what llama.cpp
    computes on the adaptkit-merged weights (only the latter where peft cannot load the adapter)."""
    from peft import PeftModel

    from fixtures.build import load_model

    base_gguf = _gguf_base(lc, base, tmp_path / "base.gguf")
    _adaptkit("convert", adapter, "--to", "gguf", "--base", base, "-o", tmp_path / "adapter.gguf")
    with_lora = _llama_logits(lc, base_gguf, tmp_path / "adapter.gguf")
    # llama.cpp's own noise on these weights: the merged model (adaptkit merge, fp32, through the
    # same converter) run in llama.cpp against peft (gemma's GELU goes through an f16 table there)
    _adaptkit("merge", base, adapter, "-o", tmp_path / "merged", "--dtype", "float32")
    merged = _llama_logits(lc, _gguf_base(lc, tmp_path / "merged", tmp_path / "merged.gguf"))
    if not peft:
        plain = _llama_logits(lc, base_gguf)
        scale = np.abs(merged).max()
        err, effect = np.abs(with_lora - merged).max() / scale, np.abs(merged - plain).max() / scale
        print(label, f"LoRA vs merged in llama.cpp {err:.2e}, effect {effect:.2f}")
        assert effect > 0.1 and err <= 2e-5
        return
    from adaptkit.commands.verify import _text_model

    ref = PeftModel.from_pretrained(load_model(base), adapter).eval()  # the class its config names, fp32
    run = _text_model(ref.base_model.model)  # Llama 4's VLM runs text through its language model (see there)
    with torch.no_grad():
        want = run(input_ids=torch.tensor([IDS])).logits[0].double().numpy()
        with ref.disable_adapter():
            plain = run(input_ids=torch.tensor([IDS])).logits[0].double().numpy()
    scale = np.abs(want).max()
    noise = np.abs(merged - want).max() / scale
    err = np.abs(with_lora - want).max() / scale
    effect = np.abs(want - plain).max() / scale
    print(label, f"llama.cpp base+LoRA vs peft {err:.2e}, merged model in llama.cpp vs peft {noise:.2e}, "
                 f"LoRA vs merged in llama.cpp {np.abs(with_lora - merged).max() / scale:.2e}, effect {effect:.2f}")
    assert effect > 0.1  # the adapter moves the logits: a dropped or mis-scaled module would show
    assert err <= max(2 * noise, 2e-5), (err, noise)
    # the LoRA applied by llama.cpp equals the merged weights run by llama.cpp, whatever llama.cpp's own
    # distance to transformers.
    # Where llama.cpp's CPU GELU rounds its input to f16 for a table lookup (ggml-cpu/vec.h GGML_GELU_FP16)
    # and the model's own noise is that rounding, the two fp32 orders of B·(A·x) + W·x and (W + ΔW)·x land
    # on different f16 steps: there a fifth of that noise is the bound (starcoder2 came to 0.11 of it on an
    # AMD EPYC, under 0.1 on the Intel machines before). Gemma 4's MoE layers run two such MLPs (the dense one
    # and the experts, whose top-k the steps also move) and its VLM text model more steps: there it is the
    # noise itself (gemma4-moe 0.47 of it, gemma4-vlm 0.38, gemma4 0.11 on an Intel Xeon)
    bound = max(2e-5, noise / 5) if label in F16_GELU else 2e-5
    bound = noise if label in ("gemma4-moe", "gemma4-vlm") else bound
    assert np.abs(with_lora - merged).max() / scale <= bound


F16_GELU = {"gemma", "gemma2", "gemma4", "gemma3-vlm", "gemma4-vlm", "starcoder2", "phi2", "gpt-neox", "gpt2", "gpt-bigcode", "bloom", "falcon"}  # GELU-tanh MLPs (gemma3 stays within 2e-5)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_llama_cpp_computes_what_peft_does(tmp_path, lc, arch):
    base = _base(lc, tmp_path, arch)
    adapter = _adapter(base, tmp_path / "adapter", *ARCHS[arch][1:])
    _check(lc, tmp_path, base, adapter, arch)


def _llama4_vlm():
    from fixtures import build

    return build.llama4_config(vlm=True, text=_llama4())


@pytest.mark.parametrize("family", ["llava", "gemma3-vlm", "gemma4-vlm", "mistral3-vlm", "llama4-vlm", "qwen2-vl", "qwen2.5-vl",
                                    "qwen3-vl", "qwen3-vl-moe", "qwen3.5-vlm", "qwen3.5-moe-vlm"])
def test_llama_cpp_takes_a_vlm_language_model_lora(tmp_path, lc, family):
    """A VLM's language model (peft: model.language_model.layers…; Llava and Llama 4 on disk
    language_model.model…): llama.cpp's converter makes a text model of it (the vision tower goes to an
    mmproj file), and the GGUF LoRA of its attention and MLP (Llama 4: its shared expert and, through
    target_parameters, its routed experts) computes what peft does there."""
    import transformers
    from transformers import LlamaTokenizer

    from fixtures import build

    base = tmp_path / "base"
    config, cls = {"llava": (build.llava_config, transformers.LlavaForConditionalGeneration),
                   "gemma3-vlm": (build.gemma3_vlm_config, transformers.Gemma3ForConditionalGeneration),
                   "gemma4-vlm": (build.gemma4_vlm_config, transformers.Gemma4ForConditionalGeneration),
                   "mistral3-vlm": (build.mistral3_vlm_config, transformers.Mistral3ForConditionalGeneration),
                   "llama4-vlm": (_llama4_vlm, transformers.Llama4ForConditionalGeneration),
                   "qwen2-vl": (lambda: qwen_vl_config("2"), transformers.Qwen2VLForConditionalGeneration),
                   "qwen2.5-vl": (lambda: qwen_vl_config("2.5"), transformers.Qwen2_5_VLForConditionalGeneration),
                   "qwen3-vl": (lambda: qwen_vl_config("3"), transformers.Qwen3VLForConditionalGeneration),
                   "qwen3-vl-moe": (lambda: qwen_vl_config("3-moe"),
                                    transformers.Qwen3VLMoeForConditionalGeneration),
                   "qwen3.5-vlm": (lambda: qwen_vl_config("3.5"), transformers.Qwen3_5ForConditionalGeneration),
                   "qwen3.5-moe-vlm": (lambda: qwen_vl_config("3.5-moe"),
                                       transformers.Qwen3_5MoeForConditionalGeneration)}[family]
    config = config()
    build.build_model(config, base, dtype=torch.float32, auto=cls)
    if family == "qwen3-vl-moe":  # the Hub's layout of its experts, which llama.cpp's converter expects
        build.to_hub_expert_layout(base)
    if family == "qwen3.5-moe-vlm":  # the Hub's layout of its experts: fused, as in memory (the converter splits it)
        base = build.to_fused_expert_layout(base, tmp_path / "fused")
    LlamaTokenizer(vocab_file=str(lc[2])).save_pretrained(base)
    shutil.copy(lc[2], base / "tokenizer.model")
    experts = {"target_parameters": ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]} \
        if family == "llama4-vlm" else {"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]} \
        if family in ("qwen3-vl-moe", "qwen3.5-moe-vlm") else {}
    linear = "|in_proj_qkv|in_proj_z|out_proj" if family.startswith("qwen3.5") else ""  # Qwen3.5's delta nets
    adapter = build.build_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, use_rslora=True, scale=0.3,
                                  target_modules=rf".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|down_proj{linear})",
                                  rank_pattern={"layers.1.self_attn.q_proj": 2}, **experts)
    _check(lc, tmp_path, base, adapter, family)


def test_llama_cpp_takes_per_expert_linear_loras_stacked(tmp_path, lc):
    """A transformers-4 era Mixtral LoRA on each expert's nn.Linear (as peft 0.13 saved it): stacked into
    ffn_*_exps, expert ranks differing (zero-padded) and one expert without a LoRA (zeros). peft 0.21
    cannot load this one (transformers stacks the experts' factors on load, which needs every expert
    at one rank), so llama.cpp on the adaptkit-merged weights is the reference: that merge is checked
    against the factors in tests/test_families.py."""
    from safetensors.torch import save_file

    base = _base(lc, tmp_path, "mixtral")
    gen = torch.Generator().manual_seed(0)
    tensors, ranks = {}, {}
    for layer in range(2):
        for e in range(3):  # expert 3 has none
            for w, (o, i) in {"w1": (48, 64), "w2": (64, 48), "w3": (48, 64)}.items():
                p = f"base_model.model.model.layers.{layer}.block_sparse_moe.experts.{e}.{w}"
                r = 2 if e == 1 else 4
                if r != 4:
                    ranks[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}"] = r
                tensors[p + ".lora_A.weight"] = 0.3 * torch.randn(r, i, generator=gen)
                tensors[p + ".lora_B.weight"] = 0.3 * torch.randn(o, r, generator=gen)
    ad = tmp_path / "lora"
    ad.mkdir()
    save_file(tensors, ad / "adapter_model.safetensors")
    (ad / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": ranks,
        "alpha_pattern": {"model.layers.0.block_sparse_moe.experts.0.w2": 2}, "target_modules": ["w1", "w2", "w3"],
        "peft_version": "0.13.2"}))
    _check(lc, tmp_path, base, ad, "mixtral per-expert linears", peft=False)


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
