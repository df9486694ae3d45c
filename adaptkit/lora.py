"""Every LoRA formula adaptkit computes, in one place, each with its reference.

The adapter model (:mod:`.adapter`) says *what* a module holds; these functions say what it
*computes*. All work in fp32 (the callers round once, at the end) on the device of their inputs.

- peft, ``tuners/lora/layer.py`` (``update_layer``, ``get_delta_weight``) and ``variants.py``:
  :func:`scaling`, :func:`delta`, :func:`add_delta_`, :func:`dora`, :func:`bias_delta`.
- Single-scale formats (llama.cpp's one ``adapter.lora.alpha``, mlx-lm's one ``scale``) and kohya's
  per-module ``alpha``: :func:`fold`, :func:`kohya_alpha`, :func:`alpha_for`.
- Sums of LoRAs, exactly: :func:`concat`; their spectrum without forming ΔW: :func:`qr_core`.

Orientation: ΔW is (out, in). The base stores embeddings and GPT-2 ``Conv1D`` weights as (in, out);
``transposed`` says so.
"""

from __future__ import annotations

import math

import torch


def scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """s = α / r, or α / √r with rsLoRA (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def delta(a: torch.Tensor, b: torch.Tensor, scale: float, device=None) -> torch.Tensor:
    """ΔW = s · B @ A in fp32, (out, in)."""
    a = a.to(device=device, dtype=torch.float32)
    b = b.to(device=device, dtype=torch.float32)
    return (b @ a).mul_(scale)


def add_delta_(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, transposed: bool) -> torch.Tensor:
    """W += s · B @ A in place, in one fused ``addmm_`` (ΔW is never materialised); fp32 A, B on w's device."""
    if transposed:
        return w.addmm_(a.T, b.T, alpha=scale)
    return w.addmm_(b, a, alpha=scale)


def dora(w: torch.Tensor, ref: torch.Tensor, d: torch.Tensor, magnitude: torch.Tensor, transposed: bool) -> torch.Tensor:
    """DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353): W' = m / ‖W₀ + ΔW‖_row · (W + ΔW).

    Row norms of the canonical (out, in) weight; ``ref`` = W₀, the weight before any adapter (peft
    takes the norm of the unmerged weight too); ``d`` = ΔW in the stored orientation.
    """
    combined = ref + d
    norm = torch.linalg.vector_norm(combined.T if transposed else combined, dim=1)
    factor = magnitude.to(device=w.device, dtype=torch.float32) / norm
    return (w + d) * (factor[None, :] if transposed else factor[:, None])


def bias_delta(bias: torch.Tensor, scale: float, device=None) -> torch.Tensor:
    """peft's ``lora_bias``: b' = b + s · lora_B.bias."""
    return bias.to(device=device, dtype=torch.float32) * scale


def fold(b: torch.Tensor, scale: float, shared: float) -> torch.Tensor:
    """B scaled so that a format's one ``shared`` scale gives this module its own ``scale``: B · (s / shared)."""
    return b * (scale / shared)


def alpha_for(scale: float, r: int) -> float:
    """The α that gives ``scale`` as α / r (no rsLoRA); an int when it is one (PEFT configs)."""
    a = scale * r
    return int(a) if float(a).is_integer() else a


def kohya_alpha(scale: float, r: int) -> torch.Tensor:
    """kohya's per-module ``.alpha`` (scale = alpha / r): fp32, or fp64 when fp32 cannot hold it exactly."""
    alpha = scale * r
    t = torch.tensor(alpha, dtype=torch.float32)
    return t if float(t) / r == scale else torch.tensor(alpha, dtype=torch.float64)


def concat(parts, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ sᵢ·Bᵢ·Aᵢ as one LoRA, exactly: A = [A₁; A₂; …], B = [s₁B₁, s₂B₂, …] (rank Σrᵢ).

    ``parts``: (A, B, s) triples; fp32 on ``device``.
    """
    a = torch.cat([pa.to(device, torch.float32) for pa, _, _ in parts], 0)
    b = torch.cat([pb.to(device, torch.float32) * s for _, pb, s in parts], 1)
    return a, b


def qr_core(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B = Q_B R_B and Aᵀ = Q_A R_A (thin QR): ΔW = B·A = Q_B (R_B R_Aᵀ) Q_Aᵀ, so the singular values
    of ΔW are those of the small core R_B R_Aᵀ. Returns (Q_B, Q_A, core)."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    return qb, qa, rb @ ra.T


def expert_factors(a: torch.Tensor, b: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's layout for a LoRA on a 3-D expert parameter (``target_parameters``, ParamWrapper in
    ``peft/tuners/lora/layer.py``, peft ≥ 0.21): A is (E·r, in) with expert-major rows, B (out, r·E)
    with rank-major columns. Returns A as (E, r, in) and B as (out, r, E): expert e's factors are
    ``A[e]`` and ``B[:, :, e]``."""
    r = a.shape[0] // experts
    return a.reshape(experts, r, a.shape[-1]), b.reshape(b.shape[0], r, experts)


def pack_experts(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`expert_factors`: A (E, r, in) and B (out, r, E) back to peft's (E·r, in)
    and (out, r·E)."""
    return a.reshape(-1, a.shape[-1]).contiguous(), b.reshape(b.shape[0], -1).contiguous()


def expert_delta(a: torch.Tensor, b: torch.Tensor, scale: float, experts: int, e: int, device=None,
                 rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> torch.Tensor:
    """ΔW of expert ``e`` = s · B_e @ A_e in fp32, (out, in); only ``rows`` (B_e's) or ``cols`` (A_e's)
    of it when given (the part of ΔW an on-disk tensor holds: gate beside up)."""
    r = a.shape[0] // experts
    a_e, b_e = a[e * r:(e + 1) * r], b[:, e::experts]  # = expert_factors(...)[e]
    if rows is not None:
        b_e = b_e[rows[0]:rows[1]]
    if cols is not None:
        a_e = a_e[:, cols[0]:cols[1]]
    return delta(a_e, b_e, scale, device)


def place_expert(one, experts: int, expert: int | None, part: tuple[int, int, int] | None) -> torch.Tensor:
    """Where an expert LoRA's deltas land on one on-disk tensor: ``one(e)`` (expert e's delta in the
    parameter's own orientation) for every expert, stacked, on a fused 3-D tensor (``expert`` None);
    else expert ``expert``'s, narrowed to ``part`` = (dim, start, stop) where the tensor holds a part
    of it (gate beside up; every expert's part where ``expert`` is None and ``part`` given)."""
    if expert is None:
        d = torch.stack([one(e) for e in range(experts)])
        if part is not None:
            dim, start, stop = part
            d = d.narrow(dim + 1, start, stop - start)
        return d
    d = one(expert)
    if part is not None:
        dim, start, stop = part
        d = d.narrow(dim, start, stop - start)
    return d


def stack_rows(parts, rows: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA for a fused weight from LoRAs on some of its parts (split → fused), exactly:
    A = [A₁; A₂; …] and B block-diagonal, part i's sᵢ·Bᵢ on its rows and its own columns, zeros
    elsewhere, so B·A puts each sᵢ·Bᵢ·Aᵢ on its rows and nothing on a part without a LoRA.

    ``parts``: (A, B, s, (start, stop)) per part; ``rows``: the fused weight's rows. fp32 on ``device``."""
    a = torch.cat([pa.to(device, torch.float32) for pa, _, _, _ in parts], 0)
    b = torch.zeros(rows, a.shape[0], dtype=torch.float32, device=device)
    col = 0
    for pa, pb, s, (start, stop) in parts:
        b[start:stop, col:col + pa.shape[0]] = pb.to(device, torch.float32) * s
        col += pa.shape[0]
    return a, b
