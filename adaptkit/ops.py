"""What a merge does to one tensor, in fp32: the plan's operations and how they apply.

Each operation names its inputs (an adapter module, a saved tensor) and applies one formula of
:mod:`.lora`. :func:`apply_ops` runs a tensor's operations in order; a lone plain LoRA is one fused
``addmm_`` (W += s·B@A, ΔW never materialised), anything else goes through ΔW.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import lora
from .adapter import FP32_MAX, Adapter, LoraModule
from .errors import AdaptkitError


@dataclass
class Op:
    """One change to one tensor: ``lora`` (W += w·s·B@A, DoRA when the module has magnitudes),
    ``bias`` (b += w·s·lora_B.bias), ``replace`` (a tensor the adapter saved, modules_to_save) or
    ``rows`` (trainable tokens: the rows of some token ids replaced by the values the adapter saved)."""

    kind: str  # "replace", "lora", "bias" or "rows"
    adapter: Adapter
    weight: float = 1.0
    module: LoraModule | None = None
    key: str | None = None  # for "replace": the adapter tensor that replaces the base one
    transposed: bool = False  # for "lora": the base stores (in, out)
    rows: list[int] | None = None  # for "rows": the token ids whose rows ``key`` holds
    expert: int | None = None  # for "experts": the expert whose delta goes here (None: all, a fused 3-D tensor)
    part: tuple[int, int, int] | None = None  # for "experts": (dim, start, stop) of that expert's delta
    into: tuple[int, int] | None = None  # for "lora"/"bias": the rows of this tensor the delta lands on (fused base)
    take: tuple[int, int] | None = None  # for "lora"/"bias": the rows of the delta this tensor takes (split base)

    def window(self, w: torch.Tensor) -> torch.Tensor:
        """The rows of ``w`` this op changes (a view; ``w`` itself unless the base fuses the module)."""
        return w if self.into is None else w[self.into[0]:self.into[1]]

    def part_of(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """The rows of a per-output tensor (B, DoRA magnitude, lora_bias) for this tensor's part."""
        return t if self.take is None or t is None else t[self.take[0]:self.take[1]]

    @property
    def scale(self) -> float:
        """w·s, the factor of this op's term; refused when not a finite fp32 number (``addmm_`` on the
        CPU would silently ignore a NaN alpha)."""
        s = self.module.scaling * self.weight
        if not (math.isfinite(s) and abs(s) <= FP32_MAX):
            raise AdaptkitError(f"the scale of {self.module.name} is not a finite fp32 number "
                                f"({self.module.scaling} × {self.weight})", self.adapter.path)
        return s


def _fused(ops: list[Op]) -> Op | None:
    """The one plain-LoRA op of a tensor, when it can be a single ``addmm_``."""
    if len(ops) == 1 and ops[0].kind == "lora" and not ops[0].module.use_dora:
        return ops[0]
    return None


def apply_ops(w: torch.Tensor, ops: list[Op], device) -> None:
    """Apply ``ops`` in order to the fp32 tensor ``w`` (on ``device``), in place."""
    if not ops:
        return
    if all(op.kind == "experts" for op in ops):  # additions only: in place, no copy of the weight
        for op in ops:
            w += expert_term(op, device)
        return
    op = _fused(ops)
    if op is not None:
        m = op.module
        lora.add_delta_(op.window(w), m.A.to(device, torch.float32), op.part_of(m.B).to(device, torch.float32),
                        op.scale, op.transposed)
        return
    w.copy_(_general(w.clone(), ops, device))


def _general(w: torch.Tensor, ops: list[Op], device) -> torch.Tensor:
    needs_ref = any(op.kind == "lora" and op.module.use_dora for op in ops)
    ref = w.clone() if needs_ref else None  # DoRA's W₀: the weight before any adapter
    for op in ops:
        if op.kind == "replace":
            w = op.adapter.source.get(op.key).to(device=device, dtype=torch.float32, copy=True)
            ref = w.clone() if needs_ref else None
        elif op.kind == "lora":
            m = op.module
            _ = op.scale  # refuses a scale that is not finite
            d = lora.delta(m.A, op.part_of(m.B), m.scaling, device)
            if op.weight != 1.0:
                d.mul_(op.weight)
            if op.transposed:
                d = d.T
            target = op.window(w)  # rows windows only on nn.Linear weights (see families)
            if m.use_dora:
                target.copy_(lora.dora(target, op.window(ref), d, op.part_of(m.magnitude), op.transposed))
            else:
                target.add_(d)
        elif op.kind == "bias":
            op.window(w).add_(lora.bias_delta(op.part_of(op.module.lora_bias), op.scale, device))
        elif op.kind == "rows":
            w[op.rows] = op.adapter.source.get(op.key).to(device=device, dtype=torch.float32)
        elif op.kind == "experts":
            w += expert_term(op, device)
    return w


def expert_term(op: Op, device) -> torch.Tensor:
    """What a ``target_parameters`` LoRA adds to this tensor: one expert's w·s·B_e@A_e ((out, in), or
    transposed where the parameter stores (in, out)), the part this tensor holds, or every expert's,
    stacked, for a fused 3-D tensor."""
    m = op.module
    if op.expert is not None and op.part is not None:  # a part of one expert's ΔW: computed alone
        dim, start, stop = op.part
        cuts_rows = (dim == 0) != op.transposed  # the part's dim is ΔW's out (rows), else its in (columns)
        d = lora.expert_delta(m.A, m.B, op.scale, m.experts, op.expert, device,
                              rows=(start, stop) if cuts_rows else None, cols=None if cuts_rows else (start, stop))
        return d.T if op.transposed else d

    def one(e):
        d = lora.expert_delta(m.A, m.B, op.scale, m.experts, e, device)
        return d.T if op.transposed else d

    return lora.place_expert(one, m.experts, op.expert, op.part)
