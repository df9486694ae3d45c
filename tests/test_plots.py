"""Plots (issue 21): every figure rendered for the shipped fixtures and checked as a file (PNG read
back at its size, SVG and HTML parsed, the HTML self-contained), the numbers behind them compared
with the tables' and with independent computations, the terminal spectrum, the missing extra."""

from __future__ import annotations

import html.parser
import json
import math
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

import adaptkit
from adaptkit import plots
from tests.helpers import ADAPTERS, BASE_OF, FIXTURES, assert_one_line_error, invoke

pytest.importorskip("matplotlib")


class _Page(html.parser.HTMLParser):
    """Collects every URL an HTML page would fetch."""

    def __init__(self):
        super().__init__()
        self.external, self.tags = [], set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        for key, value in attrs:
            if key in ("src", "href", "xlink:href") and value and not value.startswith(("#", "data:")):  # embedded: fine
                self.external.append(value)
        if tag in ("script", "link", "iframe", "img"):
            self.external.append(tag)


def _check_file(path, fig=None):
    if path.suffix == ".png":
        import matplotlib.image

        img = matplotlib.image.imread(path)
        assert img.ndim == 3 and img.shape[2] in (3, 4)
        if fig is not None:
            w, h = fig.get_size_inches() * 110
            assert abs(img.shape[1] - w) <= 2 and abs(img.shape[0] - h) <= 2
    elif path.suffix == ".svg":
        assert ET.parse(path).getroot().tag.endswith("svg")
    else:
        text = path.read_text()
        page = _Page()
        page.feed(text)
        assert "svg" in page.tags and "table" in page.tags
        assert not page.external, page.external  # nothing fetched: one self-contained page
        assert "url(http" not in text and "@import" not in text  # (http://… elsewhere: XML namespace names)


@pytest.mark.parametrize("suffix", [".png", ".svg", ".html"])
def test_inspect_plots_of_every_fixture(tmp_path, suffix):
    names = ["llama-lora", "llama-dora", "llama-rslora-patterns", "gpt2-lora", "llama-embed-mts"]
    for name in names:
        report = adaptkit.inspect(ADAPTERS[name], svd=True)
        fig = plots.plot_inspect(report, tmp_path / f"{name}{suffix}")
        _check_file(tmp_path / f"{name}{suffix}", fig)
    both = [adaptkit.inspect(ADAPTERS[n], svd=True) for n in names[:2]]
    fig = plots.plot_inspect(both, tmp_path / f"both{suffix}")
    _check_file(tmp_path / f"both{suffix}", fig)
    a, b = adaptkit.load_adapter(ADAPTERS["llama-lora"]), adaptkit.load_adapter(ADAPTERS["llama-rslora-patterns"])
    fig = plots.plot_compare(a, b, tmp_path / f"compare{suffix}")
    _check_file(tmp_path / f"compare{suffix}", fig)


def test_the_numbers_behind_the_figures(tmp_path):
    report = adaptkit.inspect(ADAPTERS["llama-rslora-patterns"], svd=True)
    adapter = adaptkit.load_adapter(ADAPTERS["llama-rslora-patterns"])
    grid = plots.layer_grid(report)
    for i, layer in enumerate(grid.layers):
        for j, kind in enumerate(grid.kinds):
            module = next(n for n in adapter.modules if plots.split_name(n) == (layer, kind))
            want = float(adapter.modules[module].delta().double().norm())  # ‖ΔW‖ from ΔW itself
            assert math.isclose(grid.values[i][j], want, rel_tol=1e-5), module
    for kind, lines in plots.spectra(report).items():
        mods = [m for m in report.modules if m.name.endswith("." + kind)]
        assert [r[2] for r in lines] == [m.rank_90 for m in mods] and [r[3] for r in lines] == [m.rank_99 for m in mods]
        assert all(s[0] == 1.0 and all(x <= 1.0 for x in s) for _, s, _, _ in lines)
    other = adaptkit.load_adapter(ADAPTERS["llama-lora"])
    for name, c in plots.cosine(adapter, other).items():
        d1, d2 = adapter.modules[name].delta().double().flatten(), other.modules[name].delta().double().flatten()
        assert math.isclose(c, float(d1 @ d2 / (d1.norm() * d2.norm())), abs_tol=1e-6), name  # ΔW from fp32
    same = plots.cosine(adapter, adapter)
    assert all(math.isclose(c, 1.0, rel_tol=1e-9) for c in same.values())
    assert plots.sparkline([4.0, 2.0, 1.0, 0.5]) == "█▅▃▂" and plots.sparkline([1.0, 1e-4]) == "█▁"
    assert plots.sparkline([]) == "" and len(plots.sparkline(range(1, 100), width=32)) == 32


def test_combine_extract_and_verify_reports(runner, tmp_path):
    res = invoke(runner, "combine", ADAPTERS["llama-lora"], ADAPTERS["llama-rslora-patterns"], "--method", "ties",
                 "--density", "0.5", "--rank", "8", "-o", tmp_path / "c", "--report", tmp_path / "c.html", "--json")
    assert res.exit_code == 0, res.output
    modules = json.loads(res.stdout)["modules"]
    assert all(0.65 < m["nonzero"] < 0.85 for m in modules)  # TIES of two at density 0.5: 1 - 0.5² of the entries
    _check_file(tmp_path / "c.html")
    page = (tmp_path / "c.html").read_text()
    assert all(m["name"] in page for m in modules)  # the numbers behind the figure, in its table
    base = BASE_OF["llama-lora"]
    adaptkit.merge(base, ADAPTERS["llama-lora"], tmp_path / "m")
    res = invoke(runner, "extract", base, tmp_path / "m", "-o", tmp_path / "e", "--rank", "4", "--report",
                 tmp_path / "e.svg")
    assert res.exit_code == 0, res.output
    _check_file(tmp_path / "e.svg")
    res = invoke(runner, "verify", base, ADAPTERS["llama-lora"], tmp_path / "m", "--no-model", "--report",
                 tmp_path / "v.png")
    assert res.exit_code == 0, res.output
    _check_file(tmp_path / "v.png")
    report = adaptkit.verify(base, ADAPTERS["llama-lora"], tmp_path / "m", model=False)
    fig = plots.plot_verify(report)
    bars = fig.axes[0].patches
    assert len(bars) == len(report.modules)
    for bar, m in zip(bars, report.modules):  # each bar is that tensor's error / allowed
        assert math.isclose(bar.get_width(), max(m.rel_error / m.allowed, 1e-6), rel_tol=1e-9)


def test_cli_inspect_plot_compare_and_terminal_spectrum(runner, tmp_path):
    res = invoke(runner, "inspect", ADAPTERS["llama-lora"], ADAPTERS["llama-dora"], "--plot", tmp_path / "p.svg")
    assert res.exit_code == 0 and "2 adapters drawn" in res.stdout
    _check_file(tmp_path / "p.svg")
    res = invoke(runner, "inspect", ADAPTERS["llama-lora"], ADAPTERS["llama-rslora-patterns"], "--compare", "--json")
    assert res.exit_code == 0 and len(json.loads(res.stdout)["cosine"]) == 14
    res = invoke(runner, "inspect", ADAPTERS["llama-lora"], "--svd")
    spectrum_rows = [line for line in res.stdout.splitlines() if line.startswith("model.layers.")]
    assert len(spectrum_rows) == 14 and all(any(c in line for c in plots.BLOCKS) for line in spectrum_rows)
    assert_one_line_error(invoke(runner, "inspect", ADAPTERS["llama-lora"], "--compare"), "compares two adapters")
    assert_one_line_error(invoke(runner, "inspect", ADAPTERS["llama-lora"], ADAPTERS["llama-dora"]),
                          "--plot or --compare")
    assert_one_line_error(invoke(runner, "inspect", ADAPTERS["llama-lora"], "--plot", tmp_path / "p.jpg"),
                          "--plot: plots are written as .png, .svg, .html")
    assert_one_line_error(invoke(runner, "inspect", ADAPTERS["llama-lora"], ADAPTERS["gpt2-lora"], "--compare"),
                          "share no module")


def test_a_plot_is_never_written_into_an_input(runner, tmp_path):
    from tests.helpers import snapshot

    base = tmp_path / "base"
    import shutil

    shutil.copytree(BASE_OF["llama-lora"], base)
    adaptkit.merge(base, ADAPTERS["llama-lora"], tmp_path / "m")
    before = snapshot(base, ADAPTERS["llama-lora"], tmp_path / "m")
    for args in (["verify", base, ADAPTERS["llama-lora"], tmp_path / "m", "--no-model", "--report", base / "v.png"],
                 ["verify", base, ADAPTERS["llama-lora"], tmp_path / "m", "--no-model", "--report",
                  tmp_path / "m" / "v.svg"],
                 ["inspect", ADAPTERS["llama-lora"], "--plot", ADAPTERS["llama-lora"] / "p.html"],
                 ["extract", base, tmp_path / "m", "-o", tmp_path / "e", "--rank", "2", "--report", base / "e.png"]):
        assert_one_line_error(invoke(runner, *args), "input")
    assert snapshot(base, ADAPTERS["llama-lora"], tmp_path / "m") == before and not (tmp_path / "e").exists()
    report = adaptkit.verify(base, ADAPTERS["llama-lora"], tmp_path / "m", model=False)
    with pytest.raises(adaptkit.AdaptkitError, match="input"):  # the library refuses it too
        plots.plot_verify(report, base / "v.png")
    assert snapshot(base) == {k: v for k, v in before.items() if k.startswith(str(base))}


def test_a_missing_extra_is_one_line(runner, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    res = invoke(runner, "inspect", ADAPTERS["llama-lora"], "--plot", tmp_path / "p.png")
    assert_one_line_error(res, "pip install 'adaptkit[plot]'")
    res = invoke(runner, "verify", BASE_OF["llama-lora"], ADAPTERS["llama-lora"], FIXTURES / "tiny-llama",
                 "--report", tmp_path / "v.png")
    assert_one_line_error(res, "adaptkit[plot]")  # before any work
    assert not (tmp_path / "p.png").exists() and not (tmp_path / "v.png").exists()
    with pytest.raises(adaptkit.AdaptkitError, match=r"adaptkit\[plot\]"):
        plots.plot_inspect(adaptkit.inspect(ADAPTERS["llama-lora"], svd=True))
    assert torch.is_tensor(torch.zeros(1))  # the rest of adaptkit does not need it
