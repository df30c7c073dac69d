"""Fused per-expert weighted aggregation (DESIGN.md §3.3), in one batch or streamed as replies arrive.

Each of the M received rows is one updated copy of one expert, flattened to P values. For every expert
``e`` the new value is computed over its *accepted* rows ``m`` (those whose values are all finite once
converted to the accumulation dtype; the others are rejected and counted, never averaged in)::

    d_m  = row_m - base[e]                                   # the row's delta
    s_m  = min(1, max_norm / ||d_m||_2)                      # clipping (1 without max_norm)
    W_e  = sum_m w_m
    new  = base[e] + lr * sum_m w_m * s_m * d_m / W_e        # if W_e > 0, else base[e]

With ``lr = 1`` and no clipping that is the weighted mean ``sum w row / sum w``; with clipping it is the
weighted mean of the clipped rows ``base + s * d``; ``lr`` is a server step on ``mean - base``. An expert
with no accepted rows, or whose accepted weights sum to zero, keeps ``base``. Weights must be finite and
``>= 0`` (integer sample counts are fine).

Dtypes. Rows may be float16, bfloat16, float32 or float64, independently of the bank ``base`` (same
choice). Sums are accumulated in float64 when the bank is float64, else in float32; the result is written
in the bank's dtype (rounded to nearest). A float64 value beyond float32 range in a row aggregated into a
float32 bank is not finite in the accumulation dtype: the row is rejected. ``base`` must be finite.
Weight sums are float64. Each weight is scaled by a power of two per expert (so that the largest is in
``[0.5, 1)``) before it multiplies a delta: any finite weights work, and the result is the same as
without the scaling (powers of two commute with rounding) unless values underflow.

Determinism. Per element, the rows of an expert are summed sequentially in ascending row order (a
stable grouping; no atomics), so the same call gives the same bits. The streaming :class:`Accumulator`
adds rows in the order they arrive; fed the rows of a batch in that order (in any number of ``add``
calls) it gives bitwise the batch result of the same backend, unless a power-of-two rescale pushes values
into subnormals; fed in another order, it agrees to float32 rounding. The two backends agree to float32
rounding: Triton sums ``c * (row - base)``, torch sums ``c * row`` and subtracts ``(sum c) * base`` at the
end (``c = w * s``), which spares it a gather of ``base`` per row.

Passes. Both backends read the rows twice and never convert or copy them whole.
torch (the CPU default): (1) verdicts, one reduction per row (rows whose sum is not finite are then
tested value by value), over all rows at once, or whole rows about 1 MiB at a time where they must be
converted (float64 rows, float32 bank) or clipped (deltas and their norms); (2) a block of columns at a
time, the sums of the touched experts (a ``[U, step]`` float32/float64 block of about 4 MiB), built from
about 1 MiB tiles of the rows' columns scaled in a reused buffer and ``index_add_``-ed, and then the new
values of those columns. Triton (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``): a verdict launch
(finiteness, clipping norms), then one launch over (column block, expert) that sums in registers and
reads and writes the bank once; see :mod:`fedmoe_kernels.backend.aggregate`. The streaming form keeps
``[E, P]`` sums instead (that is its O(E*P) memory) and writes the bank in :meth:`Accumulator.result`.

In place. ``out=base`` (or ``out`` the same view of the same memory) updates the bank where it lies, so
parameters that are views of the flat ``[E, P]`` bank see the new values; no copy of the bank is made.
Out of place, ``out`` (a new tensor by default) receives ``base`` for the experts left as they are.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from fedmoe_kernels._backend import resolve

__all__ = ["Accumulator", "AggregateResult", "aggregate"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CHUNK_BYTES = 1 << 20  # torch path: bytes of rows handled per step (sums blocks: 4x that)
_K_NONE = -1100  # weight exponent of an expert that has seen no positive weight (below any float64's)


@dataclass(frozen=True)
class AggregateResult:
    """What :func:`aggregate` and :meth:`Accumulator.result` return (E = number of experts).

    - ``bank``: [E, P] in the dtype of ``base``; the ``out`` tensor (``base`` itself when in place).
    - ``accepted``: int64 [E], rows averaged in per expert (zero-weight rows included).
    - ``rejected``: int64 [E], rows with a non-finite value per expert.
    - ``weight_sum``: float64 [E], the sum of the accepted rows' weights.
    """

    bank: torch.Tensor
    accepted: torch.Tensor
    rejected: torch.Tensor
    weight_sum: torch.Tensor


# ---------------------------------------------------------------- validation


def _check_base(base) -> None:
    if not isinstance(base, torch.Tensor):
        raise TypeError(f"base must be a torch.Tensor, got {type(base).__name__}")
    if base.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"base must be float16, bfloat16, float32 or float64, got {base.dtype}")
    if base.ndim != 2 or base.shape[0] < 1 or base.shape[1] < 1:
        raise ValueError(f"base must be [E, P] with E >= 1 and P >= 1, got shape {tuple(base.shape)}")
    if base.shape[0] > 65535:
        raise ValueError(f"base may have at most 65535 experts (rows), got {base.shape[0]}")


def _check_real(value, name: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be finite{' and > 0' if positive else ''}, got {value}")
    return value


def _check_batch(rows, experts, weights, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate one batch against the bank; return (experts as int64 [M], weights as float64 [M])."""
    num_experts, p = base.shape
    for name, value in (("rows", rows), ("experts", experts), ("weights", weights)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.device != base.device:
            raise ValueError(f"{name} must be on the device of base ({base.device}), got {value.device}")
    if rows.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"rows must be float16, bfloat16, float32 or float64, got {rows.dtype}")
    if rows.ndim != 2 or rows.shape[1] != p:
        raise ValueError(f"rows must be [M, {p}] (P of base), got shape {tuple(rows.shape)}")
    m = rows.shape[0]
    if experts.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"experts must be int32 or int64, got {experts.dtype}")
    if tuple(experts.shape) != (m,):
        raise ValueError(f"experts must be [{m}] (one per row), got shape {tuple(experts.shape)}")
    if weights.dtype == torch.bool or weights.is_complex():
        raise TypeError(f"weights must be a real floating or integer tensor, got {weights.dtype}")
    if tuple(weights.shape) != (m,):
        raise ValueError(f"weights must be [{m}] (one per row), got shape {tuple(weights.shape)}")
    w = weights.to(torch.float64)
    if m:
        lo, hi = torch.aminmax(experts)
        bad_w = ~torch.isfinite(w) | (w < 0)
        lo, hi, n_bad = torch.stack([lo.long(), hi.long(), bad_w.sum()]).tolist()  # one sync
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"experts must be in [0, {num_experts}), found {lo if lo < 0 else hi}")
        if n_bad:
            raise ValueError(f"weights must be finite and >= 0, found {n_bad} that are not")
    return experts.long(), w


def _span(t: torch.Tensor) -> tuple[int, int]:
    """Byte range [start, end) that ``t`` touches."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0:
        return False
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


def _check_out(out, base: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``out`` (None: a new tensor like ``base``) checked to be ``base`` itself or disjoint from it."""
    if out is None:
        return torch.empty_like(base)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if out.shape != base.shape or out.dtype != base.dtype or out.device != base.device:
        raise ValueError(
            f"out must match base in shape, dtype and device ({tuple(base.shape)}, {base.dtype}, "
            f"{base.device}), got ({tuple(out.shape)}, {out.dtype}, {out.device})"
        )
    same = out.data_ptr() == base.data_ptr() and out.stride() == base.stride()
    if not same and _overlap(out, base):
        raise ValueError("out must be base itself (in place) or not overlap it")
    if rows is not None and _overlap(out, rows):
        raise ValueError("out must not overlap rows")
    return out


def _acc_dtype(base: torch.Tensor) -> torch.dtype:
    return torch.float64 if base.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- shared steps


def _pow2(n: torch.Tensor) -> torch.Tensor:
    """Exact float64 ``2**n`` for integer ``n`` in [-1022, 1023]."""
    return ((n.long() + 1023) << 52).view(torch.float64)


def _ldexp(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``x * 2**n`` (float64; integer ``n`` in [-2044, 2046]) in two exact steps."""
    half = torch.div(n, 2, rounding_mode="floor")
    return x * _pow2(half) * _pow2(n - half)


def _scale_weights(
    k_old: torch.Tensor, experts: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-expert power-of-two weight scales, raised to cover a new batch.

    ``k_old`` (int64 [E]) holds each expert's exponent so far (``_K_NONE``: no positive weight yet). Returns
    the new exponents ``k`` (the largest scaled weight of an expert is below 1), the factors by which
    sums taken at the old exponents must be multiplied (float64 [E], powers of two <= 1) and the batch's
    weights divided by ``2**k`` of their experts (float64 [M]).
    """
    wmax = torch.zeros(k_old.shape, dtype=torch.float64, device=w.device)
    wmax.scatter_reduce_(0, experts, w, "amax")
    k_batch = torch.where(wmax > 0, torch.frexp(wmax).exponent.long(), _K_NONE)
    k = torch.maximum(k_old, k_batch)
    rescale = torch.where(k_old == _K_NONE, 1.0, _ldexp(torch.ones_like(wmax), (k_old - k).clamp(min=-2044)))
    return k, rescale, _ldexp(w, -k[experts])


def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    """bool [n]: rows of ``x`` ([n, P]) whose values are all finite; one reduction and no copy of ``x``.

    A sum with a NaN or an infinity in it is not finite; only rows whose sum is not finite (a bad row, or
    finite values that overflow) are tested value by value.
    """
    ok = torch.isfinite(x.sum(dim=1))
    suspect = torch.nonzero(~ok).squeeze(1)
    if suspect.numel():
        ok[suspect] = torch.isfinite(x.index_select(0, suspect)).all(dim=1)
    return ok


def _clip_factors(deltas: torch.Tensor, max_norm: float) -> torch.Tensor:
    """float64 [n]: ``min(1, max_norm / ||d||)`` per row of ``deltas`` ([n, P]).

    Row by row, so that a row's norm (hence its bits) does not depend on the rows batched with it.
    """
    norms = torch.stack([torch.linalg.vector_norm(d, dtype=torch.float64) for d in deltas])
    return max_norm / norms.clamp(min=max_norm)


def _torch_verdicts(
    rows: torch.Tensor, experts: torch.Tensor, wscaled: torch.Tensor, base: torch.Tensor, acc: torch.dtype,
    max_norm: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """First pass over the rows: ``ok`` (bool [M]) and the coefficients ``c = w' * s`` ([M], ``acc``; 0 for
    rejected rows). One reduction over all rows, or whole rows a few at a time (about 1 MiB) where they
    must be converted (float64 rows, float32 sums) or clipped (the deltas' norms)."""
    m, p = rows.shape
    convert = rows.dtype == torch.float64 and acc == torch.float32  # beyond float32 range: not finite
    clip = torch.ones(m, dtype=torch.float64, device=rows.device)
    if max_norm is None and not convert:
        ok = _finite_rows(rows)
    else:
        ok = torch.empty(m, dtype=torch.bool, device=rows.device)
        step = max(1, _CHUNK_BYTES // (8 * p))
        for lo in range(0, m, step):
            x = rows[lo : lo + step].to(acc)
            ok[lo : lo + step] = _finite_rows(x)
            if max_norm is not None:
                b = base.index_select(0, experts[lo : lo + step]).to(acc)
                clip[lo : lo + step] = _clip_factors(x - b, max_norm)
    return ok, torch.where(ok, wscaled * clip, 0.0).to(acc)


def _kept(coef: torch.Tensor) -> torch.Tensor | None:
    """The rows that contribute (``coef > 0``), ascending; None when all do."""
    positive = coef > 0
    return None if bool(positive.all()) else torch.nonzero(positive).squeeze(1)


def _take(values: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    return values if kept is None else values[kept]


def _column_step(num_rows: int, p: int) -> int:
    """Columns per block, so that a [num_rows, step] block of sums stays about 4 MiB (at least 1024)."""
    return min(p, max(1024, 4 * _CHUNK_BYTES // (4 * max(num_rows, 1))))


def _torch_sum_block(
    target: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, kept: torch.Tensor | None,
    coef: torch.Tensor, c0: int, c1: int,
) -> None:
    """``target[ids[k]] += coef[k] * rows[kept[k], c0:c1]`` for k ascending (target: [*, c1 - c0]).

    ``kept`` None: all rows, read in place; otherwise the rows' columns are gathered first. A tile (about
    1 MiB) at a time is scaled into a reused buffer in the dtype of ``target`` and added; the per-element
    order is the row order.
    """
    cols = rows[:, c0:c1]
    count = rows.shape[0] if kept is None else kept.numel()
    step = max(1, _CHUNK_BYTES // ((c1 - c0) * target.element_size()))
    shape = (min(step, count), c1 - c0)
    tile = torch.empty(shape, dtype=target.dtype, device=rows.device)
    gather = None if kept is None else torch.empty(shape, dtype=rows.dtype, device=rows.device)
    for lo in range(0, count, step):
        n = min(step, count - lo)
        if kept is None:
            x = cols[lo : lo + n]
        else:
            x = torch.index_select(cols, 0, kept[lo : lo + n], out=gather[:n])
        target.index_add_(0, ids[lo : lo + n], torch.mul(x, coef[lo : lo + n, None], out=tile[:n]))


def _finish_block(
    sums: torch.Tensor, touched: torch.Tensor, factor: torch.Tensor, neg_c: torch.Tensor, base: torch.Tensor,
    out: torch.Tensor, c0: int, c1: int,
) -> None:
    """``out[e, c0:c1] = b + factor * (S - C * b)`` with ``b = base[e, c0:c1]`` for the ``touched`` experts;
    ``sums`` ([len(touched), c1 - c0]) holds S and is overwritten; ``factor = lr / W``, ``neg_c = -C``."""
    b = base[:, c0:c1].index_select(0, touched).to(sums.dtype)
    sums.addcmul_(b, neg_c)
    out[:, c0:c1].index_copy_(0, touched, b.addcmul_(sums, factor).to(out.dtype))


def _finish_factors(
    touched: torch.Tensor, wsum: torch.Tensor, csum: torch.Tensor, lr: float, acc: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``lr / W`` and ``-C`` of the touched experts, as [n, 1] columns in ``acc``."""
    return (lr / wsum[touched]).to(acc)[:, None], (-csum[touched]).to(acc)[:, None]


def _torch_aggregate(
    rows: torch.Tensor, experts: torch.Tensor, wscaled: torch.Tensor, base: torch.Tensor,
    max_norm: float | None, lr: float, out: torch.Tensor, wsum: torch.Tensor,
) -> torch.Tensor:
    """Batch torch path: a verdict pass over the rows, then a block of columns at a time the sums of the
    touched experts (a small [U, step] buffer, no [E, P] one) and their new values. Returns ``ok``."""
    acc = _acc_dtype(base)
    ok, coef = _torch_verdicts(rows, experts, wscaled, base, acc, max_norm)
    wsum.index_add_(0, experts, torch.where(ok, wscaled, 0.0))
    csum = torch.zeros_like(wsum).index_add_(0, experts, coef.to(torch.float64))
    kept = _kept(coef)
    touched, ids = torch.unique(experts if kept is None else experts[kept], return_inverse=True)
    if out.data_ptr() != base.data_ptr() and touched.numel() < base.shape[0]:
        out.copy_(base)  # for the experts left as they are (every row is written below if all are touched)
    factor, neg_c = _finish_factors(touched, wsum, csum, lr, acc)
    p = base.shape[1]
    step = _column_step(touched.numel(), p)
    block = torch.empty((touched.numel(), step), dtype=acc, device=base.device)
    for c0 in range(0, p, step):
        c1 = min(p, c0 + step)
        sums = block[:, : c1 - c0].zero_()
        _torch_sum_block(sums, ids, rows, kept, _take(coef, kept), c0, c1)
        _finish_block(sums, touched, factor, neg_c, base, out, c0, c1)
    return ok


def _group(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable grouping of the rows by expert: ``perm`` (int64 [M]) and CSR ``offsets`` (int64 [E+1])."""
    perm = torch.sort(experts, stable=True).indices
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=experts.device)
    torch.cumsum(torch.bincount(experts, minlength=num_experts), 0, out=offsets[1:])
    return perm, offsets


def _counts(experts: torch.Tensor, ok: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted, rejected) rows per expert, int64 [E]."""
    accepted = torch.zeros(num_experts, dtype=torch.int64, device=experts.device)
    accepted.index_add_(0, experts, ok.long())
    return accepted, torch.bincount(experts, minlength=num_experts) - accepted


def _triton_stats(rows, experts, base, acc_dtype, max_norm):
    from fedmoe_kernels.backend.aggregate import row_stats

    if rows.shape[0] == 0:
        return torch.ones(0, dtype=torch.int8, device=rows.device), None
    return row_stats(rows, experts, base, acc_dtype, max_norm is not None)


def _params(lr: float, max_norm: float | None, device) -> torch.Tensor:
    return torch.tensor([lr, 0.0 if max_norm is None else max_norm], dtype=torch.float64, device=device)


# ---------------------------------------------------------------- ops


def aggregate(
    rows: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    num_experts: int,
    base: torch.Tensor,
    *,
    max_norm: float | None = None,
    lr: float = 1.0,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> AggregateResult:
    """Aggregate M received expert copies into the bank (semantics: module docstring).

    Args:
        rows: [M, P] float16/bfloat16/float32/float64, one expert copy per row (any strides; not copied).
        experts: int32/int64 [M], the expert of each row, in [0, num_experts), in any order.
        weights: real [M], finite and >= 0 (e.g. sample counts).
        num_experts: E, the number of rows of ``base``.
        base: [E, P] the current bank, float16/bfloat16/float32/float64, finite.
        max_norm: clip each row's delta ``row - base`` to this L2 norm (> 0); None: no clipping.
        lr: server step size on ``mean - base`` (finite; 1 = plain weighted mean).
        out: [E, P] like ``base`` to write into; ``base`` itself for in place; None: a new tensor.
        backend: "auto" (Triton on CUDA, torch on CPU), "triton" or "torch".

    Returns:
        :class:`AggregateResult` (bank, accepted, rejected, weight_sum).
    """
    _check_base(base)
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        raise TypeError(f"num_experts must be an int, got {type(num_experts).__name__}")
    if num_experts != base.shape[0]:
        raise ValueError(f"num_experts must equal base.shape[0] ({base.shape[0]}), got {num_experts}")
    experts, w = _check_batch(rows, experts, weights, base)
    max_norm = None if max_norm is None else _check_real(max_norm, "max_norm", positive=True)
    lr = _check_real(lr, "lr", positive=False)
    out = _check_out(out, base, rows)
    backend = resolve(backend, base)
    acc_dtype = _acc_dtype(base)
    k_none = torch.full((num_experts,), _K_NONE, dtype=torch.int64, device=base.device)
    k, _, wscaled = _scale_weights(k_none, experts, w)
    wsum = torch.zeros(num_experts, dtype=torch.float64, device=base.device)
    if backend == "torch":
        ok = _torch_aggregate(rows, experts, wscaled, base, max_norm, lr, out, wsum)
    else:
        from fedmoe_kernels.backend.aggregate import aggregate_rows

        ok, sq = _triton_stats(rows, experts, base, acc_dtype, max_norm)
        perm, offsets = _group(experts, num_experts)
        aggregate_rows(
            rows, perm, offsets, ok, wscaled, sq, base, _params(lr, max_norm, base.device), wsum,
            acc_dtype=acc_dtype, out=out,
        )
    accepted, rejected = _counts(experts, ok, num_experts)
    return AggregateResult(out, accepted, rejected, _ldexp(wsum, k))


class Accumulator:
    """Streaming form of :func:`aggregate`: :meth:`add` replies as they arrive, :meth:`result` at the end.

    Holds ``base`` ([E, P], by reference: it must not change until :meth:`result`) and running sums:
    ``[E, P]`` in the accumulation dtype (float32, float64 for a float64 bank) plus O(E) counters, whatever
    the number of rows added. Rows of any expert may come in any order and in any number of calls; fed
    the rows of a batch in order it reproduces :func:`aggregate` bitwise (module docstring).

    Args:
        base: the bank the deltas are taken against (and clipped against).
        max_norm: as in :func:`aggregate`; fixed here because clipping happens as rows are added.
        backend: as in :func:`aggregate`, chosen once from ``base``.
    """

    def __init__(self, base: torch.Tensor, *, max_norm: float | None = None, backend: str = "auto"):
        _check_base(base)
        self._base = base
        self._max_norm = None if max_norm is None else _check_real(max_norm, "max_norm", positive=True)
        self._backend = resolve(backend, base)
        num_experts, p = base.shape
        device = base.device
        self._sums = torch.zeros((num_experts, p), dtype=_acc_dtype(base), device=device)
        self._wsum = torch.zeros(num_experts, dtype=torch.float64, device=device)
        self._csum = torch.zeros(num_experts, dtype=torch.float64, device=device)  # torch path only
        self._k = torch.full((num_experts,), _K_NONE, dtype=torch.int64, device=device)
        self._accepted = torch.zeros(num_experts, dtype=torch.int64, device=device)
        self._rejected = torch.zeros(num_experts, dtype=torch.int64, device=device)

    @property
    def num_experts(self) -> int:
        return self._base.shape[0]

    def add(self, rows: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> None:
        """Add rows ([M, P]), their experts (int [M]) and weights ([M]), as in :func:`aggregate`."""
        experts, w = _check_batch(rows, experts, weights, self._base)
        self._add(rows, experts, w)

    def _add(self, rows: torch.Tensor, experts: torch.Tensor, w: torch.Tensor) -> None:
        self._k, rescale, wscaled = _scale_weights(self._k, experts, w)
        if self._backend == "torch":
            sums = self._sums
            rescaled = torch.nonzero(rescale != 1.0).squeeze(1)
            sums[rescaled] = (sums[rescaled].double() * rescale[rescaled, None]).to(sums.dtype)
            self._wsum.mul_(rescale)
            self._csum.mul_(rescale)
            ok, coef = _torch_verdicts(rows, experts, wscaled, self._base, sums.dtype, self._max_norm)
            self._wsum.index_add_(0, experts, torch.where(ok, wscaled, 0.0))
            self._csum.index_add_(0, experts, coef.to(torch.float64))
            kept = _kept(coef)  # whole rows: the [E, P] sums do not fit a cache anyway
            _torch_sum_block(sums, _take(experts, kept), rows, kept, _take(coef, kept), 0, sums.shape[1])
        else:
            from fedmoe_kernels.backend.aggregate import aggregate_rows

            ok, sq = _triton_stats(rows, experts, self._base, self._sums.dtype, self._max_norm)
            perm, offsets = _group(experts, self.num_experts)
            aggregate_rows(
                rows, perm, offsets, ok, wscaled, sq, self._base, _params(1.0, self._max_norm, rows.device),
                self._wsum, acc_dtype=self._sums.dtype, sums=self._sums, rescale=rescale,
            )
        accepted, rejected = _counts(experts, ok, self.num_experts)
        self._accepted += accepted
        self._rejected += rejected

    def result(self, *, lr: float = 1.0, out: torch.Tensor | None = None) -> AggregateResult:
        """The aggregated bank so far (``out=base``: in place); the accumulator is left unchanged."""
        return self._result(_check_real(lr, "lr", positive=False), _check_out(out, self._base, None))

    def _result(self, lr: float, out: torch.Tensor) -> AggregateResult:
        if self._backend == "torch":
            touched = torch.nonzero(self._wsum > 0).squeeze(1)
            if out.data_ptr() != self._base.data_ptr() and touched.numel() < self.num_experts:
                out.copy_(self._base)
            acc = self._sums.dtype
            factor, neg_c = _finish_factors(touched, self._wsum, self._csum, lr, acc)
            p = self._sums.shape[1]
            step = _column_step(touched.numel(), p)
            for c0 in range(0, p, step):
                c1 = min(p, c0 + step)
                sums = self._sums[:, c0:c1].index_select(0, touched)
                _finish_block(sums, touched, factor, neg_c, self._base, out, c0, c1)
            wsum = self._wsum
        else:
            from fedmoe_kernels.backend.aggregate import aggregate_rows

            device = self._base.device
            no_rows = self._sums[:0]
            no_ids = torch.empty(0, dtype=torch.int64, device=device)
            wsum = self._wsum.clone()
            aggregate_rows(
                no_rows, no_ids, torch.zeros(self.num_experts + 1, dtype=torch.int64, device=device),
                no_ids, self._wsum[:0], None, self._base, _params(lr, None, device), wsum,
                acc_dtype=self._sums.dtype, out=out, sums=self._sums, rescale=torch.ones_like(wsum),
            )
        return AggregateResult(out, self._accepted.clone(), self._rejected.clone(), _ldexp(wsum, self._k))
