"""llama.cpp LoRA adapters (GGUF), written with the ``gguf`` package.

llama.cpp (``llama-adapter.cpp``) scales each adapted tensor by ``alpha / rank`` with one
``adapter.lora.alpha`` for the whole file and ``rank`` read from each tensor's shape. A PEFT adapter
can have per-module ranks, alphas and rsLoRA, so each module's own scaling sₘ is folded into its
lora_b: lora_b' = lora_b · sₘ / (alpha / rₘ). Tensors keep PEFT's shapes (lora_a r × in, lora_b
out × r) under gguf's own names (``blk.0.attn_q.weight.lora_a``). For llama-family models the
converter permutes the rows of q and k for RoPE; lora_b's rows get the same permutation.

MoE experts: llama.cpp's converter stacks the checkpoint's per-expert tensors into one 3-D tensor per
projection (``blk.N.ffn_{gate,up,down}_exps``, numpy (E, out, in)), and its graph applies a LoRA on
it expert by expert (``llm_graph_context::build_lora_mm_id``: mul_mat_id(b, mul_mat_id(a, x)) with
``a`` (E, r, in), ``b`` (E, out, r), one rank for the tensor). A ``target_parameters`` LoRA on a
transformers-5 expert parameter is laid out there from the base's own on-disk tensors (gate beside
up: each gets its rows of every expert's ΔW); per-expert ``nn.Linear`` LoRAs (transformers-4 era
Mixtral) are stacked, each expert zero-padded to the largest rank and experts without a LoRA zero:
exact either way.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from .. import lora
from ..adapter import Adapter
from ..errors import AdaptkitError

# HF architecture -> (gguf architecture, how llama.cpp's converter reorders the rows of attention weights:
# "rope" permutes q/k from HF's rotate-half layout (llama's ``permute``), "neox-qkv" regroups GPT-NeoX's
# per-head [q k v] rows of query_key_value into [Q; K; V], "falcon-qkv" Falcon's kv groups likewise, "v-heads"
# tiles a gated delta net's value heads (Qwen3.5: see v_heads), "" keeps them). Each entry is read off llama.cpp's
# converter (llama-cpp-python 0.3.36's vendor/llama.cpp/conversion/*.py: the class registered for the HF
# architecture and its modify_tensors) and run in llama.cpp by tests/test_llama_cpp.py; an architecture not
# listed is refused rather than guessed.
ARCHITECTURES = {
    # llama.py LlamaModel (undo_permute) and its subclasses ArceeModel, SmolLM3Model; granite.py
    # GraniteModel(LlamaModel); olmo.py OlmoModel permutes q/k itself
    "LlamaForCausalLM": ("llama", "rope"), "MistralForCausalLM": ("llama", "rope"),
    "ArceeForCausalLM": ("arcee", "rope"), "SmolLM3ForCausalLM": ("smollm3", "rope"),
    "GraniteForCausalLM": ("granite", "rope"), "OlmoForCausalLM": ("olmo", "rope"),
    # renames only (no modify_tensors of their own, or one that leaves attention and MLP weights as they are)
    "Qwen2ForCausalLM": ("qwen2", ""), "Qwen3ForCausalLM": ("qwen3", ""),
    "GemmaForCausalLM": ("gemma", ""), "Gemma2ForCausalLM": ("gemma2", ""), "Gemma3ForCausalLM": ("gemma3", ""),
    "Phi3ForCausalLM": ("phi3", ""), "PhiForCausalLM": ("phi2", ""),
    "Olmo2ForCausalLM": ("olmo2", ""), "Olmo3ForCausalLM": ("olmo2", ""),  # olmo.py Olmo2Model registers both
    "Starcoder2ForCausalLM": ("starcoder2", ""), "CohereForCausalLM": ("command-r", ""),
    "Exaone4ForCausalLM": ("exaone4", ""), "SeedOssForCausalLM": ("seed_oss", ""),
    "StableLmForCausalLM": ("stablelm", ""),  # stablelm.py StableLMModel: only its per-head q/k norms stacked
    # command_r.py Cohere2Model: renames (it drops the all-zero biases, which transformers' Cohere2 lacks)
    "Cohere2ForCausalLM": ("cohere2", ""),
    # llama.py ApertusModel(LlamaModel) with undo_permute False: q/k rows kept (its xIELU parameters go to metadata)
    "ApertusForCausalLM": ("apertus", ""),
    # hunyuan.py HunYuanModel: renames (the tied head skipped)
    "HunYuanDenseV1ForCausalLM": ("hunyuan-dense", ""),
    # hunyuan.py HunYuanMoEModel: experts stacked, the router (mlp.gate.wg) and shared_mlp renamed (its
    # list-valued moe_topk / moe_intermediate_size / num_shared_expert read from config.json as Hunyuan-A13B's)
    "HunYuanMoEV1ForCausalLM": ("hunyuan-moe", ""),
    # gpt2.py GPT2Model: Conv1D weights transposed to (out, in), which is the orientation of peft's ΔW there
    # (mpt.py registers MPTForCausalLM, MosaicML's remote-code class, not transformers' MptForCausalLM)
    "GPT2LMHeadModel": ("gpt2", ""),
    "GPTBigCodeForCausalLM": ("starcoder", ""),  # starcoder.py StarCoderModel: renames only (c_attn stays fused)
    # gptneox.py GPTNeoXModel and bloom.py BloomModel: query_key_value regrouped (see neox_qkv_rows)
    "GPTNeoXForCausalLM": ("gptneox", "neox-qkv"), "BloomForCausalLM": ("bloom", "neox-qkv"),
    # falcon.py FalconModel: query_key_value regrouped from kv groups (see falcon_qkv_rows)
    "FalconForCausalLM": ("falcon", "falcon-qkv"),
    # nemotron.py NemotronModel: renames (it adds 1 to the norm weights, layernorm1p)
    "NemotronForCausalLM": ("nemotron", ""),
    # MoE: qwen.py Qwen2MoeModel / Qwen3MoeModel(Qwen2MoeModel) and olmo.py OlmoeModel stack
    # mlp.experts.N.{gate,up,down}_proj into mlp.experts.{…}; llama.py LlamaModel stacks Mixtral's
    # block_sparse_moe.experts.N.w{1,2,3} (and permutes q/k as for llama)
    "Qwen2MoeForCausalLM": ("qwen2moe", ""), "Qwen3MoeForCausalLM": ("qwen3moe", ""),
    "OlmoeForCausalLM": ("olmoe", ""), "MixtralForCausalLM": ("llama", "rope"),
    # gpt_oss.py GptOssModel: experts stored fused and (E, in, out), split and transposed there (see _expert_parts)
    "GptOssForCausalLM": ("gpt-oss", ""),
    # deepseek.py DeepseekV2Model (DeepSeek-V2/V3, Kimi-K2): experts stacked as above, kv_b_proj split into
    # k_b/v_b (attention LoRAs there are refused: see UNAPPLIED), q/k rows kept
    "DeepseekV2ForCausalLM": ("deepseek2", ""), "DeepseekV3ForCausalLM": ("deepseek2", ""),
    # glm.py Glm4MoeModel (GLM-4.5/4.6/4.7, GLM-4.5-Air), ernie.py Ernie4_5MoeModel and dots1.py Dots1Model:
    # experts stacked as above, a dense lead layer, shared experts and the router renamed, q/k rows kept
    "Glm4MoeForCausalLM": ("glm4moe", ""), "Ernie4_5_MoeForCausalLM": ("ernie4_5-moe", ""),
    "Dots1ForCausalLM": ("dots1", ""),
    # minimax.py MiniMaxM2Model: block_sparse_moe.experts.N.w{1,2,3} stacked, renames otherwise (partial RoPE
    # from rotary_dim). (command_r.py's Cohere2MoeModel is not here: the gguf package 0.19 has no cohere2moe.)
    "MiniMaxM2ForCausalLM": ("minimax-m2", ""),
    # granite.py GraniteMoeModel(GraniteModel, a LlamaModel: q/k permuted): experts stored 3-D (input_linear,
    # output_linear), input_linear and the shared MLP's split into gate and up (see _expert_parts, _tensors)
    "GraniteMoeForCausalLM": ("granitemoe", "rope"), "GraniteMoeSharedForCausalLM": ("granitemoe", "rope"),
    # glm.py Glm4Model: renames (gate_up_proj stays fused as ffn_up); it permutes q/k only under M-RoPE
    # (rope_parameters.mrope_section), which base_architecture refuses; ernie.py Ernie4_5Model: renames (its
    # split of a fused qkv_proj/up_gate_proj concerns Baidu's own checkpoints, transformers' hold them apart)
    "Glm4ForCausalLM": ("glm4", ""), "Ernie4_5ForCausalLM": ("ernie4_5", ""),
    # mistral3.py Mistral3Model: a ministral3 text model is its Ministral3Model(LlamaModel), q/k permuted
    "Ministral3ForCausalLM": ("mistral3", "rope"),
    # vision-language models whose language model llama.cpp converts as a text model (the vision tower goes to
    # a separate mmproj file, whose LoRAs are not exported): llama.py LlamaModel registers
    # LlavaForConditionalGeneration, gemma.py Gemma3Model Gemma3ForConditionalGeneration; base.py's
    # filter_tensors drops "language_model." from every name, and hparams come from text_config
    "LlavaForConditionalGeneration": ("llama", "rope"), "Gemma3ForConditionalGeneration": ("gemma3", ""),
    # mistral3.py Mistral3Model registers Mistral3ForConditionalGeneration too: a text model of model_type
    # mistral/ministral3 is its Ministral3Model (a LlamaModel); mistral4 (DeepSeek-V2-like) is refused below
    "Mistral3ForConditionalGeneration": ("mistral3", "rope"),
    # qwenvl.py Qwen2VLModel (Qwen2-VL, Qwen2.5-VL) and qwen3vl.py Qwen3VLTextModel(Qwen3Model): renames only; their
    # M-RoPE sections go to the GGUF base, and text alone gets one position per token on every section
    "Qwen2VLForConditionalGeneration": ("qwen2vl", ""), "Qwen2_5_VLForConditionalGeneration": ("qwen2vl", ""),
    "Qwen3VLForConditionalGeneration": ("qwen3vl", ""),
    # qwen3vl.py Qwen3VLMoeTextModel(Qwen3MoeModel): its experts as the Hub stores them, (E, H, 2I) and (E, I, H)
    # (see _expert_parts; transformers 5 saves them (E, 2I, H), which that converter would mis-split: refused)
    "Qwen3VLMoeForConditionalGeneration": ("qwen3vlmoe", ""),
    # llama.py Llama4Model (undo_permute False: q/k rows kept): experts fused on disk, see _expert_parts; it
    # registers Llama4ForConditionalGeneration too (every Llama 4 checkpoint on the Hub), whose language model
    # it converts as this text model (its vision tower goes to an mmproj file: llama4.py Llama4VisionModel)
    "Llama4ForCausalLM": ("llama4", ""), "Llama4ForConditionalGeneration": ("llama4", ""),
    # gemma.py Gemma4Model(Gemma3Model), registered for both classes: renames (no norm shift); its MoE experts
    # stay fused 3-D (ffn_gate_up_exps, ffn_down_exps) and router.per_expert_scale becomes ffn_down_exps.scale,
    # which llama.cpp multiplies into W·x but not into a LoRA's delta (see _tensors)
    "Gemma4ForCausalLM": ("gemma4", ""), "Gemma4ForConditionalGeneration": ("gemma4", ""),
    # qwen.py Qwen3_5TextModel / Qwen3_5MoeTextModel (_LinearAttentionVReorderBase, registered for the causal LMs
    # and the vision-language models): the gated delta net's value heads reordered from grouped to tiled
    # ("v-heads": the value rows of in_proj_qkv, in_proj_z, in_proj_a/b, the columns of out_proj; see v_heads)
    # where there are more value than key heads; full attention and MLPs renamed; MoE experts stacked as Qwen2-MoE's
    "Qwen3_5ForCausalLM": ("qwen35", "v-heads"), "Qwen3_5ForConditionalGeneration": ("qwen35", "v-heads"),
    "Qwen3_5MoeForCausalLM": ("qwen35moe", "v-heads"), "Qwen3_5MoeForConditionalGeneration": ("qwen35moe", "v-heads"),
    # qwen.py Qwen3NextModel(Qwen2MoeModel): the gated delta net's in_proj_qkvz, held per key head [q k v z], split
    # into attn_qkv ([all q; all k; all v]) and attn_gate (all z) (see _tensors); the rest renamed, experts stacked
    "Qwen3NextForCausalLM": ("qwen3next", ""),
    # afmoe.py AfmoeModel(LlamaModel) (Arcee Trinity): its modify_tensors calls ModelBase's, not LlamaModel's, so
    # q/k rows are kept; experts stacked, the attention gate, router and shared experts renamed
    "AfmoeForCausalLM": ("afmoe", ""),
    # jais.py Jais2Model: renames (its rope dimension count written from head_dim)
    "Jais2ForCausalLM": ("jais2", ""),
    # minicpm.py MiniCPM3Model: renames (latent attention: its projections are refused, see UNAPPLIED)
    "MiniCPM3ForCausalLM": ("minicpm3", ""),
    # nemotron.py NemotronHModel(GraniteHybridModel), undo_permute: Mamba-2, attention (q/k permuted) and MoE layers
    # (Nemotron 3 Nano): checkpoint names backbone.layers…mixer…, its experts stacked as model.layers.N.mlp.experts
    # (see write); a dense Nemotron-H is refused in base_architecture
    "NemotronHForCausalLM": ("nemotron_h_moe", "rope"),
    # falcon_h1.py FalconH1Model(Mamba2Model): its µP multipliers folded into the weights (see _falcon_h1_rows)
    "FalconH1ForCausalLM": ("falcon-h1", ""),
    # lfm2.py LFM2Model: renames (the short convolution's in_proj/out_proj, the attention, w1/w2/w3);
    # LFM2MoeModel: the experts (feed_forward.experts.N.w1/w2/w3 on disk) stacked
    "Lfm2ForCausalLM": ("lfm2", ""), "Lfm2MoeForCausalLM": ("lfm2moe", ""),
    # glm.py Glm4MoeLiteModel(DeepseekV2Model) (GLM-4.7-Flash): as deepseek2; SolarOpenModel(Glm4MoeModel)
    "Glm4MoeLiteForCausalLM": ("deepseek2", ""), "SolarOpenForCausalLM": ("glm4moe", ""),
    # granite.py GraniteHybridModel(Mamba2Model, GraniteMoeModel), undo_permute: the attention layers' q/k
    # permuted, the Mamba-2 mixer renamed, experts and the shared MLP split as for granitemoe
    "GraniteMoeHybridForCausalLM": ("granitehybrid", "rope"),
}
# the gguf architectures whose converter is qwen.py's Qwen2MoeModel (its modify_tensors splits fused experts)
QWEN2_MOE = ("qwen2moe", "qwen3moe", "qwen3next", "qwen35moe")
GRANITE_MOE = ("granitemoe", "granitehybrid")  # granite.py's split of input_linear into gate and up halves
ROWS = dict(ARCHITECTURES.values())  # gguf architecture -> its row reordering (one per gguf architecture)
PERMUTED = {arch for arch, rows in ROWS.items() if rows == "rope"}  # gguf archs whose q/k rows are permuted
# gguf tensors that llama.cpp's graph of an architecture multiplies with a plain ggml_mul_mat, not through
# build_lora_mm: a LoRA there would load and be dropped without a word, so the export refuses it. Read off
# llama-cpp-python 0.3.36's vendor/llama.cpp/src/models/*.cpp (the other exported architectures apply a LoRA
# on every tensor they map)
UNAPPLIED = {
    # deepseek2.cpp: wq_a, wq_b and wq (q_proj when q_lora_rank is null), wkv_a_mqa, wkv_b, wk_b and wv_b
    # (the converter's split of kv_b_proj; wv_b goes in as build_attn_mha's v_mla) and the output head
    "deepseek2": {"attn_q_a", "attn_q_b", "attn_q", "attn_kv_a_mqa", "attn_kv_b", "attn_k_b", "attn_v_b", "output"},
    # gemma4.cpp: the per-layer inputs' projection (project_per_layer_inputs) and their embedding (get_rows)
    "gemma4": {"per_layer_model_proj", "per_layer_token_embd"},
    # minicpm3.cpp: wq_a, wq_b, wkv_a_mqa and wkv_b (its latent attention's projections)
    "minicpm3": {"attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_kv_b"},
    # nemotron-h-moe.cpp: the latent MoE projections (Nemotron 3 Super)
    "nemotron_h_moe": {"ffn_latent_down", "ffn_latent_up"},
    # qwen35.cpp, qwen35moe.cpp: the gated delta net's short convolution (ggml_ssm_conv)
    "qwen35": {"ssm_conv1d"}, "qwen35moe": {"ssm_conv1d"}, "qwen3next": {"ssm_conv1d"},
}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise AdaptkitError("GGUF needs the gguf package: pip install 'adaptkit[gguf]'") from None
    return gguf


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf ``permute``: reorder q/k rows from HF's rotate-half RoPE layout."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def neox_qkv_rows(w: torch.Tensor, n_head: int, inverse: bool = False) -> torch.Tensor:
    """gptneox.py's regrouping of query_key_value's rows: HF holds them per head [q k v] (n_head, 3,
    head_dim), llama.cpp [Q; K; V] (3, n_head, head_dim); ``inverse`` goes back."""
    head_dim = w.shape[0] // n_head // 3
    shape = (3, n_head, head_dim) if inverse else (n_head, 3, head_dim)
    return w.reshape(*shape, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


def falcon_qkv_rows(w: torch.Tensor, n_head: int, n_kv: int, inverse: bool = False) -> torch.Tensor:
    """falcon.py's regrouping of query_key_value's rows: HF holds n_kv groups of [n_head/n_kv queries,
    one key, one value] (n_kv, n_head/n_kv + 2, head_dim), llama.cpp [Q; K; V]; ``inverse`` goes back."""
    group = n_head // n_kv
    head_dim = w.shape[0] // (n_head + 2 * n_kv)
    rest = w.shape[1:]
    if not inverse:
        g = w.reshape(n_kv, group + 2, head_dim, *rest)
        return torch.cat([g[:, :group].reshape(-1, *rest), g[:, group].reshape(-1, *rest),
                          g[:, group + 1].reshape(-1, *rest)])
    q, k, v = w.split([n_head * head_dim, n_kv * head_dim, n_kv * head_dim])
    g = torch.cat([q.reshape(n_kv, group, head_dim, *rest), k.reshape(n_kv, 1, head_dim, *rest),
                   v.reshape(n_kv, 1, head_dim, *rest)], 1)
    return g.reshape(w.shape)


def falcon_kv_heads(config: dict, n_head: int, path=None) -> int:
    """The key/value heads falcon.py's converter reshapes query_key_value by (``num_kv_heads``, else
    ``n_head_kv``, else 1), refused when transformers' Falcon lays the weight out by another count
    (multi-query without new_decoder_architecture has one, whatever num_kv_heads says): llama.cpp's
    GGUF of that base would be wrong already. ``n_head``: the attention heads (:func:`sizes`)."""
    c = text_config(config)
    llama_cpp = c.get("num_kv_heads") or c.get("n_head_kv") or 1
    if c.get("new_decoder_architecture"):
        hf = c.get("num_kv_heads") or n_head
    else:
        hf = 1 if c.get("multi_query", True) else n_head
    if llama_cpp != hf or not isinstance(llama_cpp, int) or n_head % llama_cpp:
        raise AdaptkitError(f"config.json: llama.cpp's Falcon converter reshapes query_key_value by {llama_cpp} "
                            f"key/value heads, transformers' Falcon lays it out by {hf} (multi_query "
                            f"{c.get('multi_query')}, new_decoder_architecture {c.get('new_decoder_architecture')}): "
                            "its GGUF of this base would be wrong, so the LoRA is not exported (merge instead)", path)
    return llama_cpp


def v_heads(t: torch.Tensor, dim: int, linear: tuple[int, int, int, int], head: int,
            inverse: bool = False) -> torch.Tensor:
    """qwen.py _LinearAttentionVReorderBase._reorder_v_heads: the value heads of a gated-delta-net
    projection along ``dim``, held by HF grouped by key head (n_k, n_v/n_k, ``head``), laid out by
    llama.cpp tiled (n_v/n_k, n_k, ``head``); ``linear`` as :func:`linear_heads`; ``inverse`` goes back."""
    n_k, n_v = linear[:2]
    groups = (n_v // n_k, n_k) if inverse else (n_k, n_v // n_k)
    shape = list(t.shape)
    return t.reshape(*shape[:dim], *groups, head, *shape[dim + 1:]).transpose(dim, dim + 1).reshape(shape)


def linear_heads(config: dict, path=None) -> tuple[int, int, int, int] | None:
    """A Qwen3.5 gated delta net's (key heads, value heads, key head dim, value head dim) where the
    value heads outnumber the key heads (llama.cpp's converter reorders them then), else None."""
    c = text_config(config)
    sizes = [c.get(k) for k in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                                "linear_value_head_dim")]
    if not sizes[0] or not sizes[1] or sizes[0] == sizes[1]:
        return None
    if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in sizes) or sizes[1] % sizes[0]:
        raise AdaptkitError(f"config.json: linear_num_key_heads, linear_num_value_heads, linear_key_head_dim, "
                            f"linear_value_head_dim are {sizes}: not positive whole numbers with the value heads a "
                            "multiple of the key heads", path)
    return tuple(sizes)


def qkvz_rows(config: dict, path=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-Next's in_proj_qkvz rows, held per key head [q (dk), k (dk), v (nv/nk·dv), z (nv/nk·dv)]:
    the rows qwen.py's Qwen3NextModel.modify_tensors makes attn_qkv of ([all q; all k; all v]) and
    attn_gate of (all z), in that order."""
    c = text_config(config)
    sizes = [c.get(k) for k in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                                "linear_value_head_dim")]
    if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in sizes) or sizes[1] % sizes[0]:
        raise AdaptkitError(f"config.json: linear_num_key_heads, linear_num_value_heads, linear_key_head_dim, "
                            f"linear_value_head_dim are {sizes}: not positive whole numbers with the value heads a "
                            "multiple of the key heads", path)
    n_k, n_v, d_k, d_v = sizes
    v = n_v // n_k * d_v
    rows = torch.arange(n_k * (2 * d_k + 2 * v)).reshape(n_k, 2 * d_k + 2 * v)
    q, k, vv, z = rows.split([d_k, d_k, v, v], dim=1)
    return torch.cat([q.reshape(-1), k.reshape(-1), vv.reshape(-1)]), z.reshape(-1)


def reorder_cols(a: torch.Tensor, tensor: str, rows: str, linear=None, inverse: bool = False) -> torch.Tensor:
    """lora_A of gguf ``tensor`` with its columns ordered as llama.cpp's converter orders that
    weight's (only a gated delta net's ssm_out, whose input is the value heads: see :func:`v_heads`)."""
    kind = tensor.split(".")[2] if tensor.startswith("blk.") else ""
    if rows == "v-heads" and linear and kind == "ssm_out":
        return v_heads(a, a.dim() - 1, linear, linear[3], inverse)
    return a


def reorder_rows(b: torch.Tensor, tensor: str, rows: str, n_head: int, n_kv: int,
                 inverse: bool = False, linear=None) -> torch.Tensor:
    """lora_B of gguf ``tensor`` (``blk.N.attn_q``…) with its rows ordered as llama.cpp's converter
    orders that weight (``rows`` as in :data:`ARCHITECTURES`; ``linear``: :func:`linear_heads`, for
    "v-heads"); ``inverse`` goes back to HF's order."""
    kind = tensor.split(".")[2] if tensor.startswith("blk.") else ""
    if rows == "v-heads" and linear:
        n_k, _, d_k, d_v = linear
        if kind == "attn_qkv":  # in_proj_qkv: q and k kept, the value rows reordered
            qk = 2 * n_k * d_k
            return torch.cat([b[:qk], v_heads(b[qk:], 0, linear, d_v, inverse)])
        if kind in ("attn_gate", "ssm_alpha", "ssm_beta"):  # in_proj_z (a value head each), in_proj_a/b (one row)
            return v_heads(b, 0, linear, d_v if kind == "attn_gate" else 1, inverse)
        return b
    if rows == "rope" and kind in ("attn_q", "attn_k"):
        return (unpermute_rows if inverse else permute_rows)(b, n_head if kind == "attn_q" else n_kv)
    if rows == "neox-qkv" and kind == "attn_qkv":
        return neox_qkv_rows(b, n_head, inverse)
    if rows == "falcon-qkv" and kind == "attn_qkv":
        return falcon_qkv_rows(b, n_head, n_kv, inverse)
    return b


def text_config(config: dict) -> dict:
    """The language model's hyper-parameters: a vision-language config's ``text_config`` over its top
    level (what llama.cpp's converter reads for the text model)."""
    inner = config.get("text_config")
    return {**config, **inner} if isinstance(inner, dict) else config


def sizes(config: dict, path=None) -> tuple[int, int, int]:
    """The language model's (layers, attention heads, key/value heads), under the names its config.json
    uses: where the standard ones are absent, the names transformers' config class of that model type maps
    them to (its ``attribute_map``: GPT-2's and GPTBigCode's n_layer, n_head)."""
    text = text_config(config)
    try:
        from transformers import CONFIG_MAPPING

        alias = dict(getattr(CONFIG_MAPPING[str(text.get("model_type"))], "attribute_map", {}))
    except (ImportError, KeyError):
        alias = {}

    def get(name):
        value = text.get(name)
        return text.get(alias[name]) if value is None and name in alias else value

    def whole(name, default=0):
        value = get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise AdaptkitError(f"config.json: {alias.get(name, name) if text.get(name) is None else name} is "
                                f"{value!r}, not a whole number", path)
        return value

    n_head = whole("num_attention_heads")
    n_layers = whole("num_hidden_layers")
    if not n_layers:  # Nemotron-H's config.json holds only its layers' kinds (transformers counts them)
        kinds = text.get("layers_block_type") or text.get("hybrid_override_pattern")
        n_layers = len(kinds) if isinstance(kinds, (list, str)) else 0
    return n_layers, n_head, whole("num_key_value_heads", n_head) or n_head


def row_sizes(config: dict, rows: str, path=None) -> tuple[int, int, int]:
    """:func:`sizes`, with the key/value heads Falcon's rows are regrouped by (:func:`falcon_kv_heads`)
    for ``rows`` "falcon-qkv" (:data:`ARCHITECTURES`)."""
    n_layers, n_head, n_kv = sizes(config, path)
    return n_layers, n_head, falcon_kv_heads(config, n_head, path) if rows == "falcon-qkv" else n_kv


def gguf_module(name: str) -> str:
    """The checkpoint-style name llama.cpp's converter maps for an adapter module (base.py
    filter_tensors: ``language_model.`` dropped, as a VLM's language model is converted alone)."""
    return name.replace("language_model.", "")


def base_architecture(config: dict, path) -> tuple[str, str]:
    """The gguf architecture of a base config and how its attention rows are reordered (see
    :data:`ARCHITECTURES`); a config without ``architectures`` is told by its ``model_type``, through
    transformers' own table of causal LMs."""
    from ..architecture import named_class

    arch, model_type = named_class(config), config.get("model_type")
    if arch is None and config.get("architectures"):
        raise AdaptkitError(f"config.json: architectures is {config['architectures']!r}, not a list of class names",
                            path)
    if not arch and model_type:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(str(model_type))
    if arch not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        what = arch or (f"of model_type {model_type!r}, which names no causal LM of transformers" if model_type
                        else "of unknown architecture")
        raise AdaptkitError(f"GGUF export supports {supported}; the base is {what}", path)
    if arch == "Mistral3ForConditionalGeneration" and text_config(config).get("model_type") == "mistral4":
        raise AdaptkitError("config.json: a Mistral 3 vision-language model with a mistral4 language model, which "
                            "llama.cpp converts as its DeepSeek-V2-like Mistral4Model (not checked): not exported to "
                            "GGUF (merge instead)", path)
    if arch == "NemotronHForCausalLM":
        layers = text_config(config).get("hybrid_override_pattern") or text_config(config).get("layers_block_type") or ""
        if "E" not in layers and "moe" not in layers:
            raise AdaptkitError("config.json: a Nemotron-H without MoE layers, which llama.cpp's converter (reading the "
                                "config through transformers 5, whose defaults hold num_experts_per_tok) makes a "
                                "nemotron_h_moe GGUF of that llama.cpp cannot load: not exported (merge instead)", path)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if ARCHITECTURES[arch][0] == "glm4" and isinstance(rope, dict) and "mrope_section" in rope:
        raise AdaptkitError("config.json: a GLM-4 with M-RoPE (rope mrope_section), whose q/k rows llama.cpp's "
                            "converter re-lays out: not exported to GGUF (merge instead)", path)
    return ARCHITECTURES[arch]


_EXPERT = re.compile(r"\.experts\.(\d+)(?=\.)")  # a per-expert tensor or module: ….experts.3.gate_proj


def _stacked(name: str) -> tuple[str, int | None]:
    """The name llama.cpp's converter gives the stack of a per-expert tensor or module (the expert
    index dropped, as its MoE models' modify_tensors build ``merged_name``) and the expert; a name
    of no single expert unchanged, with None."""
    m = _EXPERT.search(name)
    return (name[: m.start()] + ".experts" + name[m.end():], int(m.group(1))) if m else (name, None)


def _layer(name: str) -> int:
    found = re.search(r"\.layers\.(\d+)\.", name)
    if found is None:
        raise AdaptkitError(f"{name}: not in a numbered layer")
    return int(found.group(1))


def _halves(gate: str, up: str, half: int, swap: bool) -> list[tuple[str, int, slice, slice, bool]]:
    """:func:`_expert_parts` of a gate_up parameter the converter splits in halves, gate first: each
    of ``gate`` and ``up`` takes its half of every expert's ΔW rows (of its transpose when ``swap``)."""
    every = slice(None)
    return [(gate, -1, slice(0, half), every, swap), (up, -1, slice(half, None), every, swap)]


def _expert_parts(m, base, arch: str | None, path,
                  runtime: str = "GGUF") -> list[tuple[str, int, slice, slice, bool]]:
    """Where a LoRA on a 3-D expert parameter lands on the checkpoint's own tensors, as llama.cpp's
    converter (``arch``: its architecture) and the runtimes reading experts apart (``runtime``, for the
    messages) see them: each (checkpoint tensor it becomes, without ``.weight``; expert, or -1 for all;
    rows of ΔW (B's); columns (A's); whether that ΔW is the LoRA's transposed, A' = Bᵀ and B' = Aᵀ,
    rows and columns then taken of those)."""
    from ..plan import _expert_orientation, expert_parameters, renames

    shapes, fused = expert_parameters(base)
    shape = shapes.get(m.weight_name)
    every = slice(None)
    if shape is None or len(shape) != 3 or shape[0] != m.experts:
        raise AdaptkitError(f"{m.name}: the base has no expert parameter of {m.experts} experts there", path)
    transposed = _expert_orientation(m, tuple(shape[1:]), base)
    stored = m.weight_name in base.tensors
    if not stored and m.weight_name not in fused:  # stored 3-D under another name (transformers renames it)
        disk = renames(base).get(m.weight_name)
        if disk is not None and tuple(base.info(disk).shape) == tuple(shape):
            stem = disk.removesuffix(".weight")
            if arch in GRANITE_MOE and transposed is False and stem.endswith("block_sparse_moe.input_linear"):
                # granite.py GraniteMoeModel.modify_tensors: input_linear (E, 2I, H) split in halves along
                # its rows, gate first, into ffn_gate_exps and ffn_up_exps (the gguf names it writes)
                bid = _layer(stem)
                return _halves(f"blk.{bid}.ffn_gate_exps", f"blk.{bid}.ffn_up_exps", shape[1] // 2, False)
            if transposed is False and not stem.endswith("input_linear"):
                return [(stem, -1, every, every, False)]  # output_linear (E, H, I): ffn_down_exps as it is
            raise AdaptkitError(f"{m.name}: the base stores these experts as {disk}, whose layout llama.cpp's "
                                f"converter for {arch or 'this model'} was not checked for: not exported to "
                                f"{runtime} (merge instead)", path)
    if arch == "gpt-oss" and stored and transposed:
        # gpt_oss.py GptOssModel.modify_tensors: gate_up_proj (E, H, 2I) transposed, gate = rows ::2, up = rows
        # 1::2 (interleaved); down_proj (E, I, H) transposed. ΔW is (out, in) already: the same rows.
        stem = m.weight_name.removesuffix(".weight")
        if stem.endswith("gate_up_proj"):
            root = stem.removesuffix("gate_up_proj")
            return [(root + "gate_proj", -1, slice(0, None, 2), every, False),
                    (root + "up_proj", -1, slice(1, None, 2), every, False)]
        return [(stem, -1, every, every, False)]
    if arch == "qwen3vlmoe" and stored and transposed:
        # qwen3vl.py Qwen3VLMoeTextModel.modify_tensors: gate_up_proj as the Hub stores it, (E, H, 2I), split
        # in halves on its last dimension (gate first) and transposed; down_proj (E, I, H) transposed. ΔW is
        # (out, in) already (transformers transposes these on load: peft's LoRA is in that layout)
        stem = m.weight_name.removesuffix(".weight")
        if stem.endswith("gate_up_proj"):
            root = stem.removesuffix("gate_up_proj")
            return _halves(root + "gate_proj", root + "up_proj", shape[2] // 2, False)
        return [(stem, -1, every, every, False)]
    if arch == "qwen3vlmoe" and stored:
        raise AdaptkitError(f"{m.name}: the base stores these experts in transformers' own layout (E, out, in), "
                            "not the Hub's (E, in, out) that llama.cpp's qwen3vl.py converter transposes: its "
                            "GGUF base would be wrong, so no LoRA is exported for it (merge instead)", path)
    if arch == "llama4" and stored and transposed is False:
        # llama4.py Llama4Model.modify_tensors: gate_up_proj (E, H, 2I) transposed and split in halves (gate
        # first), down_proj (E, I, H) transposed. transformers does not mark these experts is_transposed, so
        # peft's LoRA is in the parameter's own orientation ((H, 2I) per expert): llama.cpp's ΔW is its transpose
        stem = m.weight_name.removesuffix(".weight")
        if stem.endswith("gate_up_proj"):
            root = stem.removesuffix("gate_up_proj")
            return _halves(root + "gate_proj", root + "up_proj", shape[2] // 2, True)
        return [(stem, -1, every, every, True)]
    if transposed is not False:
        raise AdaptkitError(f"{m.name}: the base stores these experts as (E, in, out), which is re-laid out per "
                            f"model ({arch or 'this model'} not checked): not exported to {runtime} (merge instead)",
                            path)
    if stored:  # stored 3-D as in memory
        stem = m.weight_name.removesuffix(".weight")
        if stem.endswith("mlp.experts.gate_up_proj") and arch in QWEN2_MOE:
            # qwen.py Qwen2MoeModel.modify_tensors: mlp.experts.gate_up_proj (E, 2I, H) split in halves along its
            # rows, gate first (Qwen3.5-MoE's Hub checkpoints store their experts so)
            root = stem.removesuffix("gate_up_proj")
            return _halves(root + "gate_proj", root + "up_proj", shape[1] // 2, False)
        if stem.endswith("gate_up_proj") and arch != "gemma4":  # gemma4 keeps it: ffn_gate_up_exps
            raise AdaptkitError(f"{m.name}: a base storing gate and up fused is laid out per model (split or kept): "
                                f"not exported to {runtime} (merge instead)", path)
        return [(stem, -1, every, every, False)]
    sources = fused.get(m.weight_name)
    if not sources:
        raise AdaptkitError(f"{m.name}: cannot tell which on-disk tensors hold this parameter", path)
    from ..architecture import part_spans

    out = []
    for (disk, e, _, _, concat), span in zip(sources, part_spans(sources, lambda n: base.info(n).shape)):
        cut = slice(*span) if span is not None else every
        out.append((disk.removesuffix(".weight"), -1 if e is None else e, cut if concat == 1 else every,
                    cut if concat == 2 else every, False))
    return out


def per_expert_pairs(m, base, runtime: str, path):
    """Each expert's (on-disk module, expert, A_e (r, in), sₘ·B_e (out, r)) of a LoRA on a 3-D expert
    parameter, for runtimes that read experts as a checkpoint stores them apart (vLLM, mlx-lm); a base
    storing them fused is refused, naming ``runtime``."""
    if m.weight_name in base.tensors:
        raise AdaptkitError(f"{m.name}: the base stores these experts fused (gpt-oss…), which {runtime} reads in "
                            "its 3-D layout, not written by adaptkit: merge instead", path)
    a3, b3 = lora.expert_factors(m.A.to(torch.float32), m.B.to(torch.float32), m.experts)
    for disk, e, rows, cols, _ in _expert_parts(m, base, None, path, runtime):  # (never swapped without arch)
        if e == -1:  # stored 3-D under another name (GraniteMoe's output_linear)
            raise AdaptkitError(f"{m.name}: the base stores these experts fused as {disk}, which {runtime} reads "
                                "in its 3-D layout, not written by adaptkit: merge instead", path)
        yield disk, e, a3[e][:, cols], m.scaling * b3[:, :, e][rows]


def _expert_output_scale(base, arch: str, name: str, path) -> torch.Tensor | None:
    """The per-expert factor llama.cpp multiplies into W·x of ``name``'s experts but not into a LoRA's delta,
    which transformers applies to the whole expert output: folded into B so llama.cpp's sum is transformers'.
    gemma4: router.per_expert_scale (E,), which the converter writes as ffn_down_exps.scale and gemma4.cpp
    passes to build_lora_mm_id as down_exps_s (llama-graph.cpp scales ggml_mul_mat_id's result only)."""
    if arch != "gemma4" or not name.endswith("experts.down_proj"):
        return None
    scale = name.removesuffix("experts.down_proj") + "router.per_expert_scale"
    if scale not in base.tensors:
        raise AdaptkitError(f"{name}: the base has no {scale}, which llama.cpp's gemma4 scales these experts by",
                            path)
    return base.read(scale).to(torch.float32)


def falcon_h1_ssm_rows(config: dict, n_rows: int, path) -> torch.Tensor:
    """Falcon-H1's ssm_multipliers spread over the rows of a Mamba-2 in_proj, segments [z x B C dt] of
    mamba_d_ssm, mamba_d_ssm, n_groups·d_state, n_groups·d_state and the rest (the heads)."""
    sizes = [config.get(k) for k in ("mamba_d_ssm", "mamba_n_groups", "mamba_d_state")]
    factors = config.get("ssm_multipliers")
    if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in sizes) or \
            not isinstance(factors, list) or len(factors) != 5:
        raise AdaptkitError(f"config.json: Falcon-H1's mamba_d_ssm, mamba_n_groups, mamba_d_state are {sizes} and "
                            f"ssm_multipliers {factors!r}: not the sizes and five factors of its in_proj", path)
    inner, state = sizes[0], sizes[1] * sizes[2]
    bounds = [0, inner, 2 * inner, 2 * inner + state, 2 * inner + 2 * state, n_rows]
    rows = torch.ones(n_rows)
    for i, factor in enumerate(factors):
        rows[bounds[i]:bounds[i + 1]] = float(factor)
    return rows


def _falcon_h1_rows(module: str, b: torch.Tensor, config: dict, path) -> torch.Tensor:
    """lora_B of a Falcon-H1 module with the µP multipliers falcon_h1.py's FalconH1Model.modify_tensors
    multiplies into that weight (matched on the name as it matches them, in its order), where transformers
    multiplies the module's input or output by them: llama.cpp then adds m·ΔW, as transformers computes."""
    c = text_config(config)

    def get(key):
        value = c.get(key)
        if value is None:
            raise AdaptkitError(f"config.json: Falcon-H1 without {key}, which llama.cpp's converter multiplies into "
                                "the weights", path)
        return value

    if "down_proj" in module:
        return b * get("mlp_multipliers")[1]
    if "gate_proj" in module:
        return b * get("mlp_multipliers")[0]
    if "k_proj" in module:
        return b * (get("key_multiplier") * get("attention_in_multiplier"))
    if "q_proj" in module or "v_proj" in module:
        return b * get("attention_in_multiplier")
    if "o_proj" in module:
        return b * get("attention_out_multiplier")
    if "out_proj" in module:
        return b * get("ssm_out_multiplier")
    if "in_proj" in module:  # and each of its row segments [z, x, B, C, dt] by its own ssm_multipliers entry
        return b * get("ssm_in_multiplier") * falcon_h1_ssm_rows(c, b.shape[0], path)[:, None]
    if "lm_head" in module:
        return b * get("lm_head_multiplier")
    if "embed_tokens" in module:
        return b * get("embedding_multiplier")
    return b


def _tensors(adapter: Adapter, base, base_config: dict, arch: str, alpha: float, base_path) -> dict[str, tuple]:
    """Every (a, b) llama.cpp reads, by the checkpoint name it converts, in llama.cpp's orientation and
    with llama.cpp's one scale (alpha / rank of the tensor) folded in: 2-D (r, in), (out, r); experts
    stacked (E, r, in), (E, out, r). Errors about the base name ``base_path``, about the adapter its own."""
    plain: dict[str, tuple] = {}  # checkpoint name (or, where the converter writes one itself, gguf name) -> (a, b)
    stacks: dict[str, dict[int, tuple]] = {}  # stacked name -> expert -> (A_e, s_e·B_e)
    experts = {}  # stacked name -> E
    for m in adapter.modules.values():
        a, b = m.A.to(torch.float32), m.B.to(torch.float32)
        if m.param and m.experts > 1:
            if base is None:
                raise AdaptkitError("LoRAs on MoE experts need the base model itself for GGUF: give base", adapter.path)
            a3, b3 = lora.expert_factors(a, b, m.experts)  # (E, r, in), (out, r, E)
            for disk, e, rows, cols, swap in _expert_parts(m, base, arch, base_path):
                name, _ = _stacked(disk)
                scale = _expert_output_scale(base, arch, name, base_path)
                for k in (range(m.experts) if e == -1 else [e]):
                    a_k, b_k = (b3[:, :, k].T, a3[k].T) if swap else (a3[k], b3[:, :, k])
                    a_e, b_e = a_k[:, cols], b_k[rows]
                    stacks.setdefault(name, {})[k] = (a_e, m.scaling * (b_e if scale is None else scale[k] * b_e))
                experts[name] = m.experts
            continue
        module = m.name.removesuffix(".weight") if m.param else m.name  # a 2-D parameter (Qwen2-MoE's router)
        if base is not None:  # renamed on load (GraniteMoe's router)
            from ..plan import disk_module

            module = disk_module(base, module)
        if arch in GRANITE_MOE and module.endswith("shared_mlp.input_linear"):
            # granite.py: the shared MLP's input_linear (2S, H) split in halves along its rows, gate first,
            # into ffn_{gate,up}_shexp (ffn_{gate,up} in a model without experts); A is each half's own
            half, bid = b.shape[0] // 2, _layer(module)
            shexp = "_shexp" if text_config(base_config).get("num_local_experts") else ""
            for part, rows in (("gate", slice(0, half)), ("up", slice(half, None))):
                plain[f"blk.{bid}.ffn_{part}{shexp}"] = (a, lora.fold(b[rows], m.scaling, alpha / m.shape_rank))
            continue
        if arch == "qwen3next" and module.endswith("linear_attn.in_proj_qkvz"):
            # qwen.py Qwen3NextModel.modify_tensors: regrouped and split into attn_qkv and attn_gate; A is both's
            qkv, z = qkvz_rows(base_config, base_path)
            bid = _layer(module)
            for part, rows in (("attn_qkv", qkv), ("attn_gate", z)):
                plain[f"blk.{bid}.{part}"] = (a, lora.fold(b[rows], m.scaling, alpha / m.shape_rank))
            continue
        if arch == "falcon-h1":  # its converter folds the µP multipliers into the weights: B carries them too
            b = _falcon_h1_rows(module, b, base_config, base_path)
        if m.kind == "embedding":  # token_embd: llama.cpp adds scale · B · A[token] (get_rows of A, (vocab, r))
            plain[module] = (a.T.contiguous(), lora.fold(b, m.scaling, alpha / m.shape_rank))
            continue
        name, e = _stacked(module)
        if e is not None:
            stacks.setdefault(name, {})[e] = (a, m.scaling * b)
            cfg = text_config(base_config)
            experts[name] = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
            continue
        plain[module] = (a, lora.fold(b, m.scaling, alpha / m.shape_rank))
    for name, parts in stacks.items():
        count = experts[name]
        if count < max(parts) + 1:
            raise AdaptkitError(f"{name}: LoRAs on expert {max(parts)}, but the base config has {count} experts", adapter.path)
        r = max(a_e.shape[0] for a_e, _ in parts.values())
        (a0, b0) = next(iter(parts.values()))
        if any(a_e.shape[1] != a0.shape[1] or b_e.shape[0] != b0.shape[0] for a_e, b_e in parts.values()):
            raise AdaptkitError(f"{name}: the experts' LoRAs differ in shape", adapter.path)
        a3 = torch.zeros(count, r, a0.shape[1])
        b3 = torch.zeros(count, b0.shape[0], r)
        for e, (a_e, sb_e) in parts.items():  # zero rows/columns past an expert's own rank: exact
            a3[e, : a_e.shape[0]] = a_e
            b3[e, :, : a_e.shape[0]] = sb_e / (alpha / r)
        plain[name] = (a3, b3)
    return plain


def write(adapter: Adapter, out: Path, *, base_config: dict, outtype: str = "f32", base_path=None, base=None,
          **_) -> dict:
    """Write ``adapter`` as a llama.cpp LoRA; return the metadata written. ``base`` (the base
    :class:`~adaptkit.io.checkpoint.Checkpoint`) places LoRAs on MoE expert parameters."""
    from ..readiness import require

    gguf = _gguf()
    arch_name, rows = base_architecture(base_config, base_path)
    require(adapter, "llamacpp")
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name)
    n_layers, n_head, n_kv = row_sizes(base_config, rows, base_path)
    linear = linear_heads(base_config, base_path) if rows == "v-heads" else None
    names = gguf.get_tensor_name_map(arch, n_layers)
    mods = list(adapter.modules.values())
    ranks = {m.shape_rank // m.experts for m in mods}
    alpha = float(adapter.config.get("lora_alpha") or next(iter(ranks)))
    tensors = _tensors(adapter, base, base_config, arch_name, alpha, base_path)
    dtype = {"f32": np.float32, "f16": np.float16, "bf16": None}[outtype]
    gnames = {}
    for module in tensors:
        gname = module if module.startswith("blk.") else names.get_name(gguf_module(module))
        if gname is None and arch_name == "lfm2moe":  # lfm2.py names its expert stacks without "model."
            gname = names.get_name(gguf_module(module).removeprefix("model."))
        if gname is None and arch_name == "nemotron_h_moe":  # nemotron.py stacks backbone…mixer.experts.* so
            gname = names.get_name(re.sub(r"^backbone\.layers\.(\d+)\.mixer\.experts\.", r"model.layers.\1.mlp.experts.",
                                          module))
        if gname is None and "text_config" in base_config and "language_model." not in module:
            raise AdaptkitError(f"{module} is outside the language model, which is all llama.cpp's converter makes a "
                                "text model of (a vision tower goes to a separate mmproj file): its LoRA is not "
                                "exported to GGUF (merge instead)", adapter.path)
        if gname is None:
            raise AdaptkitError(f"gguf has no name for module {module} in {arch_name}", adapter.path)
        kind = gname.split(".")[2] if gname.startswith("blk.") else gname
        if kind in UNAPPLIED.get(arch_name, ()):
            raise AdaptkitError(f"{module}: llama.cpp's {arch_name} graph multiplies {gname} without its LoRA "
                                f"(src/models/{arch_name}.cpp: ggml_mul_mat, not build_lora_mm), so this adapter "
                                "would run without that delta (fix: adaptkit merge BASE ADAPTER -o MERGED and convert "
                                "the merged model)", adapter.path)
        gnames[module] = gname
    writer = gguf.GGUFWriter(str(out), arch_name)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    writer.add_string("general.name", Path(str(adapter.path)).name)
    if adapter.alora_tokens:  # llama.cpp's llama-adapter.cpp reads them as a UINT32 array (PR #15327)
        writer.add_key_value("adapter.alora.invocation_tokens", [int(t) for t in adapter.alora_tokens],
                             gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT32)
    for module, (a, b) in tensors.items():
        gname = gnames[module]
        a, b = reorder_cols(a, gname, rows, linear), reorder_rows(b, gname, rows, n_head, n_kv, linear=linear)
        for suffix, t in (("lora_a", a), ("lora_b", b)):
            name = f"{gname}.weight.{suffix}"
            if outtype == "bf16":
                data = gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType.BF16)
                writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType.BF16)  # shape from the bytes
            else:
                writer.add_tensor(name, t.numpy().astype(dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"general.architecture": arch_name, "adapter.lora.alpha": alpha, "tensors": 2 * len(tensors)}


def read_gguf_deltas(path: Path, base_config: dict) -> dict[str, torch.Tensor]:
    """ΔW per gguf tensor name as llama.cpp computes it (alpha / rank · B·A, per expert on a 3-D
    ``*_exps`` tensor), q/k rows un-permuted back to HF order: for tests and checks."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    fields = {f.name: f for f in reader.fields.values()}
    alpha = float(fields["adapter.lora.alpha"].parts[fields["adapter.lora.alpha"].data[0]][0])
    arch = bytes(fields["general.architecture"].parts[fields["general.architecture"].data[0]]).decode()
    _, n_head, n_kv = row_sizes(base_config, ROWS.get(arch, ""))
    linear = linear_heads(base_config) if ROWS.get(arch) == "v-heads" else None
    t = {}
    for tensor in reader.tensors:
        data = torch.from_numpy(np.array(tensor.data)).float()
        if tensor.tensor_type == gguf.GGMLQuantizationType.BF16:
            data = torch.from_numpy(np.array(tensor.data)).view(torch.int16).view(torch.bfloat16).float()
        shape = tuple(int(x) for x in reversed(tensor.shape))  # gguf lists ne (innermost first)
        t[tensor.name] = data.reshape(shape)
    out = {}
    for name in t:
        if name.endswith(".lora_a"):
            stem = name[: -len(".lora_a")]
            a, b = t[name], t[stem + ".lora_b"]
            if stem.startswith("token_embd"):  # stored (vocab, r): A[token] rows, see write
                a = a.T
            b = reorder_rows(b, stem, ROWS[arch], n_head, n_kv, inverse=True, linear=linear)
            a = reorder_cols(a, stem, ROWS[arch], linear, inverse=True)
            out[stem] = (alpha / a.shape[-2]) * (b @ a)  # canonical (out, in) ((E, out, in) for experts)
    return out
