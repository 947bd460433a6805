"""segment_attention / varlen_attention: triton (interpreter) and torch against the float64 reference.

Tolerances: fp32 relative error <= 1e-5 against float64 (forward and every gradient);
fp16/bf16 at most twice the error of plain PyTorch attention run at that dtype (dense
mask, matmuls in the dtype, softmax in fp32 then cast, as transformers' eager path).
Measured here (triton / plain): bf16 out 4.4e-3 / 3.8e-3, dq 6.4e-3 / 3.6e-3; fp16 out
2.3e-4 / 4.5e-4: the bound holds with margin 1.1-1.8x and no floor.
"""

import math

import pytest
import torch

from fastrft_kernels import (
    Segments,
    bidirectional_span_segments,
    segment_attention,
    segments_from_cu_seqlens,
    shared_prefix_segments,
    use_backend,
    varlen_attention,
)


def _tables():
    return {
        # odd prompt lengths, an empty completion, G different per group
        "shared_prefix": shared_prefix_segments([37, 50], [[20, 0, 51, 3], [36]]),
        # documents with an empty one, vision-style full attention
        "docs_full": segments_from_cu_seqlens(torch.tensor([0, 45, 45, 130, 197], dtype=torch.int32), causal=False),
        "docs_causal": segments_from_cu_seqlens(torch.tensor([0, 1, 66, 66, 197], dtype=torch.int32)),
        "spans": bidirectional_span_segments(torch.tensor([0, 120, 197], dtype=torch.int32), [(7, 71), (125, 190)]),
        # hand-made: overlapping key ranges (dedup), causal with k shorter than q (rows that
        # see nothing), queries [180, 197) in no entry, an empty entry
        "mixed": Segments.from_entries(
            [
                (0, 60, 0, 60, "causal"),
                (40, 100, 10, 70, "full"),
                (60, 130, 60, 100, "causal"),
                (100, 180, 50, 180, "causal"),
                (100, 180, 120, 140, "full"),
                (150, 150, 0, 10, "full"),
            ]
        ),
    }


T = 197
TABLES = _tables()


def _inputs(Hq, Hk, D, dtype, seed=0):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)  # CUDA under FASTRFT_TEST_DEVICE=cuda
    q = torch.randn(T, Hq, D, generator=g).to(dtype)
    k = torch.randn(T, Hk, D, generator=g).to(dtype)
    v = torch.randn(T, Hk, D, generator=g).to(dtype)
    do = torch.randn(T, Hq, D, generator=g).to(dtype)
    dlse = torch.randn(Hq, T, generator=g)
    return q, k, v, do, dlse


def _run(backend, q, k, v, do, dlse, segments, use_lse=True):
    """out, lse, dq, dk, dv (float64) for loss = <out, do> + <lse, dlse> (finite lse only).
    With use_lse=False the op runs without return_lse (the torch backend's SDPA path) and
    lse comes back as None."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    with use_backend(backend):
        if use_lse:
            out, lse = segment_attention(q, k, v, segments, return_lse=True)
        else:
            out, lse = segment_attention(q, k, v, segments), None
    loss = (out.double() * do.double()).sum()
    if use_lse:
        loss = loss + torch.where(torch.isfinite(lse), lse.double() * dlse.double(), 0.0).sum()
    loss.backward()
    return [None if x is None else x.detach().double() for x in (out, lse, q.grad, k.grad, v.grad)]


def _plain(q, k, v, do, dlse, segments, use_lse=True):
    """Plain PyTorch attention at the input dtype (the baseline the 2x bound refers to)."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    G = q.shape[1] // k.shape[1]
    mask = segments.dense_mask(T)
    s = torch.einsum("thd,shd->hts", q, k.repeat_interleave(G, 1)) * (q.shape[-1] ** -0.5)
    s = s.float().masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0).to(q.dtype)
    out = torch.einsum("hts,shd->thd", p, v.repeat_interleave(G, 1))
    loss = (out.double() * do.double()).sum()
    if use_lse:
        loss = loss + torch.where(torch.isfinite(lse), lse.double() * dlse.double(), 0.0).sum()
    loss.backward()
    return [x.detach().double() for x in (out, lse, q.grad, k.grad, v.grad)]


def _rel(a, ref):
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(a)), "-inf lse rows differ"
    return ((a - ref)[finite].norm() / ref[finite].norm().clamp_min(1e-30)).item()


NAMES = ("out", "lse", "dq", "dk", "dv")


def _check(backend, table, Hq, Hk, D, dtype, use_lse=True):
    segments = TABLES[table]
    q, k, v, do, dlse = _inputs(Hq, Hk, D, dtype)
    ref = _run("reference", q.double(), k.double(), v.double(), do, dlse, segments, use_lse)
    got = _run(backend, q, k, v, do, dlse, segments, use_lse)
    # rows in no entry: output exactly 0, lse -inf, no gradient
    none = ~segments.dense_mask(T).any(1)
    if none.any():
        assert torch.all(got[0][none] == 0) and torch.all(got[2][none] == 0)
        assert not use_lse or torch.all(torch.isneginf(got[1][:, none]))
    checked = [(n, a, r) for n, a, r in zip(NAMES, got, ref) if r is not None]
    assert len(checked) == (5 if use_lse else 4)
    if dtype == torch.float32:
        for name, a, r in checked:
            assert _rel(a, r) <= 1e-5, f"{name}: rel err {_rel(a, r):.2e}"
    else:
        base = _plain(q, k, v, do, dlse, segments, use_lse)
        for name, a, b, r in zip(NAMES, got, base, ref):
            if r is None:
                continue
            err, err_plain = _rel(a, r), _rel(b, r)
            assert err <= 2 * err_plain, f"{name}: rel err {err:.2e} vs plain {dtype} {err_plain:.2e}"


# Triton under the interpreter costs ~1-4 s per case: each case below covers a different
# table, GQA ratio, head dim (non-powers of 2 included) and dtype.
@pytest.mark.parametrize(
    "table,Hq,Hk,D,dtype",
    [
        ("shared_prefix", 4, 1, 72, torch.float32),
        ("mixed", 4, 2, 80, torch.float32),
        ("spans", 2, 2, 128, torch.bfloat16),
        ("docs_causal", 4, 2, 96, torch.float16),
        ("shared_prefix", 2, 1, 64, torch.bfloat16),
        ("docs_full", 2, 1, 80, torch.float16),
    ],
)
def test_triton_matches_reference(table, Hq, Hk, D, dtype):
    _check("triton", table, Hq, Hk, D, dtype)


@pytest.mark.parametrize("use_lse", [True, False], ids=["lse_path", "sdpa_path"])
@pytest.mark.parametrize("table", sorted(TABLES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_matches_reference(table, dtype, use_lse):
    Hq, Hk = {torch.float32: (4, 1), torch.bfloat16: (2, 1), torch.float16: (2, 2)}[dtype]
    _check("torch", table, Hq, Hk, 72 if dtype == torch.float32 else 64, dtype, use_lse)


def test_triton_backward_is_deterministic():
    segments = TABLES["mixed"]
    q, k, v, do, dlse = _inputs(4, 2, 64, torch.bfloat16, seed=1)
    a = _run("triton", q, k, v, do, dlse, segments)
    b = _run("triton", q, k, v, do, dlse, segments)
    for name, x, y in zip(NAMES, a, b):
        assert torch.equal(x, y), name


def test_varlen_matches_flash_semantics_with_different_q_and_k_lengths():
    # cross attention per sequence, causal bottom-right: sequence 1 has 3 queries over 9 keys
    cu_q = torch.tensor([0, 5, 8, 8, 20], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 13, 15, 26], dtype=torch.int32)
    g = torch.Generator(torch.get_default_device()).manual_seed(3)
    q = torch.randn(20, 4, 64, generator=g, dtype=torch.float64)
    k = torch.randn(26, 2, 64, generator=g, dtype=torch.float64)
    v = torch.randn(26, 2, 64, generator=g, dtype=torch.float64)
    with use_backend("torch"):
        out = varlen_attention(q, k, v, cu_q, cu_k, max_seqlen_q=12, max_seqlen_k=11, causal=True)
    expect = torch.zeros_like(q)
    for s in range(4):
        q0, q1, k0, k1 = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        lq, lk = q1 - q0, k1 - k0
        if lq == 0:
            continue
        sc = torch.einsum("thd,shd->hts", q[q0:q1], k[k0:k1].repeat_interleave(2, 1)) / 8.0
        allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)  # bottom-right
        p = torch.softmax(sc.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)  # a query with no key: 0
        expect[q0:q1] = torch.einsum("hts,shd->thd", p, v[k0:k1].repeat_interleave(2, 1))
    assert torch.allclose(out, expect, rtol=1e-10, atol=1e-12)
    with use_backend("triton"):
        out32 = varlen_attention(q.float(), k.float(), v.float(), cu_q, cu_k, causal=True)
    assert (out32.double() - expect).norm() / expect.norm() < 1e-5


def test_softmax_scale_is_applied():
    segments = TABLES["docs_causal"]
    q, k, v, _, _ = _inputs(2, 1, 64, torch.float64)
    with use_backend("reference"):
        a = segment_attention(q, k, v, segments, softmax_scale=0.3)
        b = segment_attention(q * (0.3 * math.sqrt(64)), k, v, segments)
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    with use_backend("torch"):
        c = segment_attention(q, k, v, segments, softmax_scale=0.3)
    assert torch.allclose(a, c, rtol=1e-12, atol=1e-12)


def test_bad_arguments_name_what_is_wrong():
    seg = TABLES["docs_causal"]
    q, k, v, _, _ = _inputs(4, 2, 64, torch.float32)
    with pytest.raises(TypeError, match="segments must be a fastrft_kernels.Segments"):
        segment_attention(q, k, v, seg.table)
    with pytest.raises(ValueError, match="multiple of k's heads"):
        segment_attention(q[:, :3], k, v, seg)
    with pytest.raises(TypeError, match="share one dtype"):
        segment_attention(q, k.half(), v, seg)
    with pytest.raises(ValueError, match="q must be 3-D"):
        segment_attention(q[0], k, v, seg)
    with pytest.raises(ValueError, match="beyond the number of query tokens"):
        segment_attention(q[:100], k[:100], v[:100], seg)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        segment_attention(q, k, v[:, :1], seg)
    with pytest.raises(ValueError, match="cu_seqlens_q must end at the number of tokens"):
        varlen_attention(q, k, v, torch.tensor([0, 10], dtype=torch.int32))
    with pytest.raises(TypeError, match="cu_seqlens_q must have dtype torch.int32"):
        varlen_attention(q, k, v, torch.tensor([0, T]))


def test_aot_configs_cover_every_dtype_and_head_dim_padding():
    from fastrft_kernels import _segment_attention as mod
    from fastrft_kernels.aot import AOTKernel

    configs = mod.aot_configs()
    assert all(isinstance(c, AOTKernel) for c in configs)
    names = {c.name.split("[")[0] for c in configs}
    assert names == {
        "_segment_attention_fwd_kernel", "_segment_attention_bwd_dkdv_kernel", "_segment_attention_bwd_dq_kernel"
    }
    for ty in ("fp16", "bf16", "fp32"):
        for bd in (64, 128):  # D = 64 -> 64; D = 72, 80, 96, 128 -> 128
            assert sum(c.name.split("[")[1].startswith(f"{ty},BLOCK_D={bd},") for c in configs) == 3
    for c in configs:  # every constexpr has a value, every runtime parameter a type
        assert set(c.signature) == set(c.fn.arg_names), c.name
        assert {p for p, t in c.signature.items() if t == "constexpr"} == set(c.constexprs), c.name


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_table_with_no_entries_gives_zeros_and_no_gradient(backend):
    seg = Segments.from_entries([])
    q, k, v, do, _ = _inputs(2, 1, 64, torch.float32)
    q, k, v = (x[:40].clone().requires_grad_() for x in (q, k, v))
    with use_backend(backend):
        out, lse = segment_attention(q, k, v, seg, return_lse=True)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    out.backward(do[:40])
    for x in (q, k, v):
        assert torch.all(x.grad == 0)
