"""`adaptkit combine` on peft-made adapters, against peft.utils.merge_utils and the methods' formulas."""

import json

import pytest
import torch
from helpers import ADAPTERS, TINY_LLAMA, load_dir, peft_deltas
from peft.utils import merge_utils

from adaptkit import combine, load_adapter
from adaptkit.cli import main
from adaptkit.methods import METHODS, factor

A1, A2 = ADAPTERS["llama-lora"], ADAPTERS["llama-rslora-patterns"]


@pytest.fixture(scope="module")
def third(tmp_path_factory):
    from fixtures import build

    out = tmp_path_factory.mktemp("third") / "ad"
    return build.build_adapter(TINY_LLAMA, out, seed=21, r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"])


def full_deltas(paths, name):
    out = []
    for p in paths:
        m = load_adapter(p).modules.get(name)
        out.append(m.delta() if m is not None else None)
    ref = next(d for d in out if d is not None)
    return [d if d is not None else torch.zeros_like(ref) for d in out]


def combined_deltas(out):
    return {n: m.delta() for n, m in load_adapter(out).modules.items()}


def test_linear_is_exact_and_loads_in_peft(tmp_path, third):
    out = tmp_path / "lin"
    combine([A1, A2, third], out, method="linear", weights=[1.0, 0.5, -2.0])
    got = combined_deltas(out)
    for name, d in got.items():
        ds = full_deltas([A1, A2, third], name)
        expect = ds[0] + 0.5 * ds[1] - 2.0 * ds[2]
        assert torch.allclose(d, expect, atol=1e-6), name
        r = sum(load_adapter(p).modules[name].shape_rank for p in (A1, A2, third) if name in load_adapter(p).modules)
        assert load_adapter(out).modules[name].shape_rank == r  # exact concatenation
    ref = peft_deltas(TINY_LLAMA, out)  # peft loads it and computes the same ΔW
    assert set(ref) == set(got) and all(torch.allclose(ref[n], got[n], atol=1e-6) for n in got)


def test_ties_equal_weights_equals_peft_merge_utils(tmp_path, third):
    paths = [A1, A2, third]
    for sign in ("total", "frequency"):
        out = tmp_path / sign
        combine(paths, out, method="ties", density=0.4, majority_sign=sign, rank=64)  # full rank: no truncation
        got = combined_deltas(out)
        for name, d in got.items():
            ds = full_deltas(paths, name)
            ref = merge_utils.ties(ds, torch.ones(3), 0.4, majority_sign_method=sign)
            assert torch.allclose(d, ref, atol=2e-6), (sign, name)


def test_ties_unequal_weights_follow_the_formula(tmp_path):
    paths, w = [A1, A2], [0.7, 0.2]
    out = tmp_path / "ties"
    combine(paths, out, method="ties", weights=w, density=0.5, rank=64)
    for name, d in combined_deltas(out).items():
        ds = full_deltas(paths, name)
        pruned = [merge_utils.magnitude_based_pruning(x, 0.5) * wi for x, wi in zip(ds, w)]
        stacked = torch.stack(pruned)
        elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
        agree = stacked.sign() == elected
        num = (stacked * agree).sum(0)
        den = (torch.tensor(w).view(-1, 1, 1) * agree).sum(0)
        expect = torch.where(den != 0, num / den.clamp(min=1e-30), torch.zeros_like(num))
        assert torch.allclose(d, expect, atol=2e-6), name


def test_magnitude_prune_equals_peft(tmp_path):
    out = tmp_path / "mp"
    combine([A1, A2], out, method="magnitude_prune", weights=[1.0, 0.3], density=0.3, rank=64)
    for name, d in combined_deltas(out).items():
        ref = merge_utils.magnitude_prune(full_deltas([A1, A2], name), torch.tensor([1.0, 0.3]), 0.3)
        assert torch.allclose(d, ref, atol=2e-6), name


def test_rank_r_is_the_best_rank_r_approximation(tmp_path):
    out = tmp_path / "r3"
    res = combine([A1, A2], out, method="ties", density=0.5, rank=3)
    full_out = tmp_path / "full"
    combine([A1, A2], full_out, method="ties", density=0.5, rank=64)
    full = combined_deltas(full_out)
    for m in res.modules:
        u, s, vh = torch.linalg.svd(full[m.name].double(), full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        got = load_adapter(out).modules[m.name]
        assert got.shape_rank == 3
        assert torch.allclose(got.delta().double(), best, atol=1e-5), m.name
        assert m.retained_energy == pytest.approx(float((s[:3] ** 2).sum() / (s ** 2).sum()), rel=1e-5)


def test_linear_with_rank_uses_the_exact_core(tmp_path):
    out = tmp_path / "lr"
    combine([A1, A2], out, method="linear", rank=5)
    for name, d in combined_deltas(out).items():
        ds = full_deltas([A1, A2], name)
        u, s, vh = torch.linalg.svd((ds[0] + ds[1]).double(), full_matrices=False)
        assert torch.allclose(d.double(), (u[:, :5] * s[:5]) @ vh[:5], atol=1e-5), name


def test_energy_picks_smallest_rank(tmp_path):
    res = combine([A1, A2], tmp_path / "e", method="linear", energy=0.9)
    for m in res.modules:
        assert m.retained_energy >= 0.9
        ds = full_deltas([A1, A2], m.name)
        s = torch.linalg.svdvals((ds[0] + ds[1]).double())
        cum = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
        assert m.rank == int((cum < 0.9 - 1e-12).sum()) + 1


def _binomial_ok(kept: torch.Tensor, p: float, sds: float = 5.0) -> bool:
    """The fraction of True in ``kept`` is what independent draws with probability p give (within sds σ)."""
    n = kept.numel()
    return abs(kept.float().mean().item() - p) <= sds * (p * (1 - p) / n) ** 0.5


def test_dare_keeps_density_rescales_and_is_reproducible(tmp_path, third):
    """The mask is read back from the output (no RNG call repeated here): every entry is either dropped
    or rescaled by exactly 1/density; the survivors are a Bernoulli(density) sample; the same seed
    gives the same file, another seed another mask; a module's mask does not depend on which other
    modules are combined (it is drawn per (seed, module name))."""
    density, name = 0.3, "model.layers.0.mlp.up_proj"
    full = load_adapter(A1).modules[name].delta()
    res = combine([A1, A2], tmp_path / "d1", method="dare_linear", weights=[1.0, 0.0], density=density, rank=64,
                  seed=7)
    d = combined_deltas(tmp_path / "d1")[name]
    kept = (d - full / density).abs() <= 1e-5
    dropped = d.abs() <= 1e-5
    assert bool((kept ^ dropped).all())  # each entry one or the other (full ΔW has no zeros here)
    assert _binomial_ok(kept, density)
    assert all(_binomial_ok(row, density, 6.0) for row in kept.reshape(8, -1))  # no block of the matrix favoured
    combine([A1, A2], tmp_path / "d2", method="dare_linear", weights=[1.0, 0.0], density=density, rank=64, seed=7)
    combine([A1, A2], tmp_path / "d3", method="dare_linear", weights=[1.0, 0.0], density=density, rank=64, seed=8)
    f1, f2, f3 = (tmp_path / x / "adapter_model.safetensors" for x in ("d1", "d2", "d3"))
    assert f1.read_bytes() == f2.read_bytes()
    other = (combined_deltas(tmp_path / "d3")[name] - full / density).abs() <= 1e-5
    assert not torch.equal(kept, other) and _binomial_ok(kept & other, density * density)  # independent seeds
    # other modules in the mix (third adds q/v_proj only): this module's mask is the same
    combine([A1, third], tmp_path / "d4", method="dare_linear", weights=[1.0, 0.0], density=density, rank=64, seed=7)
    assert torch.equal(kept, (combined_deltas(tmp_path / "d4")[name] - full / density).abs() <= 1e-5)
    assert res.parameters["seed"] == 7


def test_dare_ties_runs_the_ties_election_on_dropped_deltas(tmp_path):
    """Each entry of dare_ties is 0 (both dropped, or no agreeing survivor), one survivor rescaled, or
    the mean of two agreeing survivors; zeros come at the rate two independent drops give."""
    density, name = 0.5, "model.layers.1.self_attn.k_proj"
    out = tmp_path / "dt"
    combine([A1, A2], out, method="dare_ties", density=density, rank=64, seed=3)
    d1, d2 = (x / density for x in full_deltas([A1, A2], name))
    got = combined_deltas(out)[name]
    close = [(got - c).abs() <= 2e-5 for c in (torch.zeros_like(got), d1, d2, (d1 + d2) / 2)]
    assert bool(torch.stack(close).any(0).all())
    agree = (d1 > 0) == (d2 > 0)
    # zero only when both were dropped: P = (1 - density)², where the two deltas agree in sign
    assert _binomial_ok(close[0][agree], (1 - density) ** 2)
    both = close[3] & ~close[1] & ~close[2]
    assert _binomial_ok(both[agree], density ** 2)


def test_module_in_one_adapter_only(tmp_path, third):
    out = tmp_path / "x"
    combine([third, A1], out, method="linear", weights=[1.0, 1.0])
    got = combined_deltas(out)
    assert "model.layers.0.mlp.up_proj" in got  # only in A1
    assert torch.allclose(got["model.layers.0.mlp.up_proj"], load_adapter(A1).modules["model.layers.0.mlp.up_proj"].delta(), atol=1e-6)


def test_output_loads_in_peft_with_patterns(tmp_path):
    out = tmp_path / "e"
    combine([A1, A2], out, method="ties", energy=0.95)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["rank_pattern"]  # modules kept different ranks
    ours = combined_deltas(out)
    ref = peft_deltas(TINY_LLAMA, out)
    assert all(torch.allclose(ref[n], ours[n], atol=1e-6) for n in ours)
    readme = (out / "README.md").read_text()
    assert "ties" in readme and "llama-lora" in readme


def test_combine_into_base_equals_merging_the_combined_adapter(tmp_path):
    combine([A1, A2], tmp_path / "ad", method="ties", density=0.5, rank=4)
    combine([A1, A2], tmp_path / "merged", method="ties", density=0.5, rank=4, base=TINY_LLAMA)
    from adaptkit import merge

    merge(TINY_LLAMA, [tmp_path / "ad"], tmp_path / "ref")
    a, b = load_dir(tmp_path / "merged"), load_dir(tmp_path / "ref")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_low_energy_warns(runner, tmp_path):
    res = runner.invoke(main, ["combine", str(A1), str(A2), "--method", "ties", "--rank", "1", "-o", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "under 90 %" in res.stderr


@pytest.mark.parametrize("args,msg", [
    (["--method", "ties", "--density", "1.5"], "--density: must be in"),
    (["--method", "linear", "--density", "0.5"], "does not apply"),
    (["--method", "linear", "--rank", "2", "--energy", "0.9"], "not both"),
    (["--method", "linear", "--weights", "1,x"], "comma-separated"),
])
def test_bad_parameters_exit_2(runner, tmp_path, args, msg):
    res = runner.invoke(main, ["combine", str(A1), str(A2), "-o", str(tmp_path / "o"), *args])
    assert res.exit_code == 2 and msg in res.stderr


def test_mismatched_or_dora_adapters_refused(runner, tmp_path):
    from fixtures import build

    small = tmp_path / "small"
    build.build_model(build.llama_config(hidden=32, intermediate=64), small, dtype=torch.float32)
    other = build.build_adapter(small, tmp_path / "other", r=2, lora_alpha=2, target_modules=["q_proj"])
    res = runner.invoke(main, ["combine", str(A1), str(other), "--method", "linear", "-o", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "disagree on module" in res.stderr and "same base" in res.stderr
    res = runner.invoke(main, ["combine", str(A1), str(ADAPTERS["llama-dora"]), "--method", "ties", "-o", str(tmp_path / "o3")])
    assert res.exit_code == 2 and "DoRA" in res.stderr


def test_registry_declares_parameters():
    assert set(METHODS) == {"linear", "magnitude_prune", "ties", "dare_linear", "dare_ties"}
    assert METHODS["ties"].sign and METHODS["ties"].density and not METHODS["ties"].random
    assert METHODS["dare_ties"].random and METHODS["dare_linear"].paper


def test_factor_energy_and_rank():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(40, 30, generator=gen)
    a, b, kept = factor(m, rank=30)
    assert torch.allclose(b @ a, m, atol=1e-4) and kept == pytest.approx(1.0)
