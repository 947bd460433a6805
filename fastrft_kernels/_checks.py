"""Argument checks shared by the public ops (each error names the argument and what was
expected), and the accumulation dtype rule they share."""

from __future__ import annotations

import torch

from ._loss_config import LossConfig

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the Triton kernels take


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation and outputs; fp64 when the inputs are fp64 (the reference's precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensor(name: str, x, *, ndim: int | None = None, float_: bool = False, dtype=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if float_ and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {x.dtype}")


def check_kernel_dtype(name: str, x: torch.Tensor) -> None:
    """The triton backend's dtypes (fp64 runs on the torch and reference backends only)."""
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32 on the triton backend, got {x.dtype}")


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


def check_config(config) -> None:
    if not isinstance(config, LossConfig):
        raise TypeError(f"config must be a fastrft_kernels.LossConfig, got {type(config).__name__}")


def check_loss_args(config, T: int, advantages, cu_seqlens, *, per_token: dict, **same_device) -> None:
    """The checks `policy_loss` and `linear_policy_loss` share, for T tokens.

    per_token: name -> optional [T] float tensor (old_logp, ref_logp, ...); same_device: the
    caller's other tensors, which must share the device. Reads cu_seqlens on the host (once).
    """
    check_cu_seqlens(cu_seqlens, T)
    S = cu_seqlens.numel() - 1
    check_tensor("advantages", advantages, ndim=1, float_=True)
    if advantages.numel() not in (S, T):
        raise ValueError(
            f"advantages must hold one value per sequence (S={S}) or per token (T={T}), got {advantages.numel()}"
        )
    for name, x in per_token.items():
        if x is not None:
            check_tensor(name, x, ndim=1, float_=True)
            if x.numel() != T:
                raise ValueError(f"{name} must have one value per token (T={T}), got {x.numel()}")
    if config.beta > 0 and per_token.get("ref_logp") is None:
        raise ValueError(
            f"ref_logp is required when config.beta > 0 (the KL penalty), got beta={config.beta} and ref_logp=None"
        )
    check_same_device(**same_device, advantages=advantages, cu_seqlens=cu_seqlens, **per_token)
    if not bool(torch.isfinite(advantages).all()):  # one NaN would make the loss and every gradient NaN
        bad = (~torch.isfinite(advantages)).nonzero()[0].item()
        raise ValueError(
            f"advantages must be finite, got {advantages[bad].item()} at index {bad} (group_advantages gives "
            "unscorable completions, NaN rewards, an advantage of 0)"
        )
