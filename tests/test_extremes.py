"""Every op on every backend under extreme inputs: outputs stay in range and every gradient is finite.

What must hold, whatever the input values (issue: "nothing NaN"):
- logp <= 0 and finite, entropy >= 0 and finite, at every row;
- every gradient finite, and exactly 0 at ignored rows (their values, even inf or NaN, never
  reach a valid row's output or any gradient);
- degenerate batches (no rows, no tokens, sequences with no valid token) give a finite loss and
  zero gradients;
- inputs that would silently corrupt a run (NaN or inf advantages, inf rewards) are a clear error.

Cases: logits around +-1e4 (float32 exp overflows past ~88), +-inf and NaN in ignored rows,
temperatures 0.05 and 20 (logits / T of 2e5 and 5e2), fp16 logits near its 65504 limit and
bf16 ones near 1e38.
"""


import pytest
import torch

from fastrft_kernels import (
    LossConfig,
    group_advantages,
    linear_logprob,
    linear_policy_loss,
    logprob,
    policy_loss,
    segment_attention,
    segments_from_cu_seqlens,
    shared_prefix_segments,
    use_backend,
)

BACKENDS = ("reference", "torch", "triton")
TEMPERATURES = (0.05, 1.0, 20.0)
IGNORE = -100


def _check_logp_ent(logp, ent, valid):
    assert torch.isfinite(logp).all(), "logp not finite"
    assert (logp <= 0).all(), f"logp > 0: {logp.max().item()}"
    assert (logp[~valid] == 0).all()
    if ent is not None:
        assert torch.isfinite(ent).all(), "entropy not finite"
        assert (ent >= 0).all(), f"entropy < 0: {ent.min().item()}"
        assert (ent[~valid] == 0).all()


def _check_grad(grad, ignored_rows, name):
    assert grad is not None, f"{name}: no gradient"
    bad = (~torch.isfinite(grad)).nonzero()[:4].tolist()
    assert not bad, f"{name}: gradient not finite at {bad}"
    if ignored_rows is not None:
        assert (grad[ignored_rows] == 0).all(), f"{name}: gradient at ignored rows"


def _logits_case(case, n, v, g):
    """[n, v] fp32 logits and the rows to poison (ignored) for `case`."""
    base = 3.0 * torch.randn(n, v, generator=g)
    if case == "plus_1e4":
        return 1e4 + base
    if case == "minus_1e4":
        return -1e4 + base
    if case == "spread_1e4":  # one logit at +1e4, the rest at -1e4: p = 1 and p = e^-2e4 in one row
        z = -1e4 + base
        z[torch.arange(n), torch.randint(0, v, (n,), generator=g)] = 1e4
        return z
    if case == "normal":
        return base
    raise ValueError(case)


# --------------------------------------------------------------------------------------- logprob


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,poison", [("plus_1e4", "finite"), ("minus_1e4", "inf"), ("spread_1e4", "nan"),
                                         ("plus_1e4", "-inf")])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_logprob_extreme_logits(backend, case, temperature, poison):
    g = torch.Generator().manual_seed(0)
    n, v = 23, 97
    logits = _logits_case(case, n, v, g)
    targets = torch.randint(0, v, (n,), generator=g)
    ignored = torch.tensor([0, 7, n - 1])
    targets[ignored] = IGNORE
    if poison != "finite":
        logits[ignored] = float(poison)
    logits[7, 3] = float("nan") if poison == "nan" else logits[7, 3]
    x = logits.clone().requires_grad_()
    with use_backend(backend):
        logp, ent = logprob(x, targets, temperature=temperature, return_entropy=True)
    valid = targets != IGNORE
    _check_logp_ent(logp, ent, valid)
    g_lp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    (logp * g_lp + ent * g_ent).sum().backward()
    _check_grad(x.grad, ignored, "d_logits")
    # each output alone, too (a backward with one of the two gradients absent takes another path)
    for which in ("logp", "entropy"):
        x.grad = None
        with use_backend(backend):
            logp, ent = logprob(x, targets, temperature=temperature, return_entropy=True)
        (logp if which == "logp" else ent).sum().backward()
        _check_grad(x.grad, ignored, f"d_logits via {which}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,scale", [(torch.float16, 6e4), (torch.bfloat16, 1e38)])
def test_logprob_half_near_overflow(backend, dtype, scale):
    g = torch.Generator().manual_seed(1)
    n, v = 29, 131
    logits = (scale * (1 - 0.01 * torch.rand(n, v, generator=g))).to(dtype)  # every logit near the max
    logits[:, 5] = -scale  # and one at the opposite end
    assert torch.isfinite(logits).all()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[3] = IGNORE
    x = logits.clone().requires_grad_()
    with use_backend(backend):
        logp, ent = logprob(x, targets, return_entropy=True)
    _check_logp_ent(logp, ent, targets != IGNORE)
    (logp.sum() + ent.sum()).backward()
    _check_grad(x.grad, torch.tensor([3]), "d_logits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprob_no_rows_and_all_ignored(backend):
    for n in (0, 4):
        logits = torch.randn(n, 17).requires_grad_()
        targets = torch.full((n,), IGNORE)
        with use_backend(backend):
            logp, ent = logprob(logits, targets, return_entropy=True)
        assert logp.shape == (n,) and (logp == 0).all() and (ent == 0).all()
        (logp.sum() + ent.sum()).backward()
        assert logits.grad is not None and (logits.grad == 0).all()


# -------------------------------------------------------------------------------- linear_logprob


def _head_for_logits(case, n, h, v, g):
    """hidden [n, h], weight [v, h] whose logits hidden @ weight.T are about `case`."""
    hidden = 3.0 * torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) / h**0.5
    if case == "plus_1e4":  # 1e4 + N(0, 9): a shared offset past float32's exp range
        hidden[:, 0], weight[:, 0] = 1e4, 1.0
    elif case == "spread_1e4":  # N(0, 1e8): every row spans tens of thousands
        hidden = hidden * (1e4 / 3.0)
    return hidden, weight


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,poison", [("plus_1e4", "finite"), ("spread_1e4", "inf"), ("spread_1e4", "nan")])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_linear_logprob_extreme_logits(backend, case, temperature, poison):
    g = torch.Generator().manual_seed(2)
    n, h, v = 23, 40, 97
    hidden, weight = _head_for_logits(case, n, h, v, g)
    bias = torch.randn(v, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    ignored = torch.tensor([1, 15, n - 1])
    targets[ignored] = IGNORE
    if poison != "finite":
        hidden[ignored] = float(poison)
    x, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    with use_backend(backend):
        logp, ent = linear_logprob(x, w, targets, bias=b, temperature=temperature, return_entropy=True)
    _check_logp_ent(logp, ent, targets != IGNORE)
    (logp.sum() - 0.5 * ent.sum()).backward()
    _check_grad(x.grad, ignored, "d_hidden")
    _check_grad(w.grad, None, "d_weight")
    _check_grad(b.grad, None, "d_bias")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_logprob_half_large_logits(backend, dtype):
    # logits about 3e4: inside fp16's range (65504), and e^(3e4) overflows any float
    g = torch.Generator().manual_seed(3)
    n, h, v = 21, 32, 97
    hidden = torch.full((n, h), 1.0) + 0.01 * torch.randn(n, h, generator=g)
    weight = 900.0 + 100.0 * torch.rand(v, h, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[4] = IGNORE
    x, w = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
    with use_backend(backend):
        logp, ent = linear_logprob(x, w, targets, return_entropy=True)
    _check_logp_ent(logp, ent, targets != IGNORE)
    (logp.sum() + ent.sum()).backward()
    _check_grad(x.grad, torch.tensor([4]), "d_hidden")
    _check_grad(w.grad, None, "d_weight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprob_no_rows_and_all_ignored(backend):
    for n in (0, 5):
        x = torch.randn(n, 16).requires_grad_()
        w = torch.randn(33, 16).requires_grad_()
        targets = torch.full((n,), IGNORE)
        with use_backend(backend):
            logp, ent = linear_logprob(x, w, targets, return_entropy=True)
        assert logp.shape == (n,) and (logp == 0).all() and (ent == 0).all()
        (logp.sum() + ent.sum()).backward()
        for t in (x, w):
            assert t.grad is not None and (t.grad == 0).all()


# ------------------------------------------------------------------------------------ policy_loss

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")


def _cfg(loss_type, level="token", beta=0.04):
    return LossConfig(loss_type=loss_type, importance_sampling_level=level, beta=beta, max_completion_length=16,
                      epsilon_high=5.0 if loss_type == "cispo" else 0.28)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_policy_loss_degenerate_batches(backend, loss_type, level):
    cfg = _cfg(loss_type, level)
    # (cu_seqlens, mask): no sequence; sequences with no token; every token ignored; a mixed batch
    # whose second sequence is all ignored and holds inf / NaN log-probs there
    cases = [
        ([0], []),
        ([0, 0, 0], []),
        ([0, 3, 5], [False] * 5),
        ([0, 4, 7, 9], [True, True, False, True, False, False, False, True, True]),
    ]
    for cu, mask in cases:
        T = cu[-1]
        g = torch.Generator().manual_seed(T)
        logp = -torch.rand(T, generator=g) - 0.1
        old = logp + 0.2 * torch.randn(T, generator=g)
        ref = logp + 0.2 * torch.randn(T, generator=g)
        m = torch.tensor(mask, dtype=torch.bool)
        if T == 9:  # poison the ignored tokens: they must never reach the loss
            logp[4:7], old[4:7], ref[4:7] = float("nan"), float("inf"), float("-inf")
        adv = torch.randn(len(cu) - 1, generator=g)
        x = logp.clone().requires_grad_()
        with use_backend(backend):
            loss, stats = policy_loss(x, adv, torch.tensor(cu, dtype=torch.int32), old_logp=old, ref_logp=ref,
                                      mask=m, config=cfg)
        assert torch.isfinite(loss), (cu, loss)
        loss.backward()
        _check_grad(x.grad, ~m if T else None, f"d_logp {cu}")
        if T == 0 or not m.any():
            assert loss.item() == 0.0 and (x.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_policy_loss_refuses_non_finite_advantages(backend, bad):
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    adv = torch.tensor([0.5, bad])
    with use_backend(backend), pytest.raises(ValueError, match="advantages must be finite"):
        policy_loss(-torch.rand(7), adv, cu, config=_cfg("dapo", beta=0.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_linear_policy_loss_extremes(backend, temperature):
    g = torch.Generator().manual_seed(4)
    n, h, v = 29, 24, 67
    hidden, weight = _head_for_logits("spread_1e4", n, h, v, g)
    targets = torch.randint(0, v, (n,), generator=g)
    ignored = torch.tensor([0, 9, 10, 11, 28])  # sequence 1 (rows 9-11) is all ignored
    targets[ignored] = IGNORE
    hidden[ignored] = float("nan")
    cu = torch.tensor([0, 9, 12, 20, 29], dtype=torch.int32)
    adv = torch.randn(4, generator=g)
    with torch.no_grad(), use_backend("reference"):
        ref_logp = linear_logprob(torch.nan_to_num(hidden), weight, targets, temperature=temperature) - 0.1
    cfg = LossConfig(loss_type="grpo", beta=0.04, temperature=temperature, top_entropy_quantile=0.5)
    x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with use_backend(backend):
        loss, stats = linear_policy_loss(x, w, targets, adv, cu, ref_logp=ref_logp, config=cfg)
    assert torch.isfinite(loss)
    loss.backward()
    _check_grad(x.grad, ignored, "d_hidden")
    _check_grad(w.grad, None, "d_weight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_policy_loss_empty_batch(backend):
    x = torch.randn(0, 8).requires_grad_()
    w = torch.randn(11, 8).requires_grad_()
    with use_backend(backend):
        loss, _ = linear_policy_loss(x, w, torch.zeros(0, dtype=torch.long), torch.zeros(0),
                                     torch.zeros(1, dtype=torch.int32), config=LossConfig())
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad is not None and (w.grad == 0).all()


# ------------------------------------------------------------------------------- group_advantages


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_extremes(backend, estimator, scale):
    nan = float("nan")
    cases = {
        "empty": torch.zeros(0),
        "all_nan": torch.full((8,), nan),
        "huge": torch.tensor([1e18, -1e18, 1e18, 1e18, 3.0, 3.0, 3.0, 3.0]),  # squares near fp32's 3.4e38
        "one_valid": torch.tensor([nan, 1.0, nan, nan, 0.0, 1.0, nan, 2.0]),
    }
    for name, r in cases.items():
        with use_backend(backend):
            a = group_advantages(r, 4, scale=scale, estimator=estimator)
        assert a.shape == r.shape and torch.isfinite(a).all(), (name, a)
        assert (a[r.isnan()] == 0).all(), name
        if name == "huge":  # every finite reward keeps its sign in the advantage
            assert (a[:3].sign() == torch.tensor([1.0, -1.0, 1.0])).all(), (name, a)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
def test_group_advantages_infinite_reward_is_unscorable(backend, bad):
    r = torch.tensor([0.0, 1.0, bad, 0.5, 0.2, 0.9])
    with use_backend(backend):
        a = group_advantages(r, 3)
        a_nan = group_advantages(torch.where(torch.isinf(r), float("nan"), r), 3)
    assert torch.isfinite(a).all() and a[2] == 0
    torch.testing.assert_close(a, a_nan, rtol=0, atol=0)


# ------------------------------------------------------------------------------ segment_attention


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_segment_attention_extreme_scores(backend, dtype):
    g = torch.Generator().manual_seed(5)
    T, Hq, Hk, D = 45, 2, 1, 64
    big = 60.0 if dtype == torch.float16 else 300.0  # scores q.k/sqrt(D) ~ 1e4 (fp16: ~1e3, inputs < 65504)
    q = (big * torch.randn(T, Hq, D, generator=g)).to(dtype)
    k = (big * torch.randn(T, Hk, D, generator=g)).to(dtype)
    v = torch.randn(T, Hk, D, generator=g).to(dtype)
    segs = shared_prefix_segments([9], [[11, 0, 25]])
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    with use_backend(backend):
        out = segment_attention(qq, kk, vv, segs)
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    for name, t in (("dq", qq), ("dk", kk), ("dv", vv)):
        _check_grad(t.grad, None, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_attention_no_tokens(backend):
    q = torch.randn(0, 2, 64).requires_grad_()
    k = torch.randn(0, 1, 64).requires_grad_()
    v = torch.randn(0, 1, 64).requires_grad_()
    segs = segments_from_cu_seqlens(torch.zeros(1, dtype=torch.int32))
    with use_backend(backend):
        out = segment_attention(q, k, v, segs)
    assert out.shape == (0, 2, 64)
    out.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape
