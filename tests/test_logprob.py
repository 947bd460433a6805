"""logprob (given logits): triton (interpreter) and torch paths against the float64 reference."""

import pytest
import torch

from fastrft_kernels import logprob, use_backend

N, V = 13, 131  # V: a multiple of no block size (interpreter block 32)
IGNORED = [2, 7]


def _run(backend, logits, targets, temperature, g_lp, g_ent):
    z = logits.detach().clone().requires_grad_()
    with use_backend(backend):
        logp, ent = logprob(z, targets, temperature=temperature, return_entropy=True)
    (logp.double() * g_lp + ent.double() * g_ent).sum().backward()
    return [logp.detach().double(), ent.detach().double(), z.grad.double()]


def _rel(a, r):
    return ((a - r).abs().max() / r.abs().max()).item()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference(backend, dtype):
    logits = (torch.randn(N, V, dtype=torch.float64) * 3).to(dtype)
    targets = torch.randint(0, V, (N,))
    targets[IGNORED] = -100
    g_lp, g_ent = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    ref = _run("reference", logits.double(), targets, 0.7, g_lp, g_ent)
    got = _run(backend, logits, targets, 0.7, g_lp, g_ent)
    assert (got[0][IGNORED] == 0).all() and (got[1][IGNORED] == 0).all() and (got[2][IGNORED] == 0).all()
    if dtype == torch.float32:
        for a, r in zip(got, ref):
            assert _rel(a, r) <= 1e-5
    else:
        # the logits are exact in both, so logp and entropy carry fp32 error only (bound: the fp32
        # criterion); the gradient is stored in the logits' dtype: twice plain PyTorch's error,
        # or one rounding of that dtype (plain PyTorch may land nearer by luck)
        plain = _run("reference", logits, targets, 0.7, g_lp, g_ent)
        floors = [1e-5, 1e-5, torch.finfo(dtype).eps]
        for a, p, r, floor in zip(got, plain, ref, floors):
            assert _rel(a, r) <= max(2 * _rel(p, r), floor)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("temperature", [0.1, 10.0])
def test_huge_logits_finite(backend, temperature):
    logits = torch.randn(N, V, dtype=torch.float64) * 1e4
    targets = torch.randint(0, V, (N,))
    g = torch.randn(N, dtype=torch.float64)
    got = _run(backend, logits.float(), targets, temperature, g, g)
    ref = _run("reference", logits, targets, temperature, g, g)
    assert all(torch.isfinite(x).all() for x in got)
    assert (got[0] <= 0).all() and (got[1] >= 0).all()
    scale = 4e4 / temperature
    assert (got[0] - ref[0]).abs().max() <= 1e-6 * scale and (got[1] - ref[1]).abs().max() <= 1e-6 * scale


def test_logp_only_and_bad_arguments():
    logits = torch.randn(4, 10)
    targets = torch.tensor([1, -100, 9, 0])
    with use_backend("triton"):
        lp = logprob(logits, targets)
    ref = torch.log_softmax(logits.double(), -1)[torch.arange(4), targets.clamp_min(0)]
    assert torch.allclose(lp.double(), torch.where(targets != -100, ref, 0.0), atol=1e-6)
    with pytest.raises(ValueError, match="targets"):
        logprob(logits, torch.tensor([1, 2, 10, 0]))
    with pytest.raises(TypeError, match="logits"):
        logprob(logits.long(), targets)
    with pytest.raises(ValueError, match="temperature"):
        logprob(logits, targets, temperature=-1.0)
    with pytest.raises(ValueError, match="device"):
        logprob(logits, targets.to("meta"))
