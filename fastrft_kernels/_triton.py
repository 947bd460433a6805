"""The one module that imports Triton, and the Triton helpers the kernel modules share.

Triton is optional: without it `HAVE_TRITON` is False and `triton` and `tl` are None; the torch
and reference backends need none of it, and asking for the triton backend raises the error of
`require_triton()` (from `_backend.resolve_backend`). Kernel modules import `triton` and `tl`
from here and define their `@triton.jit` functions only `if HAVE_TRITON:`.

Shared `@triton.jit` helpers (inlined into the kernels that call them; the AOT gate compiles
them as part of those kernels and counts them there):
- `dot(a, b, acc, PRECISION, UPCAST)`: acc + a @ b with the two flags every kernel passes on;
- `aligned_rows(stride_a, stride_b, H, EVEN_H)`: the 16-element alignment facts of row-major
  operands whose rows are whole 16-element units.
Shared host helpers: `dot_flags` (the flags of a launch), `launch` (the plain kernel with the
small interpreter blocks under TRITON_INTERPRET=1, else its autotuned wrapper) and
`kernel_output` (a buffer the kernel writes in full, NaN-poisoned under the interpreter).

Kernel signatures carry the Triton type of every parameter whose type does not follow the
input dtype (`M: tl.int32`, `stride_xn: tl.int64`, `inv_temp: tl.float32`, `LSE: fp32_ptr`);
the input-dtype pointers (X, W, Q, ...) stay unannotated. Triton uses those types at launch,
and the AOT gate builds each kernel's signature from them (`aot.signature`).
"""

import os

import torch

try:  # the torch and reference paths never need triton (CPU-only installs)
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised by tests/test_backend.py in a subprocess
    triton = None
    tl = None
    HAVE_TRITON = False


def require_triton() -> None:
    """Raises a RuntimeError that says how to get the triton backend when triton is absent."""
    if not HAVE_TRITON:
        raise RuntimeError(
            "backend 'triton' needs the triton package, which is not installed: pip install triton, "
            "or use backend 'torch'"
        )


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def kernel_output(shape, *, dtype, device):
    """A buffer the kernel writes in full: NaN-filled under the interpreter (the tests), so that
    an element the kernel misses shows; left uninitialized on a GPU (no fill to pay for)."""
    if interpreting():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def dot_flags(dtype, precision: str) -> dict:
    """The `dot` flags of a launch: PRECISION as given, UPCAST for bf16 under the interpreter."""
    return dict(PRECISION=precision, UPCAST=dtype == torch.bfloat16 and interpreting())


def launch(kernel, tuned, grid, *args, interpreter_meta: dict, **kwargs) -> None:
    """Launches `kernel` over `grid` (a function of the block sizes, meta -> grid tuple).

    Under TRITON_INTERPRET=1 the plain `kernel` runs with `interpreter_meta`: small blocks, so
    that the test shapes cross every block boundary (the autotuner would time configurations on
    the interpreter). Otherwise the autotuned wrapper `tuned` picks the blocks.
    """
    if interpreting():
        kernel[grid](*args, **kwargs, **interpreter_meta)
    else:
        tuned[grid](*args, **kwargs)


if HAVE_TRITON:
    # Pointer types for the kernel parameters of a fixed element type: Triton takes an
    # annotation as the parameter's type, at launch and in the AOT gate (`aot.signature`). The
    # strings "*fp32", ... would do the same, but linters parse string annotations as Python.
    fp32_ptr = tl.pointer_type(tl.float32)
    i64_ptr = tl.pointer_type(tl.int64)
    i32_ptr = tl.pointer_type(tl.int32)
    i8_ptr = tl.pointer_type(tl.int8)

    @triton.jit
    def dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """acc + a @ b (acc None: a @ b), products at input_precision PRECISION.

        UPCAST (interpreter only): Triton 3.9's interpreter multiplies bf16 tiles as their raw
        uint16 bits (numpy has no bf16); fp32 operands hold the same bf16 values exactly, and the
        MMA on a GPU also forms exact products with fp32 accumulation, so the results agree.
        """
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc, input_precision=PRECISION)

    @triton.jit
    def aligned_rows(stride_a, stride_b, H, EVEN_H: tl.constexpr):
        """(stride_a, stride_b, H), rewritten as identities that show 16-element alignment when
        EVEN_H (H % BLOCK_H == 0 and both row strides % 16 == 0: the launcher checked).

        The compiler then knows the rows start 16-element aligned, so loads go 128-bit wide.
        Triton's launch specializes such ints itself; a build from a signature (the AOT gate)
        does not, and tl.multiple_of / tl.assume on scalars did not reach the loads (measured:
        scalar 16-bit loads, 255 registers and spills).
        """
        if EVEN_H:
            stride_a = (stride_a // 16) * 16
            stride_b = (stride_b // 16) * 16
            H = (H // 16) * 16
        return stride_a, stride_b, H
