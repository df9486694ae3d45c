"""llama.cpp LoRA adapters (GGUF), written with the ``gguf`` package.

llama.cpp (``llama-adapter.cpp``) scales each adapted tensor by ``alpha / rank`` with one
``adapter.lora.alpha`` for the whole file and ``rank`` read from each tensor's shape. A PEFT adapter
can have per-module ranks, alphas and rsLoRA, so each module's own scaling sₘ is folded into its
lora_b: lora_b' = lora_b · sₘ / (alpha / rₘ). Tensors keep PEFT's shapes (lora_a r × in, lora_b
out × r) under gguf's own names (``blk.0.attn_q.weight.lora_a``). For llama-family models the
converter permutes the rows of q and k for RoPE; lora_b's rows get the same permutation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import lora
from ..adapter import Adapter
from ..errors import AdaptkitError

# HF architectures -> gguf architecture name; True where q/k rows are permuted (llama's RoPE layout)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True), "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False), "GemmaForCausalLM": ("gemma", False),
    "Gemma2ForCausalLM": ("gemma2", False), "Phi3ForCausalLM": ("phi3", False),
    # llama.cpp's converter (llama-cpp-python 0.3.36's vendor/llama.cpp/conversion: qwen.py Qwen3Model,
    # gemma.py Gemma3Model, granite.py GraniteModel(LlamaModel), which permutes q/k as llama does)
    "Qwen3ForCausalLM": ("qwen3", False), "Gemma3ForCausalLM": ("gemma3", False),
    "GraniteForCausalLM": ("granite", True),
}
PERMUTED = {arch for arch, permute in ARCHITECTURES.values() if permute}  # gguf archs whose q/k rows are permuted


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


MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "phi3": "Phi3ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "granite": "GraniteForCausalLM"}


def base_architecture(config: dict, path) -> tuple[str, bool]:
    """The gguf architecture of a base config and whether its q/k rows are permuted; a config
    without ``architectures`` is told by its ``model_type``."""
    arch = (config.get("architectures") or [None])[0] or MODEL_TYPES.get(str(config.get("model_type")))
    if arch not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise AdaptkitError(f"GGUF export supports {supported}; the base is {arch or 'of unknown architecture'}", path)
    return ARCHITECTURES[arch]


def write(adapter: Adapter, out: Path, *, base_config: dict, outtype: str = "f32", base_path=None, **_) -> dict:
    """Write ``adapter`` as a llama.cpp LoRA; return the metadata written."""
    from ..readiness import require

    gguf = _gguf()
    arch_name, permute = base_architecture(base_config, base_path)
    require(adapter, "llamacpp")
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name)
    n_layers = int(base_config.get("num_hidden_layers", 0))
    names = gguf.get_tensor_name_map(arch, n_layers)
    n_head = int(base_config.get("num_attention_heads", 0))
    n_kv = int(base_config.get("num_key_value_heads") or n_head)
    mods = list(adapter.modules.values())
    ranks = {m.shape_rank for m in mods}
    alpha = float(adapter.config.get("lora_alpha") or next(iter(ranks)))
    dtype = {"f32": np.float32, "f16": np.float16, "bf16": None}[outtype]
    writer = gguf.GGUFWriter(str(out), arch_name)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    writer.add_string("general.name", Path(str(adapter.path)).name)
    if adapter.alora_tokens:  # llama.cpp's llama-adapter.cpp reads them as a UINT32 array (PR #15327)
        writer.add_key_value("adapter.alora.invocation_tokens", [int(t) for t in adapter.alora_tokens],
                             gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT32)
    for m in mods:
        gname = names.get_name(m.name)
        if gname is None:
            raise AdaptkitError(f"gguf has no name for module {m.name} in {arch_name}", adapter.path)
        a = m.A.to(torch.float32)
        b = lora.fold(m.B.to(torch.float32), m.scaling, alpha / m.shape_rank)
        if m.kind == "embedding":  # token_embd: llama.cpp adds scale · B · A[token] (get_rows of A, (vocab, r))
            a = a.T.contiguous()
        if permute and m.name.endswith("q_proj"):
            b = permute_rows(b, n_head)
        elif permute and m.name.endswith("k_proj"):
            b = permute_rows(b, n_kv)
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
    return {"general.architecture": arch_name, "adapter.lora.alpha": alpha, "tensors": 2 * len(mods)}


def read_gguf_deltas(path: Path, base_config: dict) -> dict[str, torch.Tensor]:
    """ΔW per gguf tensor name as llama.cpp computes it (alpha / rank · B·A), q/k rows un-permuted
    back to HF order: for tests and checks."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    fields = {f.name: f for f in reader.fields.values()}
    alpha = float(fields["adapter.lora.alpha"].parts[fields["adapter.lora.alpha"].data[0]][0])
    arch = bytes(fields["general.architecture"].parts[fields["general.architecture"].data[0]]).decode()
    permute = arch in PERMUTED
    n_head = int(base_config.get("num_attention_heads", 0))
    n_kv = int(base_config.get("num_key_value_heads") or n_head)
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
            if permute and ".attn_q." in stem:
                b = unpermute_rows(b, n_head)
            elif permute and ".attn_k." in stem:
                b = unpermute_rows(b, n_kv)
            out[stem] = (alpha / a.shape[0]) * (b @ a)  # canonical (out, in): (hidden, vocab) for token_embd
    return out
