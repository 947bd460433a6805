"""Log-probability (and entropy) of target tokens fused with the LM head: never holds [N, V].

`linear_logprob(hidden, weight, targets)` returns log softmax((hidden @ weight.T + bias) / T)[target]
per row, and optionally the entropy of that distribution, without materializing the [N, V] logits.

Only completion rows run: rows whose target is `ignore_index` are dropped first (one
`nonzero`, the only host sync: the grid size needs the row count), so a packed batch whose
prompts fill 80% of the tokens pays for the 20% that are completions.

Triton design (the GPU path; the tests run it under TRITON_INTERPRET=1):
- Pass A (`_linear_logprob_fwd_partial_kernel`): grid (row blocks x vocab splits). Each
  program walks its vocab split in [BLOCK_N, BLOCK_V] logit tiles, each a `tl.dot` loop over
  H in BLOCK_H, and keeps per row an online max m, sum-exp s = sum e^(z-m) and
  a = sum e^(z-m) (z-m) (relative to the running max, so every term is bounded: logits of 1e4
  at temperature 0.1 stay finite). `_linear_logprob_fwd_finalize_kernel` merges the splits in
  a fixed order in fp32 -> lse, the mean logit E[z] (for entropy and its gradient) and the
  entropy. The split width (`_V_PER_SPLIT` columns) depends on V only, never on N: a row's
  reduction order is the same whatever else is in the batch (batch invariance).
- The target logit is a row dot product x . w[target] (`_linear_logprob_target_kernel`), in
  both the full pass and the lse-reuse pass, so the two give bit-identical log-probs for the
  same lse (an on-policy ratio is exactly 1).
- Pass B (backward), deterministic, no float atomics: `_linear_logprob_bwd_dx_kernel` (grid
  row blocks x vocab splits, each program owning its rows of a fp32 partial dX) and
  `_linear_logprob_bwd_dw_kernel` (grid vocab blocks, each program owning its rows of a fp32
  dW and dbias) each recompute their logit tiles and form
  dlogits = (g_logp (onehot - p) - g_ent p (z - E[z])) / T in registers. FLOPs: 2NHV (pass A)
  + 2 x (2NHV recompute + 2NHV product) = 10 NHV, 1.25x the 8 NHV floor (pass A, one
  recompute, dX, dW). The dX partials over `dx_splits` vocab splits are summed in a fixed
  order by torch. The price of owning the outputs without atomics is read-modify-write
  traffic on fp32 tiles: the dW kernel reads and writes its [BLOCK_V, H] rows once per row
  block (8 V H ceil(M / BLOCK_N) bytes: at M = 8192, H = 4096, V = 151936, BLOCK_N = 64:
  640 GB against 20 TFLOP of math in that pass, 32 FLOP/byte, well under an H100's ~300:
  unless L2 catches the re-reads the pass is bandwidth-bound; larger row blocks, or dlogits
  kept in shared memory across several row blocks, are the next step, unmeasured here for
  want of a GPU), and the dX kernel its [BLOCK_N, H] rows once per vocab block. Extra
  memory: dW in fp32 [V, H] (cast to the weight's dtype at the end), dX partials
  [dx_splits, M, H] fp32, and the gathered rows x [M, H].
- With `lse=` given (from a no-grad pass with the same weights, `return_lse=True`) and no
  entropy asked, pass A's GEMM is skipped: the forward is only the target dot product.
  Asking for entropy needs pass A anyway: the given lse is then ignored and recomputed.

Three backends behind the one function (DESIGN.md): `triton`, `torch` (blocks of rows x
vocab, memory O(rows x vocab block); the CPU path) and `reference` (materializes logits; float64-capable).
"""

import os

import torch

from ._backend import resolve_backend
from ._checks import acc_dtype, check_kernel_dtype, check_same_device, check_targets, check_tensor
from ._triton import HAVE_TRITON, dot_flags, interpreting, launch, tl, triton

# --------------------------------------------------------------------------------------- public API


def linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    lse: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """Log-probability of each target token under softmax((hidden @ weight.T + bias) / temperature).

    Args:
        hidden: [N, H] float16 / bfloat16 / float32 (float64 on the torch and reference backends).
        weight: [V, H], the LM head, same dtype as hidden.
        targets: [N] int64 (or int32) token ids in [0, V), or `ignore_index`.
        bias: optional [V], same dtype.
        temperature: positive float; the logits are divided by it (as TRL does).
        ignore_index: rows with this target cost nothing and get logp = entropy = 0.
        return_entropy: also return the entropy [N] of each row's distribution.
        lse: optional [N] float32 log-sum-exp of z = logits / temperature for these rows, from an
            earlier call with the same hidden, weight, bias and temperature (`return_lse=True`,
            typically the no-grad old-logprob pass of an on-policy step). It skips pass A's GEMM:
            the forward is only the target dot product. It is taken as a constant (no gradient flows
            into it). With `return_entropy=True` pass A must run anyway, and `lse` is ignored.
        return_lse: also return that lse [N] float32 (0 at ignored rows; never differentiable).

    Returns:
        logp [N] float32 (float64 for float64 inputs), or a tuple (logp, entropy?, lse?) in that
        order when `return_entropy` / `return_lse` ask for them. Differentiable w.r.t. hidden,
        weight and bias through logp and entropy.
    """
    _check_args(hidden, weight, targets, bias, temperature, ignore_index, lse)
    backend = resolve_backend(hidden.device)
    if backend == "reference":
        logp, ent, lse_out = _reference(hidden, weight, targets, bias, temperature, ignore_index, return_entropy)
    else:
        if backend == "triton":
            check_kernel_dtype("hidden", hidden)
        logp, ent, lse_out = _LinearLogprob.apply(
            hidden, weight, bias, targets, lse, float(temperature), ignore_index, return_entropy, backend
        )
    if not return_entropy and not return_lse:
        return logp
    out = (logp,)
    if return_entropy:
        out += (ent,)
    if return_lse:
        out += (lse_out,)
    return out


# ---------------------------------------------------------------------------------- argument checks


def _check_args(hidden, weight, targets, bias, temperature, ignore_index, lse):
    check_tensor("hidden", hidden, ndim=2, float_=True)
    check_tensor("weight", weight, ndim=2, float_=True)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[1] = {hidden.shape[1]}, got shape {tuple(weight.shape)}"
        )
    if bias is not None:
        check_tensor("bias", bias, ndim=1, float_=True)
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be [V] with V = {weight.shape[0]}, got shape {tuple(bias.shape)}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if lse is not None:
        check_tensor("lse", lse, ndim=1, float_=True)
        if lse.numel() != hidden.shape[0]:
            raise ValueError(f"lse must be [N] with N = {hidden.shape[0]}, got shape {tuple(lse.shape)}")
    check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias, lse=lse)
    check_targets(targets, hidden.shape[0], weight.shape[0], ignore_index)


# ---------------------------------------------------------------------------------------- reference


def _reference(hidden, weight, targets, bias, temperature, ignore_index, want_entropy):
    """Plain autograd: logits [N, V] in the input dtype, log_softmax in fp32 (fp64 for fp64)."""
    valid = targets != ignore_index  # [N]
    hidden = torch.where(valid[:, None], hidden, 0.0)  # ignored rows may hold inf / NaN: none reaches a gradient
    logits = hidden @ weight.t()  # [N, V]
    if bias is not None:
        logits = logits + bias
    z = logits.to(acc_dtype(hidden.dtype)) / temperature  # [N, V]
    logsm = torch.log_softmax(z, dim=-1)  # [N, V]
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logp = logsm.gather(1, safe[:, None]).squeeze(1)  # [N]
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    lse = torch.logsumexp(z, dim=-1)
    lse = torch.where(valid, lse, torch.zeros_like(lse))
    ent = None
    if want_entropy:
        ent = -(logsm.exp() * logsm).sum(-1)  # [N]
        ent = torch.where(valid, ent, torch.zeros_like(ent))
    return logp, ent, lse.detach()


# --------------------------------------------------------------------------------------- torch path

# Block shape of the torch path: [_TORCH_ROWS, _TORCH_VOCAB] fp32 logits = 8 MiB. Measured
# on the 2-core dev box at V = 151936, H = 896, fp32 (shared and noisy):
# - fwd+bwd of linear_policy_loss at N = 512, one round (seconds), rows x vocab 256 x 2048: 20.5,
#   256 x 4096: 13.0, 512 x 4096: 9.1, 128 x 8192: 13.8; small blocks lose to per-op overhead
#   and the dW GEMM's short inner dimension (K = rows);
# - peak memory of one fwd+bwd at N = 2048 (MiB, the fp32 dW alone is 519): 256 x 4096: 562,
#   512 x 4096: 568, 256 x 8192: 613, 512 x 8192: 609 (Liger: 566). Beyond 4096 columns the
#   GEMM packs a [H, vocab block] copy of the weight (29 MiB at 8192) next to the block.
# Rows and the online softmax over vocab blocks in a fixed order depend on V only: a row's
# bits never depend on the batch.
_TORCH_ROWS = int(os.environ.get("FASTRFT_LOGPROB_ROWS", 512))
_TORCH_VOCAB = int(os.environ.get("FASTRFT_LOGPROB_VOCAB", 4096))
# MKL's sgemm takes another path below 16 rows, whose rounding differs (measured: 4e-5 at
# H = 896); padding a short row block to 16 rows keeps every row's logits bit-identical
# whatever the batch (batch invariance).
_MIN_GEMM_ROWS = 16


def _block_logits(xc, weight, bias, v0, v1, inv_t, acc):
    """z = (xc @ weight[v0:v1].T + bias[v0:v1]) / T: [C, v1 - v0] in `acc` dtype; pads to 16 rows."""
    c = xc.shape[0]
    if c < _MIN_GEMM_ROWS:
        xc = torch.cat([xc, xc.new_zeros(_MIN_GEMM_ROWS - c, xc.shape[1])])
    w = weight[v0:v1]  # [Vb, H]
    if bias is not None:
        z = torch.addmm(bias[v0:v1], xc, w.t())  # [C, Vb]
    else:
        z = xc @ w.t()  # [C, Vb]
    z = z[:c]
    z = z.to(acc) if z.dtype != acc else z.contiguous()
    if inv_t != 1.0:
        z.mul_(inv_t)
    return z


def _target_logit(x, weight, bias, tgt, inv_t, acc):
    """z[target] = (x . w[target] + b[target]) / T per row: [M] in `acc` dtype.

    A row dot product (fixed order over H, independent of the batch), used by the full pass
    and the lse-reuse pass alike so both give the same bits.
    """
    wt = weight.index_select(0, tgt)  # [M, H]
    zt = (x.to(acc) * wt.to(acc)).sum(-1)  # [M]
    if bias is not None:
        zt = zt + bias.index_select(0, tgt).to(acc)
    return zt * inv_t


def _torch_stats(x, weight, bias, inv_t, want_entropy):
    """lse [M] and E[z] [M] (or None): an online softmax over vocab blocks, row block by row block."""
    acc = acc_dtype(x.dtype)
    m, vocab = x.shape[0], weight.shape[0]
    lse = torch.empty(m, dtype=acc, device=x.device)
    ez = torch.empty(m, dtype=acc, device=x.device) if want_entropy else None
    for i in range(0, m, _TORCH_ROWS):
        xc = x[i : i + _TORCH_ROWS]  # [C, H]
        c = xc.shape[0]
        mx = torch.full((c,), float("-inf"), dtype=acc, device=x.device)  # running max
        s = torch.zeros(c, dtype=acc, device=x.device)  # sum e^(z - mx)
        a = torch.zeros(c, dtype=acc, device=x.device)  # sum e^(z - mx) (z - mx), bounded terms
        for v0 in range(0, vocab, _TORCH_VOCAB):
            z = _block_logits(xc, weight, bias, v0, min(v0 + _TORCH_VOCAB, vocab), inv_t, acc)  # [C, Vb]
            m_new = torch.maximum(mx, z.amax(1))
            alpha = torch.exp(mx - m_new)  # 0 on the first block
            z.sub_(m_new[:, None])  # z - m_new
            if want_entropy:
                e = torch.exp(z)  # [C, Vb]
                shift = torch.where(s > 0, (mx - m_new) * s, 0.0)  # s == 0 exactly while mx == -inf
                a = alpha * (a + shift) + (e * z).sum(1)
            else:
                e = z.exp_()  # in place: no second block
            s = alpha * s + e.sum(1)
            mx = m_new
        lse[i : i + c] = mx + torch.log(s)
        if want_entropy:
            ez[i : i + c] = mx + a / s
    return lse, ez


def _torch_backward(x, weight, bias, tgt, lse, ez, g_lp, g_ent, inv_t, need_x, need_w, need_b):
    """dX [M, H] (x's dtype), dW [V, H] and db [V] (acc dtype), recomputing each block's logits."""
    acc = acc_dtype(x.dtype)
    m, vocab = x.shape[0], weight.shape[0]
    dx = torch.empty(m, x.shape[1], dtype=x.dtype, device=x.device) if need_x else None
    dw = torch.zeros(vocab, x.shape[1], dtype=acc, device=x.device) if need_w else None
    db = torch.zeros(vocab, dtype=acc, device=x.device) if need_b else None
    w_acc = weight if weight.dtype == x.dtype else weight.to(x.dtype)
    for i in range(0, m, _TORCH_ROWS):
        xc = x[i : i + _TORCH_ROWS]  # [C, H]
        c = xc.shape[0]
        gl = g_lp[i : i + c, None]  # [C, 1]
        ge = g_ent[i : i + c, None] if g_ent is not None else None
        lse_c = lse[i : i + c, None]
        ez_c = ez[i : i + c, None] if g_ent is not None else None
        tc = tgt[i : i + c]
        dxc = torch.zeros(c, x.shape[1], dtype=acc, device=x.device) if need_x else None  # [C, H]
        for v0 in range(0, vocab, _TORCH_VOCAB):
            v1 = min(v0 + _TORCH_VOCAB, vocab)
            z = _block_logits(xc, weight, bias, v0, v1, inv_t, acc)  # [C, Vb]
            if ge is None:
                dl = z.sub_(lse_c).exp_().mul_(-gl)  # -g p, in place of z
            else:
                p = torch.sub(z, lse_c).exp_()
                # dH/dz = -p (z - E[z]); the logp term adds g (onehot - p)
                dl = z.sub_(ez_c).mul_(ge).add_(gl).mul_(p).neg_()
            hit = (tc >= v0) & (tc < v1)  # rows whose target lies in this block
            if bool(hit.any()):
                rows = hit.nonzero().squeeze(1)
                dl[rows, tc[rows] - v0] += gl[rows, 0]
            if inv_t != 1.0:
                dl.mul_(inv_t)
            dlc = dl if dl.dtype == x.dtype else dl.to(x.dtype)  # plain PyTorch's grad dtype
            if need_x:
                if dlc.dtype == acc:
                    dxc.addmm_(dlc, w_acc[v0:v1])  # [C, H] += [C, Vb] @ [Vb, H]
                else:
                    dxc.add_(dlc @ w_acc[v0:v1])
            if need_w:
                if dlc.dtype == acc:
                    dw[v0:v1].addmm_(dlc.t(), xc)  # [Vb, H] += [Vb, C] @ [C, H]
                else:
                    dw[v0:v1].add_(dlc.t() @ xc)
            if need_b:
                db[v0:v1].add_(dl.sum(0))
        if need_x:
            dx[i : i + c] = dxc
    return dx, dw, db


# --------------------------------------------------------------------- triton kernels and launchers

# Columns of the vocabulary per pass-A program: a function of V only, never of N, so a row's
# reduction order is the same in every batch. 2048 = 16 blocks of 128: at V = 151936 there are
# 75 splits, so even one row block fills 75 SMs.
_V_PER_SPLIT = 2048
# Blocks used under TRITON_INTERPRET=1 (small, so that the test shapes cross every boundary).
INTERPRETER_BLOCKS = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, V_PER_SPLIT=64, DX_SPLITS=2)

# (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages) per kernel, each compiled for sm_80 and
# sm_90 without spills (python -m fastrft_kernels.aot). Every BLOCK_V divides _V_PER_SPLIT.
_CONFIGS = {
    # Compiled by the AOT gate for sm_80 and sm_90 (python -m fastrft_kernels.aot): none spills.
    # Half precision: tensor-core tiles. In the dW kernel BLOCK_V is the owned dimension and
    # rows stream by in BLOCK_N; at 4 warps its 64 x 128 x 64 tile spilled 280 B, at 8 none.
    "half": {
        "fwd": [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3)],
        "dx": [(64, 128, 32, 4, 3), (64, 128, 64, 8, 3)],  # 64 x 256 x 64 spilled 8 B (sm_90)
        "dw": [(64, 128, 64, 8, 3), (64, 128, 32, 8, 3), (64, 64, 64, 4, 3)],
    },
    # fp32 with IEEE products (torch's default for fp32 matmuls) runs on FMA units and holds its
    # operands in registers: BLOCK_H 32 and 2 stages (64 x 128 x 64 spilled 200-7000 B).
    "fp32": {
        "fwd": [(64, 128, 32, 8, 2), (64, 64, 32, 4, 2)],
        "dx": [(32, 64, 32, 4, 2)],  # 64 x 128 x 32 at 8 warps spilled 24 B without entropy
        "dw": [(32, 64, 32, 4, 2)],
    },
}


if HAVE_TRITON:
    from ._triton import aligned_rows, dot, fp32_ptr, i64_ptr

    @triton.jit
    def _logits_tile(
        X, W, B, n0, v0, v_end, M, H, stride_xn, stride_wv, inv_temp,
        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
        EVEN_H: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """z = (X[n0:] @ W[v0:].T + B[v0:]) / T as a [BLOCK_N, BLOCK_V] fp32 tile; -inf from v_end on.

        The H dimension is contiguous (stride 1, a kernel precondition): with a runtime stride
        the loads cannot be vectorized and the per-element 64-bit pointers alone spilled every
        64 x 128 config (255 registers, 120-2400 B of spills on sm_90). Likewise a mask along
        H (EVEN_H false) keeps loads scalar; H % BLOCK_H == 0 drops it.
        """
        offs_n = n0 + tl.arange(0, BLOCK_N)
        cols = v0 + tl.arange(0, BLOCK_V)
        offs_h = tl.arange(0, BLOCK_H)
        row_mask = offs_n < M
        col_mask = cols < v_end
        x_rows = X + offs_n.to(tl.int64)[:, None] * stride_xn  # [BN, 1]
        w_rows = W + cols.to(tl.int64)[:, None] * stride_wv  # [BV, 1], H contiguous
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            # pointers rebuilt from h0 each step, not carried through the loop: a loop-carried
            # pointer loses its alignment facts and the loads go scalar
            h = h0 + offs_h
            if EVEN_H:
                x = tl.load(x_rows + h[None, :], mask=row_mask[:, None], other=0.0)  # [BN, BH]
                w = tl.load(w_rows + h[None, :], mask=col_mask[:, None], other=0.0)  # [BV, BH]
            else:
                h_mask = h < H
                x = tl.load(x_rows + h[None, :], mask=row_mask[:, None] & h_mask[None, :], other=0.0)
                w = tl.load(w_rows + h[None, :], mask=col_mask[:, None] & h_mask[None, :], other=0.0)
            acc = dot(x, tl.trans(w), acc, PRECISION, UPCAST)
        if HAS_BIAS:
            b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
            acc += b[None, :]
        z = acc * inv_temp
        return tl.where(col_mask[None, :], z, float("-inf"))

    @triton.jit
    def _linear_logprob_fwd_partial_kernel(
        X, W, B, M_PART: fp32_ptr, S_PART: fp32_ptr, A_PART: fp32_ptr,
        M: tl.int32, H: tl.int32, V: tl.int32, V_PER_SPLIT: tl.int32,
        stride_xn: tl.int64, stride_wv: tl.int64,
        inv_temp: tl.float32,
        HAS_BIAS: tl.constexpr, HAS_ENT: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, EVEN_H: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """Pass A: per (row block, vocab split) the online max m, sum e^(z-m), sum e^(z-m)(z-m)."""
        stride_xn, stride_wv, H = aligned_rows(stride_xn, stride_wv, H, EVEN_H)  # 128-bit loads when EVEN_H
        n0 = tl.program_id(0) * BLOCK_N
        split = tl.program_id(1)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        row_mask = offs_n < M
        m_i = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        s_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
        a_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
        v_start = split * V_PER_SPLIT
        v_end = tl.minimum(v_start + V_PER_SPLIT, V)
        for v0 in range(v_start, v_end, BLOCK_V):
            z = _logits_tile(
                X, W, B, n0, v0, v_end, M, H, stride_xn, stride_wv, inv_temp,
                HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, EVEN_H, PRECISION, UPCAST,
            )
            m_new = tl.maximum(m_i, tl.max(z, axis=1))  # finite: every tile has a column < v_end
            alpha = tl.exp(m_i - m_new)  # 0 on the first tile (m_i = -inf)
            e = tl.exp(z - m_new[:, None])  # [BN, BV], 0 past v_end
            if HAS_ENT:
                # rebase a to the new max: sum e^(z-m_new)(z-m_new) = alpha (a + (m - m_new) s);
                # s == 0 exactly when m == -inf, where (m - m_new) s would be -inf * 0
                shift = tl.where(s_i > 0, (m_i - m_new) * s_i, 0.0)
                cols = v0 + tl.arange(0, BLOCK_V)
                ez = tl.where((cols < v_end)[None, :], e * (z - m_new[:, None]), 0.0)
                a_i = alpha * (a_i + shift) + tl.sum(ez, axis=1)
            s_i = alpha * s_i + tl.sum(e, axis=1)
            m_i = m_new
        out = split * M + offs_n
        tl.store(M_PART + out, m_i, mask=row_mask)
        tl.store(S_PART + out, s_i, mask=row_mask)
        if HAS_ENT:
            tl.store(A_PART + out, a_i, mask=row_mask)

    @triton.jit
    def _linear_logprob_fwd_finalize_kernel(
        M_PART: fp32_ptr, S_PART: fp32_ptr, A_PART: fp32_ptr, LSE: fp32_ptr, EZ: fp32_ptr,
        M: tl.int32, N_SPLITS: tl.int32,
        HAS_ENT: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Merge the vocab splits of pass A in a fixed order: lse [M] and E[z] [M] (fp32)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < M
        mx = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
        for k in range(0, N_SPLITS):
            mx = tl.maximum(mx, tl.load(M_PART + k * M + offs, mask=mask, other=0.0))
        s = tl.zeros((BLOCK,), dtype=tl.float32)
        a = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in range(0, N_SPLITS):
            m_k = tl.load(M_PART + k * M + offs, mask=mask, other=0.0)
            s_k = tl.load(S_PART + k * M + offs, mask=mask, other=1.0)  # padding rows: log(1), not log(0)
            scale = tl.exp(m_k - mx)
            s += scale * s_k
            if HAS_ENT:
                a_k = tl.load(A_PART + k * M + offs, mask=mask, other=0.0)
                a += scale * (a_k + (m_k - mx) * s_k)
        tl.store(LSE + offs, mx + tl.log(s), mask=mask)
        if HAS_ENT:
            tl.store(EZ + offs, mx + a / s, mask=mask)  # E[z]; entropy = lse - E[z]

    @triton.jit
    def _linear_logprob_target_kernel(
        X, W, B, TGT: i64_ptr, ZT: fp32_ptr,
        M: tl.int32, H: tl.int32,
        stride_xn: tl.int64, stride_wv: tl.int64,
        inv_temp: tl.float32,
        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        """z[target] = (x . w[target] + b[target]) / T per row, a fixed-order dot over H."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = offs_n < M
        rows = offs_n.to(tl.int64)
        tgt = tl.load(TGT + offs_n, mask=row_mask, other=0).to(tl.int64)
        offs_h = tl.arange(0, BLOCK_H)
        acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            h = h0 + offs_h
            msk = row_mask[:, None] & (h < H)[None, :]
            x = tl.load(X + rows[:, None] * stride_xn + h[None, :], mask=msk, other=0.0)
            w = tl.load(W + tgt[:, None] * stride_wv + h[None, :], mask=msk, other=0.0)
            acc += x.to(tl.float32) * w.to(tl.float32)
        zt = tl.sum(acc, axis=1)
        if HAS_BIAS:
            zt += tl.load(B + tgt, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(ZT + offs_n, zt * inv_temp, mask=row_mask)

    @triton.jit
    def _dlogits_tile(z, tgt, v0, v_end, row_mask, lse, ez, g_lp, g_ent, inv_temp,
                      HAS_ENT: tl.constexpr, BLOCK_V: tl.constexpr):
        """dloss/dlogits for one tile, fp32: (g_lp (onehot - p) - g_ent p (z - E[z])) / T; 0 off the tile."""
        cols = v0 + tl.arange(0, BLOCK_V)
        p = tl.exp(z - lse[:, None])  # [BN, BV]
        onehot = tgt[:, None] == cols[None, :]
        dl = g_lp[:, None] * (tl.where(onehot, 1.0, 0.0) - p)
        if HAS_ENT:
            dl -= g_ent[:, None] * p * (z - ez[:, None])
        # padding rows/columns may hold inf * 0: zero them so they never reach dX or dW
        return tl.where(row_mask[:, None] & (cols < v_end)[None, :], dl * inv_temp, 0.0)

    @triton.jit
    def _linear_logprob_bwd_dx_kernel(
        X, W, B, TGT: i64_ptr, LSE: fp32_ptr, EZ: fp32_ptr, G_LP: fp32_ptr, G_ENT: fp32_ptr, DX_PART: fp32_ptr,
        M: tl.int32, H: tl.int32, V: tl.int32, V_PER_SPLIT: tl.int32,
        stride_xn: tl.int64, stride_wv: tl.int64,
        inv_temp: tl.float32,
        HAS_BIAS: tl.constexpr, HAS_ENT: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, EVEN_H: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """dX partial [split, M, H] fp32 (zero-filled by the caller): this program owns rows x split."""
        stride_xn, stride_wv, H = aligned_rows(stride_xn, stride_wv, H, EVEN_H)  # 128-bit loads when EVEN_H
        n0 = tl.program_id(0) * BLOCK_N
        split = tl.program_id(1)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        row_mask = offs_n < M
        tgt = tl.load(TGT + offs_n, mask=row_mask, other=0).to(tl.int64)
        lse = tl.load(LSE + offs_n, mask=row_mask, other=0.0)
        g_lp = tl.load(G_LP + offs_n, mask=row_mask, other=0.0)
        if HAS_ENT:
            ez = tl.load(EZ + offs_n, mask=row_mask, other=0.0)
            g_ent = tl.load(G_ENT + offs_n, mask=row_mask, other=0.0)
        else:
            ez = lse
            g_ent = g_lp
        dx_base = DX_PART + split.to(tl.int64) * M * H
        offs_h = tl.arange(0, BLOCK_H)
        v_start = split * V_PER_SPLIT
        v_end = tl.minimum(v_start + V_PER_SPLIT, V)
        for v0 in range(v_start, v_end, BLOCK_V):
            z = _logits_tile(
                X, W, B, n0, v0, v_end, M, H, stride_xn, stride_wv, inv_temp,
                HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, EVEN_H, PRECISION, UPCAST,
            )
            dl = _dlogits_tile(z, tgt, v0, v_end, row_mask, lse, ez, g_lp, g_ent, inv_temp, HAS_ENT, BLOCK_V)
            dl = dl.to(W.dtype.element_ty)  # the GEMM runs in the input dtype, as plain PyTorch's
            cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
            w_ptrs = W + cols[:, None] * stride_wv + offs_h[None, :]  # [BV, BH]
            d_ptrs = dx_base + offs_n.to(tl.int64)[:, None] * H + offs_h[None, :]  # [BN, BH]
            for h0 in range(0, H, BLOCK_H):
                h_mask = ((h0 + offs_h) < H) | EVEN_H  # all-true, hence constant, when EVEN_H
                w = tl.load(w_ptrs, mask=(cols < v_end)[:, None] & h_mask[None, :], other=0.0)
                d_mask = row_mask[:, None] & h_mask[None, :]
                acc = tl.load(d_ptrs, mask=d_mask, other=0.0)
                acc = dot(dl, w, acc, PRECISION, UPCAST)
                tl.store(d_ptrs, acc, mask=d_mask)
                w_ptrs += BLOCK_H
                d_ptrs += BLOCK_H

    @triton.jit
    def _linear_logprob_bwd_dw_kernel(
        X, W, B, TGT: i64_ptr, LSE: fp32_ptr, EZ: fp32_ptr, G_LP: fp32_ptr, G_ENT: fp32_ptr, DW: fp32_ptr, DB: fp32_ptr,
        M: tl.int32, H: tl.int32, V: tl.int32,
        stride_xn: tl.int64, stride_wv: tl.int64,
        inv_temp: tl.float32,
        HAS_BIAS: tl.constexpr, HAS_ENT: tl.constexpr, NEED_DB: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, EVEN_H: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """dW [V, H] fp32 (zero-filled) and dbias [V] fp32: this program owns BLOCK_V vocab rows."""
        stride_xn, stride_wv, H = aligned_rows(stride_xn, stride_wv, H, EVEN_H)  # 128-bit loads when EVEN_H
        v0 = tl.program_id(0) * BLOCK_V
        cols = v0 + tl.arange(0, BLOCK_V)
        offs_h = tl.arange(0, BLOCK_H)
        db = tl.zeros((BLOCK_V,), dtype=tl.float32)
        for n0 in range(0, M, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            row_mask = offs_n < M
            tgt = tl.load(TGT + offs_n, mask=row_mask, other=0).to(tl.int64)
            lse = tl.load(LSE + offs_n, mask=row_mask, other=0.0)
            g_lp = tl.load(G_LP + offs_n, mask=row_mask, other=0.0)
            if HAS_ENT:
                ez = tl.load(EZ + offs_n, mask=row_mask, other=0.0)
                g_ent = tl.load(G_ENT + offs_n, mask=row_mask, other=0.0)
            else:
                ez = lse
                g_ent = g_lp
            z = _logits_tile(
                X, W, B, n0, v0, V, M, H, stride_xn, stride_wv, inv_temp,
                HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, EVEN_H, PRECISION, UPCAST,
            )
            dl = _dlogits_tile(z, tgt, v0, V, row_mask, lse, ez, g_lp, g_ent, inv_temp, HAS_ENT, BLOCK_V)
            if NEED_DB:
                db += tl.sum(dl, axis=0)
            dlt = tl.trans(dl.to(X.dtype.element_ty))  # [BV, BN]
            x_ptrs = X + offs_n.to(tl.int64)[:, None] * stride_xn + offs_h[None, :]  # [BN, BH]
            d_ptrs = DW + cols.to(tl.int64)[:, None] * H + offs_h[None, :]  # [BV, BH]
            for h0 in range(0, H, BLOCK_H):
                h_mask = ((h0 + offs_h) < H) | EVEN_H
                x = tl.load(x_ptrs, mask=row_mask[:, None] & h_mask[None, :], other=0.0)
                d_mask = (cols < V)[:, None] & h_mask[None, :]
                acc = tl.load(d_ptrs, mask=d_mask, other=0.0)
                acc = dot(dlt, x, acc, PRECISION, UPCAST)
                tl.store(d_ptrs, acc, mask=d_mask)
                x_ptrs += BLOCK_H
                d_ptrs += BLOCK_H
        if NEED_DB:
            tl.store(DB + cols, db, mask=cols < V)

    # Autotuned wrappers (GPU). Keyed on H and V only: the config, hence every row's
    # reduction order, never depends on the number of rows (batch invariance within a
    # process). Every BLOCK_V divides _V_PER_SPLIT.
    def _configs(kind, family=None):
        fams = [family] if family else list(_CONFIGS)
        seen, out = set(), []
        for fam in fams:
            for cfg in _CONFIGS[fam][kind]:
                if cfg not in seen:
                    seen.add(cfg)
                    bn, bv, bh, warps, stages = cfg
                    out.append(triton.Config(dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh), num_warps=warps,
                                             num_stages=stages))
        return out

    def _make_prune(kind):
        def prune(configs, named_args, **kwargs):
            # the configs shipped (and AOT-checked) for this dtype family; then one whose
            # BLOCK_H divides H, which runs the unmasked, vectorized loads
            fam = "fp32" if named_args["X"].dtype == torch.float32 else "half"
            allowed = set(_CONFIGS[fam][kind])
            kept = [c for c in configs
                    if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_V"], c.kwargs["BLOCK_H"], c.num_warps, c.num_stages)
                    in allowed]
            h = named_args["H"]
            even = [c for c in kept if h % c.kwargs["BLOCK_H"] == 0]
            return even or kept

        return prune

    _even_h = triton.heuristics({"EVEN_H": lambda a: _even(a["H"], a["BLOCK_H"], a["stride_xn"], a["stride_wv"])})
    _linear_logprob_fwd_partial_tuned = triton.autotune(
        configs=_configs("fwd"), key=["H", "V"], prune_configs_by={"early_config_prune": _make_prune("fwd")}
    )(_even_h(_linear_logprob_fwd_partial_kernel))
    _linear_logprob_bwd_dx_tuned = triton.autotune(
        configs=_configs("dx"), key=["H", "V"], prune_configs_by={"early_config_prune": _make_prune("dx")},
        reset_to_zero=["DX_PART"],
    )(_even_h(_linear_logprob_bwd_dx_kernel))
    _linear_logprob_bwd_dw_tuned = triton.autotune(
        configs=_configs("dw"), key=["H", "V"], prune_configs_by={"early_config_prune": _make_prune("dw")},
        reset_to_zero=["DW"],
    )(_even_h(_linear_logprob_bwd_dw_kernel))


def _even(h: int, block_h: int, stride_xn: int, stride_wv: int) -> bool:
    """The unmasked, vectorized variant applies: H a multiple of BLOCK_H, rows 16-element aligned."""
    return h % block_h == 0 and stride_xn % 16 == 0 and stride_wv % 16 == 0


def _precision(dtype) -> str:
    # fp32 inputs follow torch's own matmul setting: IEEE unless the user allowed TF32
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _interpreter_meta(x, weight) -> dict:
    """Block sizes (and EVEN_H) of the plain kernels under TRITON_INTERPRET=1."""
    meta = {k: INTERPRETER_BLOCKS[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H")}
    meta["EVEN_H"] = _even(x.shape[1], meta["BLOCK_H"], x.stride(0), weight.stride(0))
    return meta


def _triton_target_logit(x, weight, bias, tgt, inv_t):
    """z[target] [M] fp32 for the gathered rows x [M, H]."""
    m, h = x.shape
    zt = torch.full((m,), float("nan"), dtype=torch.float32, device=x.device)  # poisoned: every row is written
    block_n, block_h = 16, (16 if interpreting() else 64)
    _linear_logprob_target_kernel[(triton.cdiv(m, block_n),)](
        x, weight, bias if bias is not None else weight, tgt, zt, m, h,
        x.stride(0), weight.stride(0), inv_t,
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_H=block_h,
    )
    return zt


def _triton_stats(x, weight, bias, inv_t, want_entropy):
    """Pass A + finalize on the gathered rows x [M, H]: lse [M] fp32 and E[z] [M] fp32 (or None)."""
    m, h = x.shape
    vocab = weight.shape[0]
    dev = x.device
    v_per_split = INTERPRETER_BLOCKS["V_PER_SPLIT"] if interpreting() else _V_PER_SPLIT
    n_splits = triton.cdiv(vocab, v_per_split)
    # partials are fully written by pass A; NaN-filled so that a missed store shows
    m_part = torch.full((n_splits, m), float("nan"), dtype=torch.float32, device=dev)
    s_part = torch.full_like(m_part, float("nan"))
    a_part = torch.full_like(m_part, float("nan")) if want_entropy else m_part
    common = (
        x, weight, bias if bias is not None else weight, m_part, s_part, a_part,
        m, h, vocab, v_per_split,
        x.stride(0), weight.stride(0), inv_t,
    )
    flags = dict(HAS_BIAS=bias is not None, HAS_ENT=want_entropy, **dot_flags(x.dtype, _precision(x.dtype)))
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_N"]), n_splits)  # noqa: E731
    launch(_linear_logprob_fwd_partial_kernel, _linear_logprob_fwd_partial_tuned, grid, *common,
           interpreter_meta=_interpreter_meta(x, weight), **flags)
    lse = torch.full((m,), float("nan"), dtype=torch.float32, device=dev)
    ez = torch.full((m,), float("nan"), dtype=torch.float32, device=dev) if want_entropy else lse
    block = 128
    _linear_logprob_fwd_finalize_kernel[(triton.cdiv(m, block),)](
        m_part, s_part, a_part, lse, ez, m, n_splits, HAS_ENT=want_entropy, BLOCK=block
    )
    return lse, (ez if want_entropy else None)


def _dx_splits(m: int, vocab: int, device) -> int:
    """Vocab splits of the dX kernel: enough programs to fill the GPU when rows are few.

    Each split adds an fp32 [M, H] partial (at M = 1024, H = 4096: 16 MiB), so at most 8.
    """
    if interpreting():
        return INTERPRETER_BLOCKS["DX_SPLITS"]
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(m, 64)
    want = triton.cdiv(2 * sms, row_blocks)
    return max(1, min(8, want, triton.cdiv(vocab, _V_PER_SPLIT)))


def _triton_backward(x, weight, bias, tgt, lse, ez, g_lp, g_ent, inv_t, need_x, need_w, need_b):
    """dX [M, H] (x's dtype), dW [V, H] fp32, db [V] fp32: two deterministic kernels."""
    m, h = x.shape
    vocab = weight.shape[0]
    dev = x.device
    has_ent = g_ent is not None
    b_arg = bias if bias is not None else weight
    ez_arg = ez if has_ent else lse
    ge_arg = g_ent if has_ent else g_lp
    strides = (x.stride(0), weight.stride(0))
    flags = dict(HAS_BIAS=bias is not None, HAS_ENT=has_ent, **dot_flags(x.dtype, _precision(x.dtype)))
    interp_meta = _interpreter_meta(x, weight)
    dx = dw = db = None
    if need_x:
        v_per_split = INTERPRETER_BLOCKS["V_PER_SPLIT"] if interpreting() else _V_PER_SPLIT
        n_splits = _dx_splits(m, vocab, dev)
        # each split covers ceil(V / n_splits) columns, rounded up to whole units of v_per_split
        cols_per = triton.cdiv(triton.cdiv(vocab, n_splits), v_per_split) * v_per_split
        n_splits = triton.cdiv(vocab, cols_per)
        part = torch.zeros((n_splits, m, h), dtype=torch.float32, device=dev)  # read-modify-written
        args = (x, weight, b_arg, tgt, lse, ez_arg, g_lp, ge_arg, part, m, h, vocab, cols_per, *strides, inv_t)
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_N"]), n_splits)  # noqa: E731
        launch(_linear_logprob_bwd_dx_kernel, _linear_logprob_bwd_dx_tuned, grid, *args, interpreter_meta=interp_meta,
               **flags)
        dx = part.sum(0) if n_splits > 1 else part[0]  # fixed-order sum over splits: deterministic
    if need_w or need_b:
        dw_buf = torch.zeros((vocab, h), dtype=torch.float32, device=dev)  # read-modify-written
        db = torch.full((vocab,), float("nan"), dtype=torch.float32, device=dev) if need_b else dw_buf
        args = (x, weight, b_arg, tgt, lse, ez_arg, g_lp, ge_arg, dw_buf, db, m, h, vocab, *strides, inv_t)
        grid = lambda meta: (triton.cdiv(vocab, meta["BLOCK_V"]),)  # noqa: E731
        launch(_linear_logprob_bwd_dw_kernel, _linear_logprob_bwd_dw_tuned, grid, *args, interpreter_meta=interp_meta,
               NEED_DB=need_b, **flags)
        dw = dw_buf if need_w else None
        db = db if need_b else None
    return dx, dw, db


# ----------------------------------------------------------------------------------------- autograd


class _LinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, lse_in, temperature, ignore_index, want_entropy, backend):
        n = hidden.shape[0]
        acc = acc_dtype(hidden.dtype)
        dev = hidden.device
        inv_t = 1.0 / float(temperature)
        # the one host sync: the kernels' grid needs the number of completion rows
        rows = torch.nonzero(targets != ignore_index).squeeze(1)  # [M] int64
        tgt = targets.index_select(0, rows).long()  # [M]
        m = rows.numel()
        logp = torch.zeros(n, dtype=acc, device=dev)
        ent = torch.zeros(n, dtype=acc, device=dev) if want_entropy else None
        lse_full = torch.zeros(n, dtype=acc, device=dev)
        lse = ez = x = None
        if m > 0:
            # gathered once: [M, H] is small next to the M x V x H GEMMs, and a contiguous x
            # lets the kernels use block pointers (no per-element 64-bit pointer tensors)
            # every row a completion row (a benchmark, or a caller that gathered them): no copy
            x = hidden if m == n and hidden.is_contiguous() else hidden.index_select(0, rows)  # [M, H]
            if backend == "triton" and weight.stride(1) != 1:
                weight = weight.contiguous()  # the kernels take H contiguous (a transposed view is copied)
            if backend == "triton":
                zt = _triton_target_logit(x, weight, bias, tgt, inv_t)
            else:
                zt = _target_logit(x, weight, bias, tgt, inv_t, acc)
            if lse_in is not None and not want_entropy:
                lse = lse_in.index_select(0, rows).to(acc)  # pass A skipped
            elif backend == "triton":
                lse, ez = _triton_stats(x, weight, bias, inv_t, want_entropy)
            else:
                lse, ez = _torch_stats(x, weight, bias, inv_t, want_entropy)
            # logp <= 0 and entropy >= 0 hold exactly; rounding may cross by ~1 ulp of lse
            logp.index_copy_(0, rows, torch.clamp(zt.to(acc) - lse, max=0.0))
            lse_full.index_copy_(0, rows, lse)
            if want_entropy:
                ent.index_copy_(0, rows, torch.clamp(lse - ez, min=0.0))
        ctx.set_materialize_grads(False)  # an unused entropy output costs no backward work
        ctx.backend, ctx.inv_t, ctx.n, ctx.m = backend, inv_t, n, m
        ctx.want_entropy = want_entropy
        ctx.save_for_backward(hidden, weight, bias, rows, tgt, x, lse, ez)
        ctx.mark_non_differentiable(lse_full)
        return logp, ent, lse_full

    @staticmethod
    def backward(ctx, g_logp, g_ent, _g_lse):
        hidden, weight, bias, rows, tgt, x, lse, ez = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dh = dw = db = None
        if ctx.m == 0 or g_logp is None and g_ent is None:
            if need_x:
                dh = torch.zeros_like(hidden)
            if need_w:
                dw = torch.zeros_like(weight)
            if need_b:
                db = torch.zeros_like(bias)
            return dh, dw, db, None, None, None, None, None, None
        acc = acc_dtype(hidden.dtype)
        g_lp = (g_logp if g_logp is not None else torch.zeros(ctx.n, device=hidden.device, dtype=acc))
        g_lp = g_lp.index_select(0, rows).to(acc).contiguous()  # [M]
        ge = None
        if ctx.want_entropy and g_ent is not None:
            ge = g_ent.index_select(0, rows).to(acc).contiguous()  # [M]
        if ge is not None and ez is None:  # cannot happen: entropy always runs pass A
            raise RuntimeError("entropy gradient without E[z]")
        if ctx.backend == "triton":
            dx, dwf, dbf = _triton_backward(x, weight, bias, tgt, lse, ez, g_lp, ge, ctx.inv_t, need_x, need_w, need_b)
        else:
            dx, dwf, dbf = _torch_backward(
                x, weight, bias, tgt, lse, ez, g_lp, ge, ctx.inv_t, need_x, need_w, need_b
            )
        if need_x:
            if ctx.m == ctx.n:
                dh = dx.to(hidden.dtype)  # rows == arange(N): no scatter, no second [N, H]
            else:
                dh = torch.zeros_like(hidden)
                dh.index_copy_(0, rows, dx.to(hidden.dtype))
        if need_w:
            dw = dwf.to(weight.dtype)
        if need_b:
            db = dbf.to(bias.dtype)
        return dh, dw, db, None, None, None, None, None, None


# ------------------------------------------------------------------------------- AOT configurations


def aot_configs():
    """Every shipped Triton configuration x dtype, for ahead-of-time compilation checks."""
    from .aot import AOTKernel

    out = []
    for dtype in ("fp32", "bf16", "fp16"):
        family = "fp32" if dtype == "fp32" else "half"
        # PRECISION ieee: torch's default for fp32 matmuls (half dtypes ignore it)
        flags = dict(EVEN_H=True, PRECISION="ieee", UPCAST=False)
        # (bias, entropy): the common LM head (no bias, logp only) and the heaviest variant
        for has_bias, has_ent in ((False, False), (True, True)):
            for kernel, kind, extra in (
                (_linear_logprob_fwd_partial_kernel, "fwd", {}),
                (_linear_logprob_bwd_dx_kernel, "dx", {}),
                (_linear_logprob_bwd_dw_kernel, "dw", dict(NEED_DB=has_bias)),
            ):
                for cfg in _configs(kind, family):
                    constexprs = dict(HAS_BIAS=has_bias, HAS_ENT=has_ent, **extra, **flags, **cfg.kwargs)
                    out.append(AOTKernel(kernel, dtype, constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        out.append(AOTKernel(_linear_logprob_target_kernel, dtype, dict(HAS_BIAS=True, BLOCK_N=16, BLOCK_H=64),
                             num_warps=4, num_stages=1))
    finalize = dict(HAS_ENT=True, BLOCK=128)
    out.append(AOTKernel(_linear_logprob_fwd_finalize_kernel, None, finalize, num_warps=4, num_stages=1))
    return out
