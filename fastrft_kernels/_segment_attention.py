"""Packed attention driven by a segment table: vision and text tokens, shared prompts, in one kernel.

    out = segment_attention(q, k, v, segments)            # q [T, Hq, D], k/v [T, Hk, D]
    out = varlen_attention(q, k, v, cu_seqlens_q, ...)    # flash_attn_varlen_func semantics

Each query attends to the union of the keys the entries of `segments` holding it let it
see (see `_segments.py` for the exact semantics; overlapping entries are deduplicated, a key
counts once). A query that sees no key outputs 0 and has lse = -inf.

Three backends (DESIGN.md):
- triton: online-softmax forward over a per-q-block list of key blocks (`Segments.plan`),
  each flagged full (no mask evaluated) or masked (the OR of the q-block's entries);
  tiles nobody sees are never visited. Backward: dK/dV per key block over the transposed
  lists, summing the GQA group's query heads inside the program; dQ per query block in a
  separate pass. No atomics anywhere, so gradients are bitwise deterministic.
  Head dims that are not a power of 2 (72, 80, 96: Qwen2.5-VL's vision tower uses 80)
  are padded to the next power of 2 with load/store masks.
- torch: chunks of queries cut where their entries change (so a completion's chunk holds
  only its own rows), each against the union of its entries' key ranges (the prompt and
  the completion itself, gathered: siblings in between are skipped), with the chunk's
  [c, keys] bool mask; never a [T, T] mask (T = 4096, Hq = 16: dense fp32 scores are 1 GiB).
  Without lse, each chunk is one PyTorch SDPA call (its fused CPU/GPU kernels; 256-query
  chunks). With return_lse=True (SDPA does not return it), 128-query chunks of explicit
  fp32 matmuls with a custom backward that recomputes the probabilities from the saved
  lse, as the kernel does: peak extra memory one chunk's [Hq, 128, span] fp32 scores, and
  autograd saves only q, k, v, out and lse.
- reference: a dense [Tq, Tk] mask in float64; the spec for tests.

Outputs: `out` has q's dtype (it feeds the next layer, as flash-attn's does); `lse` is
fp32 [Hq, Tq] (natural log). Both are differentiable.
"""

import math

import torch

from ._backend import resolve_backend
from ._checks import acc_dtype, check_cu_seqlens, check_kernel_dtype, check_same_device, check_tensor
from ._segments import CAUSAL, Segments, segments_from_cu_seqlens
from ._triton import HAVE_TRITON, dot_flags, interpreting, tl, triton

# --------------------------------------------------------------------------------------- public API


def segment_attention(q, k, v, segments: Segments, *, softmax_scale: float | None = None, return_lse: bool = False):
    """Packed attention over the union of the keys each query's entries let it see.

    q: [Tq, Hq, D] fp16/bf16/fp32 (fp64 on the reference and torch backends);
    k, v: [Tk, Hk, D], same dtype, Hq a multiple of Hk (GQA: query head h reads kv head
    h // (Hq // Hk)); Tq = Tk = T for one packed sequence.
    segments: `Segments` table over those token positions (see _segments.py).
    softmax_scale: defaults to 1 / sqrt(D).
    Returns out [Tq, Hq, D] in q's dtype (0 for a query that sees no key), and with
    return_lse also lse [Hq, Tq] fp32 (natural log, -inf for such a query).
    D may be any size up to 256; the Triton kernels pad it to the next power of 2.
    """
    _check_qkv(q, k, v)
    if not isinstance(segments, Segments):
        raise TypeError(f"segments must be a fastrft_kernels.Segments, got {type(segments).__name__}")
    Tq, Tk = q.shape[0], k.shape[0]
    segments.check(Tq, Tk)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    backend = resolve_backend(q.device)
    if Tq == 0 or Tk == 0:  # no query or no key: outputs 0, lse -inf, gradients 0
        zero = q[..., :0].sum(-1, keepdim=True) + k[:0].sum() + v[:0].sum()  # [Tq, Hq, 1] zeros, on the graph
        out = zero.expand_as(q).to(q.dtype)
        lse = torch.full((q.shape[1], Tq), float("-inf"), dtype=acc_dtype(q.dtype), device=q.device)
    elif backend == "reference":
        out, lse = _reference(q, k, v, segments, scale)
    elif backend == "torch":
        if not return_lse:
            return _torch_sdpa(q, k, v, segments, scale)
        out, lse = _TorchSegmentAttention.apply(q, k, v, segments, scale)
    else:
        check_kernel_dtype("q", q)
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        block_d = max(16, triton.next_power_of_2(q.shape[-1]))
        plan = segments.plan(Tq, Tk, *_blocks(q.dtype, block_d, False), q.device)
        plan_bwd = None
        if torch.is_grad_enabled():
            plan_bwd = segments.plan(Tq, Tk, *_blocks(q.dtype, block_d, True), q.device)
        out, lse = _TritonSegmentAttention.apply(q, k, v, plan, plan_bwd, scale)
    return (out, lse) if return_lse else out


def varlen_attention(
    q, k, v, cu_seqlens_q, cu_seqlens_k=None, *, max_seqlen_q=None, max_seqlen_k=None, causal=True, softmax_scale=None
):
    """flash_attn_varlen_func's semantics over `segment_attention`.

    q: [Tq, Hq, D], k/v: [Tk, Hk, D]; cu_seqlens_q / cu_seqlens_k: [S+1] int32 (k defaults
    to q's). Sequence s attends queries [cu_q[s], cu_q[s+1]) to keys [cu_k[s], cu_k[s+1]),
    causal aligned bottom-right when `causal`. max_seqlen_q / max_seqlen_k are accepted for
    signature compatibility and unused (the plan knows every length). Returns out [Tq, Hq, D].
    The table is cached per cu_seqlens tensor object (the last 8), so layers reusing one
    build it (and read it on the host) once.
    """
    _check_qkv(q, k, v)
    cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    key = (id(cu_seqlens_q), id(cu_k), bool(causal), q.shape[0], k.shape[0])
    cached = _VARLEN_CACHE.get(key)
    # the cache holds the cu tensors themselves, so an id cannot be reused while cached
    if cached is not None and cached[0] is cu_seqlens_q and cached[1] is cu_k:
        segments = cached[2]
    else:
        check_cu_seqlens(cu_seqlens_q, q.shape[0], "cu_seqlens_q")
        check_cu_seqlens(cu_k, k.shape[0], "cu_seqlens_k")
        if cu_k.numel() != cu_seqlens_q.numel():
            raise ValueError(
                f"cu_seqlens_q and cu_seqlens_k must hold the same number of sequences, got "
                f"{cu_seqlens_q.numel() - 1} and {cu_k.numel() - 1}"
            )
        if cu_k is cu_seqlens_q:
            segments = segments_from_cu_seqlens(cu_seqlens_q, causal=causal)
        else:
            cq, ck = cu_seqlens_q.detach().cpu(), cu_k.detach().cpu()
            kind = torch.full_like(cq[1:], CAUSAL if causal else 0)
            segments = Segments(torch.stack([cq[:-1], cq[1:], ck[:-1], ck[1:], kind], 1).to(torch.int32).contiguous())
        if len(_VARLEN_CACHE) >= _VARLEN_CACHE_SIZE:
            _VARLEN_CACHE.pop(next(iter(_VARLEN_CACHE)))  # oldest first
        _VARLEN_CACHE[key] = (cu_seqlens_q, cu_k, segments)
    return segment_attention(q, k, v, segments, softmax_scale=softmax_scale)


# The last few cu_seqlens pairs seen -> their tables. A model's layers call with the same
# tensors (a Qwen2.5-VL vision tower alternates two: per window and per image), so each
# table and plan is built once per forward, not once per layer.
_VARLEN_CACHE: dict = {}
_VARLEN_CACHE_SIZE = 8


# ---------------------------------------------------------------------------------- argument checks

_MAX_HEAD_DIM = 256


def _check_qkv(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, ndim=3, float_=True)
    check_same_device(q=q, k=k, v=v)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [T, Hk, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must share the head dim D, got {q.shape[2]} and {k.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"q's heads ({q.shape[1]}) must be a multiple of k's heads ({k.shape[1]}) (GQA: query head h reads "
            "kv head h // (Hq // Hk))"
        )
    if not 0 < q.shape[2] <= _MAX_HEAD_DIM:
        raise ValueError(f"the head dim D must lie in [1, {_MAX_HEAD_DIM}], got {q.shape[2]}")


# ---------------------------------------------------------------------------------------- reference


def _reference(q, k, v, segments: Segments, scale):
    """Dense [Tq, Tk] mask, float64, plain autograd. The spec."""
    Tq, Hq, D = q.shape
    Tk, Hk, _ = k.shape
    G = Hq // Hk
    mask = segments.dense_mask(Tq, Tk, device=q.device)  # [Tq, Tk]
    qf, kf, vf = q.double(), k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = torch.einsum("thd,shd->hts", qf, kf) * scale  # [Hq, Tq, Tk]
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    l = e.sum(-1, keepdim=True)  # [Hq, Tq, 1]
    out = torch.einsum("hts,shd->thd", e / l.clamp_min(1e-300), vf)
    lse = torch.where(l > 0, m + torch.log(l.clamp_min(1e-300)), torch.full_like(l, float("-inf"))).squeeze(-1)
    return out.to(q.dtype), lse.to(acc_dtype(q.dtype))


# --------------------------------------------------------------------------------------- torch path

# torch path: queries per chunk (scores [Hq, 128, span] fp32 at a time) for the lse path;
# the SDPA path (no lse asked) takes 256-query chunks: SDPA blocks internally, so a chunk
# costs only its [256, span] bool mask, and larger chunks amortize the per-call overhead.
TORCH_CHUNK = 128
SDPA_CHUNK = 256


def _chunk_mask(segments: Segments, sel: list[int], q0: int, q1: int, cols: torch.Tensor) -> torch.Tensor:
    """[q1-q0, L] bool: OR over the selected entries (the same rule as `_tile_mask`);
    cols [L] are the absolute positions of the chunk's keys.

    Cached on the Segments object: every layer of a forward and of its backward asks for the
    same masks, and rebuilding them per layer cost 63 ms of a 276 ms training phase of the
    tiny default model (2 layers, fwd + bwd) on CPU.
    """
    key = ("mask", q0, q1, tuple(sel), cols.data_ptr(), cols.shape[0], str(cols.device))
    cached = segments._cache.get(key)
    if cached is not None:
        return cached
    rows = torch.arange(q0, q1, device=cols.device)[:, None]  # [c, 1]
    cols = cols[None, :]  # [1, L]
    mask = torch.zeros(q1 - q0, cols.shape[1], dtype=torch.bool, device=cols.device)
    host = segments._host
    for e in sel:
        qs, qe, ks, ke, kind = (int(x) for x in host[e])
        m = (rows >= qs) & (rows < qe) & (cols >= ks) & (cols < ke)
        if kind == CAUSAL:
            m &= (cols - rows) <= (ke - qe)
        mask |= m
    segments._cache[key] = mask
    return mask


def _take(x: torch.Tensor, keys) -> torch.Tensor:
    """The chunk's key rows of x [T, ...]: a view for a contiguous range, a gather otherwise."""
    return x[keys[0]:keys[1]] if isinstance(keys, tuple) else x.index_select(0, keys)


def _add_at(buf: torch.Tensor, keys, val: torch.Tensor) -> None:
    if isinstance(keys, tuple):
        buf[keys[0]:keys[1]] += val
    else:
        buf.index_add_(0, keys, val)


def _torch_chunk_scores(q, k, q0, q1, keys, scale, mask):
    """Scores of one chunk, accumulation dtype, masked: [Hk, G, c, L]."""
    Hk = k.shape[1]
    acc = acc_dtype(q.dtype)
    qc = q[q0:q1].to(acc).unflatten(1, (Hk, -1))  # [c, Hk, G, D]
    kc = _take(k, keys).to(acc)  # [L, Hk, D]
    s = torch.einsum("chgd,lhd->hgcl", qc, kc) * scale  # [Hk, G, c, L]
    return s.masked_fill(~mask, float("-inf")), qc, kc


def _torch_sdpa(q, k, v, segments: Segments, scale):
    """out [Tq, Hq, D]: per chunk of up to 256 queries, SDPA over the chunk's keys with its bool mask.

    PyTorch's own SDPA kernels (flash on CPU) do the softmax blockwise and save only what
    their backward needs, so memory stays O(chunk x keys) bytes of mask. A query that sees no
    key gets an all-True mask row (no NaN from an empty softmax) and a 0 output.
    """
    Tq, Hq, D = q.shape
    Tk = k.shape[0]
    outs = []
    for q0, q1, keys, cols, sel in segments.query_chunks(Tq, Tk, SDPA_CHUNK, q.device):
        if not sel:
            outs.append(q.new_zeros(q1 - q0, Hq, D))
            continue
        mask = _chunk_mask(segments, sel, q0, q1, cols)  # [c, L]
        seen = mask.any(1)  # [c]
        o = torch.nn.functional.scaled_dot_product_attention(
            q[q0:q1].transpose(0, 1)[None],  # [1, Hq, c, D]
            _take(k, keys).transpose(0, 1)[None],  # [1, Hk, L, D]
            _take(v, keys).transpose(0, 1)[None],
            attn_mask=mask | ~seen[:, None],
            scale=scale,
            enable_gqa=True,
        )[0].transpose(0, 1)  # [c, Hq, D]
        outs.append(torch.where(seen[:, None, None], o, torch.zeros((), dtype=o.dtype, device=o.device)))
    if not outs:
        return q.new_zeros(Tq, Hq, D)
    return torch.cat(outs)


# --------------------------------------------------------------------- triton kernels and launchers

_LOG2E = 1.4426950408889634
# Tiles (BLOCK_Q, BLOCK_K) per input dtype. fp16/bf16: 64 x 64 keeps the dK/dV accumulators
# (2 x [64, 128] fp32) in registers at D = 128 with 8 warps (no spill on sm_80/sm_90, see
# aot_configs()). fp32 runs exact-fp32 dots (no tensor cores; fp32 is the test and CPU
# dtype, not the training one): 32 x 32 is what fits its FMA layouts without spilling.
_BLOCKS = {torch.float16: (64, 64), torch.bfloat16: (64, 64), torch.float32: (16, 32)}
# Backward tiles: half the query rows of the forward's. Each backward iteration holds q, dO,
# the score tile and dp at once; with 64 query rows the BD = 128 kernels spilled 32-136 B.
# The backward walks its own plan (built once, cached beside the forward's).
_BLOCKS_BWD = {torch.float16: (32, 64), torch.bfloat16: (32, 64), torch.float32: (16, 32)}


def _blocks(dtype: torch.dtype, block_d: int, backward: bool) -> tuple[int, int]:
    if backward:
        return _BLOCKS_BWD[dtype]
    if dtype == torch.float32 and block_d <= 64:
        return (32, 32)  # fits at BD = 64 (168 registers, no spill); 16 x 32 spilled 8 B on sm_80 there
    return _BLOCKS[dtype]


if HAVE_TRITON:
    from ._triton import dot, fp32_ptr, i32_ptr

    @triton.jit
    def _tile_mask(SEG, ENT, n_ent, offs_q, offs_k):
        """[BLOCK_Q, BLOCK_K] bool: OR over the q-block's entries. Entry e gives row i the key
        interval [k_start, hi_i): hi_i = k_end (full) or min(k_end, i + k_end - q_end + 1)
        (causal, bottom-right), empty for rows outside [q_start, q_end). Rows are reduced to
        [BLOCK_Q] bounds first so each element costs 2 compares and 2 logic ops per entry."""
        cols = offs_k[None, :]  # [1, BK]
        mask = (offs_q[:, None] < 0) & (cols < 0)  # [BQ, BK] all False
        for i in range(0, n_ent):
            e = tl.load(ENT + i)
            qs = tl.load(SEG + e * 5 + 0)
            qe = tl.load(SEG + e * 5 + 1)
            ks = tl.load(SEG + e * 5 + 2)
            ke = tl.load(SEG + e * 5 + 3)
            kind = tl.load(SEG + e * 5 + 4)
            hi = tl.where(kind == 0, ke, tl.minimum(ke, offs_q + (ke - qe) + 1))  # [BQ]
            hi = tl.where((offs_q >= qs) & (offs_q < qe), hi, ks)
            mask = mask | ((cols >= ks) & (cols < hi[:, None]))
        return mask

    @triton.jit
    def _segment_attention_fwd_kernel(
        Q, K, V, O, LSE: fp32_ptr,
        SEG: i32_ptr, Q_TILES: i32_ptr, Q_COUNT: i32_ptr, Q_ENT: i32_ptr, Q_ECOUNT: i32_ptr,
        Tq: tl.int32, Tk: tl.int32, qk_scale: tl.float32,
        stride_qt: tl.int32, stride_qh: tl.int32, stride_kt: tl.int32, stride_kh: tl.int32,
        stride_vt: tl.int32, stride_vh: tl.int32, stride_ot: tl.int32, stride_oh: tl.int32,
        stride_tiles: tl.int32, stride_ent: tl.int32,
        GROUP: tl.int32, HEAD_DIM: tl.int32, BLOCK_D: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        qb = tl.program_id(0)
        h = tl.program_id(1)
        hk = h // GROUP
        offs_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)  # [BQ]
        offs_d = tl.arange(0, BLOCK_D)  # [BD]
        d_ok = offs_d < HEAD_DIM
        q_ok = offs_q < Tq
        q_ptr = Q + offs_q[:, None].to(tl.int64) * stride_qt + h * stride_qh + offs_d[None, :]
        q = tl.load(q_ptr, mask=q_ok[:, None] & d_ok[None, :], other=0.0)  # [BQ, BD]

        m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)  # running max, base-2 units
        l_i = tl.zeros([BLOCK_Q], tl.float32)
        acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
        n_tiles = tl.load(Q_COUNT + qb)
        n_ent = tl.load(Q_ECOUNT + qb)
        for t in range(0, n_tiles):
            code = tl.load(Q_TILES + qb * stride_tiles + t)
            kb = code // 2
            offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
            kv_mask = (offs_k < Tk)[:, None] & d_ok[None, :]
            k = tl.load(K + offs_k[:, None].to(tl.int64) * stride_kt + hk * stride_kh + offs_d[None, :],
                        mask=kv_mask, other=0.0)  # [BK, BD]
            v = tl.load(V + offs_k[:, None].to(tl.int64) * stride_vt + hk * stride_vh + offs_d[None, :],
                        mask=kv_mask, other=0.0)  # [BK, BD]
            s = dot(q, tl.trans(k), None, PRECISION, UPCAST) * qk_scale  # [BQ, BK]
            if code % 2 == 1:  # boundary tile: evaluate the mask
                mask = _tile_mask(SEG, Q_ENT + qb * stride_ent, n_ent, offs_q, offs_k)
                s = tl.where(mask, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row that has seen no key yet keeps m = -inf; subtract 0 there so no inf - inf
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])  # [BQ, BK]
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, None, PRECISION, UPCAST)
            m_i = m_new

        seen = l_i > 0.0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        o_ptr = O + offs_q[:, None].to(tl.int64) * stride_ot + h * stride_oh + offs_d[None, :]
        tl.store(o_ptr, out.to(O.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])
        tl.store(LSE + h.to(tl.int64) * Tq + offs_q, lse, mask=q_ok)

    @triton.jit
    def _segment_attention_bwd_dkdv_kernel(
        Q, K, V, DO, LSE: fp32_ptr, DELTA: fp32_ptr, DK, DV,
        SEG: i32_ptr, K_TILES: i32_ptr, K_COUNT: i32_ptr, Q_ENT: i32_ptr, Q_ECOUNT: i32_ptr,
        Tq: tl.int32, Tk: tl.int32, qk_scale: tl.float32, sm_scale: tl.float32,
        stride_qt: tl.int32, stride_qh: tl.int32, stride_kt: tl.int32, stride_kh: tl.int32,
        stride_vt: tl.int32, stride_vh: tl.int32, stride_dot: tl.int32, stride_doh: tl.int32,
        stride_dkt: tl.int32, stride_dkh: tl.int32, stride_dvt: tl.int32, stride_dvh: tl.int32,
        stride_tiles: tl.int32, stride_ent: tl.int32,
        GROUP: tl.int32, HEAD_DIM: tl.int32, BLOCK_D: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        kb = tl.program_id(0)
        hk = tl.program_id(1)
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        k_ok = offs_k < Tk
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(K + offs_k[:, None].to(tl.int64) * stride_kt + hk * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)  # [BK, BD]
        v = tl.load(V + offs_k[:, None].to(tl.int64) * stride_vt + hk * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)  # [BK, BD]
        dk = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
        n_tiles = tl.load(K_COUNT + kb)
        for g in range(0, GROUP):  # the GQA group's query heads, summed here: no atomics
            h = hk * GROUP + g
            for t in range(0, n_tiles):
                code = tl.load(K_TILES + kb * stride_tiles + t)
                qb = code // 2
                offs_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)  # [BQ]
                q_ok = offs_q < Tq
                qd_mask = q_ok[:, None] & d_ok[None, :]
                q = tl.load(Q + offs_q[:, None].to(tl.int64) * stride_qt + h * stride_qh + offs_d[None, :],
                            mask=qd_mask, other=0.0)  # [BQ, BD]
                do = tl.load(DO + offs_q[:, None].to(tl.int64) * stride_dot + h * stride_doh + offs_d[None, :],
                             mask=qd_mask, other=0.0)  # [BQ, BD]
                lse2 = tl.load(LSE + h.to(tl.int64) * Tq + offs_q, mask=q_ok, other=0.0) * 1.4426950408889634
                delta = tl.load(DELTA + h.to(tl.int64) * Tq + offs_q, mask=q_ok, other=0.0)  # [BQ]
                s = dot(q, tl.trans(k), None, PRECISION, UPCAST) * qk_scale  # [BQ, BK]
                p = tl.math.exp2(s - lse2[:, None])
                if code % 2 == 1:
                    n_ent = tl.load(Q_ECOUNT + qb)
                    mask = _tile_mask(SEG, Q_ENT + qb * stride_ent, n_ent, offs_q, offs_k)
                    p = tl.where(mask, p, 0.0)
                dv += dot(tl.trans(p.to(do.dtype)), do, None, PRECISION, UPCAST)
                dp = dot(do, tl.trans(v), None, PRECISION, UPCAST)  # [BQ, BK]
                ds = p * (dp - delta[:, None])
                dk += dot(tl.trans(ds.to(q.dtype)), q, None, PRECISION, UPCAST)
        dk = dk * sm_scale
        tl.store(DK + offs_k[:, None].to(tl.int64) * stride_dkt + hk * stride_dkh + offs_d[None, :],
                 dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + offs_k[:, None].to(tl.int64) * stride_dvt + hk * stride_dvh + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _segment_attention_bwd_dq_kernel(
        Q, K, V, DO, LSE: fp32_ptr, DELTA: fp32_ptr, DQ,
        SEG: i32_ptr, Q_TILES: i32_ptr, Q_COUNT: i32_ptr, Q_ENT: i32_ptr, Q_ECOUNT: i32_ptr,
        Tq: tl.int32, Tk: tl.int32, qk_scale: tl.float32, sm_scale: tl.float32,
        stride_qt: tl.int32, stride_qh: tl.int32, stride_kt: tl.int32, stride_kh: tl.int32,
        stride_vt: tl.int32, stride_vh: tl.int32, stride_dot: tl.int32, stride_doh: tl.int32,
        stride_dqt: tl.int32, stride_dqh: tl.int32,
        stride_tiles: tl.int32, stride_ent: tl.int32,
        GROUP: tl.int32, HEAD_DIM: tl.int32, BLOCK_D: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        qb = tl.program_id(0)
        h = tl.program_id(1)
        hk = h // GROUP
        offs_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        q_ok = offs_q < Tq
        qd_mask = q_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + offs_q[:, None].to(tl.int64) * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=qd_mask, other=0.0)  # [BQ, BD]
        do = tl.load(DO + offs_q[:, None].to(tl.int64) * stride_dot + h * stride_doh + offs_d[None, :],
                     mask=qd_mask, other=0.0)  # [BQ, BD]
        lse2 = tl.load(LSE + h.to(tl.int64) * Tq + offs_q, mask=q_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + h.to(tl.int64) * Tq + offs_q, mask=q_ok, other=0.0)
        dq = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
        n_tiles = tl.load(Q_COUNT + qb)
        n_ent = tl.load(Q_ECOUNT + qb)
        for t in range(0, n_tiles):
            code = tl.load(Q_TILES + qb * stride_tiles + t)
            kb = code // 2
            offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            kv_mask = (offs_k < Tk)[:, None] & d_ok[None, :]
            k = tl.load(K + offs_k[:, None].to(tl.int64) * stride_kt + hk * stride_kh + offs_d[None, :],
                        mask=kv_mask, other=0.0)  # [BK, BD]
            v = tl.load(V + offs_k[:, None].to(tl.int64) * stride_vt + hk * stride_vh + offs_d[None, :],
                        mask=kv_mask, other=0.0)  # [BK, BD]
            s = dot(q, tl.trans(k), None, PRECISION, UPCAST) * qk_scale  # [BQ, BK]
            p = tl.math.exp2(s - lse2[:, None])
            if code % 2 == 1:
                mask = _tile_mask(SEG, Q_ENT + qb * stride_ent, n_ent, offs_q, offs_k)
                p = tl.where(mask, p, 0.0)
            dp = dot(do, tl.trans(v), None, PRECISION, UPCAST)  # [BQ, BK]
            ds = p * (dp - delta[:, None])
            dq += dot(ds.to(k.dtype), k, None, PRECISION, UPCAST)
        dq = dq * sm_scale
        tl.store(DQ + offs_q[:, None].to(tl.int64) * stride_dqt + h * stride_dqh + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=qd_mask)


# Backward: one stage (no software pipelining of the q-tile loads): at two stages the
# in-flight q/dO tiles pushed the BD = 128 kernels past 255 registers (56-60 B spilled).
_STAGES_BWD = 1


def _launch_meta(q: torch.Tensor, backward: bool = False) -> dict:
    block_d = max(16, triton.next_power_of_2(q.shape[-1]))
    bq, bk = _blocks(q.dtype, block_d, backward)
    return dict(
        BLOCK_D=block_d,
        BLOCK_Q=bq,
        BLOCK_K=bk,
        **dot_flags(q.dtype, _precision(q.dtype)),
    )


def _precision(dtype) -> str:
    # fp32 inputs are held to 1e-5 relative error: tf32 (10-bit mantissa) would give ~1e-3;
    # half dtypes ignore it
    return "ieee" if dtype == torch.float32 else "tf32"


def _warps(kernel: str, block_d: int, dtype=torch.bfloat16) -> int:
    # At BD = 128 a [64, 128] fp32 accumulator is 64 registers per thread with 4 warps; the
    # fwd tile adds q, k, v and two [64, 64] score tiles: 8 warps halve all of that. The
    # backward holds two more tiles (dO, dp) and spilled 8-112 B at 4 warps even at BD = 64.
    if dtype == torch.float32:
        return 4
    return 8 if (block_d >= 128 or kernel != "fwd") else 4


def _triton_forward(q, k, v, plan, scale):
    Tq, Hq, D = q.shape
    Tk, Hk, _ = k.shape
    out = torch.empty_like(q)  # [Tq, Hq, D]
    lse = torch.empty(Hq, Tq, dtype=torch.float32, device=q.device)  # [Hq, Tq]
    if interpreting():  # poison: a row the kernel forgets to write shows up as NaN in tests
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
    meta = _launch_meta(q)
    grid = (plan.n_qblocks, Hq)
    _segment_attention_fwd_kernel[grid](
        q, k, v, out, lse,
        plan.table, plan.q_tiles, plan.q_count, plan.q_entries, plan.q_ecount,
        Tq, Tk, scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        plan.q_tiles.stride(0), plan.q_entries.stride(0),
        Hq // Hk, D, **meta, num_warps=_warps("fwd", meta["BLOCK_D"], q.dtype), num_stages=2,
    )
    return out, lse


def _triton_backward(q, k, v, out, lse, dout, dlse, plan, scale):
    Tq, Hq, D = q.shape
    Tk, Hk, _ = k.shape
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    # delta_i = sum_d dO * O (minus dlse: d lse_i / d s_ij = p_ij folds into the same term)
    delta = (dout.float() * out.float()).sum(-1).transpose(0, 1).contiguous()  # [Hq, Tq]
    if dlse is not None:
        delta = delta - dlse.float()
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if interpreting():
        for x in (dq, dk, dv):
            x.fill_(float("nan"))
    meta = _launch_meta(q, backward=True)
    _segment_attention_bwd_dkdv_kernel[(plan.n_kblocks, Hk)](
        q, k, v, dout, lse, delta, dk, dv,
        plan.table, plan.k_tiles, plan.k_count, plan.q_entries, plan.q_ecount,
        Tq, Tk, scale * _LOG2E, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        plan.k_tiles.stride(0), plan.q_entries.stride(0),
        Hq // Hk, D, **meta, num_warps=_warps("dkdv", meta["BLOCK_D"], q.dtype), num_stages=_STAGES_BWD,
    )
    _segment_attention_bwd_dq_kernel[(plan.n_qblocks, Hq)](
        q, k, v, dout, lse, delta, dq,
        plan.table, plan.q_tiles, plan.q_count, plan.q_entries, plan.q_ecount,
        Tq, Tk, scale * _LOG2E, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1),
        dq.stride(0), dq.stride(1),
        plan.q_tiles.stride(0), plan.q_entries.stride(0),
        Hq // Hk, D, **meta, num_warps=_warps("dq", meta["BLOCK_D"], q.dtype), num_stages=_STAGES_BWD,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------- autograd


class _TorchSegmentAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, segments, scale):
        Tq, Hq, D = q.shape
        Tk, Hk, _ = k.shape
        out = torch.zeros(Tq, Hq, D, dtype=q.dtype, device=q.device)  # rows of no entry stay 0
        acc = acc_dtype(q.dtype)
        lse = torch.full((Hq, Tq), float("-inf"), dtype=acc, device=q.device)
        for q0, q1, keys, cols, sel in segments.query_chunks(Tq, Tk, TORCH_CHUNK, q.device):
            if not sel:
                continue
            mask = _chunk_mask(segments, sel, q0, q1, cols)  # [c, L]
            s, _, _ = _torch_chunk_scores(q, k, q0, q1, keys, scale, mask)
            m = s.amax(-1, keepdim=True)  # [Hk, G, c, 1]
            m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
            p = torch.exp(s - m)
            l = p.sum(-1, keepdim=True)  # [Hk, G, c, 1]
            vc = _take(v, keys).to(acc)  # [L, Hk, D]
            o = torch.einsum("hgcl,lhd->chgd", p / l.clamp_min(1e-30), vc)  # [c, Hk, G, D]
            out[q0:q1] = o.flatten(1, 2).to(q.dtype)
            lse[:, q0:q1] = (m + torch.log(l)).squeeze(-1).flatten(0, 1)  # log(0) = -inf: no key seen
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.segments, ctx.scale = segments, scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        segments, scale = ctx.segments, ctx.scale
        Tq, Hq, D = q.shape
        Tk, Hk, _ = k.shape
        G = Hq // Hk
        if dout is None:
            dout = torch.zeros_like(out)
        acc = acc_dtype(q.dtype)
        delta = (dout.to(acc) * out.to(acc)).sum(-1).transpose(0, 1)  # [Hq, Tq]
        if dlse is not None:
            delta = delta - dlse.to(acc)
        dq = torch.zeros(Tq, Hq, D, dtype=acc, device=q.device)
        dk = torch.zeros(Tk, Hk, D, dtype=acc, device=q.device)
        dv = torch.zeros(Tk, Hk, D, dtype=acc, device=q.device)
        for q0, q1, keys, cols, sel in segments.query_chunks(Tq, Tk, TORCH_CHUNK, q.device):
            if not sel:
                continue
            mask = _chunk_mask(segments, sel, q0, q1, cols)
            s, qc, kc = _torch_chunk_scores(q, k, q0, q1, keys, scale, mask)
            lse_c = lse[:, q0:q1].reshape(Hk, G, -1, 1)  # [Hk, G, c, 1]
            lse_c = torch.where(torch.isinf(lse_c), torch.zeros_like(lse_c), lse_c)
            p = torch.exp(s - lse_c)  # masked entries: exp(-inf) = 0
            vc = _take(v, keys).to(acc)
            doc = dout[q0:q1].to(acc).unflatten(1, (Hk, G))  # [c, Hk, G, D]
            _add_at(dv, keys, torch.einsum("hgcl,chgd->lhd", p, doc))
            dp = torch.einsum("chgd,lhd->hgcl", doc, vc)
            ds = p * (dp - delta[:, q0:q1].reshape(Hk, G, -1, 1))  # [Hk, G, c, L]
            dq[q0:q1] = (torch.einsum("hgcl,lhd->chgd", ds, kc) * scale).flatten(1, 2)
            _add_at(dk, keys, torch.einsum("hgcl,chgd->lhd", ds, qc) * scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


class _TritonSegmentAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, plan_bwd, scale):
        out, lse = _triton_forward(q, k, v, plan, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan_bwd, scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _triton_backward(q, k, v, out, lse, dout, dlse, ctx.plan, ctx.scale)
        return dq, dk, dv, None, None, None


# ------------------------------------------------------------------------------- AOT configurations


def aot_configs():
    """Every shipped configuration: 3 kernels x 3 dtypes x BLOCK_D 64 (D = 64) and 128
    (D = 72, 80, 96, 128: the head dim is a runtime argument, padded inside the kernel)."""
    from .aot import AOTKernel

    out = []
    for dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for block_d in (64, 128):
            for fn, which in ((_segment_attention_fwd_kernel, "fwd"), (_segment_attention_bwd_dkdv_kernel, "dkdv"),
                              (_segment_attention_bwd_dq_kernel, "dq")):
                bq, bk = _blocks(dtype, block_d, which != "fwd")
                constexprs = dict(BLOCK_D=block_d, BLOCK_Q=bq, BLOCK_K=bk, PRECISION=_precision(dtype), UPCAST=False)
                out.append(AOTKernel(fn, name, constexprs, num_warps=_warps(which, block_d, dtype),
                                     num_stages=2 if which == "fwd" else _STAGES_BWD))
    return out
