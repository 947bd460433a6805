"""linear_policy_loss: every backend against policy_loss(reference linear_logprob) in float64."""

import pytest
import torch

from fastrft_kernels import LinearPolicyLoss, LossConfig, linear_logprob, linear_policy_loss, policy_loss, use_backend

T, H, V = 29, 45, 131
CU = [0, 10, 10, 22, 29]  # an empty sequence in the middle


def _batch():
    hidden = torch.randn(T, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64) * 0.4
    bias = torch.randn(V, dtype=torch.float64) * 0.1
    targets = torch.randint(0, V, (T,))
    targets[[3, 9, 25]] = -100
    cu = torch.tensor(CU, dtype=torch.int32)
    adv = torch.randn(len(CU) - 1, dtype=torch.float64)
    old = torch.randn(T, dtype=torch.float64) * 0.3 - 5.0
    ref = torch.randn(T, dtype=torch.float64) * 0.3 - 5.0
    return hidden, weight, bias, targets, cu, adv, old, ref


def _expected(hidden, weight, bias, targets, cu, adv, old, ref, cfg):
    h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    with use_backend("reference"):
        logp, ent = linear_logprob(h, w, targets, bias=b, temperature=cfg.temperature, return_entropy=True)
        loss, stats = policy_loss(logp, adv, cu, old_logp=old, ref_logp=ref, mask=targets != -100, config=cfg,
                                  entropy=ent.detach() if cfg.top_entropy_quantile < 1 else None)
    loss.backward()
    return loss.detach(), stats, h.grad, w.grad, b.grad


CONFIGS = [
    LossConfig(loss_type="grpo", beta=0.04, temperature=0.8),
    LossConfig(loss_type="dapo", epsilon_high=0.28, top_entropy_quantile=0.5),
    LossConfig(loss_type="dr_grpo", max_completion_length=12, importance_sampling_level="sequence", beta=0.1,
               kl_estimator="k2"),
]


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.loss_type for c in CONFIGS])
def test_matches_policy_loss_of_reference_logprob(backend, cfg):
    hidden, weight, bias, targets, cu, adv, old, ref = _batch()
    exp_loss, exp_stats, exp_dh, exp_dw, exp_db = _expected(hidden, weight, bias, targets, cu, adv, old, ref, cfg)
    dt = torch.float64 if backend == "reference" else torch.float32
    h, w, b = (x.to(dt).requires_grad_() for x in (hidden, weight, bias))
    with use_backend(backend):
        loss, stats = linear_policy_loss(h, w, targets, adv.to(dt), cu, bias=b, old_logp=old.to(dt),
                                         ref_logp=ref.to(dt), config=cfg)
    loss.backward()
    tol = 1e-10 if backend == "reference" else 1e-5
    assert abs(loss.item() - exp_loss.item()) <= tol * max(1.0, abs(exp_loss.item()))
    for a, e in ((h.grad, exp_dh), (w.grad, exp_dw), (b.grad, exp_db)):
        assert ((a.double() - e).abs().max() / e.abs().max()).item() <= tol
    assert (h.grad[[3, 9, 25]] == 0).all()
    if cfg.top_entropy_quantile < 1:
        assert torch.isfinite(stats["entropy"]) and abs(stats["entropy"].item() - exp_stats["entropy"].item()) < 1e-5
    else:
        assert torch.isnan(stats["entropy"])  # not computed, not reported
    assert abs(stats["kl"].item() - exp_stats["kl"].item()) <= 1e-5 * max(1.0, abs(exp_stats["kl"].item()))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_on_policy_lse_reuse_and_module(backend):
    hidden, weight, bias, targets, cu, adv, _, _ = _batch()
    hidden, weight = hidden.float(), weight.float()
    cfg = LossConfig(loss_type="grpo")
    with use_backend(backend), torch.no_grad():
        old, lse = linear_logprob(hidden, weight, targets, return_lse=True)
    w1, w2 = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    with use_backend(backend):
        l1, s1 = linear_policy_loss(hidden, w1, targets, adv.float(), cu, old_logp=old, config=cfg)
        l2, s2 = LinearPolicyLoss(cfg)(hidden, w2, targets, adv.float(), cu, old_logp=old, lse=lse)
    (l1 + 0).backward()
    l2.backward()
    assert s2["ratio_mean"].item() == 1.0  # the lse-reuse pass reproduces the old log-probs bit for bit
    assert torch.allclose(l1, l2, rtol=1e-6) and torch.allclose(w1.grad, w2.grad, rtol=1e-5, atol=1e-7)


def test_bad_arguments_name_the_argument():
    hidden, weight, bias, targets, cu, adv, old, ref = _batch()
    cfg = LossConfig()
    call = lambda **kw: linear_policy_loss(**{**dict(hidden=hidden, weight=weight, targets=targets,  # noqa: E731
                                                    advantages=adv, cu_seqlens=cu, config=cfg), **kw})
    with pytest.raises(ValueError, match="weight"):
        call(weight=weight[:, :-1])
    with pytest.raises(ValueError, match="targets"):
        call(targets=torch.where(targets == -100, targets, targets + V))
    with pytest.raises(TypeError, match="hidden"):
        call(hidden=hidden.long(), weight=weight.long())
    with pytest.raises(TypeError, match="advantages"):
        call(advantages=adv.long())
    with pytest.raises(ValueError, match="device"):
        call(weight=weight.to("meta"))
    with pytest.raises(ValueError, match="device"):
        call(advantages=adv.to("meta"))
    with pytest.raises(TypeError, match="cu_seqlens"):
        call(cu_seqlens=cu.long())
    with pytest.raises(ValueError, match="start at 0"):
        call(cu_seqlens=torch.tensor([1, 10, 10, 22, 29], dtype=torch.int32))
    with pytest.raises(ValueError, match="non-decreasing"):
        call(cu_seqlens=torch.tensor([0, 10, 8, 22, 29], dtype=torch.int32))
    with pytest.raises(ValueError, match="end at"):
        call(cu_seqlens=torch.tensor([0, 10, 10, 22, 28], dtype=torch.int32))
    with pytest.raises(ValueError, match="advantages"):
        call(advantages=adv[:-1])
    with pytest.raises(ValueError, match="old_logp"):
        call(old_logp=old[:-1])
    with pytest.raises(TypeError, match="config"):
        call(config={"loss_type": "grpo"})
