"""Combination methods: each one pure function over the full deltas ΔWᵢ of one module.

They work on ΔWᵢ = sᵢ·Bᵢ·Aᵢ, never on A and B separately (peft's ``add_weighted_adapter`` does the
latter for linear/TIES/DARE, which leaves cross terms Bᵢ·Aⱼ in the result). Registered by name with
their summary, paper and the parameters they take (with their defaults), so the CLI's choices and
help, the docs and validation come from this one place. A method that is exact on the factors
themselves (``linear``: a concatenation) says so with ``on_factors``; it never forms ΔW.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import lora


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable | None  # (deltas, weights, **parameters) -> combined ΔW
    summary: str
    paper: str | None
    density: float | None = None  # takes ``density``, with this default
    sign: bool = False  # takes ``majority_sign``
    random: bool = False  # takes ``seed``
    on_factors: Callable | None = None  # ([(A, B, w·s)], device) -> (A, B), exactly; then ``fn`` is not needed


METHODS: dict[str, Method] = {}
MAJORITY_SIGNS = ("total", "frequency")


def register(name: str, summary: str, paper: str | None = None, **parameters):
    def wrap(fn):
        METHODS[name] = Method(name, fn, summary, paper, **parameters)
        return fn
    return wrap


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = int(density · numel) entries of largest |x| (peft's magnitude_based_pruning)."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    k = int(density * delta.numel())
    if k == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    mag = delta.abs().reshape(-1)
    if mag.device.type != "cpu":  # on CUDA topk is fast (~1 ms for 11 M entries; kthvalue ~80 ms)
        mask = torch.zeros_like(mag, dtype=torch.bool)
        mask[torch.topk(mag, k=k, largest=True).indices] = True
        return mask.view_as(delta)
    # on the CPU the k-th largest |x| as a threshold is several times faster than topk
    threshold = torch.kthvalue(mag, mag.numel() - k + 1).values
    mask = mag >= threshold
    if int(mask.sum()) != k:  # ties at the threshold: pick exactly k, as topk does
        mask = torch.zeros_like(mag, dtype=torch.bool)
        mask[torch.topk(mag, k=k, largest=True).indices] = True
    return mask.view_as(delta)


def dare_masks(shape, n: int, density: float, generator: torch.Generator, device) -> list[torch.Tensor]:
    """n independent Bernoulli(density) keep-masks, drawn on the CPU from ``generator`` (reproducible
    whatever the device, thread count or module order)."""
    return [(torch.rand(shape, generator=generator) < density).to(device) for _ in range(n)]


def _weighted(deltas, weights):
    return [d * w for d, w in zip(deltas, weights)]


def _sum(tensors):
    out = torch.zeros_like(tensors[0])
    for t in tensors:
        out += t
    return out


def disjoint_mean(weighted: list[torch.Tensor], weights: list[float], method: str) -> torch.Tensor:
    """TIES sign election and disjoint merge on weighted deltas wᵢ·dᵢ.

    Elected sign per entry: ``total`` = sign of Σ wᵢdᵢ, ``frequency`` = sign of Σ sign(wᵢdᵢ); zero
    counts as +. Entries agreeing with it (a zero entry never agrees) are summed and divided by the
    sum of the weights of the agreeing adapters (mergekit's normalisation; with unit weights this
    is peft's count). One adapter at a time, so memory stays at a few module-sized tensors.
    """
    votes = torch.zeros_like(weighted[0])
    for t in weighted:
        votes += t if method == "total" else t.sign()
    positive = votes >= 0
    num = torch.zeros_like(votes)
    den = torch.zeros_like(votes)
    for t, w in zip(weighted, weights):
        agree = torch.where(positive, t > 0, t < 0)
        num += t * agree
        den += agree * w
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(num))


METHODS["linear"] = Method("linear", None, "Σ wᵢ·ΔWᵢ, exactly: the factors concatenated, a LoRA of rank Σrᵢ "
                           "(reduced when a rank or energy is asked for).", None, on_factors=lora.concat)


@register("magnitude_prune", "Keep the top density fraction of each ΔWᵢ by |x|, then Σ wᵢ·ΔWᵢ.", density=0.5)
def magnitude_prune(deltas, weights, density, **_):
    return _sum([d * magnitude_mask(d, density) * w for d, w in zip(deltas, weights)])


@register("ties", "Magnitude-prune each ΔWᵢ, elect a sign per entry, average the agreeing ones.",
          "https://arxiv.org/abs/2306.01708", density=0.5, sign=True)
def ties(deltas, weights, density, majority_sign="total", **_):
    pruned = [d * magnitude_mask(d, density) for d in deltas]
    return disjoint_mean(_weighted(pruned, weights), weights, majority_sign)


@register("dare_linear", "Drop entries with probability 1 − density, rescale by 1/density, then Σ wᵢ·ΔWᵢ.",
          "https://arxiv.org/abs/2311.03099", density=0.5, random=True)
def dare_linear(deltas, weights, density, generator, **_):
    masks = dare_masks(deltas[0].shape, len(deltas), density, generator, deltas[0].device)
    return _sum([d * m / density * w for d, m, w in zip(deltas, masks, weights)])


@register("dare_ties", "DARE drop-and-rescale, then TIES sign election and disjoint mean.",
          "https://arxiv.org/abs/2311.03099", density=0.5, sign=True, random=True)
def dare_ties(deltas, weights, density, generator, majority_sign="total", **_):
    masks = dare_masks(deltas[0].shape, len(deltas), density, generator, deltas[0].device)
    dropped = [d * m / density for d, m in zip(deltas, masks)]
    return disjoint_mean(_weighted(dropped, weights), weights, majority_sign)


# ------------------------------------------------------------------------------------ rank reduction

def energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest k whose top-k singular values hold ``energy`` of the squared Frobenius norm (0 if all zero)."""
    e = s.double() ** 2
    total = e.sum()
    if total == 0:
        return 0
    cum = torch.cumsum(e, 0) / total
    return int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype, device=cum.device) - 1e-12).item()) + 1


def factor(delta: torch.Tensor, rank: int | None = None, energy: float | None = None):
    """Best rank-R approximation of ``delta`` (Eckart–Young) as LoRA factors B (out × R), A (R × in).

    Returns (A, B, retained energy fraction). ``energy`` picks the smallest R holding that fraction
    of ‖ΔW‖²_F. Full SVD, except ``torch.svd_lowrank`` when R ≪ min(out, in) on large matrices.
    """
    n = min(delta.shape)
    total = float(delta.double().pow(2).sum())
    if energy is None and rank is not None and rank * 16 <= n and n >= 1024:
        u, s, v = torch.svd_lowrank(delta, q=min(rank + 16, n), niter=6)
        u, s, vh = u[:, :rank], s[:rank], v[:, :rank].T
    else:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = max(1, energy_rank(s, energy)) if energy is not None else min(rank or n, n)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    root = s.sqrt()
    kept = float(s.double().pow(2).sum())
    return (root[:, None] * vh).contiguous(), (u * root[None, :]).contiguous(), (kept / total if total else 1.0)


def factor_product(b: torch.Tensor, a: torch.Tensor, rank: int | None = None, energy: float | None = None):
    """Like :func:`factor` for ΔW = B·A given as factors (a sum of LoRAs, concatenated): exact and
    cheap, through the SVD of the small core R_B·R_Aᵀ of thin QRs, never forming ΔW."""
    qb, qa, core = lora.qr_core(b, a)
    uc, s, vhc = torch.linalg.svd(core)
    total = float(s.double().pow(2).sum())
    r = max(1, energy_rank(s, energy)) if energy is not None else min(rank or len(s), len(s))
    u, s_r, vh = qb @ uc[:, :r], s[:r], vhc[:r] @ qa.T
    root = s_r.sqrt()
    kept = float(s_r.double().pow(2).sum())
    return (root[:, None] * vh).contiguous(), (u * root[None, :]).contiguous(), (kept / total if total else 1.0)
