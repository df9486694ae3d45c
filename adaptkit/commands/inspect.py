"""``adaptkit.inspect``: what an adapter holds, its health, the spectrum of ΔW, and where it will load.

The spectrum never forms ΔW: with B = Q_B R_B and Aᵀ = Q_A R_A (thin QR), ΔW = s · Q_B (R_B R_Aᵀ) Q_Aᵀ,
so the singular values of ΔW are s times those of the r × r core R_B R_Aᵀ (:func:`adaptkit.lora.qr_core`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .. import lora
from ..adapter import Adapter, LoraModule, without_base_copies
from ..methods import energy_rank
from ..readiness import Readiness, check
from ..reporting import Collected, Reporter
from .inputs import open_adapter


@dataclass
class ModuleReport:
    name: str
    kind: str
    rank: int
    alpha: float
    scaling: float
    in_features: int
    out_features: int
    dora: bool = False
    lora_bias: bool = False
    singular_values: list[float] | None = None
    rank_90: int | None = None
    rank_99: int | None = None
    experts: int = 1  # a LoRA on a 3-D expert parameter: one rank-r LoRA per expert


@dataclass
class AdapterReport:
    path: str
    format: str
    peft_type: str
    base_model: str | None
    r: int
    lora_alpha: float
    scaling: float | None
    use_rslora: bool
    use_dora: bool
    target_modules: object
    dtype: list[str]
    parameters: int
    file_size: int
    modules: list[ModuleReport]
    modules_to_save: list[str] = field(default_factory=list)
    target_parameters: list[str] = field(default_factory=list)  # peft target_parameters (MoE experts…)
    trainable_tokens: dict[str, list[int]] = field(default_factory=dict)  # embedding -> token ids it replaces
    alora_invocation_tokens: list[int] | None = None
    warnings: list[str] = field(default_factory=list)
    checks: list[Readiness] = field(default_factory=list)  # where it will load (``checks=``)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["checks"] = {c.target: c.to_dict() for c in self.checks}
        return d


def singular_values(module: LoraModule) -> torch.Tensor:
    """Singular values of ΔW = scaling · B @ A, from the r × r core (fp64 for accuracy)."""
    _, _, core = lora.qr_core(module.B.to(torch.float64), module.A.to(torch.float64))
    return torch.linalg.svdvals(core) * abs(module.scaling)


def health(adapter: Adapter) -> list[str]:
    warnings = list(adapter.notes)
    src = adapter.source
    zero_b, nonfinite, mismatched, rank_diff = [], [], [], []
    for m in adapter.modules.values():
        a_shape, b_shape = src.shape(m.a_key), src.shape(m.b_key)
        if a_shape[0] != b_shape[1]:
            mismatched.append(f"{m.name} (A {list(a_shape)}, B {list(b_shape)})")
            continue
        if m.kind != "param" and m.shape_rank != m.rank * m.experts:
            rank_diff.append(f"{m.name} (tensors r={m.shape_rank}, config r={m.rank})")
        a, b = m.A, m.B
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            nonfinite.append(m.name)
        elif not b.any():
            zero_b.append(m.name)
    for key in adapter.full_tensors.values():
        t = src.get(key)
        if t.is_floating_point() and not torch.isfinite(t).all():
            nonfinite.append(key)
    if zero_b:
        warnings.append(f"B is all zero (untrained, ΔW = 0) in {_few(zero_b)}")
    if nonfinite:
        warnings.append(f"NaN or Inf in {_few(nonfinite)}")
    if mismatched:
        warnings.append(f"A/B shapes do not fit in {_few(mismatched)}")
    if rank_diff:
        warnings.append(f"rank differs from the config in {_few(rank_diff)}: peft cannot load it, adaptkit will not "
                        "merge it")
    warnings += [p for p in adapter.problems if "but the config gives r=" not in p]
    if adapter.mutated_init:
        warnings.append(adapter.mutated_init)
    if adapter.unclaimed:
        warnings.append(f"{len(adapter.unclaimed)} tensors belong to no LoRA module: {_few(adapter.unclaimed)}")
    if not adapter.modules and not adapter.full_tensors and not adapter.token_rows:
        warnings.append("the adapter holds no LoRA modules")
    return warnings


def _few(items: list[str], n: int = 3) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def inspect(source, *, svd: bool = False, checks=(), max_lora_rank: int = 16, base=None,
            reporter: Reporter | None = None) -> AdapterReport:
    """What a LoRA adapter holds: peft type, base model, r, α, scaling, DoRA, targets, one row per
    module (named as in the base model) and health warnings (untrained B, NaN/Inf, shapes that do
    not fit, ranks that differ from the config, tensors that belong to no module).

    Args:
        source: a PEFT folder, an mlx-lm folder, a single .safetensors file (PEFT or kohya names),
            a Hub id, or a loaded :class:`Adapter`.
        svd: add each module's singular values of ΔW and the ranks holding 90 % / 99 % of its energy,
            from the r×r core (never the full ΔW).
        checks: runtimes to check the adapter against (:data:`adaptkit.readiness.TARGETS`:
            ``vllm``, ``llamacpp``, ``mlx``); each result names the rules broken and the fix.
        max_lora_rank: vLLM's ``--max-lora-rank``, for the ``vllm`` check.
        base: the base model (folder or Hub id), optional: names what each ``target_parameters``
            LoRA adapts from its checkpoint, and leaves out of the checks the saved tensors that
            only repeat the base's (peft's copy of an embedding it saves beside an embedding LoRA),
            as the exports do.
        reporter: receives the health warnings.

    Returns:
        An :class:`AdapterReport` (``to_dict()`` for JSON).

    Example:
        >>> import adaptkit
        >>> r = adaptkit.inspect("fixtures/adapters/llama-lora", checks=["vllm"], max_lora_rank=4)
        >>> r.r, r.lora_alpha, r.scaling, len(r.modules), r.checks[0].ok
        (8, 16, 2.0, 14, False)
    """
    collected = Collected(reporter)
    base_ck = None
    if base is not None:
        from ..io.checkpoint import Checkpoint
        from .inputs import resolve

        base_ck = Checkpoint.open(resolve(base))
    adapter = open_adapter(source, base_names=list(base_ck.tensors) if base_ck is not None else None)
    if base_ck is not None:
        from ..plan import resolve_parameters

        resolve_parameters(base_ck, [adapter])
    else:
        _resolve_from_base(adapter)
    report = inspect_adapter(adapter, svd=svd)
    checked = adapter
    if base_ck is not None and adapter.full_tensors:
        checked, same = without_base_copies(adapter, base_ck)
        if same:
            report.warnings.append(f"{len(same)} saved tensors equal the base's own (peft's copy of an embedding "
                                   f"beside its LoRA): nothing to serve, left out of the checks ({', '.join(same[:3])})")
    report.checks = [check(checked, target, max_lora_rank) for target in checks]
    for w in report.warnings:
        collected.warn(w)
    return report


def _resolve_from_base(adapter: Adapter) -> None:
    """Name what each target_parameters LoRA adapts when the adapter's base is a local model folder."""
    from pathlib import Path

    from ..architecture import parameter_shapes
    from ..io.files import is_regular, read_json

    base = adapter.base_model
    if not any(m.kind == "param" for m in adapter.modules.values()) or not isinstance(base, str):
        return
    if is_regular(Path(base) / "config.json"):
        from ..architecture import is_transposed

        config = read_json(Path(base) / "config.json", "config.json")
        adapter.resolve_parameters(parameter_shapes(config), lambda module: is_transposed(config, module))


def inspect_adapter(adapter: Adapter, svd: bool = False) -> AdapterReport:
    modules = []
    for m in adapter.modules.values():
        rep = ModuleReport(name=m.name, kind=m.kind, rank=m.rank, alpha=m.alpha, scaling=m.scaling,
                           in_features=m.in_features, out_features=m.out_features, dora=m.use_dora,
                           lora_bias=m.bias_key is not None, experts=m.experts)
        if svd and m.experts == 1 and m.kind != "param" and bool(torch.isfinite(m.A).all() and torch.isfinite(m.B).all()):
            s = singular_values(m)
            rep.singular_values = [float(x) for x in s]
            rep.rank_90, rep.rank_99 = energy_rank(s, 0.90), energy_rank(s, 0.99)
        modules.append(rep)
    scalings = {m.scaling for m in adapter.modules.values()}
    cfg = adapter.config
    return AdapterReport(
        path=str(adapter.path), format=adapter.format, peft_type=adapter.peft_type, base_model=adapter.base_model,
        r=int(cfg.get("r") or (max((m.rank for m in adapter.modules.values()), default=0))),
        lora_alpha=cfg.get("lora_alpha", next((m.alpha for m in adapter.modules.values()), None)),
        scaling=scalings.pop() if len(scalings) == 1 else None, use_rslora=adapter.use_rslora,
        use_dora=adapter.use_dora, target_modules=cfg.get("target_modules"), dtype=adapter.dtypes,
        parameters=adapter.parameters, file_size=adapter.file_size, modules=modules,
        modules_to_save=sorted(adapter.full_tensors), target_parameters=list(cfg.get("target_parameters") or []),
        trainable_tokens={mod: ids for mod, (ids, _) in adapter.token_rows.items()},
        alora_invocation_tokens=adapter.alora_tokens, warnings=health(adapter))
