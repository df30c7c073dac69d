"""fedmoe_kernels.aggregate and Accumulator against the loop reference, on the torch and Triton paths.

Without a GPU the Triton kernels run under the interpreter (tests/conftest.py), which is slow: the Triton
cases are a representative subset of the shapes the torch path is checked on.
"""

from __future__ import annotations

import importlib
import itertools
import math
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy import stats

from fedmoe_kernels import Accumulator, AggregateResult, aggregate
from fedmoe_kernels._backend import interpreting
from fedmoe_kernels.aggregate import aggregate_reference

# the module (the package attribute `aggregate` is the function): its torch path's sizes are patched below
aggregate_module = importlib.import_module("fedmoe_kernels.aggregate")

TRITON = pytest.param(
    "triton",
    marks=pytest.mark.skipif(
        not (torch.cuda.is_available() or interpreting()), reason="needs CUDA or TRITON_INTERPRET=1"
    ),
)
BACKENDS = ["torch", TRITON]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float64: 1e-12, torch.float32: 2e-6}
HALF_MANTISSA = {torch.float16: 10, torch.bfloat16: 7}


def make_case(m, p, e, *, dtype=torch.float32, base_dtype=torch.float32, seed=0, bad_rows=True):
    """Rows near their expert's base (deltas of varied size), unsorted experts, weights in [0, 10)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(e, p, generator=g).to(base_dtype)
    experts = torch.randint(0, e, (m,), generator=g)
    scale = 0.02 + 0.2 * torch.rand(m, 1, generator=g)
    rows = (base[experts].double() + scale * torch.randn(m, p, generator=g, dtype=torch.float64)).to(dtype)
    weights = 10 * torch.rand(m, generator=g)
    if bad_rows and m >= 5:
        weights[1] = 0.0
        rows[2, p // 2] = math.nan
        rows[3, 0] = -math.inf
        rows[4, p - 1] = math.inf
    return rows.to(DEVICE), experts.to(DEVICE), weights.to(DEVICE), base.to(DEVICE)


def check(res: AggregateResult, rows, experts, weights, base, **kwargs) -> None:
    """Compare with the reference: exact counts, weight sums to 1e-12, the bank to its dtype's rounding."""
    ref = aggregate_reference(rows.cpu(), experts.cpu(), weights.cpu(), base.shape[0], base.cpu(), **kwargs)
    assert res.bank.dtype == base.dtype and res.bank.shape == base.shape
    assert torch.equal(res.accepted.cpu(), ref.accepted)
    assert torch.equal(res.rejected.cpu(), ref.rejected)
    torch.testing.assert_close(res.weight_sum.cpu(), ref.weight_sum, rtol=1e-12, atol=0)
    bank = res.bank.cpu().double()
    if base.dtype in HALF_MANTISSA:  # rounded to nearest: within half an ulp, up to float32 sums' error
        exponent = torch.frexp(ref.bank).exponent - 2 - HALF_MANTISSA[base.dtype]
        half_ulp = torch.ldexp(torch.ones_like(ref.bank), exponent)
        assert ((bank - ref.bank).abs() <= half_ulp + 1e-5 * ref.bank.abs() + 1e-12).all()
    else:
        tol = TOL[base.dtype]
        torch.testing.assert_close(bank, ref.bank, rtol=tol, atol=tol)


def clip_norm(p: int) -> float:
    return 0.1 * math.sqrt(p)  # between the smallest and the largest delta norms of make_case


# ---------------------------------------------------------------- against the reference


PATHS = {"product": 0, "tiles": 1 << 62}  # _PRODUCT_BYTES: every row by a product (if it may); in tiles


@pytest.fixture(params=list(PATHS))
def torch_path(request, monkeypatch):
    """Force the torch batch path's sparse-dense product (rows in the accumulation dtype) or its tiles,
    whatever the row length."""
    monkeypatch.setattr(aggregate_module, "_PRODUCT_BYTES", PATHS[request.param])
    return request.param


@pytest.mark.parametrize("e", [1, 8, 256])
@pytest.mark.parametrize("p", [1, 7, 1000, 4099])
@pytest.mark.parametrize("m", [0, 1, 5, 300])
def test_torch_matches_reference(m, p, e, torch_path):
    dtype = [torch.float32, torch.float16, torch.bfloat16][(m + p + e) % 3]
    rows, experts, weights, base = make_case(m, p, e, dtype=dtype, seed=m + p + e)
    for kw in ({}, dict(max_norm=clip_norm(p), lr=0.5)):
        res = aggregate(rows, experts, weights, e, base, backend="torch", **kw)
        check(res, rows, experts, weights, base, **kw)


@pytest.mark.parametrize(
    "m,p,e,dtype",
    [
        (0, 7, 8, torch.float32),
        (1, 1, 1, torch.float16),
        (5, 7, 8, torch.bfloat16),
        (5, 4099, 8, torch.float32),
        (40, 1000, 256, torch.float16),
        (300, 7, 8, torch.float32),
    ],
)
def test_triton_matches_reference(m, p, e, dtype):
    rows, experts, weights, base = make_case(m, p, e, dtype=dtype, seed=m + p)
    for kw in ({}, dict(max_norm=clip_norm(p), lr=1.5)):
        res = aggregate(rows, experts, weights, e, base, backend="triton", **kw)
        check(res, rows, experts, weights, base, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype,base_dtype",
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.float64, torch.float64),
        (torch.float64, torch.float32),
    ],
)
def test_dtypes(backend, dtype, base_dtype):
    rows, experts, weights, base = make_case(12, 33, 4, dtype=dtype, base_dtype=base_dtype, seed=3)
    res = aggregate(rows, experts, weights, 4, base, backend=backend, max_norm=0.4)
    check(res, rows, experts, weights, base, max_norm=0.4)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(0, 30),
    p=st.integers(1, 40),
    e=st.integers(1, 6),
    lr=st.sampled_from([1.0, 0.3, 2.0]),
    max_norm=st.sampled_from([None, 0.05, 0.3]),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_torch_matches_reference_hypothesis(m, p, e, lr, max_norm, seed, dtype):
    rows, experts, weights, base = make_case(m, p, e, dtype=dtype, seed=seed)
    res = aggregate(rows, experts, weights, e, base, max_norm=max_norm, lr=lr, backend="torch")
    check(res, rows, experts, weights, base, max_norm=max_norm, lr=lr)


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("backend", BACKENDS)
def test_rejected_rows_have_no_influence(backend):
    rows, experts, weights, base = make_case(20, 50, 3, seed=5)
    experts[2:5] = 1  # the three non-finite rows share expert 1
    rows[[0, 7, 9], 3] = torch.tensor([math.nan, math.inf, 1e39], dtype=torch.float64).float()
    experts[[0, 7, 9]] = 2  # expert 2 has only rejected rows besides its finite ones
    res = aggregate(rows, experts, weights, 3, base, backend=backend)
    bad = ~torch.isfinite(rows).all(dim=1)
    clean = aggregate(rows[~bad], experts[~bad], weights[~bad], 3, base, backend=backend)
    assert torch.equal(res.bank, clean.bank)
    assert torch.equal(res.accepted, clean.accepted)
    assert torch.equal(res.rejected, torch.bincount(experts[bad], minlength=3))
    assert torch.isfinite(res.bank).all()


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the interpreter's cast
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_row_beyond_float32_is_rejected(backend):
    base = torch.zeros(2, 3, device=DEVICE)
    rows = torch.tensor([[1.0, 2.0, 3.0], [1e300, 0.0, 0.0], [3.0, 2.0, 1.0]], dtype=torch.float64)
    rows = rows.to(DEVICE)
    experts = torch.tensor([0, 0, 1], device=DEVICE)
    res = aggregate(rows, experts, torch.ones(3, device=DEVICE), 2, base, backend=backend)
    assert res.rejected.tolist() == [1, 0] and res.accepted.tolist() == [1, 1]
    assert torch.equal(res.bank, rows[[0, 2]].float())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,value", [(torch.float16, 60000.0), (torch.float32, 2e38)])
def test_huge_finite_rows_are_accepted(backend, dtype, value):
    """Rows whose values are finite but whose sum overflows their dtype are accepted."""
    base = torch.zeros(2, 64, device=DEVICE)
    rows = torch.full((2, 64), value, dtype=dtype, device=DEVICE)
    rows[1, 1] = math.nan
    experts = torch.tensor([0, 1], device=DEVICE)
    res = aggregate(rows, experts, torch.ones(2, device=DEVICE), 2, base, backend=backend)
    assert res.accepted.tolist() == [1, 0] and res.rejected.tolist() == [0, 1]
    assert torch.equal(res.bank[0], rows[0].float()) and torch.equal(res.bank[1], base[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weights_keep_base(backend):
    rows, experts, weights, base = make_case(9, 20, 4, seed=1, bad_rows=False)
    experts[:] = torch.tensor([0, 0, 0, 1, 1, 3, 3, 3, 3])
    weights[:3] = 0.0  # expert 0: rows, but zero weight; expert 2: no rows
    res = aggregate(rows, experts, weights, 4, base, backend=backend)
    assert torch.equal(res.bank[[0, 2]], base[[0, 2]])
    assert res.accepted.tolist() == [3, 2, 0, 4] and res.weight_sum[0] == 0
    assert not torch.equal(res.bank[[1, 3]], base[[1, 3]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", [-120, 90])
def test_weight_scale_is_exact(backend, shift):
    """Weights times a power of two give the same bits (float32 weights up to 1e38: no overflow)."""
    rows, experts, weights, base = make_case(30, 17, 3, seed=2)
    weights = weights.double()
    res = aggregate(rows, experts, weights, 3, base, backend=backend, max_norm=0.3)
    scaled = aggregate(rows, experts, weights * 2.0**shift, 3, base, backend=backend, max_norm=0.3)
    assert torch.equal(scaled.bank, res.bank)
    assert torch.equal(scaled.weight_sum, res.weight_sum * 2.0**shift)
    huge = weights.float() * 3e37  # sums overflow float32
    check(aggregate(rows, experts, huge, 3, base, backend=backend), rows, experts, huge, base)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_and_tiny_weights_mixed(backend):
    rows, experts, _, base = make_case(6, 9, 2, seed=4, bad_rows=False)
    experts[:] = torch.tensor([0, 0, 0, 1, 1, 1])
    weights = torch.tensor([1e300, 1.0, 3e299, 1e-300, 5e-310, 2e-300], dtype=torch.float64, device=DEVICE)
    res = aggregate(rows, experts, weights, 2, base, backend=backend)
    check(res, rows, experts, weights, base)
    assert torch.isfinite(res.weight_sum).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_weights(backend):
    rows, experts, _, base = make_case(15, 10, 3, seed=6)
    counts = torch.randint(0, 500, (15,), device=DEVICE)
    res = aggregate(rows, experts, counts, 3, base, backend=backend)
    assert torch.equal(res.bank, aggregate(rows, experts, counts.double(), 3, base, backend=backend).bank)
    check(res, rows, experts, counts, base)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stable_grouping_gives_same_bits(backend):
    """Sorting the rows by expert (stably) keeps each expert's row order, hence the bits; a shuffle only
    changes the summation order."""
    rows, experts, weights, base = make_case(40, 30, 5, seed=7)
    res = aggregate(rows, experts, weights, 5, base, backend=backend, max_norm=0.5)
    order = torch.sort(experts, stable=True).indices
    grouped = aggregate(rows[order], experts[order], weights[order], 5, base, backend=backend, max_norm=0.5)
    assert torch.equal(grouped.bank, res.bank)
    shuffle = torch.randperm(40, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    shuffled = aggregate(
        rows[shuffle], experts[shuffle], weights[shuffle], 5, base, backend=backend, max_norm=0.5
    )
    torch.testing.assert_close(shuffled.bank, res.bank, rtol=1e-6, atol=1e-6)
    assert torch.equal(shuffled.accepted, res.accepted)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_rows(backend):
    rows, experts, weights, base = make_case(8, 12, 3, seed=8)
    wide = torch.zeros(12, 8, device=DEVICE)
    wide.copy_(rows.T)
    strided = wide.T  # [8, 12] with strides (1, 8)
    res = aggregate(strided, experts, weights, 3, base, backend=backend, max_norm=0.3)
    dense = aggregate(rows, experts, weights, 3, base, backend=backend, max_norm=0.3)
    assert torch.equal(res.bank, dense.bank)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clipping_bounds_the_step(backend):
    rows, experts, weights, base = make_case(6, 50, 6, seed=9, bad_rows=False)
    experts[:] = torch.arange(6)  # one row per expert: the step is the clipped delta times lr
    for lr in (1.0, 0.25):
        res = aggregate(rows, experts, weights, 6, base, backend=backend, max_norm=0.2, lr=lr)
        steps = torch.linalg.vector_norm((res.bank - base).double(), dim=1)
        assert (steps <= lr * 0.2 * (1 + 1e-6)).all()
        assert (steps >= lr * 0.2 * (1 - 1e-5)).all()  # every delta of make_case is longer than 0.2
    unclipped = aggregate(rows, experts, weights, 6, base, backend=backend)
    loose = aggregate(rows, experts, weights, 6, base, backend=backend, max_norm=1e30)
    assert torch.equal(loose.bank, unclipped.bank)


@pytest.mark.parametrize("backend", BACKENDS)
def test_server_step(backend):
    rows, experts, weights, base = make_case(25, 16, 4, seed=10)
    assert torch.equal(aggregate(rows, experts, weights, 4, base, lr=0.0, backend=backend).bank, base)
    full = aggregate(rows, experts, weights, 4, base, backend=backend).bank
    half = aggregate(rows, experts, weights, 4, base, lr=0.5, backend=backend).bank
    torch.testing.assert_close(half, (base + full) / 2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_keeps_base(backend):
    _, _, _, base = make_case(0, 5, 3)
    rows = torch.empty(0, 5, device=DEVICE)
    ids = torch.empty(0, dtype=torch.int64, device=DEVICE)
    for method in ("mean", "median", "trimmed-mean"):
        res = aggregate(rows, ids, torch.empty(0, device=DEVICE), 3, base, method=method, backend=backend)
        assert torch.equal(res.bank, base) and res.bank.data_ptr() != base.data_ptr()
        assert res.accepted.tolist() == [0, 0, 0] and res.rejected.tolist() == [0, 0, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_on_the_bank(backend):
    """``out=base`` updates the flat bank where it lies; parameters viewing it see the new values."""
    rows, experts, weights, base = make_case(10, 24, 3, seed=11)
    expected = aggregate(rows, experts, weights, 3, base, backend=backend, max_norm=0.4)
    bank = base.clone()
    params = [bank[e].view(4, 6) for e in range(3)]  # e.g. an expert's weight matrix
    pointer = bank.data_ptr()
    res = aggregate(rows, experts, weights, 3, bank, backend=backend, max_norm=0.4, out=bank)
    assert res.bank is bank and bank.data_ptr() == pointer
    assert torch.equal(bank, expected.bank)
    assert all(torch.equal(params[e], expected.bank[e].view(4, 6)) for e in range(3))
    other = torch.empty_like(base)
    res = aggregate(rows, experts, weights, 3, base, backend=backend, max_norm=0.4, out=other)
    assert res.bank is other and torch.equal(other, expected.bank)


# ---------------------------------------------------------------- torch: sums first, then verdicts

BLOCKS = [1, 64, 1 << 18]  # bytes of a block of experts' sums: one expert, a few, all of them here


def verdicts_first(rows, experts, weights, e, base, **kw):
    """The torch path with the verdict pass first (a clipping norm that clips nothing): the same bits."""
    return aggregate(rows, experts, weights, e, base, max_norm=1e300, backend="torch", **kw)


def assert_same(res: AggregateResult, other: AggregateResult) -> None:
    assert torch.equal(res.bank, other.bank)
    assert torch.equal(res.accepted, other.accepted) and torch.equal(res.rejected, other.rejected)
    assert torch.equal(res.weight_sum, other.weight_sum)


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 40),
    p=st.integers(1, 30),
    e=st.integers(1, 6),
    bad=st.lists(
        st.tuples(st.integers(0, 999), st.integers(0, 999), st.sampled_from([math.nan, math.inf, -math.inf])),
        max_size=6,
    ),
    zero=st.lists(st.integers(0, 999), max_size=4),
    huge=st.lists(st.integers(0, 999), max_size=3),
    huge_value=st.sampled_from([3e38, 1e39]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.float64]),
    block=st.sampled_from(BLOCKS),
    path=st.sampled_from(list(PATHS)),
    lr=st.sampled_from([1.0, 0.5]),
    seed=st.integers(0, 2**16),
)
@example(  # found by CI: two huge rows of one expert overflow its streamed sums before a larger weight
    m=39, p=22, e=2, bad=[], zero=[], huge=[321, 357], huge_value=3e38, dtype=torch.float32, block=1,
    path="product", lr=1.0, seed=70,
)
def test_sums_first_equal_verdicts_first(m, p, e, bad, zero, huge, huge_value, dtype, block, path, lr, seed):
    """Non-finite values anywhere, zero weights, huge rows (finite float32 near the top of the range, or
    beyond float32 and so rejected): on either path (product, tiles), the batch (out of place and in place)
    gives the bits of the verdicts-first path and of the streaming form, whole or in pieces (the weights
    are scaled to sum below 1 at every step: no sum overflows), and rejects exactly the rows not finite in
    float32."""
    rows, experts, weights, base = make_case(m, p, e, dtype=dtype, seed=seed, bad_rows=False)
    for r, c, value in bad:
        rows[r % m, c % p] = value
    weights[[r % m for r in zero]] = 0.0
    rows[[r % m for r in huge]] = torch.tensor(huge_value, dtype=torch.float64).to(dtype)  # may be inf
    blocks = dict(_BLOCK_BYTES=block, _LONG_BLOCK_BYTES=block, _PRODUCT_BYTES=PATHS[path])
    with mock.patch.multiple(aggregate_module, **blocks):
        res = aggregate(rows, experts, weights, e, base, lr=lr, backend="torch")
        assert_same(res, verdicts_first(rows, experts, weights, e, base, lr=lr))
        bank = base.clone()
        assert_same(res, aggregate(rows, experts, weights, e, bank, lr=lr, out=bank, backend="torch"))
        whole = Accumulator(base, backend="torch")
        whole.add(rows, experts, weights)
        assert_same(res, whole.result(lr=lr))
        acc = Accumulator(base, backend="torch")
        for lo, hi in itertools.pairwise(split_points(m, 3, seed)):
            acc.add(rows[lo:hi], experts[lo:hi], weights[lo:hi])
        assert_same(res, acc.result(lr=lr))
    bad_rows = ~torch.isfinite(rows.float()).all(dim=1)
    assert torch.equal(res.rejected, torch.bincount(experts[bad_rows], minlength=e))
    check(res, rows, experts, weights, base, lr=lr)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(0, 60),
    p=st.integers(1, 50),
    e=st.integers(1, 8),
    block=st.sampled_from(BLOCKS),
    chunk=st.sampled_from([1, 200, 1 << 20]),  # bytes of a tile: one row, a few, every row
    max_norm=st.sampled_from([None, 0.3]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_product_and_tiles_agree(m, p, e, block, chunk, max_norm, dtype, seed):
    """The two torch batch paths add the same rounded terms in the same order: the same bits, which match
    the reference and do not depend on the block or tile size."""
    rows, experts, weights, base = make_case(m, p, e, dtype=dtype, seed=seed)
    base_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    base = base.to(base_dtype)
    results = {}
    for path, product_bytes in PATHS.items():
        args = (rows, experts, weights, e, base)
        with mock.patch.object(aggregate_module, "_PRODUCT_BYTES", product_bytes):
            res = aggregate(*args, max_norm=max_norm, backend="torch")
            sizes = dict(_BLOCK_BYTES=block, _LONG_BLOCK_BYTES=block, _CHUNK_BYTES=chunk)
            with mock.patch.multiple(aggregate_module, **sizes):
                assert_same(res, aggregate(*args, max_norm=max_norm, backend="torch"))
        check(res, rows, experts, weights, base, max_norm=max_norm)
        results[path] = res
    assert_same(results["product"], results["tiles"])


def spy_sums(monkeypatch) -> list[str]:
    """Record the names of the torch path's summing functions as they are called."""
    calls = []
    for name in ("_sum_tiles", "_sum_product"):
        fn = getattr(aggregate_module, name)
        monkeypatch.setattr(aggregate_module, name, lambda *a, fn=fn, name=name: calls.append(name) or fn(*a))
    return calls


SEQUENTIAL = aggregate_module._product_is_sequential(torch.float32) and DEVICE == "cpu"


@pytest.mark.skipif(not SEQUENTIAL, reason="the sparse-dense product is not taken here (CUDA, or no MKL)")
@pytest.mark.parametrize(
    "p,dtype,layout,batch",
    [
        (8, torch.float32, "dense", "_sum_tiles"),  # short rows
        (1 << 15, torch.float32, "dense", "_sum_product"),  # 128 KiB: long rows
        (1 << 15, torch.float32, "wide", "_sum_product"),  # views of wider rows: read where they lie
        (1 << 15, torch.float32, "columns", "_sum_tiles"),  # column-major: the product would copy them
        (1 << 15, torch.bfloat16, "dense", "_sum_tiles"),  # converted to float32: tiles
    ],
)
def test_path_follows_rows(monkeypatch, p, dtype, layout, batch):
    """The batch sums long rows already in the accumulation dtype and in row-major order with one product
    per block, other rows in tiles; the streaming form adds every batch in tiles. The bits are the same."""
    rows, experts, weights, base = make_case(6, p, 2, dtype=dtype, seed=23)
    if layout == "wide":
        rows = torch.cat([rows, rows[:, :3]], dim=1)[:, :p]
    elif layout == "columns":
        rows = rows.T.contiguous().T
    calls = spy_sums(monkeypatch)
    res = aggregate(rows, experts, weights, 2, base, backend="torch")
    assert calls and set(calls) == {batch}
    calls.clear()
    acc = Accumulator(base, backend="torch")
    acc.add(rows, experts, weights)
    assert calls == ["_sum_tiles"]
    assert_same(res, acc.result())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clip", [False, True])
def test_long_rows_streaming_equals_batch_bitwise(monkeypatch, dtype, clip):
    """Rows of 128 KiB or more (the batch's product, where it is taken) against the streaming form's tiles,
    over several blocks and tiles: bad rows, zero weights, growing weights (rescaled sums), rows streamed one
    by one and in uneven pieces, in place or not: the same bits, call after call."""
    monkeypatch.setattr(aggregate_module, "_LONG_BLOCK_BYTES", 3 << 17)  # 3 experts per block at 128 KiB rows
    monkeypatch.setattr(aggregate_module, "_CHUNK_BYTES", 3 << 17)  # tiles of 3 rows
    m, p, e = 40, (1 << 17) // dtype.itemsize, 7
    max_norm = clip_norm(p) if clip else None
    rows, experts, weights, base = make_case(m, p, e, dtype=dtype, base_dtype=dtype, seed=24)
    weights = weights.double() * torch.logspace(-20, 20, m, dtype=torch.float64, device=DEVICE)
    weights[[5, 6]] = 0.0
    rows[7, 100] = 1e300 if dtype == torch.float64 else 3e38  # finite; sums with it may overflow
    product = aggregate_module._product_is_sequential(dtype) and DEVICE == "cpu"  # checked before the spy
    calls = spy_sums(monkeypatch)
    batch = aggregate(rows, experts, weights, e, base, max_norm=max_norm, lr=0.7, backend="torch")
    assert ("_sum_product" in calls) == product
    check(batch, rows, experts, weights, base, max_norm=max_norm, lr=0.7)
    assert_same(batch, aggregate(rows, experts, weights, e, base, max_norm=max_norm, lr=0.7, backend="torch"))
    bank = base.clone()
    assert_same(batch, aggregate(rows, experts, weights, e, bank, max_norm=max_norm, lr=0.7, out=bank,
                                 backend="torch"))
    for cuts in (list(range(m + 1)), split_points(m, 5, seed=3)):
        acc = Accumulator(base, max_norm=max_norm, backend="torch")
        for lo, hi in itertools.pairwise(cuts):
            acc.add(rows[lo:hi], experts[lo:hi], weights[lo:hi])
        assert_same(batch, acc.result(lr=0.7))


@pytest.mark.skipif(not SEQUENTIAL, reason="the sparse-dense product is not taken here (CUDA, or no MKL)")
def test_product_is_deterministic_across_threads():
    """The product's bits do not depend on the number of torch threads (nor on the run)."""
    rows, experts, weights, base = make_case(64, 1 << 15, 9, seed=25)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 1, 4):
            torch.set_num_threads(n)
            results.append(aggregate(rows, experts, weights, 9, base, backend="torch"))
    finally:
        torch.set_num_threads(threads)
    for res in results[1:]:
        assert_same(results[0], res)


@pytest.mark.parametrize(
    "backend,p", [("torch", 64), ("torch", 40_000), pytest.param("triton", 64, marks=TRITON.marks)]
)
def test_huge_finite_rows_average_without_overflow(backend, p):
    """The weights are scaled to sum below 1, so three rows of 3e38 (whose plain sum overflows float32)
    average to 3e38 on every path (tiles, the product where it is taken, Triton's bound and its exact
    check), as with the verdicts first; a bad row beside them is rejected."""
    base = torch.zeros(3, p, device=DEVICE)
    rows = torch.ones(5, p, device=DEVICE)
    rows[:3, :8] = 3e38  # expert 0: three huge rows in 8 columns
    rows[3, 5] = math.nan  # expert 1: a bad row
    experts = torch.tensor([0, 0, 0, 1, 2], device=DEVICE)
    weights = torch.ones(5, device=DEVICE)
    res = aggregate(rows, experts, weights, 3, base, backend=backend)
    assert res.accepted.tolist() == [3, 0, 1] and res.rejected.tolist() == [0, 1, 0]
    if backend == "torch":
        assert_same(res, verdicts_first(rows, experts, weights, 3, base))
    torch.testing.assert_close(res.bank[0], rows[0])
    assert torch.equal(res.bank[1], base[1]) and torch.equal(res.bank[2], rows[4])


@pytest.mark.parametrize("block", BLOCKS)
def test_one_bad_row_among_many_experts(monkeypatch, block):
    """Without clipping the torch path makes no verdict pass; one bad row changes only its expert, which
    is summed again without it."""
    monkeypatch.setattr(aggregate_module, "_BLOCK_BYTES", block)
    verdict_passes = []
    torch_verdicts = aggregate_module._torch_verdicts

    def counted(*args):
        verdict_passes.append(args)
        return torch_verdicts(*args)

    monkeypatch.setattr(aggregate_module, "_torch_verdicts", counted)
    rows, experts, weights, base = make_case(300, 50, 64, seed=21, bad_rows=False)
    rows[117, 13] = math.nan
    res = aggregate(rows, experts, weights, 64, base, backend="torch")
    assert not verdict_passes
    keep = torch.arange(300, device=DEVICE) != 117
    clean = aggregate(rows[keep], experts[keep], weights[keep], 64, base, backend="torch")
    assert torch.equal(res.bank, clean.bank) and torch.equal(res.accepted, clean.accepted)
    assert res.rejected.tolist() == [int(e == experts[117]) for e in range(64)]
    aggregate(rows, experts, weights, 64, base, max_norm=1e300, backend="torch")
    assert len(verdict_passes) == 1  # clipping needs the verdicts (and norms) first


@pytest.mark.parametrize("in_place", [False, True])
def test_bad_rows_mixed_with_zero_weights(in_place):
    """Expert 0: a bad row, a zero weight and good rows; 1: its only weighted row bad, a finite zero-weight
    row (kept as it is, one row accepted); 2: only bad rows; 3: no rows; 4: good rows."""
    rows, _, _, base = make_case(10, 16, 5, seed=22, bad_rows=False)
    experts = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 4, 4], device=DEVICE)
    weights = torch.tensor([1.0, 0.0, 2.0, 3.0, 5.0, 0.0, 1.0, 1.0, 2.0, 1.0], device=DEVICE)
    rows[2, 3] = math.nan
    rows[4, 0] = math.inf
    rows[6, 15] = -math.inf
    rows[7, 7] = math.nan
    bank = base.clone()
    res = aggregate(rows, experts, weights, 5, base, out=bank if in_place else None, backend="torch")
    check(res, rows, experts, weights, base)
    assert res.accepted.tolist() == [3, 1, 0, 0, 2] and res.rejected.tolist() == [1, 1, 2, 0, 0]
    assert torch.equal(res.bank[1:4], base[1:4])
    assert_same(res, verdicts_first(rows, experts, weights, 5, base))


# ---------------------------------------------------------------- robust statistics

ROBUST = [("median", 0.0), ("trimmed-mean", 0.0), ("trimmed-mean", 0.2), ("trimmed-mean", 0.45)]
COUNTS = [0, 1, 2, 3, 4, 5, 8, 11, 4]  # rows per expert: none, one, even and odd; the last all equal


def robust_case(p, *, dtype=torch.float32, base_dtype=torch.float32, seed=0):
    """Rows of experts with ``COUNTS`` rows each (shuffled), near their base, on a grid of 1/4 (ties in
    every column), with outliers, a NaN row and an infinite row (experts 7 and 6), two zero weights
    (expert 5), the last expert's rows all equal; other weights in [1, 10)."""
    g = torch.Generator().manual_seed(seed)
    e = len(COUNTS)
    base = torch.randn(e, p, generator=g).to(base_dtype)
    experts = torch.repeat_interleave(torch.arange(e), torch.tensor(COUNTS))
    experts = experts[torch.randperm(experts.numel(), generator=g)]
    m = experts.numel()
    rows = base[experts].double() + torch.randn(m, p, generator=g, dtype=torch.float64)
    rows = torch.round(rows * 4) / 4
    rows[torch.rand(m, generator=g) < 0.2] *= 40  # outliers
    rows[experts == e - 1] = rows[experts == e - 1][0]
    weights = 1 + 9 * torch.rand(m, generator=g)
    rows[int(torch.nonzero(experts == 7)[0]), p // 2] = math.nan  # rejected first: 10 finite rows left
    rows[int(torch.nonzero(experts == 6)[0]), 0] = -math.inf
    weights[torch.nonzero(experts == 5)[:2, 0]] = 0.0  # left out of the statistic: 3 rows left
    return rows.to(dtype).to(DEVICE), experts.to(DEVICE), weights.to(DEVICE), base.to(DEVICE)


ROBUST_KWARGS = [{}, dict(max_norm=3.0, lr=0.7), dict(lr=1.9)]


@pytest.mark.parametrize("method,trim", ROBUST)
@pytest.mark.parametrize("p", [1, 7, 33])
@pytest.mark.parametrize(
    "dtype,base_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float64, torch.float64),
        (torch.float64, torch.float32),
    ],
)
def test_robust_torch_matches_reference(method, trim, p, dtype, base_dtype):
    rows, experts, weights, base = robust_case(p, dtype=dtype, base_dtype=base_dtype, seed=p)
    for kw in ROBUST_KWARGS:
        res = aggregate(rows, experts, weights, len(COUNTS), base, method=method, trim=trim, backend="torch",
                        **kw)
        check(res, rows, experts, weights, base, method=method, trim=trim, **kw)
        assert res.accepted.tolist() == [0, 1, 2, 3, 4, 5, 7, 10, 4]  # zero weights count as accepted
        assert torch.equal(res.bank[0], base[0])  # no rows: base


@pytest.mark.parametrize(
    "p,dtype,base_dtype,method,trim",
    [
        (7, torch.float32, torch.float32, "median", 0.0),
        (7, torch.float32, torch.float32, "trimmed-mean", 0.0),
        (10, torch.float16, torch.float32, "trimmed-mean", 0.2),
        (10, torch.float16, torch.float32, "median", 0.0),
        (5, torch.float64, torch.float64, "trimmed-mean", 0.45),
        (3, torch.bfloat16, torch.float16, "median", 0.0),
    ],
)
def test_robust_triton_matches_reference(monkeypatch, p, dtype, base_dtype, method, trim):
    """Tiles of 64 values: 4 columns of 16 rows (11 at most here), so several column blocks, the last
    partial."""
    if not (torch.cuda.is_available() or interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    from fedmoe_kernels._details import aggregate_triton

    monkeypatch.setattr(aggregate_triton, "ROBUST_TILE", 64)
    rows, experts, weights, base = robust_case(p, dtype=dtype, base_dtype=base_dtype, seed=p)
    for kw in ROBUST_KWARGS[:2]:
        res = aggregate(rows, experts, weights, len(COUNTS), base, method=method, trim=trim, backend="triton",
                        **kw)
        check(res, rows, experts, weights, base, method=method, trim=trim, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method,trim", [("median", 0.0), ("trimmed-mean", 0.25), ("trimmed-mean", 0.0)])
def test_robust_is_the_statistic_of_the_rows(backend, method, trim):
    """With lr = 1 and no clipping, base + robust(row - base) is numpy's median or scipy's trim_mean of the
    accepted rows of positive weight, up to rounding."""
    rows, experts, weights, base = robust_case(9, seed=4)
    res = aggregate(rows, experts, weights, len(COUNTS), base, method=method, trim=trim, backend=backend)
    for e in range(len(COUNTS)):
        keep = (experts == e) & torch.isfinite(rows).all(dim=1) & (weights > 0)
        if not keep.any():
            continue
        x = rows[keep].cpu().double().numpy()
        want = np.median(x, axis=0) if method == "median" else stats.trim_mean(x, trim, axis=0)
        np.testing.assert_allclose(res.bank[e].cpu().double().numpy(), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method,trim", [("median", 0.0), ("trimmed-mean", 0.3)])
def test_robust_ignores_weights_order_and_bad_rows(backend, method, trim):
    """Bitwise: the statistic does not depend on the positive weights, nor on the order of the rows; the
    NaN and infinite rows (rejected first) and the zero-weight rows (left out) change nothing."""
    rows, experts, weights, base = robust_case(6, seed=5)
    kw = dict(method=method, trim=trim, backend=backend, max_norm=4.0)
    res = aggregate(rows, experts, weights, len(COUNTS), base, **kw)
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(1)).to(DEVICE)
    reweighted = torch.where(weights > 0, 1 + weights**2, 0.0)
    other = aggregate(rows[order], experts[order], reweighted[order], len(COUNTS), base, **kw)
    assert torch.equal(other.bank, res.bank) and torch.equal(other.accepted, res.accepted)
    keep = torch.isfinite(rows).all(dim=1) & (weights > 0)
    clean = aggregate(rows[keep], experts[keep], weights[keep], len(COUNTS), base, **kw)
    assert torch.equal(clean.bank, res.bank)
    assert res.rejected.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method,trim", [("median", 0.0), ("trimmed-mean", 0.1)])
def test_robust_in_place(backend, method, trim):
    rows, experts, weights, base = robust_case(10, seed=6)
    expected = aggregate(rows, experts, weights, len(COUNTS), base, method=method, trim=trim, backend=backend)
    bank = base.clone()
    views = [bank[e].view(2, 5) for e in range(len(COUNTS))]
    res = aggregate(rows, experts, weights, len(COUNTS), bank, method=method, trim=trim, out=bank,
                    backend=backend)
    assert res.bank is bank and torch.equal(bank, expected.bank)
    assert all(torch.equal(v, expected.bank[e].view(2, 5)) for e, v in enumerate(views))


def test_robust_torch_blocks_and_chunks_keep_the_bits(monkeypatch):
    """One expert per block and one column per chunk, or everything at once: the same bits (the window is
    summed in rank order), whatever the number of threads."""
    rows, experts, weights, base = robust_case(37, seed=7)
    results = []
    for block, sort_bytes, threads in ((1, 1, 1), (1 << 22, 1 << 21, 2), (1 << 10, 1 << 9, 1)):
        monkeypatch.setattr(aggregate_module, "_BLOCK_BYTES", block)
        monkeypatch.setattr(aggregate_module, "_SORT_BYTES", sort_bytes)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            kw = dict(method="trimmed-mean", trim=0.1, max_norm=5.0, backend="torch")
            results.append(aggregate(rows, experts, weights, len(COUNTS), base, **kw))
        finally:
            torch.set_num_threads(previous)
    for res in results[1:]:
        assert_same(res, results[0])


def test_robust_triton_falls_back_to_torch_above_max_m(monkeypatch):
    """Experts with more rows than the kernel sorts in registers take the torch path in the same call."""
    if not (torch.cuda.is_available() or interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    from fedmoe_kernels._details import aggregate_triton

    monkeypatch.setattr(aggregate_triton, "ROBUST_MAX_M", 4)
    calls = []
    torch_robust = aggregate_module._torch_robust
    monkeypatch.setattr(aggregate_module, "_torch_robust", lambda *a: calls.append(a[4]) or torch_robust(*a))
    rows, experts, weights, base = robust_case(5, seed=8)
    res = aggregate(rows, experts, weights, len(COUNTS), base, method="median", lr=0.5, backend="triton")
    assert calls == [[6, 7]]  # 7 and 10 accepted rows of positive weight
    check(res, rows, experts, weights, base, method="median", lr=0.5)


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 30),
    p=st.integers(1, 12),
    e=st.integers(1, 4),
    trim=st.sampled_from([0.0, 0.1, 0.3, 0.49]),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_robust_properties(m, p, e, trim, ties, seed):
    """float64, lr = 1, no clipping (torch): the median lies between the smallest and the largest accepted
    value of each column, so does the trimmed mean, which with trim = 0 is the unweighted mean."""
    f64 = torch.float64
    rows, experts, weights, base = make_case(m, p, e, dtype=f64, base_dtype=f64, seed=seed)
    if ties:
        rows = torch.round(rows * 2) / 2
    def bank(method="mean", trim=0.0, w=weights):
        return aggregate(rows, experts, w, e, base, method=method, trim=trim, backend="torch").bank

    median, trimmed = bank("median"), bank("trimmed-mean", trim)
    torch.testing.assert_close(bank("trimmed-mean"), bank(w=(weights > 0).double()), rtol=1e-12, atol=1e-12)
    keep = torch.isfinite(rows).all(dim=1) & (weights > 0)
    for x in range(e):
        mine = rows[keep & (experts == x)]
        if mine.numel():
            lo, hi = mine.amin(dim=0) - 1e-12, mine.amax(dim=0) + 1e-12
            for value in (median[x], trimmed[x]):
                assert ((lo <= value) & (value <= hi)).all()
        else:
            assert torch.equal(median[x], base[x]) and torch.equal(trimmed[x], base[x])


# ---------------------------------------------------------------- overflow


def overflow_case(kind: str):
    """Expert 0 overflows, expert 1 does not: (rows, experts, weights, base, lr)."""
    experts = torch.tensor([0, 0, 0, 1, 1])
    weights = torch.tensor([1.0, 2.0, 3.0, 1.0, 1.0])
    if kind == "lr":  # lr * (mean - base) beyond float32
        base = torch.zeros(2, 6)
        rows = torch.full((5, 6), 3e38)
        rows[3:] = 1.0
        lr = 1.5
    elif kind == "half":  # within float32, beyond the float16 bank
        base = torch.zeros(2, 6, dtype=torch.float16)
        rows = torch.full((5, 6), 60000.0, dtype=torch.float16)
        rows[3:] = 1.0
        lr = 2.0
    elif kind == "huge_lr":  # lr = 1e308 over a float64 bank: 10 * lr overflows, 1e-10 * lr does not
        base = torch.zeros(2, 6, dtype=torch.float64)
        rows = torch.full((5, 6), 10.0, dtype=torch.float64)
        rows[3:] = 1e-10
        lr = 1e308
    else:  # "delta": row - base beyond float32
        base = torch.zeros(2, 6)
        base[0] = -3e38
        rows = torch.full((5, 6), 3e38)
        rows[3:] = 2.0
        lr = 1.0
    return rows.to(DEVICE), experts.to(DEVICE), weights.to(DEVICE), base.to(DEVICE), lr


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's overflowing casts
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["mean", "median", "trimmed-mean"])
@pytest.mark.parametrize("kind", ["lr", "half", "huge_lr", "delta"])
def test_overflow_keeps_base(backend, method, kind):
    """An expert whose new value would not be finite keeps base, all its rows rejected, in place or not;
    the other expert is aggregated as usual (lr = 1e308 included)."""
    rows, experts, weights, base, lr = overflow_case(kind)
    kw = dict(method=method, lr=lr, backend=backend)
    res = aggregate(rows, experts, weights, 2, base, **kw)
    assert torch.equal(res.bank[0], base[0]) and torch.isfinite(res.bank).all()
    assert res.accepted.tolist() == [0, 2] and res.rejected.tolist() == [3, 0]
    assert res.weight_sum.tolist() == [0.0, 2.0]
    alone = aggregate(rows[3:], experts[3:], weights[3:], 2, base, **kw)
    assert torch.equal(res.bank[1], alone.bank[1])
    bank = base.clone()
    assert_same(res, aggregate(rows, experts, weights, 2, bank, out=bank, **kw))
    if method == "mean":
        acc = Accumulator(base, backend=backend)
        for lo in range(5):
            acc.add(rows[lo : lo + 1], experts[lo : lo + 1], weights[lo : lo + 1])
        assert_same(res, acc.result(lr=lr))
    if kind != "delta":  # the reference computes deltas in float64: they do not overflow there
        check(res, rows, experts, weights, base, method=method, lr=lr)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's overflowing casts
@pytest.mark.parametrize("backend", BACKENDS)
def test_overflow_among_many_experts(backend, monkeypatch):
    """Overflowing experts in several blocks, among others that do not (torch: one per block)."""
    monkeypatch.setattr(aggregate_module, "_BLOCK_BYTES", 1)
    rows, experts, weights, base = make_case(40, 9, 8, seed=30, bad_rows=False)
    big = torch.isin(experts, torch.tensor([1, 4, 5], device=DEVICE))
    rows[big] = 1e38 + 1e37 * rows[big].abs()  # finite; their statistics times 5 are not
    for method in ("mean", "median"):
        res = aggregate(rows, experts, weights, 8, base, method=method, lr=5.0, backend=backend)
        check(res, rows, experts, weights, base, method=method, lr=5.0)
        dropped = res.accepted == 0
        assert torch.equal(dropped, torch.isin(torch.arange(8, device=DEVICE), experts[big]))



# ---------------------------------------------------------------- streaming


def split_points(m: int, pieces: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randint(0, m + 1, (pieces - 1,), generator=g).tolist())
    return [0, *cuts, m]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_norm", [None, 0.3])
def test_streaming_equals_batch_bitwise(backend, max_norm):
    """Rows added in order, in pieces, give the batch bits; growing weights force rescaled sums."""
    m, p, e = 60, 37, 5
    rows, experts, weights, base = make_case(m, p, e, seed=12)
    weights = weights * torch.logspace(-30, 30, m, dtype=torch.float64, device=DEVICE)
    batch = aggregate(rows, experts, weights, e, base, max_norm=max_norm, lr=0.7, backend=backend)
    acc = Accumulator(base, max_norm=max_norm, backend=backend)
    cuts = split_points(m, 6, seed=1)
    for lo, hi in itertools.pairwise(cuts):
        acc.add(rows[lo:hi], experts[lo:hi], weights[lo:hi])
    res = acc.result(lr=0.7)
    assert torch.equal(res.bank, batch.bank)
    assert torch.equal(res.accepted, batch.accepted) and torch.equal(res.rejected, batch.rejected)
    assert torch.equal(res.weight_sum, batch.weight_sum)
    assert torch.equal(acc.result(lr=0.7).bank, res.bank)  # result leaves the accumulator unchanged


@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_any_order_and_in_place(backend):
    m, p, e = 30, 20, 4
    rows, experts, weights, base = make_case(m, p, e, seed=13)
    batch = aggregate(rows, experts, weights, e, base, max_norm=0.3, backend=backend)
    bank = base.clone()
    acc = Accumulator(bank, max_norm=0.3, backend=backend)
    order = torch.randperm(m, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    for piece in order.split(7):
        acc.add(rows[piece], experts[piece], weights[piece])
    res = acc.result(out=bank)
    assert res.bank is bank
    torch.testing.assert_close(bank, batch.bank, rtol=1e-6, atol=1e-6)
    assert torch.equal(res.accepted, batch.accepted) and torch.equal(res.rejected, batch.rejected)


def test_streaming_memory_does_not_grow():
    rows, experts, weights, base = make_case(50, 10, 3, seed=14)
    acc = Accumulator(base)
    held = sum(t.numel() * t.element_size() for t in vars(acc).values() if isinstance(t, torch.Tensor))
    for _ in range(20):
        acc.add(rows, experts, weights)
    after = sum(t.numel() * t.element_size() for t in vars(acc).values() if isinstance(t, torch.Tensor))
    assert after == held
    assert acc.result().accepted.sum() == 20 * 47


# ---------------------------------------------------------------- validation


def _call(**change):
    rows, experts, weights, base = make_case(6, 4, 3, seed=0, bad_rows=False)
    args = dict(rows=rows, experts=experts, weights=weights, num_experts=3, base=base)
    args.update(change)
    kw = {k: args.pop(k) for k in ("method", "trim", "max_norm", "lr", "out", "backend") if k in args}
    return aggregate(args["rows"], args["experts"], args["weights"], args["num_experts"], args["base"], **kw)


@pytest.mark.parametrize(
    "change,error,name",
    [
        (dict(weights=torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0, 1.0])), ValueError, "weights"),
        (dict(weights=torch.tensor([1.0, math.nan, 1.0, 1.0, 1.0, 1.0])), ValueError, "weights"),
        (dict(weights=torch.tensor([1.0, math.inf, 1.0, 1.0, 1.0, 1.0])), ValueError, "weights"),
        (dict(weights=torch.ones(6, dtype=torch.bool)), TypeError, "weights"),
        (dict(weights=torch.ones(5)), ValueError, "weights"),
        (dict(experts=torch.tensor([0, 1, 2, 3, 0, 0])), ValueError, "experts"),
        (dict(experts=torch.tensor([0, -1, 2, 0, 0, 0])), ValueError, "experts"),
        (dict(experts=torch.zeros(6)), TypeError, "experts"),
        (dict(experts=torch.zeros(6, 1, dtype=torch.int64)), ValueError, "experts"),
        (dict(rows=torch.ones(6, 5)), ValueError, "rows"),
        (dict(rows=torch.ones(6, 4, dtype=torch.int32)), TypeError, "rows"),
        (dict(rows=[[0.0] * 4] * 6), TypeError, "rows"),
        (dict(base=torch.ones(3, 4, dtype=torch.int64)), TypeError, "base"),
        (dict(base=torch.ones(12)), ValueError, "base"),
        (dict(num_experts=4), ValueError, "num_experts"),
        (dict(num_experts=3.0), TypeError, "num_experts"),
        (dict(max_norm=0.0), ValueError, "max_norm"),
        (dict(max_norm=math.inf), ValueError, "max_norm"),
        (dict(lr=math.nan), ValueError, "lr"),
        (dict(lr=-0.5), ValueError, "lr"),
        (dict(lr="1"), TypeError, "lr"),
        (dict(base=torch.tensor([[0.0] * 4, [1.0, math.nan, 0.0, 0.0], [0.0] * 4])), ValueError, "base"),
        (dict(base=torch.tensor([[0.0] * 4, [0.0] * 4, [0.0, 0.0, 0.0, -math.inf]])), ValueError, "base"),
        (dict(base=torch.full((3, 4), 3e38)), None, None),  # finite, though its sum overflows float32
        (dict(method="avg"), ValueError, "method"),
        (dict(method=None), ValueError, "method"),
        (dict(method="trimmed-mean", trim=0.5), ValueError, "trim"),
        (dict(method="trimmed-mean", trim=-0.1), ValueError, "trim"),
        (dict(method="trimmed-mean", trim=math.nan), ValueError, "trim"),
        (dict(method="trimmed-mean", trim="0.1"), TypeError, "trim"),
        (dict(method="median", trim=0.1), ValueError, "trim"),
        (dict(trim=0.1), ValueError, "trim"),
        (dict(out=torch.empty(3, 4, dtype=torch.float64)), ValueError, "out"),
        (dict(out=torch.empty(4, 4)), ValueError, "out"),
        (dict(backend="cuda"), ValueError, "backend"),
    ],
)
def test_validation(change, error, name):
    if error is None:
        _call(**change)
        return
    with pytest.raises(error, match=name):
        _call(**change)


def test_out_must_not_partly_overlap():
    storage = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="out"):
        _call(base=storage[:3], out=storage[1:])
    rows = torch.zeros(6, 4)
    with pytest.raises(ValueError, match="out"):
        _call(rows=rows, out=rows[:3])


def test_accumulator_validation():
    _, _, _, base = make_case(0, 4, 3)
    with pytest.raises(ValueError, match="max_norm"):
        Accumulator(base, max_norm=-1.0)
    with pytest.raises(ValueError, match=r"method.*aggregate"):
        Accumulator(base, method="median")
    with pytest.raises(ValueError, match="base"):
        Accumulator(torch.full((2, 3), math.nan))
    acc = Accumulator(base)
    with pytest.raises(ValueError, match="rows"):
        acc.add(torch.ones(2, 5), torch.zeros(2, dtype=torch.int64), torch.ones(2))
    with pytest.raises(ValueError, match="experts"):
        acc.add(torch.ones(2, 4), torch.tensor([0, 3]), torch.ones(2))
    with pytest.raises(ValueError, match="lr"):
        acc.result(lr=math.inf)
    assert torch.equal(acc.result().bank, base)  # failed adds left nothing behind
