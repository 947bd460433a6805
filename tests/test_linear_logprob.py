"""linear_logprob: triton (interpreter) and torch paths against the float64 reference."""


import pytest
import torch

from fastrft_kernels import _linear_logprob as llp  # the op's module (private; tests reach its internals)
from fastrft_kernels import linear_logprob, use_backend

N, H, V = 37, 45, 131  # multiples of no block size (interpreter blocks 16 / 32 / 16, vocab split 64)
IGNORED = [0, 5, 6, 30]


def _inputs(dtype, n=N, h=H, v=V, scale=1.0):
    hidden = torch.randn(n, h, dtype=torch.float64)
    weight = torch.randn(v, h, dtype=torch.float64) * (scale / h**0.5) * 3
    bias = torch.randn(v, dtype=torch.float64)
    targets = torch.randint(0, v, (n,))
    targets[[i for i in IGNORED if i < n]] = -100
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), targets


def _run(backend, hidden, weight, bias, targets, temperature, g_lp, g_ent, **kw):
    """Forward + backward of sum(g_lp * logp + g_ent * entropy): outputs and every gradient, float64."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    with use_backend(backend):
        logp, ent = linear_logprob(h, w, targets, bias=b, temperature=temperature, return_entropy=True, **kw)
    (logp.double() * g_lp + ent.double() * g_ent).sum().backward()
    out = [logp, ent, h.grad, w.grad] + ([b.grad] if b is not None else [])
    return [x.detach().double() for x in out]


def _rel(a, ref):
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference_every_output_and_gradient(backend, dtype):
    hidden, weight, bias, targets = _inputs(dtype)
    g_lp, g_ent = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    ref = _run("reference", hidden.double(), weight.double(), bias.double(), targets, 0.7, g_lp, g_ent)
    got = _run(backend, hidden, weight, bias, targets, 0.7, g_lp, g_ent)
    names = ["logp", "entropy", "d_hidden", "d_weight", "d_bias"]
    for name, a in zip(names, got):
        assert torch.isfinite(a).all(), name
    assert (got[0][IGNORED] == 0).all() and (got[1][IGNORED] == 0).all()  # both outputs 0 at ignored rows
    assert (got[2][IGNORED] == 0).all()  # ignored rows get no gradient
    if dtype == torch.float32:
        for name, a, r in zip(names, got, ref):
            assert _rel(a, r) <= 1e-5, (name, _rel(a, r))
    else:  # at most twice the error of plain PyTorch at this dtype (logits in dtype, fp32 log_softmax)
        plain = _run("reference", hidden, weight, bias, targets, 0.7, g_lp, g_ent)
        for name, a, p, r in zip(names, got, plain, ref):
            assert _rel(a, r) <= 2 * _rel(p, r) + 1e-6, (name, _rel(a, r), _rel(p, r))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_bias_even_h_and_logp_only_gradient(backend):
    # H = 48 takes the unmasked (EVEN_H) kernel variant; entropy unused -> no entropy term in pass B
    hidden, weight, _, targets = _inputs(torch.float32, n=21, h=48, v=70)
    ref_h = hidden.double().requires_grad_()
    ref_w = weight.double().requires_grad_()
    with use_backend("reference"):
        (linear_logprob(ref_h, ref_w, targets, temperature=1.3) * torch.arange(21)).sum().backward()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with use_backend(backend):
        lp = linear_logprob(h, w, targets, temperature=1.3)
    (lp * torch.arange(21)).sum().backward()
    assert _rel(h.grad.double(), ref_h.grad) <= 1e-5 and _rel(w.grad.double(), ref_w.grad) <= 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_rows_ignored(backend):
    hidden, weight, bias, _ = _inputs(torch.float32, n=5)
    targets = torch.full((5,), -100)
    g = torch.randn(5, dtype=torch.float64)
    got = _run(backend, hidden, weight, bias, targets, 1.0, g, g)
    for x in got:
        assert (x == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lse_reuse_gives_the_same_logp_and_gradients(backend):
    hidden, weight, bias, targets = _inputs(torch.float32)
    with use_backend(backend), torch.no_grad():
        logp_old, lse = linear_logprob(hidden, weight, targets, bias=bias, temperature=0.9, return_lse=True)
    assert lse.dtype == torch.float32 and (lse[IGNORED] == 0).all()
    g = torch.randn(N, dtype=torch.float64)
    h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    with use_backend(backend):
        logp = linear_logprob(h, w, targets, bias=b, temperature=0.9, lse=lse)
    assert torch.equal(logp, logp_old)  # same target dot product, same lse: the on-policy ratio is exactly 1
    (logp.double() * g).sum().backward()
    rh, rw, rb = (x.double().requires_grad_() for x in (hidden, weight, bias))
    with use_backend("reference"):
        (linear_logprob(rh, rw, targets, bias=rb, temperature=0.9) * g).sum().backward()
    for a, r in ((h.grad, rh.grad), (w.grad, rw.grad), (b.grad, rb.grad)):
        assert _rel(a.double(), r) <= 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("temperature", [0.1, 10.0])
def test_huge_logits_stay_finite(backend, temperature):
    hidden, weight, bias, targets = _inputs(torch.float32, n=19, v=70)
    hidden = hidden / hidden.norm(dim=1, keepdim=True)
    weight = weight / weight.norm(dim=1, keepdim=True) * 1e4  # logits of magnitude up to 1e4
    g = torch.randn(19, dtype=torch.float64)
    got = _run(backend, hidden, weight, None, targets, temperature, g, g)
    ref = _run("reference", hidden.double(), weight.double(), None, targets, temperature, g, g)
    for a in got:
        assert torch.isfinite(a).all()
    assert (got[0] <= 0).all() and (got[1] >= 0).all()
    # logp and entropy: absolute error against the lse's scale (1e4 / T), fp32 rounding
    scale = 1e4 / temperature
    assert (got[0] - ref[0]).abs().max() <= 1e-6 * scale
    assert (got[1] - ref[1]).abs().max() <= 1e-6 * scale


def test_batch_invariance_bitwise_torch():
    hidden, weight, bias, targets = _inputs(torch.float32, n=40)
    targets[targets == -100] = 3
    with use_backend("torch"), torch.no_grad():
        full, ent_full = linear_logprob(hidden, weight, targets, bias=bias, return_entropy=True)
        for rows in (torch.arange(3), torch.arange(17, 40), torch.tensor([39, 2, 20, 7, 11])):
            part, ent_part = linear_logprob(hidden[rows], weight, targets[rows], bias=bias, return_entropy=True)
            assert torch.equal(part, full[rows]) and torch.equal(ent_part, ent_full[rows])
        masked = targets.clone()
        masked[::2] = -100  # other rows ignored: the same tokens, the same bits
        assert torch.equal(linear_logprob(hidden, weight, masked, bias=bias)[1::2], full[1::2])


def test_batch_invariance_triton():
    # The kernels' per-row reduction order depends on H and V only (fixed blocks, fixed vocab
    # splits, fixed merge order). Under the interpreter tl.dot is numpy's matmul, whose BLAS
    # rounds a row differently with other rows beside it in the tile (a GPU's MMA does not), so
    # bits are checked where a 16-row tile holds the same rows, closeness elsewhere.
    hidden, weight, bias, targets = _inputs(torch.float32, n=40)
    targets[targets == -100] = 3
    with use_backend("triton"), torch.no_grad():
        full, ent_full = linear_logprob(hidden, weight, targets, bias=bias, return_entropy=True)
        rows = torch.arange(16, 32)  # tile 1 of the full batch is tile 0 here, in a smaller grid
        part, ent_part = linear_logprob(hidden[rows], weight, targets[rows], bias=bias, return_entropy=True)
        assert torch.equal(part, full[rows]) and torch.equal(ent_part, ent_full[rows])
        rows = torch.tensor([39, 2, 20, 7, 11])
        part, ent_part = linear_logprob(hidden[rows], weight, targets[rows], bias=bias, return_entropy=True)
        torch.testing.assert_close(part, full[rows], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ent_part, ent_full[rows], rtol=1e-6, atol=1e-6)


def test_transposed_weight_view_and_int32_targets():
    hidden, weight, bias, targets = _inputs(torch.float32, n=9, v=40)
    wt = weight.t().contiguous().t()  # same values, H not contiguous
    with use_backend("reference"):
        ref = linear_logprob(hidden, weight, targets, bias=bias)
    for backend in ("torch", "triton"):
        with use_backend(backend):
            got = linear_logprob(hidden, wt, targets.int(), bias=bias)
        assert _rel(got.double(), ref.double()) <= 1e-5


def test_torch_path_blocks_and_pads(monkeypatch):
    # 20 rows in row blocks of 16 (the second, of 4 rows, padded to 16 for batch invariance) and
    # vocab blocks of 48 (131 = 48 + 48 + 35): the online softmax crosses block edges
    monkeypatch.setattr(llp, "_TORCH_ROWS", 16)
    monkeypatch.setattr(llp, "_TORCH_VOCAB", 48)
    hidden, weight, bias, targets = _inputs(torch.float32, n=20)
    g = torch.randn(20, dtype=torch.float64)
    got = _run("torch", hidden, weight, bias, targets, 0.6, g, g)
    ref = _run("reference", hidden.double(), weight.double(), bias.double(), targets, 0.6, g, g)
    for a, r in zip(got, ref):
        assert _rel(a, r) <= 1e-5


def test_bad_arguments_name_the_argument():
    hidden, weight, bias, targets = _inputs(torch.float32, n=4, v=10)
    with pytest.raises(ValueError, match="weight"):
        linear_logprob(hidden, weight[:, :-1], targets)
    with pytest.raises(TypeError, match="weight"):
        linear_logprob(hidden, weight.double(), targets)
    with pytest.raises(TypeError, match="hidden"):
        linear_logprob(hidden.long(), weight.long(), targets)
    with pytest.raises(ValueError, match="targets"):
        linear_logprob(hidden, weight, torch.tensor([0, 1, 10, -100]))
    with pytest.raises(ValueError, match="temperature"):
        linear_logprob(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="bias"):
        linear_logprob(hidden, weight, targets, bias=bias[:-1])
    with pytest.raises(ValueError, match="lse"):
        linear_logprob(hidden, weight, targets, lse=torch.zeros(3))
    with pytest.raises(ValueError, match="device"):
        linear_logprob(hidden, weight.to("meta"), targets)
    with pytest.raises(TypeError, match="triton"), use_backend("triton"):
        linear_logprob(hidden.double(), weight.double(), targets)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_row_a_completion_row(backend):
    # M == N takes the no-copy, no-scatter path
    hidden, weight, bias, targets = _inputs(torch.float32, n=18)
    targets[targets == -100] = 7
    g_lp, g_ent = torch.randn(18, dtype=torch.float64), torch.randn(18, dtype=torch.float64)
    got = _run(backend, hidden, weight, bias, targets, 1.0, g_lp, g_ent)
    ref = _run("reference", hidden.double(), weight.double(), bias.double(), targets, 1.0, g_lp, g_ent)
    for a, r in zip(got, ref):
        assert _rel(a, r) <= 1e-5
