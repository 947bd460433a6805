"""`group_advantages`: GRPO / RLOO advantages from per-completion rewards, grouped by prompt.

    advantages = group_advantages(rewards, group_size=G)                 # [B] fp32
    advantages = group_advantages(rewards, group_ids=prompt_index)       # groups in any order

Semantics (DESIGN.md, checked against trl 1.16's `_generate_and_score_completions`):
- grpo: (r - group mean) / (std + eps), std unbiased (Bessel); `scale="group"` divides by the
  group's std, `scale="batch"` by the std of every valid reward in the batch (TRL's
  `scale_rewards="batch"`: mean per group, std over all rewards), `scale="none"` not at all.
- rloo: r - mean of the other valid members of the group; never divided by a std (`scale` is
  not used).
- A NaN reward (unscorable completion) is left out of its group's mean and std, and of the batch
  std, and gets advantage 0. So is an infinite one: no finite advantage follows from it, and
  refusing it would need a host read (a reward function returning inf is a bug of its own).
- A group with one valid member gets 0 (TRL: its unbiased std is NaN and `nan_to_num` gives 0;
  rloo has no "other members").
- A group whose valid rewards are all equal gets exactly 0, for every scale and estimator. A
  plain (r - mean) / (0 + eps) would amplify the rounding of the mean by 1/eps = 1e4 (0.1 summed
  three times in fp32 is off by one ulp, ~7e-9, which gives 7e-5 instead of 0), so such groups
  are detected from their max == min and zeroed.

Backends: `reference` (a Python loop over groups, float64 for float64 rewards: the spec), `torch`
(segment sums with `index_add_`/`scatter_reduce`, no loop over groups, no host sync) and `triton`
(one program per group: for `group_size` groups are contiguous; for `group_ids` the rewards are
visited through a stable sort by group id, and group k's members are `perm[starts[k]:starts[k+1]]`,
with starts from a segment count and a cumulative sum on the device; the grid has B programs, one
per possible group, and the programs past the last group find an empty range and return). The
torch and triton backends never read a tensor on the host, so the call never waits for the device.
"""

import numbers

import torch

from ._backend import resolve_backend
from ._checks import acc_dtype, check_same_device, check_tensor
from ._triton import HAVE_TRITON, kernel_output, tl, triton

SCALES = ("group", "batch", "none")
ESTIMATORS = ("grpo", "rloo")


# --------------------------------------------------------------------------------------- public API


def group_advantages(
    rewards: torch.Tensor,
    group_size: int | None = None,
    *,
    group_ids: torch.Tensor | None = None,
    scale: str = "group",
    estimator: str = "grpo",
    eps: float = 1e-4,
) -> torch.Tensor:
    """Per-completion advantages from rewards grouped by prompt.

    Args:
        rewards: (B,), float16/bfloat16/float32/float64; NaN marks an unscorable completion.
        group_size: G, the number of completions per prompt when groups are contiguous
            (rewards[k*G:(k+1)*G] is group k); B must be a multiple of G. Exclusive with group_ids.
        group_ids: (B,), int32 or int64: the group of each reward, any values, in any order.
        scale: "group" | "batch" | "none": what grpo divides by (see the module docstring).
        estimator: "grpo" | "rloo".
        eps: added to the std before dividing (TRL's 1e-4).

    Returns:
        advantages: (B,), float32 (float64 for float64 rewards on the reference and torch
        backends; the triton backend computes in float32).
    """
    _check_args(rewards, group_size, group_ids, scale, estimator, eps)
    rewards = torch.where(torch.isinf(rewards), float("nan"), rewards)  # [B] +-inf: unscorable, like NaN
    backend = resolve_backend(rewards.device)
    if backend == "reference":
        return _reference(rewards, group_size, group_ids, scale, estimator, float(eps))
    if backend == "torch":
        return _torch(rewards, group_size, group_ids, scale, estimator, float(eps))
    return _triton(rewards, group_size, group_ids, scale, estimator, float(eps))


# ---------------------------------------------------------------------------------- argument checks


def _check_args(rewards, group_size, group_ids, scale, estimator, eps):
    check_tensor("rewards", rewards, ndim=1, float_=True)
    B = rewards.numel()
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"eps must be a real number >= 0, got {eps!r}")
    if (group_size is None) == (group_ids is None):
        raise ValueError(
            "give exactly one of group_size (contiguous groups) and group_ids (a group per reward), "
            f"got group_size={group_size!r} and group_ids={'None' if group_ids is None else 'a tensor'}"
        )
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size <= 0:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if B % group_size != 0:
            raise ValueError(
                f"group_size={group_size} must divide the number of rewards B={B} (contiguous groups of "
                f"group_size completions)"
            )
    else:
        check_tensor("group_ids", group_ids, ndim=1)
        if group_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"group_ids must be an int32 or int64 tensor, got {group_ids.dtype}")
        if group_ids.numel() != B:
            raise ValueError(f"group_ids must have one entry per reward ({B}), got {group_ids.numel()}")
        check_same_device(rewards=rewards, group_ids=group_ids)


# ---------------------------------------------------------------------------------------- reference


def _reference(rewards, group_size, group_ids, scale, estimator, eps):
    """The spec: one group at a time, in float64 for float64 rewards (float32 otherwise)."""
    dtype = acc_dtype(rewards.dtype)
    r = rewards.detach().to(dtype).cpu()  # [B]
    B = r.numel()
    if group_ids is None:
        ids = torch.arange(B, device="cpu") // group_size  # [B] (host: the loop below runs there)
    else:
        ids = group_ids.detach().cpu().long()  # [B]
    valid = ~torch.isnan(r)  # [B]
    out = torch.zeros(B, dtype=dtype, device="cpu")  # [B]
    all_valid = r[valid]
    batch_std = all_valid.std() if all_valid.numel() > 1 else None
    for g in torch.unique(ids).tolist():
        members = torch.nonzero((ids == g) & valid).flatten()  # valid members of group g
        n = members.numel()
        rv = r[members]  # [n]
        if n <= 1 or bool((rv == rv[0]).all()):
            continue  # one valid member, or zero spread: advantage 0
        if estimator == "rloo":
            out[members] = rv - (rv.sum() - rv) / (n - 1)
            continue
        adv = rv - rv.mean()
        if scale == "group":
            adv = adv / (rv.std() + eps)
        elif scale == "batch":
            adv = adv / (batch_std + eps)
        out[members] = adv
    return out.to(rewards.device)


# --------------------------------------------------------------------------------------- torch path


def _dense_group_index(group_size, group_ids, B, device):
    """(index [B] int64 in [0, n_slots), n_slots, perm [B] or None) without a host sync.

    perm lists the rewards grouped (a stable sort by group id); None for contiguous groups.

    group_ids of any values become ranks of a stable sort; the number of distinct groups is not
    known without reading the device, so the segment buffers get B slots (the most there can be).
    """
    if group_ids is None:
        return torch.arange(B, device=device) // group_size, B // group_size, None
    sorted_ids, perm = torch.sort(group_ids, stable=True)  # [B], [B]
    new_group = torch.ones(B, dtype=torch.long, device=device)  # [B]
    new_group[1:] = (sorted_ids[1:] != sorted_ids[:-1]).long()
    dense_sorted = torch.cumsum(new_group, 0) - 1  # [B] group rank in sorted order
    index = torch.empty_like(dense_sorted).scatter_(0, perm, dense_sorted)  # [B]
    return index, B, perm


def _torch(rewards, group_size, group_ids, scale, estimator, eps):
    dtype = acc_dtype(rewards.dtype)
    r = rewards.detach().to(dtype)  # [B]
    B = r.numel()
    device = r.device
    if B == 0:
        return torch.empty(0, dtype=dtype, device=device)
    index, n, _ = _dense_group_index(group_size, group_ids, B, device)  # [B], n slots
    valid = ~torch.isnan(r)  # [B]
    rz = torch.where(valid, r, torch.zeros_like(r))  # [B] NaN -> 0 so sums skip them
    count = torch.zeros(n, dtype=dtype, device=device).index_add_(0, index, valid.to(dtype))  # [n]
    total = torch.zeros(n, dtype=dtype, device=device).index_add_(0, index, rz)  # [n]
    mean = total / count.clamp(min=1)  # [n]
    hi = torch.full((n,), -torch.inf, dtype=dtype, device=device).scatter_reduce_(
        0, index, torch.where(valid, r, torch.full_like(r, -torch.inf)), "amax"
    )  # [n]
    lo = torch.full((n,), torch.inf, dtype=dtype, device=device).scatter_reduce_(
        0, index, torch.where(valid, r, torch.full_like(r, torch.inf)), "amin"
    )  # [n]
    informative = (count > 1) & (hi > lo)  # [n] at least two valid members that differ
    count_t, total_t, mean_t = count[index], total[index], mean[index]  # [B] each
    if estimator == "rloo":
        adv = rz - (total_t - rz) / (count_t - 1).clamp(min=1)  # [B]
    else:
        adv = rz - mean_t  # [B]
        if scale == "group":
            dev = torch.where(valid, adv, torch.zeros_like(adv))  # [B]
            ss = torch.zeros(n, dtype=dtype, device=device).index_add_(0, index, dev * dev)  # [n]
            std = torch.sqrt(ss / (count - 1).clamp(min=1))  # [n]
            adv = adv / (std[index] + eps)
        elif scale == "batch":
            adv = adv / (_batch_std(rz, valid) + eps)
    return torch.where(valid & informative[index], adv, torch.zeros_like(adv))  # [B]


def _batch_std(rz, valid):
    """Unbiased std of the valid rewards (0-dim, on the device); 0 with fewer than two of them."""
    nv = valid.sum().to(rz.dtype)  # 0-dim
    mean = rz.sum() / nv.clamp(min=1)
    dev = torch.where(valid, rz - mean, torch.zeros_like(rz))  # [B]
    return torch.sqrt((dev * dev).sum() / (nv - 1).clamp(min=1))


# --------------------------------------------------------------------- triton kernels and launchers

_BLOCK = 128  # members per loop step in the triton kernel; groups are 2-64 in practice, so one step
_SCALE_CODE = {"group": 0, "batch": 1, "none": 2}


if HAVE_TRITON:
    from ._triton import fp32_ptr, i32_ptr, i64_ptr

    @triton.jit
    def _load_members(rewards_ptr, perm_ptr, pos, end, CONTIGUOUS: tl.constexpr):
        """(indices, rewards) of the group members at positions `pos` [BLOCK]; NaN past `end`."""
        inb = pos < end
        if CONTIGUOUS:
            idx = pos.to(tl.int64)
        else:
            idx = tl.load(perm_ptr + pos, mask=inb, other=0)
        return idx, tl.load(rewards_ptr + idx, mask=inb, other=float("nan"))

    @triton.jit
    def _group_advantages_fwd_kernel(
        rewards_ptr: fp32_ptr,  # [B]
        perm_ptr: i64_ptr,  # [B]: members in group order (unused when CONTIGUOUS)
        starts_ptr: i32_ptr,  # [n_groups + 1]: group k is perm[starts[k]:starts[k+1]] (unused when CONTIGUOUS)
        batch_std_ptr: fp32_ptr,  # [1]: std over all valid rewards (read when SCALE == 1)
        out_ptr: fp32_ptr,  # [B]
        group_size: tl.int32,  # G when CONTIGUOUS
        eps: tl.float32,
        CONTIGUOUS: tl.constexpr,
        SCALE: tl.constexpr,  # 0 group, 1 batch, 2 none
        RLOO: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        g = tl.program_id(0)
        if CONTIGUOUS:
            start = g * group_size
            end = start + group_size
        else:
            start = tl.load(starts_ptr + g)
            end = tl.load(starts_ptr + g + 1)
        offs = tl.arange(0, BLOCK)
        # pass 1: count, sum, max and min of the valid (non-NaN) members
        count = tl.zeros([BLOCK], dtype=tl.float32)
        total = tl.zeros([BLOCK], dtype=tl.float32)
        hi = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        lo = tl.full([BLOCK], float("inf"), dtype=tl.float32)
        for i in range(start, end, BLOCK):
            idx, r = _load_members(rewards_ptr, perm_ptr, i + offs, end, CONTIGUOUS)
            ok = r == r  # False for NaN (unscorable) and out-of-range lanes
            count += ok.to(tl.float32)
            total += tl.where(ok, r, 0.0)
            hi = tl.maximum(hi, tl.where(ok, r, float("-inf")))
            lo = tl.minimum(lo, tl.where(ok, r, float("inf")))
        n = tl.sum(count, axis=0)
        s = tl.sum(total, axis=0)
        mean = s / tl.maximum(n, 1.0)
        informative = (n > 1.0) & (tl.max(hi, axis=0) > tl.min(lo, axis=0))
        # as a [BLOCK] mask: the interpreter cannot `&` a 0-d bool with a block of them
        keep = (tl.zeros([BLOCK], dtype=tl.float32) + informative.to(tl.float32)) > 0.5
        inv = 1.0
        if not RLOO:
            if SCALE == 0:
                # pass 2: the group's unbiased std, from deviations (two passes: no cancellation)
                ss = tl.zeros([BLOCK], dtype=tl.float32)
                for i in range(start, end, BLOCK):
                    idx, r = _load_members(rewards_ptr, perm_ptr, i + offs, end, CONTIGUOUS)
                    d = tl.where(r == r, r - mean, 0.0)
                    ss += d * d
                std = tl.sqrt(tl.sum(ss, axis=0) / tl.maximum(n - 1.0, 1.0))
                inv = 1.0 / (std + eps)
            elif SCALE == 1:
                inv = 1.0 / (tl.load(batch_std_ptr) + eps)
        # pass 3: write
        for i in range(start, end, BLOCK):
            idx, r = _load_members(rewards_ptr, perm_ptr, i + offs, end, CONTIGUOUS)
            if RLOO:
                adv = r - (s - r) / tl.maximum(n - 1.0, 1.0)
            else:
                adv = (r - mean) * inv
            adv = tl.where((r == r) & keep, adv, 0.0)
            tl.store(out_ptr + idx, adv, mask=i + offs < end)


def _triton(rewards, group_size, group_ids, scale, estimator, eps):
    r = rewards.detach().float().contiguous()  # [B] fp32 (a copy of B floats at most)
    B = r.numel()
    device = r.device
    out = kernel_output((B,), dtype=torch.float32, device=device)  # [B]
    if B == 0:
        return out
    if scale == "batch" and estimator == "grpo":
        valid = ~torch.isnan(r)
        batch_std = _batch_std(torch.where(valid, r, torch.zeros_like(r)), valid).reshape(1)  # [1]
    else:
        batch_std = torch.zeros(1, dtype=torch.float32, device=device)  # [1], not read
    if group_ids is None:
        perm = torch.zeros(1, dtype=torch.int64, device=device)  # not read
        starts = torch.zeros(1, dtype=torch.int32, device=device)  # not read
        grid = B // group_size
        contiguous = True
    else:
        index, n, perm = _dense_group_index(None, group_ids, B, device)  # [B], B slots, [B] members grouped
        counts = torch.zeros(n, dtype=torch.int32, device=device).index_add_(
            0, index, torch.ones(B, dtype=torch.int32, device=device)
        )  # [B] members per group slot (0 past the last group)
        starts = torch.zeros(n + 1, dtype=torch.int32, device=device)  # [B + 1]
        starts[1:] = torch.cumsum(counts, 0)
        grid = n
        group_size = 0
        contiguous = False
    _group_advantages_fwd_kernel[(grid,)](
        r, perm, starts, batch_std, out, group_size, eps,
        CONTIGUOUS=contiguous, SCALE=_SCALE_CODE[scale], RLOO=estimator == "rloo", BLOCK=_BLOCK,
        num_warps=4,
    )
    return out


# ------------------------------------------------------------------------------- AOT configurations


def aot_configs():
    """Every shipped configuration of the kernel, for ahead-of-time compilation (aot.py).

    Rewards are cast to fp32 by the launcher (B floats): every pointer has its own type.
    """
    from .aot import AOTKernel

    return [
        AOTKernel(
            _group_advantages_fwd_kernel, None,
            dict(CONTIGUOUS=contiguous, SCALE=_SCALE_CODE[scale], RLOO=rloo, BLOCK=_BLOCK), num_warps=4, num_stages=1,
        )
        for contiguous in (True, False)
        for rloo, scale in ((False, "group"), (False, "batch"), (False, "none"), (True, "none"))
    ]
