"""``adaptkit.convert``: move an adapter between layouts without changing its ΔW.

PEFT folder ⇄ raw file ⇄ kohya file, and out to llama.cpp (GGUF) and mlx-lm. Every target keeps each
module's exact scaling: a PEFT folder written from a file without a PEFT config gets
``rank_pattern`` / ``alpha_pattern`` (full module names) wherever modules differ; a kohya file gets a
per-module ``.alpha`` = scaling · r (rsLoRA and patterns included, unlike peft's own kohya scripts,
which write the global alpha); single-scale formats (GGUF, MLX) get each module's scaling folded
into its B (:func:`adaptkit.lora.fold`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import lora
from ..adapter import Adapter, build_adapter, without_base_copies
from ..dtypes import resolve_dtype
from ..errors import AdaptkitError
from ..families import relayout_for
from ..formats import TARGETS
from ..formats.kohya import DEFAULT_PREFIX
from ..formats.sources import DictSource
from ..hub import resolve
from ..io.checkpoint import Checkpoint
from ..io.output import atomic_output_dir, atomic_output_file, check_output
from ..reporting import Collected, Reporter
from .inputs import open_adapter, read_paths

GGUF_OUTTYPES = ("f32", "f16", "bf16")


@dataclass
class ConvertResult:
    source: str
    source_format: str
    to: str
    out: str
    modules: int
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def convert(source, out, *, to: str, base=None, initial=None, dtype=None, outtype: str = "f32",
            prefix: str = DEFAULT_PREFIX, pad_rank: int | None = None, force: bool = False,
            reporter: Reporter | None = None) -> ConvertResult:
    """Write the adapter ``source`` in another layout at ``out``, its ΔW unchanged.

    Args:
        source: a PEFT folder (safetensors or legacy .bin), a raw .safetensors file with PEFT names,
            a kohya file (``lora_te_…``/``lora_unet_…``, ``.lora_down``/``.lora_up``/``.alpha``), an
            mlx-lm folder, or a Hub id.
        out: a folder for ``peft`` and ``mlx``, a file (``.safetensors``, ``.gguf``) otherwise.
        to: the target format, one of :data:`adaptkit.formats.TARGETS`: ``peft``, ``raw``,
            ``kohya``, ``gguf``, ``mlx``.
        base: the base model: maps foreign kohya names (underscores) back to module names, gives
            GGUF (required) and MLX their model config, and lays the LoRA out as the base stores its
            projections (:func:`adaptkit.families.relayout`: split q/k/v LoRAs onto a fused
            ``qkv_proj`` as one block-diagonal LoRA, a fused one onto split weights by B's rows).
            Without it, the adapter's own ``base_model_name_or_path`` is tried when it is a local folder.
        dtype: cast the tensors (``"float16"``, ``"bfloat16"``, ``"float32"``; default: as stored),
            for ``peft``, ``raw`` and ``kohya``.
        initial: for an adapter whose initialisation rewrote the base (PiSSA, OLoRA, CorDA…): the
            adapter as saved right after initialisation. The output is then the plain LoRA of rank
            2r that applies to the original base, B·A − B₀·A₀ (peft's
            ``path_initial_model_for_weight_conversion``).
        outtype: tensor type of a GGUF adapter: ``f32``, ``f16`` or ``bf16``.
        prefix: the kohya name prefix (``lora_te_``, ``lora_unet_``…).
        pad_rank: for ``vllm``, zero-pad every module to this rank (exact; e.g. the one rank a
            multi-LoRA server is started with).
        force: replace an existing ``out``.
        reporter: receives warnings.

    Returns:
        A :class:`ConvertResult`.

    Example:
        >>> import adaptkit
        >>> r = adaptkit.convert("fixtures/adapters/llama-rslora-patterns", "out/doc-k.safetensors", to="kohya",
        ...                      force=True)
        >>> r.source_format, r.modules
        ('peft', 14)
    """
    report = Collected(reporter)
    if to not in TARGETS:
        raise AdaptkitError(f"unknown format {to!r} (choose {', '.join(TARGETS)})", param="to")
    if outtype not in GGUF_OUTTYPES:
        raise AdaptkitError(f"unknown GGUF tensor type {outtype!r} (choose {', '.join(GGUF_OUTTYPES)})",
                            param="outtype")
    target = TARGETS[to]
    torch_dtype = resolve_dtype(dtype)
    check_output(out, force, inputs=[source, base, initial], folder=target.suffix is None)
    base_ck = Checkpoint.open(resolve(base)) if base is not None else None
    adapter = open_adapter(source, base_names=list(base_ck.tensors) if base_ck is not None else None)
    adapter.require_exact(initial_given=initial is not None)
    adapter.require_finite()
    for w in adapter.notes:
        report.warn(w)
    inputs = [source, *read_paths(base_ck, [adapter])]
    if initial is not None:
        start = open_adapter(initial)
        inputs += read_paths(None, [start])
        adapter = subtract_initial(adapter, start)
    if base_ck is not None:  # the base's own projection layout (Phi-3's fused qkv_proj, or split q/k/v)
        adapter, moved = relayout_for(adapter, base_ck)
        if moved:
            report.warn(f"{len(moved)} modules re-laid out to the base's fused/split projections (first: {moved[0]}); "
                        "every ΔW kept")
    if base_ck is not None and adapter.full_tensors:
        adapter, same = without_base_copies(adapter, base_ck)
        if same:
            report.warn(f"{len(same)} saved tensors equal the base's own (peft saves the base embedding beside an "
                        f"embedding LoRA): left out, exactly ({', '.join(same[:3])})")
    if target.base != "no" and base_ck is None:
        guess = Path(str(adapter.base_model or ""))
        if adapter.base_model and (guess / "config.json").exists():
            base_ck = Checkpoint.open(guess)
            inputs.append(guess)
        elif target.base == "required":
            raise AdaptkitError(f"{to} needs the base model's config: give base", adapter.path)
    if pad_rank is not None and (to != "vllm" or isinstance(pad_rank, bool) or not isinstance(pad_rank, int)
                                 or pad_rank < 1):
        raise AdaptkitError("is a positive rank, for to='vllm'", param="pad_rank")
    if to in ("gguf", "vllm", "mlx") and base_ck is not None:  # what each target_parameters LoRA adapts
        from ..plan import resolve_parameters

        resolve_parameters(base_ck, [adapter])
    options = dict(dtype=torch_dtype, prefix=prefix, outtype=outtype, pad_rank=pad_rank,
                   base_config=base_ck.config if base_ck is not None else None,
                   base_path=base_ck.path if base_ck is not None else None, base=base_ck)
    if target.suffix is None:
        with atomic_output_dir(out, force, inputs=inputs) as tmp:
            target.write(adapter, tmp, **options)
    else:
        with atomic_output_file(out, force, target.suffix, inputs=inputs) as tmp:
            target.write(adapter, tmp, **options)
    return ConvertResult(str(source), adapter.format, to, str(out), len(adapter.modules), report.warnings)


def subtract_initial(trained: Adapter, initial: Adapter) -> Adapter:
    """The plain LoRA that applies to the original base: ΔW = s·B·A − s₀·B₀·A₀ for every module, as one
    LoRA of rank r + r₀ (A' = [A; A₀], B' = [s·B, −s₀·B₀], scaling 1), exactly (:func:`adaptkit.lora.concat`)."""
    if set(trained.modules) != set(initial.modules):
        odd = sorted(set(trained.modules) ^ set(initial.modules))
        raise AdaptkitError(f"the initial adapter does not have the same modules (first difference: {odd[0]})",
                            initial.path, param="initial")
    if trained.use_dora or initial.use_dora or any(m.kind != "linear" for m in trained.modules.values()):
        raise AdaptkitError("only linear LoRA modules without DoRA can be converted from their initial adapter",
                            trained.path, param="initial")
    tensors, alphas = {}, {}
    for name, m in trained.modules.items():
        m0 = initial.modules[name]
        if (m0.out_features, m0.in_features) != (m.out_features, m.in_features):
            raise AdaptkitError(f"{name} is {m0.out_features}×{m0.in_features} in the initial adapter, "
                                f"{m.out_features}×{m.in_features} in the trained one", initial.path, param="initial")
        a, b = lora.concat([(m.A, m.B, m.scaling), (m0.A, m0.B, -m0.scaling)])
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = a, b
        alphas[name] = float(a.shape[0])  # scaling 1: the scales are in B
    for name, key in trained.full_tensors.items():
        tensors[name] = trained.source.get(key)
    config = {k: v for k, v in trained.config.items() if k not in ("r", "lora_alpha", "rank_pattern", "alpha_pattern",
                                                                    "use_rslora")}
    config.update(init_lora_weights=True, modules_to_save=sorted({n.rpartition(".")[0] for n in trained.full_tensors})
                  or None)
    converted = build_adapter(trained.path, trained.weights_path,
                              {"peft_type": "LORA", "modules_to_save": config["modules_to_save"]},
                              DictSource(trained.path, tensors), fmt="converted", infer_alpha=alphas)
    converted.config = {**config, "peft_type": "LORA"}
    return converted
