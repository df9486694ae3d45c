"""bitsandbytes 4-bit (NF4/FP4) weights as transformers saves them, through bitsandbytes' own code.

On disk a quantized ``X.weight`` is a packed uint8 tensor plus ``X.weight.absmax``,
``X.weight.quant_map``, with double quantization ``X.weight.nested_absmax`` and
``X.weight.nested_quant_map``, and ``X.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``): a
JSON blob (shape, dtype, blocksize…) stored as uint8. :func:`dequantize` and :func:`quantize` hand
these to ``bitsandbytes.functional`` (its CUDA kernels on the GPU, its CPU backend otherwise):
NF4 is not re-implemented here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from . import bnb_import
from .dtypes import FLOATS, parse_dtype
from .errors import AdaptkitError
from .io.files import read_json

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes.functional.quantize_4bit takes
QUANT_STATE_KEYS = ("quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4")


@dataclass(frozen=True)
class QuantizedWeight:
    """A 4-bit weight of a checkpoint: its packed tensor, its components and its dense shape/dtype."""

    name: str  # e.g. model.layers.0.self_attn.q_proj.weight
    components: tuple[str, ...]  # full tensor names, in checkpoint order
    shape: tuple[int, ...]
    dtype: torch.dtype
    quant_type: str
    blocksize: int


def check_quantization(config: dict, path) -> dict | None:
    """The bitsandbytes 4-bit quantization_config, None for a dense model; refuse anything else."""
    q = config.get("quantization_config")
    if not q:
        return None
    if not isinstance(q, dict):
        raise AdaptkitError("malformed config.json: quantization_config must be an object", path)
    method = str(q.get("quant_method", "unknown"))
    if method in ("gptq", "awq"):
        raise AdaptkitError(f"{method.upper()} int4 bases are refused: their dequantization (packing order, zero-point "
                            "offsets, act-order g_idx) is defined by gptqmodel / autoawq, which adaptkit does not "
                            "depend on, and a guessed variant would merge silently wrong; merge into the 16-bit "
                            "original, or load the base dequantized in transformers and save it first", path)
    if method != "bitsandbytes":
        raise AdaptkitError(f"quant_method {method!r} is not supported: adaptkit merges into dense, bitsandbytes "
                            "4-bit, FP8 (fp8, compressed-tensors) and MXFP4 bases (dequantize the model first)", path)
    if q.get("load_in_8bit") or q.get("_load_in_8bit"):
        raise AdaptkitError("8-bit (LLM.int8) bitsandbytes bases are not supported yet: load the base in 16-bit "
                            "and save it, then merge", path)
    if not (q.get("load_in_4bit") or q.get("_load_in_4bit")):
        raise AdaptkitError("quantization_config is bitsandbytes but neither 4-bit nor 8-bit", path)
    return q


def find_quantized(tensor_names, read_blob) -> dict[str, QuantizedWeight]:
    """Every 4-bit weight among ``tensor_names``; ``read_blob(name)`` returns a (small) tensor."""
    names = list(tensor_names)
    states = {}  # weight name -> its quant_state tensor name
    for key in names:
        for qs_key in QUANT_STATE_KEYS:
            if key.endswith("." + qs_key):
                states[key[: -len(qs_key) - 1]] = key
    comps: dict[str, list[str]] = {w: [] for w in states}
    for key in names:  # one pass: a component is "<weight>.<suffix>", the weight ending in ".weight"
        cut = key.find(".weight.")
        if cut >= 0 and key[: cut + len(".weight")] in comps:
            comps[key[: cut + len(".weight")]].append(key)
    out = {}
    for weight, qs_key in states.items():
        try:
            state = json.loads(bytes(read_blob(qs_key).reshape(-1).tolist()).decode("utf-8"))
            shape = tuple(int(x) for x in state["shape"])
            dtype = getattr(torch, str(state["dtype"]).removeprefix("torch."))
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise ValueError(f"dtype {state['dtype']!r}")
            qw = QuantizedWeight(weight, tuple(comps[weight]), shape, dtype, str(state["quant_type"]),
                                 int(state["blocksize"]))
        except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as e:
            raise AdaptkitError(f"malformed 4-bit quantization state {qs_key}: {e}") from None
        out[weight] = qw
    return out


def dequantize(packed: torch.Tensor, components: dict[str, torch.Tensor], device) -> torch.Tensor:
    """Dense weight from a packed 4-bit tensor and its components (keys relative to the weight name)."""
    F = bnb_import.functional()
    state = F.QuantState.from_dict(dict(components), device=torch.device(device))
    return F.dequantize_4bit(packed.to(device), state)


def quantize(dense: torch.Tensor, like: QuantizedWeight, double_quant: bool, storage: torch.dtype
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Quantize ``dense`` (fp32, on its device) with ``like``'s settings; the state records ``like``'s dtype.

    Quantizing straight from fp32 keeps the merge's one rounding (peft casts to the 16-bit dtype first).
    """
    F = bnb_import.functional()
    packed, state = F.quantize_4bit(dense.contiguous(), blocksize=like.blocksize, compress_statistics=double_quant,
                                    quant_type=like.quant_type, quant_storage=storage)
    state.dtype = like.dtype  # what dequantize will return, as in the base
    comps = state.as_dict(packed=True)
    return packed, {k: v for k, v in comps.items()}


ERROR_CHUNK = 1 << 20  # values per step of relative_error: a 4 MB temporary, reused


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """‖approx − exact‖ / ‖exact‖, summed in fp32 chunks with BLAS's blocked dot (fp32 norms over
    millions of values drift by 1e-5; fp64 or whole-tensor copies of a large weight cost a merge more
    time than the rest of its work)."""
    a, e = approx.reshape(-1), exact.reshape(-1)
    tmp = torch.empty(min(ERROR_CHUNK, e.numel()), dtype=torch.float32, device=e.device)
    err2 = ref2 = 0.0
    for i in range(0, e.numel(), ERROR_CHUNK):
        x = e[i:i + ERROR_CHUNK]
        x = x if x.dtype == torch.float32 else x.float()
        d = tmp[: x.numel()].copy_(a[i:i + ERROR_CHUNK]).sub_(x)
        err2 += float(torch.dot(d, d))
        ref2 += float(torch.dot(x, x))
    return math.sqrt(err2) / max(math.sqrt(ref2), 1e-30)


@dataclass(frozen=True)
class QuantSettings:
    """How to quantize a dense weight (bitsandbytes' BitsAndBytesConfig fields)."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.float16
    storage: torch.dtype = torch.uint8
    skip_modules: tuple[str, ...] | None = None  # llm_int8_skip_modules; None: transformers' own choice

    def __post_init__(self):
        if self.quant_type not in ("nf4", "fp4"):
            raise AdaptkitError(f"must be nf4 or fp4, got {self.quant_type!r}", param="quant_type")
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize not in BLOCKSIZES:
            raise AdaptkitError(f"must be one of {', '.join(map(str, BLOCKSIZES))} (what bitsandbytes "
                                f"quantizes with), got {self.blocksize!r}", param="blocksize")

    @classmethod
    def from_config(cls, path) -> "QuantSettings":
        """Settings from a JSON file: a BitsAndBytesConfig (``to_json_file``), a 4-bit model's
        config.json (its ``quantization_config``), or a folder holding that config.json.

        BitsAndBytesConfig has no blocksize (transformers quantizes with 64); a ``blocksize`` or
        ``bnb_4bit_blocksize`` key, when present, is used.
        """
        from pathlib import Path

        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        cfg = read_json(path, "quantization settings")
        q = cfg.get("quantization_config", cfg) if isinstance(cfg, dict) else None
        if not isinstance(q, dict) or str(q.get("quant_method", "bitsandbytes")) != "bitsandbytes" \
                or not (q.get("load_in_4bit") or q.get("_load_in_4bit")):
            raise AdaptkitError("not a bitsandbytes 4-bit configuration (expected load_in_4bit and bnb_4bit_* "
                                "fields, as BitsAndBytesConfig.to_json_file writes them)", path)
        def dtype(key, default):
            return parse_dtype(q.get(key) or default, FLOATS + ("uint8", "int8"), param=key, path=path)

        quant_type = str(q.get("bnb_4bit_quant_type", "fp4"))  # BitsAndBytesConfig's own default
        if quant_type not in ("nf4", "fp4"):
            raise AdaptkitError(f"bnb_4bit_quant_type {quant_type!r} is not nf4 or fp4", path)
        try:
            blocksize = int(q.get("bnb_4bit_blocksize", q.get("blocksize", 64)))
        except (TypeError, ValueError):
            raise AdaptkitError("blocksize is not an integer", path) from None
        return cls(quant_type=quant_type, blocksize=blocksize,
                   double_quant=bool(q.get("bnb_4bit_use_double_quant", False)),
                   compute_dtype=dtype("bnb_4bit_compute_dtype", "float32"),
                   storage=dtype("bnb_4bit_quant_storage", "uint8"),
                   skip_modules=tuple(q["llm_int8_skip_modules"]) if q.get("llm_int8_skip_modules") else None)

    @classmethod
    def load(cls, config=None, *, quant_type: str | None = None, blocksize: int | None = None,
             double_quant: bool | None = None, compute_dtype=None) -> "QuantSettings":
        """Settings for quantizing a dense base: those of ``config`` (a BitsAndBytesConfig JSON, a 4-bit
        model's config.json, or its folder) or the defaults, each field given here overriding.

        Example:
            >>> from adaptkit import QuantSettings
            >>> QuantSettings.load(blocksize=128).blocksize
            128
        """
        import dataclasses

        settings = cls.from_config(config) if config else cls()
        changes = dict(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                       compute_dtype=parse_dtype(compute_dtype, param="compute_dtype") if compute_dtype else None)
        return dataclasses.replace(settings, **{k: v for k, v in changes.items() if v is not None})

    def component_suffixes(self) -> list[str]:
        """The names bitsandbytes gives the components (found by quantizing a tiny tensor)."""
        F = bnb_import.functional()
        _, state = F.quantize_4bit(torch.zeros(self.blocksize * 4, 1), blocksize=self.blocksize,
                                   compress_statistics=self.double_quant, quant_type=self.quant_type,
                                   quant_storage=self.storage)
        return sorted(state.as_dict(packed=True))

    def target(self, name: str, shape, dtype) -> QuantizedWeight:
        comps = tuple(f"{name}.{s}" for s in self.component_suffixes())
        return QuantizedWeight(name, comps, tuple(shape), dtype, self.quant_type, self.blocksize)

    def quantization_config(self, skip: list[str]) -> dict:
        """config.json's quantization_config, as transformers writes it."""
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quant_type,
                                  bnb_4bit_use_double_quant=self.double_quant,
                                  bnb_4bit_compute_dtype=self.compute_dtype, bnb_4bit_quant_storage=self.storage,
                                  llm_int8_skip_modules=skip).to_dict()


def weights_bnb_would_quantize(config: dict, skip: list[str] | None = None) -> tuple[set[str], list[str]]:
    """The weight names transformers would turn into bitsandbytes 4-bit layers, and the skipped modules.

    Asks transformers itself: the model is built on the meta device (no memory) and filtered with
    its own ``get_modules_to_not_convert`` / ``should_convert_module``.
    """
    from torch import nn
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    from .architecture import meta_model

    if "model_type" not in config:
        raise AdaptkitError("config.json has no model_type: cannot tell which layers bitsandbytes would quantize")
    model = meta_model(config)
    # transformers' own rule: the given skip list replaces its defaults; fp32-kept modules are always skipped
    skip = HfQuantizer.get_modules_to_not_convert(model, list(skip) if skip is not None else None,
                                                  getattr(model, "_keep_in_fp32_modules", None))
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, Conv1D) and should_convert_module(name, skip):
            raise AdaptkitError("quantizing Conv1D models (GPT-2 family) is not supported yet")
        if type(module) is nn.Linear and should_convert_module(name, skip):
            names.add(name + ".weight")
    return names, skip
