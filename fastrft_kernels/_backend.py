"""Backend choice: `triton`, `torch` or `reference` behind every public op.

Order of precedence (DESIGN.md, Backends):
1. `use_backend(name)` inside its `with` block (the innermost wins);
2. the environment variable `FASTRFT_BACKEND`, read at each call;
3. `auto`: triton on CUDA tensors, torch on CPU ones.

Asking for triton on CPU tensors without `TRITON_INTERPRET=1`, or where triton is not
installed, is an error, never a silent fallback: a benchmark that believes it measured a
kernel must have measured it.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

from ._triton import interpreting, require_triton

BACKENDS = ("auto", "triton", "torch", "reference")

_local = threading.local()


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block with backend `name` (auto|triton|torch|reference)."""
    _check_name(name)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def requested_backend() -> str:
    """The backend asked for right now, before `auto` is resolved."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    return _check_name(os.environ.get("FASTRFT_BACKEND", "auto").strip().lower() or "auto")


def resolve_backend(device: torch.device) -> str:
    """The concrete backend ('triton' | 'torch' | 'reference') for tensors on `device`."""
    name = requested_backend()
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name != "triton":
        return name
    require_triton()
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"backend 'triton' was asked for on {device.type} tensors, but TRITON_INTERPRET=1 is not "
            "set: Triton runs on CUDA tensors, or on CPU tensors under the interpreter. "
            "Use backend 'torch' on CPU, or set TRITON_INTERPRET=1 before importing triton."
        )
    return name
