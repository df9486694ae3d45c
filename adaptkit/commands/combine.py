"""Combine several LoRA adapters into one, on exact per-module deltas, and factor back to a LoRA.

For each module (the union over adapters; an adapter without it contributes a zero delta):
ΔWᵢ = sᵢ·Bᵢ·Aᵢ in fp32 on the device → the method (:mod:`adaptkit.methods`) → the best rank-R
factorisation (or, for ``linear`` without a rank, the exact concatenation A = [A₁; A₂; …],
B = [w₁s₁B₁, w₂s₂B₂, …]). Each module's scaling is folded into its factors (alpha = r), so the
written adapter computes exactly the factored ΔW. With ``base`` the result is merged into that base
instead, through the streaming merge.
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .. import __version__, lora
from ..adapter import Adapter, adapter_weights, build_adapter, natural_key
from ..device import resolve_device
from ..errors import AdaptkitError
from ..formats import peft
from ..formats.sources import DictSource
from ..io.output import atomic_output_dir, check_output
from ..methods import MAJORITY_SIGNS, METHODS, factor, factor_product
from ..reporting import Collected, Reporter
from .inputs import open_adapters, open_base, read_paths


@dataclass
class ModuleResult:
    name: str
    rank: int
    retained_energy: float
    nonzero: float | None = None  # methods on full deltas: the share of ΔW's entries left nonzero (TIES, DARE)


@dataclass
class CombineResult:
    out: str
    method: str
    adapters: list[str]
    weights: list[float]
    parameters: dict
    modules: list[ModuleResult]
    seconds: float
    device: str
    merged_into: str | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["modules"] = [m.__dict__ for m in self.modules]
        return d


def module_seed(seed: int, name: str) -> int:
    """Each module's DARE generator seed: from (seed, module name) only, so masks do not depend on
    module order, device or threads."""
    return (int(seed) * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63)


def _check(adapters: list[Adapter]) -> dict[str, list]:
    """Per module name, the LoraModule of each adapter (or None); refuse what cannot be combined."""
    for a in adapters:
        a.require_exact()
        a.require_finite()
        if a.use_dora:
            raise AdaptkitError("DoRA adapters cannot be combined by adding deltas (their magnitudes rescale "
                                "whole rows); merge them into the base instead", a.path)
        if a.full_tensors:
            raise AdaptkitError(f"modules_to_save ({', '.join(sorted(a.full_tensors))}) cannot be combined; "
                                "merge the adapters into the base instead", a.path)
        if any(m.bias_key for m in a.modules.values()):
            raise AdaptkitError("lora_bias adapters cannot be combined yet", a.path)
        if any(m.kind == "param" for m in a.modules.values()):  # only a base tells which parameter each adapts
            raise AdaptkitError("LoRAs on parameters (target_parameters, MoE experts) combine only into a base: give "
                                "base (which parameter each one adapts is told by the base's shapes)", a.path)
        if a.token_rows:
            raise AdaptkitError("trainable tokens cannot be combined by adding deltas (they replace rows); merge the "
                                "adapters into the base instead", a.path)
    if len({tuple(a.alora_tokens or ()) for a in adapters}) > 1:
        raise AdaptkitError("aLoRA adapters combine only with aLoRAs of the same invocation tokens: "
                            + "; ".join(f"{a.path}: {a.alora_tokens}" for a in adapters))
    layouts = {a.path: {m.fan_in_fan_out for m in a.modules.values()} for a in adapters}
    if len(set().union(*layouts.values())) > 1:
        conv = [str(p) for p, v in layouts.items() if True in v]
        raise AdaptkitError(f"these adapters are for different model layouts: {', '.join(conv)} adapt Conv1D "
                            "(fan_in_fan_out) layers and the others do not; combine adapters of one base model")
    roots = {a.path: {_container(n) for n in a.modules} for a in adapters}
    if len(adapters) > 1 and not set.intersection(*roots.values()):
        desc = "; ".join(f"{p}: {', '.join(sorted(r))}" for p, r in roots.items())
        raise AdaptkitError(f"these adapters share no layer container ({desc}): were they trained on different "
                            "base models? combine adapters of one base model")
    names = sorted({n for a in adapters for n in a.modules}, key=natural_key)
    table = {}
    for n in names:
        mods = [a.modules.get(n) for a in adapters]
        present = [(a, m) for a, m in zip(adapters, mods) if m is not None]
        shapes = {(m.kind, m.out_features, m.in_features, m.fan_in_fan_out, m.experts) for _, m in present}
        if len(shapes) > 1:
            desc = "; ".join(f"{a.path}: {m.kind} {m.out_features}×{m.in_features}" for a, m in present)
            raise AdaptkitError(f"adapters disagree on module {n} ({desc}): were they trained on the same base?")
        table[n] = mods
    return table


def _container(module: str) -> str:
    """The part of a module name before its first layer index ("model.layers" of "model.layers.3.mlp")."""
    parts = module.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i])
    return module.rsplit(".", 1)[0] if "." in module else module


def combine(adapters, out, *, method: str, weights=None, density: float | None = None,
            majority_sign: str = "total", rank: int | None = None, energy: float | None = None, seed: int = 0,
            device="auto", base=None, dtype="auto", max_shard_size=None, force: bool = False,
            reporter: Reporter | None = None) -> CombineResult:
    """Fuse LoRA adapters into one, on each module's exact delta ΔWᵢ = sᵢ·Bᵢ·Aᵢ, and factor it back.

    Every method (:data:`adaptkit.methods.METHODS`) works on full deltas (peft's
    ``add_weighted_adapter`` works on A and B separately for linear/TIES/DARE, adding cross terms
    Bᵢ·Aⱼ); the result is factored back into a LoRA by truncated SVD (the best rank-R
    approximation), and the energy each module keeps is reported. ``linear`` without ``rank`` or
    ``energy`` is exact: the factors are concatenated.

    Args:
        adapters: the adapters (paths, Hub ids or :class:`Adapter` objects) of one base model.
        out: the adapter folder to write (or, with ``base``, the merged model's).
        method: ``linear``, ``ties``, ``dare_linear``, ``dare_ties`` or ``magnitude_prune``.
        weights: one number per adapter (default 1 each).
        density: the fraction of entries kept, for the pruning methods (default 0.5).
        majority_sign: TIES sign election: ``total`` (sign of the weighted sum) or ``frequency``.
        rank: the rank of the output (best rank-R approximation, per module).
        energy: per module, the smallest rank keeping this fraction of ‖ΔW‖² (e.g. 0.99).
        seed: seed of the DARE masks, drawn per (seed, module name) on the CPU: the same seed gives
            the same file on any device.
        device: where the deltas are computed (``"auto"``, ``"cpu"``, ``"cuda"``…).
        base: merge the combination into this base model instead of writing an adapter. LoRAs on
            MoE experts (``target_parameters``) combine this way only, expert by expert.
        dtype, max_shard_size: for ``base``, as in :func:`adaptkit.merge`.
        force: replace an existing ``out``.
        reporter: receives progress (modules) and warnings.

    Returns:
        A :class:`CombineResult` with each module's rank and the energy it keeps.

    Example:
        >>> import adaptkit
        >>> r = adaptkit.combine(["fixtures/adapters/llama-lora", "fixtures/adapters/llama-rslora-patterns"],
        ...                      "out/doc-combined", method="ties", density=0.5, rank=8, force=True)
        >>> len(r.modules), r.modules[0].rank
        (14, 8)
    """
    t0 = time.perf_counter()
    report = Collected(reporter)
    adapters = adapters if isinstance(adapters, (list, tuple)) else [adapters]
    if method not in METHODS:
        raise AdaptkitError(f"unknown method {method!r} (choose {', '.join(METHODS)})", param="method")
    spec = METHODS[method]
    if not adapters:
        raise AdaptkitError("give at least one adapter (one adapter with a rank reduces its rank)", param="adapters")
    weights = adapter_weights(weights, len(adapters))
    if spec.sign and len(adapters) == 1:
        alone = "magnitude_prune" if method == "ties" else "dare_linear"
        raise AdaptkitError(f"{method} of a single adapter has no signs to elect: it would only prune it. Use "
                            f"method {alone} for that, or give two or more adapters", param="method")
    if spec.density is not None:
        density = spec.density if density is None else density
        if not 0 < density <= 1:
            raise AdaptkitError(f"must be in (0, 1], got {density}", param="density")
    elif density is not None:
        raise AdaptkitError(f"does not apply to {method}", param="density")
    if majority_sign not in MAJORITY_SIGNS:
        raise AdaptkitError(f"must be one of {', '.join(MAJORITY_SIGNS)}", param="majority_sign")
    if rank is not None and energy is not None:
        raise AdaptkitError("give rank or energy, not both", param="rank")
    if energy is not None and not 0 < energy <= 1:
        raise AdaptkitError(f"must be in (0, 1], got {energy}", param="energy")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise AdaptkitError(f"must be a positive integer, got {rank}", param="rank")
    given = [a.path if isinstance(a, Adapter) else a for a in adapters] + [base]
    check_output(out, force, inputs=given)
    dev = resolve_device(device)
    loaded = open_adapters(adapters)
    if base is not None and any(m.kind == "param" for a in loaded for m in a.modules.values()):
        from ..plan import resolve_parameters

        resolve_parameters(open_base(base), loaded)  # MoE experts: E and the parameter, from the base's shapes
    table = _check(loaded)

    tensors: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    results: list[ModuleResult] = []
    report.start("combining", len(table))
    experts: dict[str, object] = {}  # combined LoRAs on expert parameters, resolved (merged into base)
    for name, mods in table.items():
        args = (weights, spec, dict(density=density, majority_sign=majority_sign), rank, energy, seed, dev)
        first = next(m for m in mods if m is not None)
        if first.experts > 1:
            a, b, kept, nonzero = _combine_experts(name, mods, *args)
            experts[name] = replace(first, rank=a.shape[0] // first.experts, alpha=a.shape[0] // first.experts,
                                    scaling=1.0, source=DictSource(Path(name), {"A": a.cpu(), "B": b.cpu()}),
                                    a_key="A", b_key="B")
            results.append(ModuleResult(name, a.shape[0] // first.experts, kept, nonzero))
            report.advance(1)
            continue
        a, b, kept, nonzero = _combine_module(name, mods, *args)
        r_out = a.shape[0]
        kind = first.kind
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A.weight",
                                                                                              "lora_B.weight")
        tensors[f"{name}.{a_key}"] = a.cpu()
        tensors[f"{name}.{b_key}"] = b.cpu()
        alphas[name] = float(r_out)
        results.append(ModuleResult(name, r_out, kept, nonzero))
        report.advance(1)
    low = [m for m in results if m.retained_energy < 0.9]
    if low:
        report.warn(f"{len(low)} modules keep under 90 % of their energy after rank reduction (lowest: "
                    f"{min(low, key=lambda m: m.retained_energy).name} at "
                    f"{100 * min(m.retained_energy for m in low):.1f} %); raise the rank or give an energy")

    first = loaded[0].config
    config = {"peft_type": "LORA", "fan_in_fan_out": any(m.fan_in_fan_out for a in loaded for m in a.modules.values()),
              "base_model_name_or_path": first.get("base_model_name_or_path"), "task_type": first.get("task_type"),
              "alora_invocation_tokens": loaded[0].alora_tokens}
    here = Path(f"(combined with {method})")  # in memory: no path on disk
    combined = build_adapter(here, here, config, DictSource(here, tensors), fmt="combined", infer_alpha=alphas)
    combined.modules.update(experts)
    params = {"density": density, "majority_sign": majority_sign if spec.sign else None,
              "rank": rank, "energy": energy, "seed": seed if spec.random else None}
    result = CombineResult(out=str(out), method=method, adapters=[str(a.path) for a in loaded], weights=weights,
                           parameters=params, modules=results, seconds=0.0, device=str(dev))
    if base is not None:
        from .merge import merge

        merged = merge(base, [combined], out, device=device, dtype=dtype, max_shard_size=max_shard_size, force=force,
                       reporter=report)
        result.merged_into = str(base)
        result.warnings = merged.warnings
    else:
        with atomic_output_dir(out, force, inputs=read_paths(None, loaded)) as tmp:
            peft.write(combined, tmp)
            (tmp / "README.md").write_text(_readme(result))
            (tmp / "adaptkit_combine.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    result.warnings = report.warnings
    result.seconds = time.perf_counter() - t0
    return result


def _combine_module(name, mods, weights, spec, parameters, rank, energy, seed, dev):
    """(A, B, energy kept, share of entries nonzero or None) of one module's combination, scaling folded
    in (alpha = r)."""
    present = [(m, w) for m, w in zip(mods, weights) if m is not None]
    if spec.on_factors is not None:  # exact on the factors; reduced from the product when a rank is asked for
        a, b = spec.on_factors([(m.A, m.B, m.scaling * w) for m, w in present], dev)
        kept, nonzero = 1.0, None
        if not bool(torch.isfinite(b).all()):
            raise AdaptkitError(f"{name}: the weighted factors are not finite (the weights overflow fp32)")
        if rank is not None or energy is not None:
            a, b, kept = factor_product(b, a, rank=rank, energy=energy)
    else:
        ref = present[0][0]
        zeros = torch.zeros(ref.out_features, ref.in_features, device=dev)
        deltas = [m.delta(dev) if m is not None else zeros for m in mods]
        gen = torch.Generator().manual_seed(module_seed(seed, name)) if spec.random else None
        full = spec.fn(deltas, weights, generator=gen, **parameters)
        nonzero = float(torch.count_nonzero(full)) / max(full.numel(), 1)
        if not bool(torch.isfinite(full).all()):
            raise AdaptkitError(f"{name}: the combined delta is not finite (the adapters' values overflow fp32)")
        r = rank if rank is not None else max(m.shape_rank for m, _ in present)
        a, b, kept = factor(full, rank=None if energy is not None else r, energy=energy)
    if not bool(torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise AdaptkitError(f"{name}: the combined delta is not finite (the adapters' values overflow fp32)")
    return a, b, kept, nonzero


def _combine_experts(name, mods, weights, spec, parameters, rank, energy, seed, dev):
    """A LoRA on a 3-D expert parameter, combined expert by expert (each expert's ΔWₑ = s·Bₑ·Aₑ is a
    module of its own: the method, the rank and the DARE masks apply per expert), packed back in
    peft's layout (A's rows expert-major, B's columns rank-major), every expert at the largest rank
    (zero-padded: exact)."""
    n = next(m for m in mods if m is not None).experts
    parts = []
    for e in range(n):
        views = [_expert_view(m, e) if m is not None else None for m in mods]
        parts.append(_combine_module(f"{name}.{e}", views, weights, spec, parameters, rank, energy, seed, dev))
    r = max(p[0].shape[0] for p in parts)
    a = torch.stack([torch.nn.functional.pad(p[0], (0, 0, 0, r - p[0].shape[0])) for p in parts])  # (E, r, in)
    b = torch.stack([torch.nn.functional.pad(p[1], (0, r - p[1].shape[1])) for p in parts], dim=2)  # (out, r, E)
    nonzero = [p[3] for p in parts if p[3] is not None]
    return (*lora.pack_experts(a, b), min(p[2] for p in parts), sum(nonzero) / len(nonzero) if nonzero else None)


def _expert_view(m, e: int):
    """Expert ``e`` of a LoRA on an expert parameter, as a plain module (Aₑ, Bₑ, same scaling)."""
    a, b = lora.expert_factors(m.A, m.B, m.experts)
    return replace(m, source=DictSource(Path(m.name), {"A": a[e], "B": b[:, :, e]}), a_key="A", b_key="B",
                   experts=1, param=None, rank=a.shape[1])


def _readme(result: CombineResult) -> str:
    spec = METHODS[result.method]
    lines = ["---", "library_name: peft", "tags: [lora, adaptkit, " + result.method + "]", "---", "",
             "# Combined LoRA adapter", "",
             f"Produced by adaptkit {__version__} (`adaptkit combine --method {result.method}`): {spec.summary}",
             f"Paper: {spec.paper}" if spec.paper else "", "", "Inputs:", ""]
    for a, w in zip(result.adapters, result.weights):
        lines.append(f"- `{a}` (weight {w:g})")
    lines += ["", "Parameters: " + ", ".join(f"{k}={v}" for k, v in result.parameters.items() if v is not None), ""]
    worst = min(result.modules, key=lambda m: m.retained_energy)
    lines.append(f"Rank reduction kept at least {100 * worst.retained_energy:.2f} % of each module's energy "
                 f"(lowest: {worst.name}); per-module figures in adaptkit_combine.json.")
    return "\n".join(lines) + "\n"
