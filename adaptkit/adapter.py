"""The in-memory view of a LoRA adapter: its modules, their factors and their scaling.

An :class:`Adapter` is built from a tensor source (a safetensors or ``.bin`` file, opened lazily) and
an adapter config (peft's ``adapter_config.json`` or what a raw file's metadata holds). Each adapted
module is a :class:`LoraModule` named by its *base-model* path (peft's ``base_model.model.`` prefix
stripped), so ``module.name + ".weight"`` is the base checkpoint's tensor name.

The formulas are peft's (``peft/tuners/lora/layer.py``, ``get_delta_weight``):
scaling = lora_alpha / r, or lora_alpha / sqrt(r) with ``use_rslora``; ΔW = scaling · B @ A in the
canonical (out, in) orientation; GPT-2 ``Conv1D`` (``fan_in_fan_out``) and embeddings store the
transpose. ``rank_pattern`` / ``alpha_pattern`` keys match a module name with the regex
``(.*\\.)?(KEY)$``, first key wins (peft's ``get_pattern_key``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from . import lora
from .errors import AdaptkitError

PEFT_PREFIX = "base_model.model."
FP32_MAX = 3.4028234663852886e38  # the merge computes in fp32: a scale beyond it cannot be applied
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8}  # LoraConfig's defaults, for keys an adapter_config.json leaves out

UNSUPPORTED_PEFT_TYPES = {
    "IA3": "IA3", "LOHA": "LoHa", "LOKR": "LoKr", "PREFIX_TUNING": "prefix tuning",
    "P_TUNING": "p-tuning", "PROMPT_TUNING": "prompt tuning", "ADALORA": "AdaLoRA", "OFT": "OFT",
    "BOFT": "BOFT", "VERA": "VeRA", "FOURIERFT": "FourierFT", "LN_TUNING": "LayerNorm tuning",
    "POLY": "Poly", "VBLORA": "VB-LoRA", "HRA": "HRA", "BONE": "Bone", "XLORA": "X-LoRA",
    "ADAPTION_PROMPT": "adaption prompt", "MULTITASK_PROMPT_TUNING": "multitask prompt tuning",
    "CPT": "CPT", "RANDLORA": "RandLoRA", "SHIRA": "SHiRA", "C3A": "C3A", "MISS": "MiSS",
}

# Every field of peft's LoraConfig, by what it means for a merge. tests/test_adapter.py checks this
# against peft's own LoraConfig: a peft release that adds a field fails that test until it is placed here.
MATH_FIELDS = {"r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "lora_bias",
               "fan_in_fan_out", "modules_to_save", "trainable_token_indices", "bias", "init_lora_weights",
               "alora_invocation_tokens", "target_parameters"}  # implemented, or refused by value (init_lora_weights, aLoRA)
SCOPE_FIELDS = {"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"}  # the tensors say it
INERT_FIELDS = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                "inference_mode", "lora_dropout", "megatron_config", "megatron_core", "runtime_config",
                "qalora_group_size", "loftq_config", "eva_config", "corda_config", "lora_ga_config"}
# fields whose meaning adaptkit does not implement: refused whenever they are set
UNSUPPORTED_FIELDS = {
    "use_qalora": "QA-LoRA (use_qalora)", "use_bdlora": "block-diagonal LoRA (use_bdlora)", "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA", "kasa_config": "KaSA (it rewrites the base)", "arrow_config": "Arrow routing",
    "layer_replication": "layer_replication (the adapter changes the model's layer layout)",
    "ensure_weight_tying": "ensure_weight_tying",
}
KNOWN_FIELDS = MATH_FIELDS | SCOPE_FIELDS | INERT_FIELDS | set(UNSUPPORTED_FIELDS)
# init_lora_weights values that rewrite the base weight when peft builds the adapter (and again on load)
MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
BIAS_MODES = ("none", "all", "lora_only")


def _version(text) -> tuple[int, ...]:
    """(0, 21, 2) of '0.21.2' (0.21.0.dev0 counts as 0.21); () when unreadable."""
    parts = []
    for p in str(text or "").split("."):
        if not p.isdigit():
            break
        parts.append(int(p))
    return tuple(parts)


def _is_set(value) -> bool:
    """Whether a config value asks for something (not None, False, 0, "" or an empty collection)."""
    return value not in (None, False, 0, "", [], {}, ())


def mutating_init(config: dict) -> str | None:
    """The ``init_lora_weights`` when it rewrote the base (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA), else None."""
    init = config.get("init_lora_weights", True)
    return init if isinstance(init, str) and init.lower().startswith(MUTATING_INITS) else None


def config_problems(config: dict) -> list[str]:
    """Config fields whose meaning adaptkit does not implement, set: one sentence each."""
    out = []
    for key, value in config.items():
        if key in UNSUPPORTED_FIELDS and _is_set(value):
            out.append(f"{UNSUPPORTED_FIELDS[key]} is not supported: adaptkit cannot apply it exactly")
        elif key not in KNOWN_FIELDS and _is_set(value):
            out.append(f"config field {key!r} = {json.dumps(value, default=str)[:40]} is unknown to adaptkit (a newer "
                       "peft variant?): refused rather than ignored")
    if _is_set(config.get("target_parameters")) and _version(config.get("peft_version")) < (0, 21):
        out.append(f"target_parameters saved by peft {config.get('peft_version') or 'of unknown version'}: the layout "
                   "of the expert factors changed between peft versions, and adaptkit reads that of peft 0.21 and "
                   "later; re-save the adapter with peft >= 0.21")
    init = config.get("init_lora_weights", True)
    if not mutating_init(config) and init not in PLAIN_INITS:
        out.append(f"init_lora_weights={init!r} is unknown to adaptkit: refused rather than guessed")
    bias = config.get("bias", "none")
    if bias not in BIAS_MODES:
        out.append(f"bias={bias!r} is not one of {', '.join(BIAS_MODES)}")
    return out


_LORA_KEY = re.compile(
    r"^(?P<mod>.+?)\.(?P<role>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<adapter>[^.]+))?(?:\.(?P<param>weight|bias))?$")


class TensorSource(Protocol):
    """Lazy access to the tensors of one adapter file."""

    path: Path

    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> torch.dtype: ...
    def get(self, key: str) -> torch.Tensor: ...


def pattern_key(patterns, name: str):
    """The first key of ``patterns`` matching module ``name`` the way peft matches it, else None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


@dataclass
class LoraModule:
    """One adapted module: A (r × in), B (out × r), and how ΔW = scaling · B @ A lands on the base."""

    name: str
    kind: str  # "linear" or "embedding"
    rank: int
    alpha: float
    scaling: float
    fan_in_fan_out: bool
    source: TensorSource
    a_key: str
    b_key: str
    magnitude_key: str | None = None  # DoRA
    bias_key: str | None = None  # lora_bias
    param: str | None = None  # target_parameters: the parameter adapted (name is then the module's + param)
    experts: int = 1  # target_parameters on a 3-D expert parameter: E (the factors hold every expert's)
    candidates: tuple[str, ...] = ()  # target_parameters before the base tells which parameter (kind "param")

    @property
    def use_dora(self) -> bool:
        return self.magnitude_key is not None

    @property
    def A(self) -> torch.Tensor:
        return self.source.get(self.a_key)

    @property
    def B(self) -> torch.Tensor:
        return self.source.get(self.b_key)

    @property
    def magnitude(self) -> torch.Tensor | None:
        return self.source.get(self.magnitude_key) if self.magnitude_key else None

    @property
    def lora_bias(self) -> torch.Tensor | None:
        return self.source.get(self.bias_key) if self.bias_key else None

    @property
    def shape_rank(self) -> int:
        return self.source.shape(self.a_key)[0]

    @property
    def in_features(self) -> int:
        return self.source.shape(self.a_key)[-1]

    @property
    def out_features(self) -> int:
        return self.source.shape(self.b_key)[0]

    @property
    def weight_name(self) -> str:
        """The (in-memory) tensor this module changes: ``name.weight``, or the parameter itself for
        ``target_parameters`` (``…mlp.experts.gate_up_proj``)."""
        return self.name if self.param else self.name + ".weight"

    @property
    def transposed(self) -> bool:
        """Whether the base stores the weight as (in, out): embeddings and fan_in_fan_out (Conv1D)."""
        return self.kind == "embedding" or self.fan_in_fan_out

    def delta(self, device: torch.device | str | None = None) -> torch.Tensor:
        """ΔW = scaling · B @ A in fp32, canonical (out, in) orientation (:func:`adaptkit.lora.delta`)."""
        return lora.delta(self.A, self.B, self.scaling, device)

    @property
    def parameters(self) -> int:
        n = math.prod(self.source.shape(self.a_key)) + math.prod(self.source.shape(self.b_key))
        for key in (self.magnitude_key, self.bias_key):
            if key:
                n += math.prod(self.source.shape(key))
        return n


@dataclass
class Adapter:
    """A LoRA adapter: config, modules by base-model name, and full tensors it replaces."""

    path: Path
    weights_path: Path
    config: dict
    source: TensorSource
    modules: dict[str, LoraModule]
    full_tensors: dict[str, str] = field(default_factory=dict)  # base tensor name -> key in source
    unclaimed: list[str] = field(default_factory=list)  # keys that belong to no module
    notes: list[str] = field(default_factory=list)  # facts worth a warning (assumed alpha, ...)
    format: str = "peft"
    problems: list[str] = field(default_factory=list)  # what makes an exact merge impossible (inspect shows them)
    token_rows: dict[str, tuple[list[int], str]] = field(default_factory=dict)  # trainable tokens: ids, key

    def resolve_parameters(self, shapes: dict[str, tuple[int, ...]], transposed=None) -> list[str]:
        """Tell each ``target_parameters`` LoRA which parameter it adapts, from the (in-memory) shapes of
        the base's parameters; return the problems (none when every one is told apart).

        A wrapper's factors fit a parameter of shape (E, d1, d2) when B is (d1 or d2, r·E) and A
        (r·E, the other): peft reads (E, out, in) for most expert modules and (E, in, out) for those
        marked ``is_transposed`` (gpt-oss); 2-D parameters are (out, in). Where two parameters fit, each
        the other's transpose (Nemotron-H's up_proj (E, I, H) and down_proj (E, H, I)), ``transposed``
        (module -> whether transformers marks it is_transposed, or None) keeps the one peft's
        orientation allows."""
        problems = []
        for mod, m in list(self.modules.items()):
            if m.kind != "param":
                continue
            module = _unwrapped(mod)
            fits = []
            for param in m.candidates:
                shape = shapes.get(f"{module}.{param}")
                if shape is None:
                    continue
                dims, experts = (tuple(shape[1:]), shape[0]) if len(shape) == 3 else (tuple(shape), 1)
                if len(dims) == 2 and {m.out_features, m.in_features} == set(dims) and \
                        (m.out_features, m.in_features) in (dims, dims[::-1]) and m.shape_rank % experts == 0:
                    fits.append((param, experts, dims))
            if len(fits) > 1 and transposed is not None and (marked := transposed(module)) is not None:
                delta = (m.out_features, m.in_features)
                fits = [f for f in fits if (f[2][::-1] if marked else f[2]) == delta]
            if len(fits) != 1:
                what = "none" if not fits else "several"
                problems.append(f"{module}: {what} of its targeted parameters ({', '.join(m.candidates)}) fit a LoRA "
                                f"of A {list(self.source.shape(m.a_key))}, B {list(self.source.shape(m.b_key))}")
                continue
            param, experts, _ = fits[0]
            name = f"{module}.{param}"
            rank, alpha, scaling, problem = module_scale(self.config, name, m.shape_rank, self.format, None, experts)
            if problem or alpha is None:
                problems.append(problem or f"{name}: no lora_alpha recorded")
                continue
            del self.modules[mod]
            self.modules[name] = LoraModule(name=name, kind="linear", rank=rank, alpha=alpha, scaling=scaling,
                                            fan_in_fan_out=False, source=m.source, a_key=m.a_key, b_key=m.b_key,
                                            param=param, experts=experts)
        self.modules = dict(sorted(self.modules.items(), key=lambda kv: natural_key(kv[0])))
        return problems

    @property
    def alora_tokens(self) -> list[int] | None:
        """aLoRA's invocation tokens: the adapter acts only after them, so no merged weight is equivalent."""
        return self.config.get("alora_invocation_tokens") or None

    def require_finite(self) -> None:
        """Raise when a factor, magnitude, bias or saved tensor holds NaN or Inf (reads the tensors)."""
        for m in self.modules.values():
            for key in (m.a_key, m.b_key, m.magnitude_key, m.bias_key):
                if key is not None:
                    t = self.source.get(key)
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        raise AdaptkitError(f"NaN or Inf in {key}: the adapter is broken (adaptkit inspect shows "
                                            "where)", self.path)
        for name, key in self.full_tensors.items():
            t = self.source.get(key)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise AdaptkitError(f"NaN or Inf in {key}: the adapter is broken", self.path)

    @property
    def mutated_init(self) -> str | None:
        """Why B·A alone is not this adapter's change: an initialisation that rewrote the base (PiSSA…)."""
        init = mutating_init(self.config)
        if init is None:
            return None
        return (f"init_lora_weights={init!r}: this adapter was saved relative to a base its initialisation "
                "rewrote (peft redoes it on load), so B·A alone is not its change; convert it first: adaptkit "
                "convert ADAPTER --initial INITIAL_ADAPTER --to peft -o OUT (INITIAL_ADAPTER: the adapter saved "
                "right after initialisation), or save it with peft's path_initial_model_for_weight_conversion")

    def require_exact(self, initial_given: bool = False) -> None:
        """Raise the first reason this adapter cannot be merged, combined or converted exactly
        (``initial_given``: the base rewrite of its initialisation is being undone, see convert)."""
        if self.mutated_init and not initial_given:
            raise AdaptkitError(self.mutated_init, self.path)
        if not self.modules and not self.full_tensors and not self.token_rows:
            raise AdaptkitError("the adapter holds no LoRA modules (nothing to apply)", self.path)
        if self.problems:
            more = f" (and {len(self.problems) - 1} more problems)" if len(self.problems) > 1 else ""
            raise AdaptkitError(self.problems[0] + more, self.path)

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", "LORA"))

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def r(self) -> int:
        return int(self.config.get("r", 8))

    @property
    def lora_alpha(self) -> float:
        return self.config.get("lora_alpha", 8)

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    @property
    def use_dora(self) -> bool:
        return any(m.use_dora for m in self.modules.values())

    @property
    def parameters(self) -> int:
        return sum(math.prod(self.source.shape(k)) for k in self.source.keys())

    @property
    def dtypes(self) -> list[str]:
        return sorted({str(self.source.dtype(k)).removeprefix("torch.") for k in self.source.keys()})

    @property
    def file_size(self) -> int:
        return self.weights_path.stat().st_size

    def full_tensor(self, base_name: str) -> torch.Tensor:
        return self.source.get(self.full_tensors[base_name])


def strip_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_config(config: dict, path: Path) -> None:
    """Refuse, in one line, any config value the math uses that peft would not accept or that would
    silently change ΔW: r and pattern ranks positive integers, alphas finite numbers, pattern keys
    valid regexes, switches true or false, module lists lists of names."""
    def bad(key, why):
        raise AdaptkitError(f"malformed adapter config: {key} {why}, got {json.dumps(config.get(key))[:60]}", path)

    if "r" in config and not (_is_int(config["r"]) and config["r"] > 0):
        bad("r", "must be a positive integer")
    if "lora_alpha" in config and not _is_number(config["lora_alpha"]):
        bad("lora_alpha", "must be a finite number")
    for key, ok, what in (("rank_pattern", lambda v: _is_int(v) and v > 0, "positive integers"),
                          ("alpha_pattern", _is_number, "finite numbers")):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            bad(key, "must be an object")
        for k, v in patterns.items():
            if not ok(v):
                raise AdaptkitError(f"malformed adapter config: {key}[{k!r}] must be one of {what}, got "
                                    f"{json.dumps(v)[:60]}", path)
            try:
                re.compile(rf"(.*\.)?({k})$")
            except re.error as e:
                raise AdaptkitError(f"malformed adapter config: {key} key {k!r} is not a valid regular expression "
                                    f"({e})", path) from None
    for key in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            bad(key, "must be true or false")
    for key in ("modules_to_save",):
        v = config.get(key)
        if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            bad(key, "must be a list of module names")
    tokens = config.get("trainable_token_indices")
    ids = tokens if isinstance(tokens, list) else [i for v in tokens.values() for i in (v if isinstance(v, list) else [v])] \
        if isinstance(tokens, dict) else None
    if tokens is not None and (ids is None or not all(_is_int(i) and i >= 0 for i in ids)):
        bad("trainable_token_indices", "must be a list of token ids, or an object of module name -> token ids")
    alora = config.get("alora_invocation_tokens")
    if alora is not None and not (isinstance(alora, list) and all(_is_int(i) and i >= 0 for i in alora)):
        bad("alora_invocation_tokens", "must be a list of token ids")


def check_peft_type(config: dict, path: Path) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        what = UNSUPPORTED_PEFT_TYPES.get(peft_type, peft_type)
        raise AdaptkitError(f"peft_type {peft_type} ({what}) is not supported: adaptkit handles LoRA adapters only", path)


def build_adapter(path: Path, weights_path: Path, config: dict, source: TensorSource, fmt: str = "peft",
                  infer_alpha: dict[str, float] | None = None) -> Adapter:
    """Group a source's keys into LoRA modules and resolve each module's rank, alpha and scaling.

    ``config`` may be empty (a raw file): ranks then come from the shapes and alphas from
    ``infer_alpha`` (per module) or default to the rank, with a note saying so.
    """
    check_peft_type(config, path)
    validate_config(config, path)
    use_rslora = bool(config.get("use_rslora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    modules_to_save = list(config.get("modules_to_save") or [])
    bias_mode = config.get("bias", "none")
    infer_alpha = infer_alpha or {}

    token_keys: dict[str, str] = {}  # module -> key of its trainable_tokens_delta
    parts: dict[str, dict[str, str]] = {}
    full: dict[str, str] = {}
    unclaimed: list[str] = []
    for key in source.keys():
        name = strip_prefix(key)
        m = _LORA_KEY.match(name)
        if m:
            mod, role, adapter_name, param = m["mod"], m["role"], m["adapter"], m["param"]
            if param is None and adapter_name in ("weight", "bias"):
                param, adapter_name = adapter_name, None
            slot = role if param != "bias" else role + ".bias"
            parts.setdefault(mod, {})[slot] = key
            continue
        if ".base_layer." in name:  # the base weights peft saves beside an embedding LoRA
            full[name.replace(".base_layer.", ".")] = key
            continue
        if ".modules_to_save." in name:  # a state dict taken from the live model
            mod, _, rest = name.partition(".modules_to_save.")
            full[mod + "." + rest.split(".", 1)[1]] = key
            continue
        if ".original_module." in name:
            continue
        if name.endswith(TOKEN_DELTA):  # trainable tokens: new values of some rows of an embedding
            token_keys[name[: -len(TOKEN_DELTA)]] = key
            continue
        mod = name.rsplit(".", 1)[0]
        if any(mod == t or mod.endswith("." + t) for t in modules_to_save):
            full[name] = key
        elif bias_mode != "none" and name.endswith(".bias"):  # bias="all"/"lora_only": trained base biases
            full[name] = key
        else:
            unclaimed.append(key)

    notes: list[str] = []
    problems: list[str] = config_problems(config)
    params = _targeted_parameters(config.get("target_parameters"), config.get("target_modules"), parts, problems)
    token_rows = _token_rows(config.get("trainable_token_indices"), token_keys, source, problems)
    modules: dict[str, LoraModule] = {}
    assumed_alpha = []
    for mod, roles in parts.items():
        if "lora_A" in roles or "lora_B" in roles:
            kind, a_key, b_key = "linear", roles.get("lora_A"), roles.get("lora_B")
        else:
            kind, a_key, b_key = "embedding", roles.get("lora_embedding_A"), roles.get("lora_embedding_B")
        if a_key is None or b_key is None:
            unclaimed.extend(roles.values())
            problems.append(f"module {mod} has only one of its two LoRA factors (peft would fill the other with "
                            "its initialisation)")
            continue
        a_shape, b_shape = source.shape(a_key), source.shape(b_key)
        if len(a_shape) != 2 or len(b_shape) != 2:
            unclaimed.extend(roles.values())
            problems.append(f"{mod}: only Linear, Conv1D and Embedding LoRA are supported (A is {list(a_shape)}, "
                            f"B is {list(b_shape)})")
            continue
        shape_rank = a_shape[0]
        if shape_rank == 0:
            raise AdaptkitError(f"{mod}: lora_A has rank 0 ({list(a_shape)})", path)
        if mod in params:  # a target_parameters wrapper: which parameter is told by the base's shapes
            modules[mod] = LoraModule(name=mod, kind="param", rank=0, alpha=0, scaling=0.0, fan_in_fan_out=False,
                                      source=source, a_key=a_key, b_key=b_key, candidates=params[mod])
            continue
        rank, alpha, scaling, problem = module_scale(config, mod, shape_rank, fmt, infer_alpha)
        if problem:
            problems.append(problem)
        if alpha is None:
            alpha = rank
            assumed_alpha.append(mod)
            scaling = lora.scaling(alpha, rank, use_rslora)
        if not (math.isfinite(scaling) and abs(scaling) <= FP32_MAX):
            raise AdaptkitError(f"{mod}: its scaling {scaling:g} (alpha {alpha}, r {rank}) is not a finite fp32 number",
                                path)
        modules[mod] = LoraModule(
            name=mod, kind=kind, rank=rank, alpha=alpha, scaling=scaling,
            fan_in_fan_out=fan_in_fan_out and kind == "linear", source=source, a_key=a_key, b_key=b_key,
            magnitude_key=roles.get("lora_magnitude_vector"), bias_key=roles.get("lora_B.bias"))
    if assumed_alpha:
        notes.append(f"no alpha recorded for {len(assumed_alpha)} modules: assumed alpha = r (scaling 1)")
    if "use_dora" in config:
        with_magnitude = sorted(m.name for m in modules.values() if m.magnitude_key)
        without = sorted(m.name for m in modules.values() if not m.magnitude_key and m.kind == "linear")
        if config["use_dora"] and without:
            problems.append(f"use_dora is true but {len(without)} modules have no lora_magnitude_vector (first: "
                            f"{without[0]}): merged without it, DoRA would silently become plain LoRA")
        if not config["use_dora"] and with_magnitude:
            problems.append(f"use_dora is false but {len(with_magnitude)} modules hold DoRA magnitudes (first: "
                            f"{with_magnitude[0]}): peft would ignore them; fix use_dora")
    return Adapter(path=path, weights_path=weights_path, config=config, source=source,
                   modules=dict(sorted(modules.items(), key=lambda kv: natural_key(kv[0]))),
                   full_tensors=full, unclaimed=unclaimed, notes=notes, format=fmt, problems=problems,
                   token_rows=token_rows)


TOKEN_DELTA = ".token_adapter.trainable_tokens_delta"
WRAPPED = ".base_layer"


def _unwrapped(mod: str) -> str:
    while mod.endswith(WRAPPED):
        mod = mod[: -len(WRAPPED)]
    return mod


def module_scale(config: dict, name: str, shape_rank: int, fmt: str, infer_alpha: dict | None, experts: int = 1):
    """(rank, alpha or None when none is recorded, scaling, problem or None) of the module ``name``,
    peft's way: rank_pattern / alpha_pattern keys first, then r and lora_alpha (their defaults for a
    PEFT folder), then ``infer_alpha`` (formats that store alphas per module)."""
    defaults = PEFT_DEFAULTS if fmt == "peft" else {}
    key = pattern_key(config.get("rank_pattern") or {}, name)
    rank = int(config["rank_pattern"][key]) if key is not None else (config.get("r", defaults.get("r", 0))
                                                                      or shape_rank // experts)
    problem = None
    if config and rank * experts != shape_rank:
        problem = (f"{name}: its tensors have rank {shape_rank} but the config gives r={rank}"
                   + (f" for {experts} experts" if experts > 1 else "") + " (peft could not load this adapter; fix "
                   "r or rank_pattern)")
    key = pattern_key(config.get("alpha_pattern") or {}, name)
    alpha_default = config.get("lora_alpha", defaults.get("lora_alpha"))
    if key is not None:
        alpha = config["alpha_pattern"][key]
    elif config and alpha_default is not None:
        alpha = alpha_default
    else:
        alpha = (infer_alpha or {}).get(name)
    scaling = lora.scaling(alpha, rank, bool(config.get("use_rslora", False))) if alpha is not None else 0.0
    return rank, alpha, scaling, problem


def _module_targeted(target_modules, module: str) -> bool:
    """Whether peft's ``target_modules`` names ``module`` (peft's check_target_module_exists: a list
    matches a name or its last parts, a string is a regex matched in full); "all-linear" tells nothing."""
    if isinstance(target_modules, str):
        if target_modules.lower() == "all-linear":
            return False
        try:
            return re.fullmatch(target_modules, module) is not None
        except re.error:
            return False
    return any(isinstance(t, str) and (module == t or module.endswith("." + t)) for t in target_modules or ())


def _targeted_parameters(targets, target_modules, parts: dict, problems: list[str]) -> dict[str, tuple[str, ...]]:
    """The parameters each ``target_parameters`` LoRA may adapt, by the key it is saved under.

    peft wraps a module once per targeted parameter (``module.base_layer…base_layer.lora_A``); the
    config's list does not keep the wrapping order, so which wrapper adapts which parameter is told by
    the shapes, against the base (:meth:`Adapter.resolve_parameters`).

    A target names ``module.parameter`` or its last parts, as peft matches it (``key == target`` or
    ``key.endswith("." + target)``): a bare ``gate_up_proj`` is any module's parameter of that name.
    peft 0.21 writes bare ones itself when it turns a transformers-4 style ``target_modules``
    (``gate_proj``, ``up_proj``, ``down_proj``, ``gate``) into parameters of a transformers-5 MoE model
    (peft/utils/transformers_weight_conversion.py ``_convert_peft_config_moe``). A module that
    ``target_modules`` names is a module LoRA, never a parameter's: peft refuses to wrap both."""
    if not targets:
        return {}
    if not isinstance(targets, list) or not all(isinstance(t, str) and t.strip(".") == t and t for t in targets):
        problems.append("target_parameters must be a list of parameter names (module.parameter or its last parts)")
        return {}
    specs = [t.rsplit(".", 1) if "." in t else ("", t) for t in targets]
    out = {}
    for mod in parts:
        module = _unwrapped(mod)
        here = tuple(dict.fromkeys(param for suffix, param in specs if module == suffix or module.endswith(
            "." + suffix) or (not suffix and not _module_targeted(target_modules, module))))
        if here:
            out[mod] = here
    return out


def _token_rows(indices, keys: dict[str, str], source: TensorSource, problems: list[str]) -> dict:
    """peft's trainable tokens: per embedding module, (token ids, key of their new rows).

    ``trainable_token_indices`` is a list (for the input embedding, the one module saved) or an object
    of module name (or its last parts) -> ids. The saved tensor holds the rows' new values, not a
    difference (peft's TrainableTokensLayer: W[ids] = values).
    """
    out = {}
    for mod, key in sorted(keys.items()):
        if isinstance(indices, dict):
            ids = next((v for k, v in indices.items() if mod == k or mod.endswith("." + k)), None)
        else:
            ids = indices if len(keys) == 1 else None
        shape = source.shape(key)
        if ids is None:
            problems.append(f"{mod}: trainable token rows are saved but trainable_token_indices does not say which "
                            "tokens they are")
        elif len(shape) != 2 or shape[0] != len(ids):
            problems.append(f"{mod}: {len(ids)} trainable token ids but {list(shape)} saved rows")
        elif len(set(ids)) != len(ids):
            problems.append(f"{mod}: trainable_token_indices repeats a token id (peft refuses overlapping tokens)")
        else:
            out[mod] = (list(ids), key)
    return out


def without_base_copies(adapter: Adapter, base_ck) -> tuple[Adapter, list[str]]:
    """The adapter without the full tensors that only repeat the base's own values (peft's
    ``save_embedding_layers`` copy: replacing a tensor with itself changes nothing), and their names.
    ``base_ck``: the base, an :class:`adaptkit.io.checkpoint.Checkpoint`."""
    keep, same = {}, []
    for name, key in adapter.full_tensors.items():
        saved = adapter.source.get(key)
        if name in base_ck.tensors and tuple(saved.shape) == tuple(base_ck.info(name).shape) \
                and torch.equal(saved.to(torch.float64), base_ck.read(name).to(torch.float64)):
            same.append(name)
        else:
            keep[name] = key
    return (dataclasses.replace(adapter, full_tensors=keep) if same else adapter), same


def adapter_weights(weights, n: int) -> list[float]:
    """The per-adapter weights (default all 1): one finite number per adapter, or a one-line error."""
    if weights is None or (not isinstance(weights, str) and len(weights) == 0):
        return [1.0] * n
    try:
        out = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise AdaptkitError(f"must be numbers, got {weights!r}", param="weights") from None
    if any(isinstance(w, bool) for w in weights) or not all(math.isfinite(w) and abs(w) <= FP32_MAX for w in out):
        raise AdaptkitError(f"must be finite numbers, got {', '.join(map(str, weights))}", param="weights")
    if len(out) != n:
        raise AdaptkitError(f"{len(out)} given for {n} adapters: give one weight per adapter", param="weights")
    return out


def natural_key(name: str):
    """Sort key putting layers.2 before layers.10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
