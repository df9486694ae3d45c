"""Checkpoints stored as low-precision values times scales: FP8 and MXFP4, read and written exactly as
the formats define them.

Three layouts, each as the library that defines it writes it (their sources are cited per function):

- ``quant_method: fp8`` (transformers' FineGrainedFP8, DeepSeek-V3/R1, Qwen3-FP8…): ``X.weight`` in
  float8_e4m3fn and ``X.weight_scale_inv`` per ``weight_block_size`` block (fp32, or power-of-two
  ``ue8m0`` scales), or one per tensor when there is no block size; W = q · scale_inv.
- ``quant_method: compressed-tensors`` with FP8 weights (``float-quantized``/``naive-quantized``,
  vLLM's FP8 checkpoints): ``X.weight`` in float8_e4m3fn and ``X.weight_scale`` per tensor, per output
  channel, per group or per block; W = q · scale.
- ``quant_method: mxfp4`` (gpt-oss experts): ``X_blocks`` (…, N, K/32, 16) uint8, two e2m1 values a
  byte, low nibble first, and ``X_scales`` (…, N, K/32) uint8 exponents (2^(s−127)) per 32 values
  along K; the dense parameter X is (…, K, N), the stored one transposed.

A weight is recognised by its data (a float8 tensor beside its scale, a ``_blocks``/``_scales`` pair),
never by guessing module names; every quantization_config field is understood or refused.

:class:`ScaledWeight` describes one stored weight; :func:`dequantize_` fills an fp32 buffer from its
stored tensors and :func:`quantize` turns an fp32 weight back into them with the format's own
quantizer (transformers' ``Fp8Quantize``, compressed-tensors' min-max scales, the MX reference of
triton_kernels that transformers calls for MXFP4), so a merge can keep the base's format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import AdaptkitError

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MX_BLOCK = 32
STRIPE_ELEMENTS = 1 << 20  # values per step of the FP8 conversions: a 4 MB temporary, reused (cache-sized work)


@dataclass(frozen=True)
class ScaledWeight:
    """One weight of a scaled checkpoint.

    ``block`` is the (rows, columns) each scale covers over the last two dims of the stored data
    (per tensor: the whole matrix; per channel: (1, columns)); ``style`` says how scales are made
    and stored: ``"fp8"`` (transformers: scale_inv = amax/448 as 1/(448/amax), fp32),
    ``"fp8-ue8m0"`` (the same rounded up to a power of two), ``"compressed-tensors"`` (scale =
    amax/448 in the scale's dtype, zeros replaced by its eps), ``"mxfp4"``.
    """

    name: str  # the dense weight's name: what a dense checkpoint stores and an adapter targets
    data: str  # the stored low-precision tensor
    scales: str  # its scales
    shape: tuple[int, ...]  # the dense shape
    block: tuple[int, int]
    style: str
    scale_dtype: torch.dtype  # as stored
    scale_shape: tuple[int, ...]  # as stored (a per-tensor scale may be (), (1,) or (1, 1))

    @property
    def stored(self) -> tuple[str, str]:
        return (self.data, self.scales)

    @property
    def label(self) -> str:
        if self.style == "mxfp4":
            return "MXFP4"
        rows, cols = self.shape[-2:]
        if self.block == (rows, cols):
            grid = "per tensor"
        elif self.block[0] == 1 and self.block[1] == cols:
            grid = "per channel"
        elif self.block[0] == 1:
            grid = f"groups of {self.block[1]}"
        else:
            grid = f"{self.block[0]}×{self.block[1]} blocks"
        return f"FP8 ({grid})"


# --------------------------------------------------------------------------------------- the config

FP8_FIELDS = {"quant_method", "activation_scheme", "weight_block_size", "modules_to_not_convert", "ignored_layers",
              "modules_to_convert", "scale_fmt", "expert_dtype", "dequantize", "fmt"}
MXFP4_FIELDS = {"quant_method", "modules_to_not_convert", "dequantize"}
CT_FIELDS = {"quant_method", "config_groups", "format", "global_compression_ratio", "ignore", "kv_cache_scheme",
             "quantization_status", "sparsity_config", "moe_sparsity_config", "transform_config", "version",
             "quant_format"}
CT_WEIGHT_FIELDS = {"num_bits", "type", "symmetric", "strategy", "group_size", "block_structure", "dynamic",
                    "observer", "observer_kwargs", "actorder", "scale_dtype", "zp_dtype"}
METHODS = ("fp8", "compressed-tensors", "mxfp4")


@dataclass(frozen=True)
class Scheme:
    """What a quantization_config says, for the parts that change the numbers."""

    method: str  # "fp8", "compressed-tensors" or "mxfp4"
    block: tuple[int, int] | None = None  # fp8: weight_block_size (None: per tensor)
    ue8m0: bool = False  # fp8: power-of-two scales
    strategy: str | None = None  # compressed-tensors: tensor, channel, group or block
    group: int | None = None  # compressed-tensors: group_size
    static_inputs: bool = False  # activation scales stored beside the weights (kept as they are)

    @property
    def name(self) -> str:
        return {"fp8": "fp8", "compressed-tensors": "compressed-tensors FP8", "mxfp4": "mxfp4"}[self.method]


def _refuse_unknown(q: dict, known: set[str], method: str, path) -> None:
    unknown = sorted(k for k, v in q.items() if k not in known and v not in (None, False, [], {}))
    if unknown:
        raise AdaptkitError(f"quantization_config field {unknown[0]!r} ({method}) is not understood by adaptkit: "
                            "refusing rather than guessing what it changes", path)


def parse_scheme(q: dict, path) -> Scheme:
    """The :class:`Scheme` of a quantization_config whose quant_method is one of :data:`METHODS`;
    one line naming the field for anything adaptkit does not implement."""
    method = str(q.get("quant_method"))
    if method == "fp8":
        _refuse_unknown(q, FP8_FIELDS, method, path)
        if q.get("modules_to_convert"):
            raise AdaptkitError("fp8 checkpoints with quantized embeddings (modules_to_convert) are not supported yet",
                                path)
        if str(q.get("expert_dtype", "fp8")) != "fp8":
            raise AdaptkitError(f"fp8 checkpoints with expert_dtype {q['expert_dtype']!r} (FP4-packed experts) are "
                                "not supported yet", path)
        if str(q.get("fmt", "e4m3")) != "e4m3":
            raise AdaptkitError(f"fp8 fmt {q['fmt']!r} is not supported (transformers loads e4m3 weights)", path)
        scale_fmt = str(q.get("scale_fmt", "float"))
        if scale_fmt not in ("float", "ue8m0"):
            raise AdaptkitError(f"fp8 scale_fmt {scale_fmt!r} is not supported (float or ue8m0)", path)
        activation = str(q.get("activation_scheme", "dynamic")).lower()
        if activation not in ("dynamic", "static"):
            raise AdaptkitError(f"fp8 activation_scheme {activation!r} is not supported", path)
        block = q.get("weight_block_size")
        if block is not None:
            if not (isinstance(block, (list, tuple)) and len(block) == 2
                    and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
                raise AdaptkitError(f"fp8 weight_block_size must be two positive integers, got {block!r}", path)
            block = (int(block[0]), int(block[1]))
        return Scheme("fp8", block=block, ue8m0=scale_fmt == "ue8m0", static_inputs=activation == "static")
    if method == "mxfp4":
        _refuse_unknown(q, MXFP4_FIELDS, method, path)
        return Scheme("mxfp4")
    if method == "compressed-tensors":
        return _compressed_tensors(q, path)
    raise AdaptkitError(f"quant_method {method!r} is not supported", path)


def _compressed_tensors(q: dict, path) -> Scheme:
    """compressed-tensors: FP8 weights only (the float-quantized / naive-quantized formats)."""
    _refuse_unknown(q, CT_FIELDS, "compressed-tensors", path)
    for key in ("sparsity_config", "moe_sparsity_config", "transform_config", "kv_cache_scheme"):
        if q.get(key):
            raise AdaptkitError(f"compressed-tensors checkpoints with {key} are not supported yet", path)
    status = str(q.get("quantization_status", "compressed"))
    if status != "compressed":
        raise AdaptkitError(f"compressed-tensors quantization_status {status!r} is not supported (the weights must "
                            "be stored compressed)", path)
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise AdaptkitError("compressed-tensors quantization_config has no config_groups", path)
    weights, static = set(), False
    for gname, group in groups.items():
        fmt = str((group or {}).get("format") or q.get("format") or "")
        if fmt not in ("float-quantized", "naive-quantized"):
            raise AdaptkitError(f"compressed-tensors format {fmt or 'missing'!r} (group {gname}) is not supported: "
                                "adaptkit reads FP8 weights (float-quantized); int4/int8 packed, NVFP4 and MXFP4 "
                                "compressed-tensors checkpoints are refused", path)
        w = (group or {}).get("weights")
        if not isinstance(w, dict):
            raise AdaptkitError(f"compressed-tensors group {gname} quantizes no weights", path)
        _refuse_unknown({k: v for k, v in w.items() if k not in ("observer", "observer_kwargs")},
                        CT_WEIGHT_FIELDS, "compressed-tensors weights", path)
        if not (w.get("type") == "float" and int(w.get("num_bits", 0)) == 8):
            raise AdaptkitError(f"compressed-tensors group {gname} has {w.get('num_bits')}-bit {w.get('type')} "
                                "weights: only 8-bit float (FP8) is supported", path)
        if not w.get("symmetric", True):
            raise AdaptkitError(f"compressed-tensors group {gname}: asymmetric FP8 (zero points) is not supported",
                                path)
        if w.get("dynamic"):
            raise AdaptkitError(f"compressed-tensors group {gname}: dynamic weight scales are not supported", path)
        if w.get("actorder"):
            raise AdaptkitError(f"compressed-tensors group {gname}: actorder is not supported", path)
        strategy = str(w.get("strategy", "tensor"))
        if strategy not in ("tensor", "channel", "group", "block"):
            raise AdaptkitError(f"compressed-tensors weight strategy {strategy!r} is not supported", path)
        block = tuple(w["block_structure"]) if strategy == "block" and w.get("block_structure") else None
        group_size = int(w["group_size"]) if strategy == "group" and w.get("group_size") else None
        if strategy == "block" and (block is None or len(block) != 2):
            raise AdaptkitError(f"compressed-tensors group {gname}: block strategy without a block_structure", path)
        if strategy == "group" and not group_size:
            raise AdaptkitError(f"compressed-tensors group {gname}: group strategy without a group_size", path)
        weights.add((strategy, block, group_size))
        acts = (group or {}).get("input_activations")
        if isinstance(acts, dict) and not acts.get("dynamic", False):
            static = True
        if (group or {}).get("output_activations"):
            raise AdaptkitError(f"compressed-tensors group {gname}: output activation quantization is not supported",
                                path)
    if len(weights) > 1:
        raise AdaptkitError("compressed-tensors checkpoints with several weight schemes are not supported yet", path)
    strategy, block, group_size = weights.pop()
    return Scheme("compressed-tensors", block=block, strategy=strategy, group=group_size, static_inputs=static)


# ------------------------------------------------------------------------------------ finding weights

def find_scaled(scheme: Scheme, infos: dict, path=None) -> dict[str, ScaledWeight]:
    """Every scaled weight among ``infos`` (on-disk name -> TensorInfo), by its dense name.

    Checks each against the scheme (scale shapes, dtypes) and refuses a low-precision tensor that has
    no scale beside it, so nothing is merged into values whose meaning is unknown."""
    out: dict[str, ScaledWeight] = {}
    if scheme.method == "mxfp4":
        for name, info in infos.items():
            if not name.endswith("_blocks"):
                continue
            dense, scales = name[: -len("_blocks")], name[: -len("_blocks")] + "_scales"
            s = infos.get(scales)
            shape = tuple(info.shape)
            if s is None or info.dtype != torch.uint8 or s.dtype != torch.uint8 or len(shape) < 3 or shape[-1] != 16 \
                    or tuple(s.shape) != shape[:-1]:
                raise AdaptkitError(f"{name}: not an MXFP4 pair (expected uint8 blocks (…, N, G, 16) and {scales} "
                                    f"(…, N, G), got {list(shape)} and {list(s.shape) if s else 'none'})", path)
            lead, n, g = shape[:-3], shape[-3], shape[-2]
            out[dense] = ScaledWeight(dense, name, scales, (*lead, g * MX_BLOCK, n), (1, MX_BLOCK), "mxfp4",
                                      torch.uint8, tuple(s.shape))
        return out
    suffix = "_scale_inv" if scheme.method == "fp8" else "_scale"
    for name, info in infos.items():
        if info.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            continue
        scales = name + suffix
        s = infos.get(scales)
        if s is None:
            raise AdaptkitError(f"{name} is {str(info.dtype).removeprefix('torch.')} but has no {scales} beside it: "
                                f"cannot tell its values ({scheme.name})", path)
        if info.dtype != FP8:
            raise AdaptkitError(f"{name} is float8_e5m2: only e4m3 FP8 weights are supported", path)
        shape = tuple(info.shape)
        if len(shape) < 2:
            raise AdaptkitError(f"{name}: FP8 weights of {len(shape)} dims are not supported", path)
        rows, cols = shape[-2:]
        if scheme.method == "fp8":
            block = scheme.block or (rows, cols)
            style = "fp8-ue8m0" if scheme.ue8m0 else "fp8"
        else:
            block = {"tensor": (rows, cols), "channel": (1, cols), "group": (1, scheme.group or cols),
                     "block": scheme.block}[scheme.strategy]
            style = "compressed-tensors"
        grid = (*shape[:-2], math.ceil(rows / block[0]), math.ceil(cols / block[1]))
        got = tuple(s.shape)
        if block == (rows, cols) and math.prod(got) == math.prod(shape[:-2]):  # one per tensor: () or (1,)…
            pass
        elif got != grid:
            raise AdaptkitError(f"{scales} is {list(got)}, expected {list(grid)} for {list(shape)} in "
                                f"{block[0]}×{block[1]} blocks ({scheme.name})", path)
        if not (s.dtype.is_floating_point or s.dtype == torch.uint8):
            raise AdaptkitError(f"{scales} is {s.dtype}: not a scale", path)
        if s.dtype == torch.uint8 and style != "fp8-ue8m0":
            raise AdaptkitError(f"{scales} holds bytes (ue8m0 exponents) but scale_fmt is not ue8m0", path)
        out[name] = ScaledWeight(name, name, scales, shape, tuple(block), style, s.dtype, got)
    return out


def companions(infos: dict, weights: dict[str, ScaledWeight]) -> set[str]:
    """Stored tensors that belong to the quantized layers and mean nothing in a dense model: static
    activation scales (``X.activation_scale``, ``X.input_scale``)."""
    out = set()
    for w in weights.values():
        module = w.data.rsplit(".", 1)[0] if w.data.endswith(".weight") else w.data
        for suffix in (".activation_scale", ".input_scale"):
            if module + suffix in infos:
                out.add(module + suffix)
    return out


# ----------------------------------------------------------------------------------------- the math

def _finite_scales(w: ScaledWeight, scales: torch.Tensor) -> torch.Tensor:
    """``scales`` (fp32), refused when one is NaN or infinite (a damaged checkpoint; E8M0's 255 is
    NaN): the values they scale would be, and an untouched layer is not range-checked later."""
    if not bool(torch.isfinite(scales).all()):
        raise AdaptkitError(f"{w.scales} holds NaN or infinite scales: the checkpoint is damaged")
    return scales


def _scale_fp32(w: ScaledWeight, scales: torch.Tensor) -> torch.Tensor:
    if scales.dtype == torch.uint8:  # ue8m0 stored as bytes: 2^(b − 127)
        return (scales.to(torch.float32) - 127.0).exp2()
    return scales.to(torch.float32)


def _mul_blocks_(t: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], divide: bool = False) -> torch.Tensor:
    """``t`` (…, R, C) times (or, ``divide``, over) ``scale`` (…, ⌈R/b0⌉, ⌈C/b1⌉) broadcast over its
    blocks, in place, without a weight-sized copy of the scales. A partial last block (shapes that
    are no multiple of the block, as DeepSeek-V3's 576-row kv_a_proj_with_mqa) takes its block's
    scale, as DeepSeek's own ``weight_dequant`` does."""
    rows, cols = t.shape[-2:]
    b0, b1 = block
    if scale.dim() < 2 or (scale.shape[-2:] != (math.ceil(rows / b0), math.ceil(cols / b1))):
        scale = scale.reshape(*t.shape[:-2], math.ceil(rows / b0), math.ceil(cols / b1))
    s = scale.repeat_interleave(b0, dim=-2)[..., :rows, :] if b0 > 1 else scale
    full, rem = divmod(cols, b1)
    op = torch.Tensor.div_ if divide else torch.Tensor.mul_
    if full:
        op(t[..., : full * b1].unflatten(-1, (full, b1)), s[..., :full, None])
    if rem:
        op(t[..., full * b1:], s[..., full:])
    return t


def _block_amax(t: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """max |t| per block (…, ⌈R/b0⌉, ⌈C/b1⌉), from a max and a min over a view (no copy of ``t``);
    partial blocks padded with zeros (a copy, for those shapes only)."""
    rows, cols = t.shape[-2:]
    b0, b1 = block
    nr, nc = math.ceil(rows / b0), math.ceil(cols / b1)
    if nr * b0 != rows or nc * b1 != cols:
        t = torch.nn.functional.pad(t, (0, nc * b1 - cols, 0, nr * b0 - rows))
    r = t.reshape(*t.shape[:-2], nr, b0, nc, b1)
    return torch.maximum(r.amax(dim=(-3, -1)), r.amin(dim=(-3, -1)).neg_())


def _e2m1_table(device) -> torch.Tensor:
    return torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)


def _fp8_to_fp32_(out: torch.Tensor, q: torch.Tensor, name: str, check: bool = True) -> torch.Tensor:
    """``out`` = the e4m3 values of ``q`` times 2^-8, five times faster than torch's own conversion on
    the CPU: an e4m3 byte's bits (s eeee mmm) moved into fp16's places (s eeeee mmmmmmmmmm, the
    exponent's top bit 0) are an fp16 whose value is the e4m3 value times 2^(7−15), for normal and
    subnormal values alike, and fp16 converts to fp32 exactly. e4m3fn's NaN (s1111111) becomes
    ±1.875 this way, above the largest value (448 · 2^-8 = 1.75): with ``check`` a weight holding
    one is refused. Done in chunks through one small int16 temporary."""
    src, dst = q.reshape(-1).view(torch.int8), out.view(-1)
    h = torch.empty(min(STRIPE_ELEMENTS, src.numel()), dtype=torch.int16, device=q.device)
    for i in range(0, src.numel(), STRIPE_ELEMENTS):
        c = h[: min(STRIPE_ELEMENTS, src.numel() - i)].copy_(src[i:i + STRIPE_ELEMENTS])  # sign-extended:
        c.bitwise_left_shift_(7).bitwise_and_(-16385)  # bit 14 set exactly when the sign is; 0xBFFF keeps bit 15
        half = c.view(torch.float16)
        if check:
            lo, hi = (float(v) for v in torch.aminmax(half))
            if hi >= 1.875 or lo <= -1.875:
                raise AdaptkitError(f"{name} holds FP8 NaN values: the checkpoint is damaged")
        dst[i:i + STRIPE_ELEMENTS].copy_(half)
    return out


def dequantize_(w: ScaledWeight, data: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` (fp32, the dense shape, on its device) with the weight's values.

    FP8: q · scale per block in fp32, the product transformers' ``Fp8Dequantize`` computes (exact
    for 16-bit or power-of-two scales); compressed-tensors multiplies in the scale's dtype
    (``x_q.to(scale.dtype) * scale``), so a 16-bit scale's product is rounded to that dtype, here
    too. MXFP4: the e2m1 value
    of each nibble (low nibble first) times 2^(scale − 127), transposed to the dense (…, K, N), as
    transformers' ``convert_moe_packed_tensors`` does."""
    dev = out.device
    if w.style == "mxfp4":
        blocks = data.to(dev)
        lut = _e2m1_table(dev)
        *lead, n, g, b = blocks.shape
        vals = torch.empty(*lead, n, g, 2 * b, dtype=torch.float32, device=dev)
        vals[..., 0::2] = lut[(blocks & 0x0F).long()]
        vals[..., 1::2] = lut[(blocks >> 4).long()]
        vals.mul_(_finite_scales(w, (scales.to(dev).to(torch.float32) - 127.0).exp2()).unsqueeze(-1))
        out.copy_(vals.reshape(*lead, n, g * 2 * b).transpose(-1, -2))
        return out
    _fp8_to_fp32_(out, data.to(dev), w.data)
    _mul_blocks_(out, _finite_scales(w, _scale_fp32(w, scales.to(dev))) * 256.0, w.block)  # 256: see _fp8_to_fp32_
    if w.style == "compressed-tensors" and w.scale_dtype != torch.float32:
        out.copy_(out.to(w.scale_dtype))  # compressed-tensors multiplies in the scale's dtype: x_q.to(scale.dtype) * scale
    return out


def quantize(w: ScaledWeight, w32: torch.Tensor, measure: bool = False):
    """``w32`` (fp32, dense shape) in the weight's own format: {stored name: tensor}, with the
    format's own quantizer (see each branch); with ``measure``, also the relative error of what is
    stored against ``w32``, ‖dequantize(stored) − w32‖ / ‖w32‖."""
    if w.style == "mxfp4":
        blocks, scales = _quantize_mxfp4(w32)
        out = {w.data: blocks, w.scales: scales}
        if not measure:
            return out
        from .quant import relative_error

        return out, relative_error(dequantize_(w, blocks, scales, torch.empty_like(w32)), w32)
    amax = _block_amax(w32, w.block)
    if w.style == "compressed-tensors":
        # compressed-tensors: calculate_qparams (symmetric: scale = max|x| / (range / 2), rounded to
        # the scale's dtype, zeros replaced by that dtype's eps), then quantize: x / scale, clamped,
        # cast to FP8; dequantize: q · scale in the scale's dtype
        scale = (amax / FP8_MAX).to(w.scale_dtype)
        scale = torch.where(scale == 0, torch.tensor(torch.finfo(w.scale_dtype).eps, dtype=w.scale_dtype,
                                                     device=scale.device), scale)
        factor, divide, stored_scale, back = scale.to(torch.float32), True, scale, scale.to(torch.float32)
    else:
        # transformers' Fp8Quantize: scale = 448 / max|x| per block (1 where the block is zero), stored
        # as its inverse; ue8m0 rounds the inverse up to a power of two first; dequantize: q · inverse
        safe = torch.where(amax > 0, amax, torch.ones_like(amax))
        scale = torch.where(amax > 0, FP8_MAX / safe, torch.ones_like(amax))
        inv = 1.0 / scale
        if w.style == "fp8-ue8m0":
            inv = torch.pow(2.0, torch.ceil(torch.log2(inv.clamp(min=torch.finfo(torch.float32).tiny))))
            scale = 1.0 / inv
        if w.scale_dtype == torch.uint8:
            stored_scale = (torch.log2(inv).round() + 127).to(torch.uint8)
        else:
            stored_scale = inv.to(w.scale_dtype)
        factor, divide, back = scale, False, _scale_fp32(w, stored_scale)
    q, err = _quantize_stripes(w, w32, factor, divide, back, measure)
    out = {w.data: q, w.scales: stored_scale.reshape(w.scale_shape)}
    return (out, err) if measure else out



def _quantize_stripes(w: ScaledWeight, w32: torch.Tensor, factor: torch.Tensor, divide: bool, back: torch.Tensor,
                      measure: bool) -> tuple[torch.Tensor, float | None]:
    """Quantize ``w32`` into FP8 stripe by stripe of rows: x · factor (or x / factor) per block,
    clamped to ±448, cast; with ``measure`` each stripe is dequantized again (q · ``back``, rounded as
    the format rounds it) to sum the error. Only one stripe-sized temporary is allocated."""
    rows, cols = w32.shape[-2:]
    b0, b1 = w.block
    flat = w32.reshape(-1, rows, cols)
    nr, nc = factor.shape[-2:] if factor.dim() >= 2 else (1, 1)
    factor, back = factor.reshape(-1, nr, nc), back.reshape(-1, nr, nc)
    q = torch.empty(w32.shape, dtype=FP8, device=w32.device)
    qflat = q.view(-1, rows, cols)
    height = max(1, min(rows, STRIPE_ELEMENTS // max(cols, 1)))
    tmp = torch.empty(height * cols, dtype=torch.float32, device=w32.device)
    err2 = 0.0
    for i in range(flat.shape[0]):
        for r0 in range(0, rows, height):
            r1 = min(rows, r0 + height)
            x = flat[i, r0:r1]
            t = tmp[: (r1 - r0) * cols].view(r1 - r0, cols).copy_(x)
            block_rows = torch.arange(r0, r1, device=w32.device) // b0
            _mul_blocks_(t, factor[i][block_rows], (1, b1), divide=divide)
            qflat[i, r0:r1].copy_(t.clamp_(-FP8_MAX, FP8_MAX))
            if measure:
                _fp8_to_fp32_(t, qflat[i, r0:r1], w.data, check=False)  # just made from finite values
                _mul_blocks_(t, back[i][block_rows] * 256.0, (1, b1))
                if w.style == "compressed-tensors" and w.scale_dtype != torch.float32:
                    t.copy_(t.to(w.scale_dtype))
                d = t.sub_(x).reshape(-1)
                err2 += float(torch.dot(d, d))  # BLAS's blocked sum: fp32 norms of millions drift by 1e-5
    if not measure:
        return q, None
    flat_all = w32.reshape(-1)
    return q, math.sqrt(err2) / max(math.sqrt(float(torch.dot(flat_all, flat_all))), 1e-30)


def _quantize_mxfp4(w32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 as triton_kernels' ``downcast_to_mxfp_torch`` (the reference transformers calls) makes it,
    along K of the dense (…, K, N): per 32 values, the scale is max|x| / 6 rounded up to a power of
    two (ROUND_UP on the fp32 bits), each value x / scale rounded to e2m1 (its bit procedure: to
    nearest, halves away from zero, saturating at 6), two a byte, low nibble first."""
    src = w32.transpose(-1, -2).contiguous()  # (…, N, K)
    *lead, n, k = src.shape
    groups = src.reshape(*lead, n, k // MX_BLOCK, MX_BLOCK)
    amax = groups.abs().amax(dim=-1, keepdim=True)
    ds_bits = (amax / 6.0).view(torch.int32)
    ds_bits = (ds_bits + 0x007FFFFF) & 0x7F800000
    ds = ds_bits.view(torch.float32)
    qs = torch.where(ds == 0, torch.zeros_like(ds), 1.0 / ds)
    q = (groups * qs).reshape(*lead, n, k)
    bits = q.view(torch.int32)
    signs = (bits >> 31) & 1
    exps = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    # subnormal e2m1 (exponent below 2^0): shift the mantissa, with its hidden bit, into place
    sub = exps < 127
    mant = torch.where(sub, (0x400000 | (mant >> 1)) >> (127 - exps - 1).clamp(min=0, max=31), mant)
    exps = torch.clamp(exps, min=126) - 126
    code = ((((exps << 2) | (mant >> 21)) + 1) >> 1).clamp(max=7)
    nibbles = ((signs << 3) | code).to(torch.uint8).reshape(*lead, n, k // 2, 2)
    packed = nibbles[..., 0] | (nibbles[..., 1] << 4)
    scales = (ds_bits.squeeze(-1) >> 23).to(torch.uint8)
    return packed.reshape(*lead, n, k // MX_BLOCK, 16), scales

