"""Argument checks shared by the public ops: each error names the argument and what was expected."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x, *, ndim: int | None = None, float_: bool = False, dtype=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if float_ and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {x.dtype}")


def check_same_device(**tensors) -> torch.device:
    """All non-None tensors on one device; returns it."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    device = items[0][1].device
    for k, v in items[1:]:
        if v.device != device:
            raise ValueError(
                f"{k} is on {v.device} but {items[0][0]} is on {device}: all tensors must be on one device"
            )
    return device


def check_cu_seqlens(cu_seqlens, total: int, name: str = "cu_seqlens") -> None:
    """flash-attn's packed convention: int32 [S+1], starts at 0, non-decreasing, ends at `total`.

    Reads the tensor on the host: callers check once per micro-batch, never inside a layer.
    """
    check_tensor(name, cu_seqlens, ndim=1, dtype=torch.int32)
    if cu_seqlens.numel() < 1:
        raise ValueError(f"{name} must hold at least one entry (0), got an empty tensor")
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"{name} must start at 0, got {cu[0]}")
    for i in range(1, len(cu)):
        if cu[i] < cu[i - 1]:
            raise ValueError(f"{name} must be non-decreasing, but {name}[{i}]={cu[i]} < {name}[{i-1}]={cu[i-1]}")
    if cu[-1] != total:
        raise ValueError(f"{name} must end at the number of tokens T={total}, got {cu[-1]}")


def check_targets(targets, n: int, vocab: int, ignore_index: int, name: str = "targets") -> None:
    check_tensor(name, targets, ndim=1)
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 (or int32) tensor of token ids, got {targets.dtype}")
    if targets.numel() != n:
        raise ValueError(f"{name} must have one entry per row ({n}), got {targets.numel()}")
    valid = targets != ignore_index
    if bool(((targets < 0) | (targets >= vocab)).logical_and(valid).any()):
        bad = targets[valid & ((targets < 0) | (targets >= vocab))][0].item()
        raise ValueError(f"{name} must lie in [0, {vocab}) or equal ignore_index={ignore_index}, got {bad}")
