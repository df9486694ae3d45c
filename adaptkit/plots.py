"""See an adapter: what it changes, where, and what a merge, a rank reduction or an extraction costs.

Numbers first, figures second: :func:`layer_grid`, :func:`spectra`, :func:`cosine` and
:func:`sparkline` compute what the figures show from the same reports the tables print
(``adaptkit.inspect(…, svd=True)``, ``combine``, ``extract``, ``verify``), without matplotlib.
The figures (:func:`plot_inspect`, :func:`plot_compare`, :func:`plot_combine`, :func:`plot_extract`,
:func:`plot_verify`) need the optional extra (``pip install 'adaptkit[plot]'``: matplotlib) and are
written as ``.png``, ``.svg`` or ``.html`` (one self-contained page, its figure inlined as SVG,
nothing fetched from a network)::

    >>> import adaptkit
    >>> from adaptkit import plots
    >>> report = adaptkit.inspect("fixtures/adapters/llama-lora", svd=True)
    >>> grid = plots.layer_grid(report)
    >>> grid.kinds[:3], grid.layers
    (['q_proj', 'k_proj', 'v_proj'], ['0', '1'])
    >>> plots.sparkline([4.0, 2.0, 1.0, 0.5])
    '█▅▃▂'
"""

from __future__ import annotations

import html
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import AdaptkitError

FORMATS = (".png", ".svg", ".html")
BLOCKS = "▁▂▃▄▅▆▇█"
KIND_ORDER = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj")
_LAYER = re.compile(r"\.(?:layers|h|blocks?|layer)\.(\d+)\.")


# --------------------------------------------------------------------------------------- numbers

def split_name(name: str) -> tuple[str, str]:
    """(layer, kind) of a module name: ``model.layers.3.self_attn.q_proj`` → ("3", "q_proj"); modules
    outside numbered layers (``lm_head``) get the layer "-"."""
    m = _LAYER.search(name + ".")
    return (m.group(1) if m else "-"), name.rsplit(".", 1)[-1]


def _order(kinds) -> list[str]:
    return sorted(set(kinds), key=lambda k: (KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER), k))


def _layers(layers) -> list[str]:
    return sorted(set(layers), key=lambda x: (x == "-", int(x) if x.isdigit() else 0))


@dataclass
class Grid:
    """Values by (layer, module kind): ``values[i][j]`` for ``layers[i]``, ``kinds[j]`` (NaN: none)."""

    layers: list[str]
    kinds: list[str]
    values: list[list[float]]
    label: str


def grid_of(values: dict[str, float], label: str) -> Grid:
    """A :class:`Grid` of per-module values (module name → value)."""
    cells = {split_name(n): v for n, v in values.items()}
    layers, kinds = _layers(l for l, _ in cells), _order(k for _, k in cells)
    return Grid(layers, kinds, [[cells.get((l, k), math.nan) for k in kinds] for l in layers], label)


def delta_norms(report) -> dict[str, float]:
    """‖ΔW‖_F of each module of an inspect report made with ``svd=True``: √Σσ² of its spectrum."""
    out = {}
    for m in report.modules:
        if m.singular_values is None:
            raise AdaptkitError(f"{m.name}: no spectrum in the report (inspect with svd=True)")
        out[m.name] = math.sqrt(sum(s * s for s in m.singular_values))
    return out


def layer_grid(report) -> Grid:
    """‖ΔW‖_F by layer × module kind (the heatmap of :func:`plot_inspect`)."""
    return grid_of(delta_norms(report), "‖ΔW‖_F")


def spectra(report) -> dict[str, list[tuple[str, list[float], int | None, int | None]]]:
    """Per module kind, each module's (layer, σ / σ₁, rank holding 90 %, rank holding 99 %)."""
    out: dict[str, list] = {}
    for m in report.modules:
        s = m.singular_values or []
        top = s[0] if s and s[0] > 0 else 1.0
        layer, kind = split_name(m.name)
        out.setdefault(kind, []).append((layer, [x / top for x in s], m.rank_90, m.rank_99))
    return {k: out[k] for k in _order(out)}


def sparkline(values, width: int | None = None) -> str:
    """A spectrum as block characters, one per value, each as tall as its share of the largest (σ / σ₁)."""
    vals = [float(v) for v in values][:width] if width else [float(v) for v in values]
    if not vals or max(vals) <= 0:
        return ""
    top = max(vals)
    out = []
    for v in vals:
        out.append(BLOCKS[min(len(BLOCKS) - 1, max(0, int(round(v / top * (len(BLOCKS) - 1)))))])
    return "".join(out)


def cosine(a, b) -> dict[str, float]:
    """Per module both adapters hold, the cosine similarity of their ΔW, ⟨ΔW_a, ΔW_b⟩_F / (‖ΔW_a‖ ‖ΔW_b‖),
    from the factors: ⟨B₁A₁, B₂A₂⟩ = tr((B₁ᵀB₂)(A₂A₁ᵀ)), r×r products only."""
    out = {}
    for name, ma in a.modules.items():
        mb = b.modules.get(name)
        if mb is None or ma.experts != 1 or mb.experts != 1 or ma.A.shape[-1] != mb.A.shape[-1] \
                or ma.B.shape[0] != mb.B.shape[0]:
            continue
        a1, b1, a2, b2 = (t.to(torch.float64) for t in (ma.A, ma.B, mb.A, mb.B))

        def inner(x_a, x_b, y_a, y_b):
            return float(torch.trace((x_b.T @ y_b) @ (y_a @ x_a.T)))

        ab = inner(a1, b1, a2, b2) * ma.scaling * mb.scaling
        na = math.sqrt(max(inner(a1, b1, a1, b1), 0.0)) * abs(ma.scaling)
        nb = math.sqrt(max(inner(a2, b2, a2, b2), 0.0)) * abs(mb.scaling)
        out[name] = ab / (na * nb) if na > 0 and nb > 0 else 0.0
    return out


# --------------------------------------------------------------------------------------- figures

def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise AdaptkitError("plots need matplotlib: pip install 'adaptkit[plot]'") from None
    matplotlib.rcParams["svg.hashsalt"] = "adaptkit"  # the same SVG for the same numbers
    from matplotlib.figure import Figure

    return Figure


def _heat(fig, ax, grid: Grid, title: str, cmap: str = "viridis", vmin=None, vmax=None):
    import numpy as np

    data = np.array(grid.values, dtype=float)
    im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax,
                   interpolation="nearest")
    ax.set_xticks(range(len(grid.kinds)), grid.kinds, rotation=45, ha="right", fontsize=7)
    step = max(1, len(grid.layers) // 16)
    ax.set_yticks(range(0, len(grid.layers), step), grid.layers[::step], fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=grid.label, shrink=0.8)


def plot_inspect(reports, path=None, inputs=None):
    """Per adapter (``adaptkit.inspect(…, svd=True)`` reports; several side by side): a heatmap of
    ‖ΔW‖_F by layer × module kind, and per module kind the normalised singular value spectra, one
    line per layer, with the median rank holding 90 % / 99 % of the energy marked."""
    Figure = _matplotlib()
    reports = reports if isinstance(reports, (list, tuple)) else [reports]
    per_report = [spectra(r) for r in reports]
    rows = 1 + max(len(k) for k in per_report)
    fig = Figure(figsize=(5.2 * len(reports), 2.2 + 1.6 * rows), layout="constrained")
    axes = fig.subplots(rows, len(reports), squeeze=False,
                        gridspec_kw={"height_ratios": [2.2] + [1.6] * (rows - 1)})
    for col, report in enumerate(reports):
        _heat(fig, axes[0][col], layer_grid(report), Path(report.path).name)
        for row, (kind, lines) in enumerate(per_report[col].items(), start=1):
            ax = axes[row][col]
            for layer, s, _, _ in lines:
                ax.semilogy(range(1, len(s) + 1), [max(x, 1e-12) for x in s], lw=0.8, alpha=0.6)
            for i, label in ((2, "90 %"), (3, "99 %")):
                ranks = sorted(r[i] for r in lines if r[i] is not None)
                if ranks:
                    ax.axvline(ranks[len(ranks) // 2], ls="--" if i == 2 else ":", color="k", lw=0.8,
                               label=f"{label}: rank {ranks[len(ranks) // 2]}")
            ax.set_title(f"{kind}: σ / σ₁ ({len(lines)} modules)", fontsize=8)
            ax.tick_params(which="both", labelsize=7)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.legend(fontsize=6, loc="upper right")
        for row in range(1 + len(per_report[col]), rows):
            axes[row][col].set_visible(False)
    inputs = [r.path for r in reports] if inputs is None else inputs
    return _finish(fig, path, "adaptkit inspect", _inspect_table(reports), inputs)


def plot_compare(a, b, path=None, inputs=None):
    """The cosine similarity of two adapters' ΔW per module (layer × module kind)."""
    Figure = _matplotlib()
    cos = cosine(a, b)
    grid = grid_of(cos, "cosine similarity")
    fig = Figure(figsize=(6, 2.4 + 0.18 * len(grid.layers)), layout="constrained")
    _heat(fig, fig.subplots(), grid, f"{Path(str(a.path)).name} vs {Path(str(b.path)).name}", cmap="RdBu",
          vmin=-1, vmax=1)
    return _finish(fig, path, "adaptkit inspect --compare", [(n, f"{c:+.4f}") for n, c in cos.items()],
                   [a.path, b.path] if inputs is None else inputs)


def plot_combine(result, path=None, inputs=None):
    """What a combine kept per module: the share of ‖ΔW‖² its rank reduction kept and, for the
    pruning methods, the share of entries left nonzero."""
    Figure = _matplotlib()
    energy = grid_of({m.name: m.retained_energy for m in result.modules}, "energy kept")
    nonzero = {m.name: m.nonzero for m in result.modules if getattr(m, "nonzero", None) is not None}
    panels = [energy] + ([grid_of(nonzero, "entries kept")] if nonzero else [])
    fig = Figure(figsize=(5.2 * len(panels), 2.4 + 0.18 * len(energy.layers)), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, grid in zip(axes, panels):
        _heat(fig, ax, grid, f"{result.method}: {grid.label}", vmin=0, vmax=1)
    return _finish(fig, path, "adaptkit combine", [(m.name, f"rank {m.rank}", f"{m.retained_energy:.4f}")
                                                   for m in result.modules],
                   result.adapters if inputs is None else inputs)


def plot_extract(result, path=None, inputs=None):
    """What an extraction kept: each module's share of ‖ΔW‖² (layer × module kind) and its rank."""
    Figure = _matplotlib()
    loras = result.lora_modules
    panels = [grid_of({m.name: m.energy for m in loras}, "energy kept"),
              grid_of({m.name: float(m.rank) for m in loras}, "rank")]
    fig = Figure(figsize=(10.4, 2.4 + 0.18 * len(panels[0].layers)), layout="constrained")
    for ax, grid in zip(fig.subplots(1, 2), panels):
        _heat(fig, ax, grid, f"extract: {grid.label}", vmin=0 if grid.label == "rank" else None,
              vmax=1 if grid.label == "energy kept" else None)
    return _finish(fig, path, "adaptkit extract", [(m.name, f"rank {m.rank}", f"{m.energy:.4f}") for m in loras],
                   [result.base, result.finetuned] if inputs is None else inputs)


def plot_verify(report, path=None, inputs=None):
    """Each checked tensor's error against what it is allowed (rounding noise, or the tolerance):
    a near-miss stands out just under the line at 1."""
    Figure = _matplotlib()
    mods = [m for m in report.modules if math.isfinite(m.rel_error)]
    ratios = [m.rel_error / max(m.allowed, 1e-30) for m in mods]
    fig = Figure(figsize=(7, 2.6 + 0.12 * len(mods)), layout="constrained")
    ax = fig.subplots()
    ax.barh(range(len(mods)), [max(r, 1e-6) for r in ratios],
            color=["tab:red" if r > 1 else "tab:green" for r in ratios])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(mods)), [m.name for m in mods], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("error / allowed")
    ax.set_title(f"verify: {'verified' if report.ok else 'NOT verified'}", fontsize=9)
    return _finish(fig, path, "adaptkit verify", [(m.name, m.kind, f"{r:.3g}") for m, r in zip(mods, ratios)],
                   [report.base, *report.adapters, report.merged] if inputs is None else inputs)


def _inspect_table(reports):
    rows = []
    for r in reports:
        for m in r.modules:
            rows.append((m.name, f"rank {m.rank}", f"90 %: {m.rank_90}, 99 %: {m.rank_99}"))
    return rows


def _finish(fig, path, title: str, rows=None, inputs=()):
    if path is not None:
        save(fig, path, title, rows, inputs)
    return fig


def ready(path, param: str = "plot", inputs=()) -> Path:
    """Refuse, before any work, a plot that cannot be written: the extra missing, a path that does
    not end in one of :data:`FORMATS`, or one that is or lies inside an input (``inputs``)."""
    from .io.output import check_output

    _matplotlib()
    check_path(path, param)
    return check_output(path, True, inputs, folder=False)


def check_path(path, param: str = "plot") -> Path:
    """A plot's path, refused (one line) unless it ends in one of :data:`FORMATS`."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise AdaptkitError(f"plots are written as {', '.join(FORMATS)}, not {path.suffix or 'a file without a suffix'}",
                            path, param=param)
    return path


def save(fig, path, title: str = "adaptkit", rows=None, inputs=()) -> Path:
    """Write a figure as ``.png``, ``.svg`` or ``.html`` (the SVG inlined, with ``rows`` — the numbers
    behind it — as a table below; nothing external is referenced). An existing plot is replaced;
    a path that is or lies inside one of ``inputs`` is refused."""
    path = check_path(path)
    suffix = path.suffix.lower()
    from .io.output import atomic_output_file

    with atomic_output_file(path, force=True, inputs=inputs) as tmp:
        if suffix == ".png":
            fig.savefig(tmp, format="png", dpi=110)
        elif suffix == ".svg":
            fig.savefig(tmp, format="svg", metadata={"Date": None})
        else:
            buf = io.StringIO()
            fig.savefig(buf, format="svg", metadata={"Date": None})
            svg = buf.getvalue()
            svg = svg[svg.index("<svg"):]  # inline: no XML prolog or DOCTYPE inside the page
            table = ""
            if rows:
                body = "\n".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                                 for row in rows)
                table = f"<table>\n{body}\n</table>"
            tmp.write_text(f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
                           "<style>body{font-family:sans-serif;margin:1em}td{padding:0 .8em;font-size:12px}"
                           f"</style></head>\n<body><h1>{html.escape(title)}</h1>\n{svg}\n{table}\n</body></html>\n")
    return path
