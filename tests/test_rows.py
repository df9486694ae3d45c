"""The CPU's blocked merge (ops.merge_rows): the fp32 sum rounded once, the same bits as the
fp32-buffer route (which runs the same blocks, ops.apply_ops) on every shape, dtype, orientation,
window and worker count, and the same refusal of NaN or overflow."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings, strategies as st

from adaptkit import merge, ops, stream
from adaptkit.ops import Op, RowWorkers, apply_ops, merge_rows

from helpers import ADAPTERS, BASE_OF, FAMILY_ADAPTERS, FAMILY_BASE_OF, load_dir

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
THREADS = torch.get_num_threads()


def _op(a, b, scale=1.7, transposed=False, into=None, take=None):
    module = SimpleNamespace(A=a, B=b, scaling=scale, name="m", use_dora=False)
    return Op(kind="lora", adapter=None, module=module, transposed=transposed, into=into, take=take)


def _reference(src, op, out_dtype):
    w = src.float()
    apply_ops(w, [op], torch.device("cpu"))
    return w.to(out_dtype)


@pytest.fixture(scope="module")
def workers():
    pool = RowWorkers(2)
    yield pool
    pool.close()


def _case(g, rows, cols, r, src_dt, window, align):
    src = torch.randn(rows, cols, generator=g).to(src_dt)
    out_f, in_f = rows, cols
    into = None
    if window and rows > align:  # a fused base: the module's delta lands on some rows
        lo = int(torch.randint(0, rows - align + 1, (1,), generator=g))
        length = int(torch.randint(1, (rows - lo) // align + 1, (1,), generator=g)) * align
        into = (lo, lo + length)
        out_f = length
    a = torch.randn(r, in_f, generator=g) * 0.3
    b = torch.randn(out_f, r, generator=g).to(torch.bfloat16)  # factors in another dtype, as adapters ship them
    return src, _op(a, b, into=into)


CASES = dict(cols=st.integers(1, 300), r=st.integers(1, 9), src_dt=st.sampled_from(DTYPES),
             out_dt=st.sampled_from(DTYPES), window=st.booleans(),
             block=st.sampled_from([64, 5000, 1 << 18]), seed=st.integers(0, 2 ** 16))


@settings(max_examples=60, deadline=None)
@given(blocks=st.integers(1, 12), **CASES)
def test_same_bits_as_the_fp32_buffer_route(blocks, cols, r, src_dt, out_dt, window, block, seed, workers):
    """Row counts in multiples of 8, as every real Linear weight has: bit-identical to the buffer
    route (fp32 in place, ops.apply_ops), and the same with two workers as in the calling thread
    (whose own intra-op thread count is the process's)."""
    g = torch.Generator().manual_seed(seed)
    src, op = _case(g, 8 * blocks, cols, r, src_dt, window, 8)
    dst = torch.empty(src.shape, dtype=out_dt)
    assert merge_rows(src, dst, op, workers, block_bytes=block)  # many blocks, a ragged last one, or one
    solo = torch.empty(src.shape, dtype=out_dt)
    assert merge_rows(src, solo, op, RowWorkers(1), block_bytes=block)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "ROW_BLOCK_BYTES", block)  # the buffer route's blocks at this size
        want = _reference(src, op, out_dt)
    assert torch.equal(dst.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(solo.view(torch.uint8), dst.view(torch.uint8))


def test_the_calling_threads_blocks_run_on_one_thread_and_give_its_setting_back(monkeypatch):
    seen = []
    real = ops.lora.add_delta_
    monkeypatch.setattr(ops.lora, "add_delta_", lambda *a: seen.append(torch.get_num_threads()) or real(*a))
    torch.set_num_threads(2)
    try:
        w = torch.randn(64, 40)
        apply_ops(w, [_op(torch.randn(2, 40), torch.randn(64, 2))], torch.device("cpu"))
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(THREADS)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 97), **CASES)
def test_any_row_count_is_rounded_once_from_the_exact_sum(rows, cols, r, src_dt, out_dt, window, block, seed,
                                                          workers):
    """Any row count (a vocabulary of 50257 rows under an embedding LoRA): the fp32 sum rounded once,
    as the buffer route gives it to within fp32's last bit before rounding (MKL's result on ragged
    rows depends on its own blocking, as it does between its thread counts)."""
    g = torch.Generator().manual_seed(seed)
    src, op = _case(g, rows, cols, r, src_dt, window, 1)
    dst = torch.empty(src.shape, dtype=out_dt)
    assert merge_rows(src, dst, op, workers, block_bytes=block)
    w = src.double()
    m = op.module
    d = op.scale * (m.B.double() @ m.A.double())
    op.window(w).add_(d)
    exact, got = w, dst.double()
    ulp = torch.finfo(out_dt).eps * exact.abs() + 2.0 ** -24
    assert ((got - exact).abs() <= ulp + 1e-6 * (src.double().abs() + d.abs().max())).all()


def test_a_base_stored_in_out_stays_on_the_buffer_route(tmp_path, monkeypatch, workers):
    """Conv1D (GPT-2) and other (in, out) bases: blocks of their rows are columns of A, and MKL's addmm
    of such a block gave other fp32 bits than the whole product for about a quarter of shapes on an Intel
    CPU (seed 2 below: whole vs blocked addmm_ of A's column blocks), so fused_op sends them to the buffer
    route and merge_rows refuses them. On an AMD EPYC the two agreed for 200 seeds: which kernel MKL picks
    depends on the CPU, so the route is fixed here and not left to what this machine happens to do."""
    g = torch.Generator().manual_seed(2)
    src = torch.randn(16, 9, generator=g)
    at, bt = torch.randn(2, 16, generator=g), torch.randn(9, 2, generator=g)
    op = _op(bt.T.contiguous(), at.T.contiguous(), transposed=True)
    assert ops.fused_op([op]) is None
    with pytest.raises(ValueError):
        merge_rows(src, torch.empty_like(src), op, workers)
    calls = []
    monkeypatch.setattr(stream, "merge_rows", lambda *a: calls.append(1))
    merge(BASE_OF["gpt2-lora"], [ADAPTERS["gpt2-lora"]], tmp_path / "m", dtype="float16")
    assert not calls


def test_a_split_bases_part_takes_its_rows_of_b(workers):
    src = torch.randn(12, 40).half()
    op = _op(torch.randn(4, 40), torch.randn(30, 4), take=(10, 22))
    dst = torch.empty_like(src)
    assert merge_rows(src, dst, op, workers)
    assert torch.equal(dst, _reference(src, op, torch.float16))


@pytest.mark.parametrize("poison", ["overflow", "nan", "inf-base"])
def test_nan_and_overflow_are_reported(poison, workers):
    src = torch.randn(50, 16).half()
    a, b = torch.randn(2, 16), torch.randn(50, 2)
    if poison == "overflow":
        b[37] = 1e5  # finite factors whose ΔW overflows fp16 in one late block
    elif poison == "nan":
        a[0, 3] = float("nan")
    else:
        src[44, 2] = float("inf")
    dst = torch.empty_like(src)
    assert not merge_rows(src, dst, _op(a, b), workers, block_bytes=64)
    ok = torch.empty(50, 16, dtype=torch.float32)  # fp32 holds what fp16 could not
    assert merge_rows(src, ok, _op(a, b), workers, block_bytes=64) == (poison == "overflow")


@pytest.mark.parametrize("name", ["llama-lora", "llama-embed-mts", "llama-rslora-patterns",
                                  "llava-language-model", "phi3-fused", "qwen3-moe-experts"])
def test_a_merge_is_bit_identical_to_the_buffer_route(tmp_path, name, monkeypatch):
    """Embedding LoRA beside modules_to_save, rsLoRA with patterns, a VLM's renamed language model,
    fused Phi-3, an MoE (its attention tensors run apart from its expert tensors, whose ops the
    blocked route does not take, so they take it): every tensor the same."""
    base = BASE_OF.get(name) or FAMILY_BASE_OF[name]
    adapter = ADAPTERS.get(name) or FAMILY_ADAPTERS[name]
    calls = []
    real = stream.merge_rows
    monkeypatch.setattr(stream, "merge_rows", lambda *a: calls.append(1) or real(*a))
    merge(base, [adapter], tmp_path / "rows", dtype="float16")
    assert calls, "the blocked route was not taken"
    monkeypatch.setattr(stream, "direct", lambda job, dev: (False, None))
    merge(base, [adapter], tmp_path / "buffer", dtype="float16")
    a, b = load_dir(tmp_path / "rows"), load_dir(tmp_path / "buffer")
    assert set(a) == set(b) and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


@pytest.mark.parametrize("out_dt", [torch.float16, torch.bfloat16])
def test_both_routes_refuse_exactly_what_rounds_to_infinity(out_dt, workers):
    """The buffer route (stream.fits, before rounding) and the blocked one (after rounding) draw the
    line at the same fp32 value: the largest finite value plus half its ulp."""
    limit = torch.tensor(ops.finite_limit(out_dt), dtype=torch.float32)
    below = torch.nextafter(limit, torch.tensor(0.0))
    for value, ok in ((below, True), (limit, False), (-limit, False)):
        src = torch.zeros(16, 8)
        src[9, 3] = value
        op = _op(torch.zeros(1, 8), torch.zeros(16, 1))
        assert merge_rows(src, torch.empty(16, 8, dtype=out_dt), op, workers, block_bytes=64) is ok
        assert stream.fits(src, out_dt) is ok


def test_a_block_whose_sum_overflows_is_checked_value_by_value(workers):
    src = torch.full((16, 64), 60000.0).half()  # every value finite, the fp16 sum of a block is not
    op = _op(torch.zeros(1, 64), torch.zeros(16, 1))
    assert merge_rows(src, torch.empty_like(src), op, workers, block_bytes=64)


@pytest.mark.parametrize("l2, want", [("512K", 1 << 20), ("1024K", 1 << 20), ("1536K", 3 << 20), ("2048K", 4 << 20),
                                      ("32M", 4 << 20), (None, 1 << 20), ("odd", 1 << 20)])
def test_the_row_block_follows_the_l2_cache_within_1_to_4_mb(monkeypatch, l2, want):
    import builtins
    import io

    real = builtins.open

    def fake(path, *args, **kwargs):
        if "cache/index2/size" in str(path):
            if l2 is None:
                raise FileNotFoundError(path)
            return io.StringIO(l2 + "\n")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake)
    assert ops._row_block_bytes() == want
