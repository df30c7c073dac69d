"""Alignment of row lengths and strides, told to the Triton kernels (docs/codegen.md).

Triton's JIT marks an integer argument as divisible by 16 or not at all. Rows of 1,000 bfloat16 values
(2,000 bytes, every row 16-byte aligned) were therefore read and written 16 bits at a time. A launcher
passes ``divisor(n, ...)`` as a constexpr ``DIV`` and the kernel takes ``n = aligned(n, DIV)``: the same
value, which Triton's alignment analysis sees as a multiple of ``DIV``, so the loads and stores of such
rows are as wide as their alignment allows (128 bits for 16-byte aligned rows).
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_DIV = 16  # as far as Triton's own specialisation goes


def divisor(*values: int) -> int:
    """The largest power of two, at most ``MAX_DIV``, dividing every one of ``values`` (ints >= 0)."""
    return min([MAX_DIV] + [v & -v for v in values if v])


@triton.jit
def aligned(n, DIV: tl.constexpr):
    """``n``, a multiple of ``DIV``, as Triton's alignment analysis sees a multiple of ``DIV``."""
    return n // DIV * DIV
