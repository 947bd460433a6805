"""Log-probability (and entropy) of target tokens from given logits.

`logprob(logits, targets)` = log softmax(logits / T)[target] per row (+ entropy), fp32 out,
0 at rows whose target is `ignore_index`. The same op as `linear_logprob` when the logits
already exist (a model that returns them): it never makes a second [N, V] copy in fp32.

- triton: `_logprob_fwd_kernel`, one program per row, an online softmax over vocab blocks
  (max m, sum e^(z-m), sum e^(z-m)(z-m): bounded terms, finite for logits of 1e4 at T = 0.1)
  -> logp, entropy, lse, E[z]; `_logprob_bwd_kernel` writes dlogits = (g_logp (onehot - p)
  - g_ent p (z - E[z])) / T row by row in the logits' dtype. Ignored rows return at once
  (their gradient row is written as zeros). The reduction order of a row depends on V only.
- torch: chunked over rows (O(chunk x V) fp32 working memory), same formulas, custom backward.
- reference: fp32 (fp64 for fp64) log_softmax with autograd.
"""

import torch

from ._backend import resolve_backend
from ._checks import acc_dtype, check_kernel_dtype, check_same_device, check_targets, check_tensor
from ._triton import HAVE_TRITON, interpreting, tl, triton

# --------------------------------------------------------------------------------------- public API


def logprob(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """log softmax(logits / temperature)[target] per row.

    Args:
        logits: [N, V] float16 / bfloat16 / float32 (float64 on the torch and reference backends).
        targets: [N] int64 (or int32) in [0, V) or `ignore_index`.
        temperature: positive float dividing the logits.
        return_entropy: also return the entropy [N] of each row's distribution.

    Returns:
        logp [N] float32 (float64 for float64 logits), or (logp, entropy); 0 at ignored rows;
        differentiable w.r.t. logits through both.
    """
    _check_args(logits, targets, temperature, ignore_index)
    backend = resolve_backend(logits.device)
    if backend == "reference":
        logp, ent = _reference(logits, targets, temperature, ignore_index, return_entropy)
    else:
        if backend == "triton":
            check_kernel_dtype("logits", logits)
            if logits.stride(1) != 1:
                logits = logits.contiguous()
            targets = targets.long()  # the kernels read int64 ids
        logp, ent = _Logprob.apply(logits, targets, float(temperature), ignore_index, return_entropy, backend)
    return (logp, ent) if return_entropy else logp


# ---------------------------------------------------------------------------------- argument checks


def _check_args(logits, targets, temperature, ignore_index):
    check_tensor("logits", logits, ndim=2, float_=True)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_same_device(logits=logits, targets=targets)
    check_targets(targets, logits.shape[0], logits.shape[1], ignore_index)


# ---------------------------------------------------------------------------------------- reference


def _reference(logits, targets, temperature, ignore_index, want_entropy):
    valid = targets != ignore_index  # [N]
    # ignored rows may hold anything (inf, NaN): zeroed, so that no NaN reaches their gradient
    z = torch.where(valid[:, None], logits.to(acc_dtype(logits.dtype)), 0.0) / temperature  # [N, V]
    logsm = torch.log_softmax(z, dim=-1)
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logp = torch.where(valid, logsm.gather(1, safe[:, None]).squeeze(1), 0.0)
    ent = torch.where(valid, -(logsm.exp() * logsm).sum(-1), 0.0) if want_entropy else None
    return logp, ent


# --------------------------------------------------------------------------------------- torch path

_CHUNK_BYTES = 64 * 2**20  # fp32 working set of the torch path per chunk


def _chunk_logits(logits, valid, i, chunk, inv_t, acc):
    """z = logits[i:i+chunk] / T in `acc` dtype, [C, V], a fresh tensor; 0 at ignored rows, which
    may hold anything (inf, NaN) and must reach no output and no gradient."""
    z = logits[i : i + chunk].to(acc) * inv_t
    return z.masked_fill_(~valid[i : i + chunk, None], 0.0)


def _torch_forward(logits, targets, inv_t, ignore_index, want_entropy):
    n, v = logits.shape
    acc = acc_dtype(logits.dtype)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    lse = torch.empty(n, dtype=acc, device=logits.device)
    ez = torch.zeros(n, dtype=acc, device=logits.device)
    zt = logits.gather(1, safe[:, None]).squeeze(1).to(acc) * inv_t  # [N]
    chunk = max(1, _CHUNK_BYTES // (4 * max(v, 1)))
    for i in range(0, n, chunk):
        z = _chunk_logits(logits, valid, i, chunk, inv_t, acc)  # [C, V]
        mx = z.amax(1, keepdim=True)
        zc = z.sub_(mx)  # z - max <= 0, in place
        p = torch.exp(zc)  # [C, V]
        s = p.sum(1)
        lse[i : i + chunk] = mx.squeeze(1) + s.log()
        if want_entropy:
            # E[z] = max + E[z - max]: the terms stay bounded (p (z) itself overflows fp32 at bf16's
            # 1e38 logits), and a -inf logit has p = 0, so p (z - max) would be 0 * -inf = NaN
            ez[i : i + chunk] = mx.squeeze(1) + torch.where(p > 0, p * zc, 0.0).sum(1) / s
    zero = torch.zeros((), dtype=acc, device=logits.device)
    logp = torch.where(valid, torch.clamp(zt - lse, max=0.0), zero)
    ent = torch.where(valid, torch.clamp(lse - ez, min=0.0), zero) if want_entropy else None
    return logp, ent, torch.where(valid, lse, zero), ez


def _torch_backward(logits, targets, lse, ez, g_lp, g_ent, inv_t, ignore_index):
    n, v = logits.shape
    acc = acc_dtype(logits.dtype)
    valid = targets != ignore_index
    g_lp = torch.where(valid, g_lp.to(acc), 0.0)
    g_ent = torch.where(valid, g_ent.to(acc), 0.0) if g_ent is not None else None
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    dz = torch.empty_like(logits)
    chunk = max(1, _CHUNK_BYTES // (4 * max(v, 1)))
    for i in range(0, n, chunk):
        z = _chunk_logits(logits, valid, i, chunk, inv_t, acc)  # [C, V]
        p = torch.sub(z, lse[i : i + chunk, None]).exp_()
        d = p * -g_lp[i : i + chunk, None]
        if g_ent is not None:
            d -= g_ent[i : i + chunk, None] * p * (z - ez[i : i + chunk, None])
        rows = torch.arange(d.shape[0], device=d.device)
        d[rows, safe[i : i + chunk]] += g_lp[i : i + chunk]
        dz[i : i + chunk] = d * inv_t
    return dz


# --------------------------------------------------------------------- triton kernels and launchers

_BLOCK_V = 2048  # vocab block of the triton kernels on a GPU (74 blocks at V = 151936)
INTERPRETER_BLOCK_V = 32

if HAVE_TRITON:
    from ._triton import fp32_ptr, i64_ptr

    @triton.jit
    def _logprob_fwd_kernel(
        Z, TGT: i64_ptr, LOGP: fp32_ptr, ENT: fp32_ptr, LSE: fp32_ptr, EZ: fp32_ptr,
        V: tl.int32, stride_zn: tl.int64, inv_temp: tl.float32, ignore_index: tl.int64,
        HAS_ENT: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """One row: logp, entropy (if asked), lse and E[z] (fp32), all 0 at ignored rows."""
        row = tl.program_id(0).to(tl.int64)
        tgt = tl.load(TGT + row).to(tl.int64)
        if tgt == ignore_index:
            tl.store(LOGP + row, 0.0)
            tl.store(LSE + row, 0.0)
            tl.store(EZ + row, 0.0)
            if HAS_ENT:
                tl.store(ENT + row, 0.0)
            return
        base = Z + row * stride_zn
        offs = tl.arange(0, BLOCK_V)
        m = tl.full((BLOCK_V,), float("-inf"), tl.float32)  # per lane: the reduction order is V's alone
        s = tl.zeros((BLOCK_V,), tl.float32)
        a = tl.zeros((BLOCK_V,), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temp
            m_new = tl.maximum(m, z)
            alive = m_new > float("-inf")  # lanes that have seen a column yet
            alpha = tl.where(alive, tl.exp(m - m_new), 0.0)
            e = tl.where(alive, tl.exp(z - m_new), 0.0)
            if HAS_ENT:
                shift = tl.where(s > 0, (m - m_new) * s, 0.0)
                a = alpha * (a + shift) + tl.where(cols < V, e * (z - m_new), 0.0)  # -inf * 0 past V
            s = alpha * s + e
            m = m_new
        mx = tl.max(m, axis=0)
        scale = tl.where(s > 0, tl.exp(m - mx), 0.0)
        ssum = tl.sum(scale * s, axis=0)
        lse = mx + tl.log(ssum)
        zt = tl.load(base + tgt).to(tl.float32) * inv_temp
        tl.store(LOGP + row, tl.minimum(zt - lse, 0.0))
        tl.store(LSE + row, lse)
        if HAS_ENT:
            asum = tl.sum(scale * (a + tl.where(s > 0, (m - mx) * s, 0.0)), axis=0)
            ez = mx + asum / ssum
            tl.store(EZ + row, ez)
            tl.store(ENT + row, tl.maximum(lse - ez, 0.0))

    @triton.jit
    def _logprob_bwd_kernel(
        Z, TGT: i64_ptr, LSE: fp32_ptr, EZ: fp32_ptr, G_LP: fp32_ptr, G_ENT: fp32_ptr, DZ,
        V: tl.int32, stride_zn: tl.int64, stride_dn: tl.int64, inv_temp: tl.float32, ignore_index: tl.int64,
        HAS_ENT: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """One row of dlogits = (g_logp (onehot - p) - g_ent p (z - E[z])) / T, in DZ's dtype."""
        row = tl.program_id(0).to(tl.int64)
        tgt = tl.load(TGT + row).to(tl.int64)
        offs = tl.arange(0, BLOCK_V)
        if tgt == ignore_index:
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + offs
                tl.store(DZ + row * stride_dn + cols, tl.zeros((BLOCK_V,), tl.float32), mask=cols < V)
            return
        lse = tl.load(LSE + row)
        g = tl.load(G_LP + row)
        if HAS_ENT:
            ez = tl.load(EZ + row)
            ge = tl.load(G_ENT + row)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            msk = cols < V
            z = tl.load(Z + row * stride_zn + cols, mask=msk, other=0.0).to(tl.float32) * inv_temp
            p = tl.exp(z - lse)
            d = g * (tl.where(cols == tgt, 1.0, 0.0) - p)
            if HAS_ENT:
                d -= ge * p * (z - ez)
            tl.store(DZ + row * stride_dn + cols, d * inv_temp, mask=msk)


def _block_v():
    return INTERPRETER_BLOCK_V if interpreting() else _BLOCK_V


def _triton_forward(logits, targets, inv_t, ignore_index, want_entropy):
    n, v = logits.shape
    dev = logits.device
    nan = lambda: torch.full((n,), float("nan"), dtype=torch.float32, device=dev)  # noqa: E731  poisoned
    logp, lse, ez = nan(), nan(), nan()
    ent = nan() if want_entropy else logp
    if n:
        _logprob_fwd_kernel[(n,)](
            logits, targets, logp, ent, lse, ez, v, logits.stride(0), inv_t, ignore_index,
            HAS_ENT=want_entropy, BLOCK_V=_block_v(), num_warps=8,
        )
    return logp, (ent if want_entropy else None), lse, ez


def _triton_backward(logits, targets, lse, ez, g_lp, g_ent, inv_t, ignore_index):
    n, v = logits.shape
    dz = torch.full_like(logits, float("nan"))  # poisoned: every element is written
    if n:
        _logprob_bwd_kernel[(n,)](
            logits, targets, lse, ez, g_lp, g_ent if g_ent is not None else g_lp, dz, v,
            logits.stride(0), dz.stride(0), inv_t, ignore_index,
            HAS_ENT=g_ent is not None, BLOCK_V=_block_v(), num_warps=8,
        )
    return dz


# ----------------------------------------------------------------------------------------- autograd


class _Logprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, ignore_index, want_entropy, backend):
        inv_t = 1.0 / float(temperature)
        fwd = _triton_forward if backend == "triton" else _torch_forward
        logp, ent, lse, ez = fwd(logits, targets, inv_t, ignore_index, want_entropy)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, targets, lse, ez)
        ctx.inv_t, ctx.ignore_index, ctx.backend, ctx.want_entropy = inv_t, ignore_index, backend, want_entropy
        return logp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        logits, targets, lse, ez = ctx.saved_tensors
        if g_lp is None and g_ent is None:
            return torch.zeros_like(logits), None, None, None, None, None
        if g_lp is None:
            g_lp = torch.zeros_like(lse)
        g_lp = g_lp.to(lse.dtype).contiguous()
        g_ent = g_ent.to(lse.dtype).contiguous() if (g_ent is not None and ctx.want_entropy) else None
        bwd = _triton_backward if ctx.backend == "triton" else _torch_backward
        return bwd(logits, targets, lse, ez, g_lp, g_ent, ctx.inv_t, ctx.ignore_index), None, None, None, None, None


# ------------------------------------------------------------------------------- AOT configurations


def aot_configs():
    """Every shipped Triton configuration x dtype, for ahead-of-time compilation checks."""
    from .aot import AOTKernel

    return [
        AOTKernel(fn, dtype, dict(HAS_ENT=ent, BLOCK_V=_BLOCK_V), num_warps=8, num_stages=1)
        for dtype in ("fp32", "bf16", "fp16")
        for ent in (False, True)
        for fn in (_logprob_fwd_kernel, _logprob_bwd_kernel)
    ]
