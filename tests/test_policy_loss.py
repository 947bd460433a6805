"""policy_loss: every backend's loss, statistics and gradient against the float64 reference; hand values; errors.

The batch has odd sequence lengths (none a multiple of any block), an empty sequence, a one-token
sequence whose only token is ignored, and ignored tokens inside sequences. The reference runs in
float64 on the very fp32 values the backends see; fp32 results must be within 1e-5 relative.
"""

import math

import pytest
import torch

from fastrft_kernels import LossConfig, policy_loss, use_backend
from fastrft_kernels._backend import interpreting
from fastrft_kernels._policy_loss import STAT_NAMES, policy_loss_with_grad

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
LEVELS = ("token", "sequence")
# beta = 0 (no KL), then beta = 0.04 with every estimator, with and without bias correction
KL_SETTINGS = [(0.0, "k3", False)] + [(0.04, est, bc) for est in ("k1", "k2", "k3") for bc in (False, True)]
CU = [0, 5, 5, 12, 13, 20, 37, 44]  # lengths 5, 0, 7, 1, 7, 17, 7
RTOL = 1e-5


def _batch(seed=0, per_token_adv=False):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)  # CUDA under FASTRFT_TEST_DEVICE=cuda
    cu = torch.tensor(CU, dtype=torch.int32)
    T, S = CU[-1], len(CU) - 1
    logp = -(torch.rand(T, generator=g) * 2.0 + 0.05)  # [T] fp32
    # log-ratios of std 0.35: ratios from ~0.4 to ~2.5, so both clips and delta = 1.5 are hit
    old = logp + 0.35 * torch.randn(T, generator=g)
    ref = logp + 0.3 * torch.randn(T, generator=g)
    entropy = torch.rand(T, generator=g) * 3.0
    isr = 0.5 + torch.rand(T, generator=g)
    mask = torch.rand(T, generator=g) > 0.2
    mask[12] = False  # the one-token sequence has no valid token
    mask[2] = True
    adv = torch.randn(T if per_token_adv else S, generator=g)
    adv[0] = 0.7  # both signs, for every sequence type
    if not per_token_adv:
        adv[2] = -0.9
    return dict(logp=logp, old=old, ref=ref, entropy=entropy, isr=isr, mask=mask, adv=adv, cu=cu)


def _config(loss_type, level, beta=0.0, est="k3", bc=False, delta=None, quantile=1.0, **kw):
    return LossConfig(
        loss_type=loss_type, importance_sampling_level=level, beta=beta, kl_estimator=est,
        use_bias_correction_kl=bc, delta=delta, max_completion_length=24,
        epsilon_high=5.0 if loss_type == "cispo" else 0.28, top_entropy_quantile=quantile, **kw,
    )


def _run(backend, b, config, *, old=True, isr=True, entropy=True, dtype=torch.float32):
    """(loss, stats, grad of loss w.r.t. logp by autograd through the public function)."""
    cast = lambda x: x.to(dtype)  # noqa: E731
    logp = cast(b["logp"]).detach().clone().requires_grad_(True)
    with use_backend(backend):
        loss, stats = policy_loss(
            logp, cast(b["adv"]), b["cu"],
            old_logp=cast(b["old"]) if old else None,
            ref_logp=cast(b["ref"]),
            entropy=cast(b["entropy"]) if entropy else None,
            importance_sampling_ratio=cast(b["isr"]) if isr else None,
            mask=b["mask"], config=config,
        )
    loss.backward()
    return loss.detach(), stats, logp.grad


def _rel(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp(min=1e-6)).item() if ref.numel() else 0.0


def _compare(got, want, what):
    loss, stats, grad = got
    rloss, rstats, rgrad = want
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert _rel(loss, rloss) <= RTOL, (what, "loss", loss.item(), rloss.item())
    assert torch.isfinite(grad).all(), (what, "gradient not finite")
    assert _rel(grad, rgrad) <= RTOL, (what, "grad", _rel(grad, rgrad))
    assert set(stats) - {"policy_loss"} == set(STAT_NAMES)
    for k in STAT_NAMES:
        assert stats[k].dim() == 0, (what, k)
        if math.isnan(rstats[k].item()):
            assert math.isnan(stats[k].item()), (what, k)
        else:
            assert abs(stats[k].item() - rstats[k].item()) <= RTOL * max(1.0, abs(rstats[k].item())), (
                what, k, stats[k].item(), rstats[k].item())


def _sweep(backend, loss_type, level, old_cases):
    b = _batch()
    deltas = (None,) if loss_type in ("cispo", "sapo") else (None, 1.5)  # delta caps the clip objective only
    for delta in deltas:
        for beta, est, bc in KL_SETTINGS:
            for old in old_cases:
                # off-policy cases also carry the IS correction and a top-60% entropy mask
                config = _config(loss_type, level, beta, est, bc, delta, quantile=0.6 if old else 1.0)
                what = (loss_type, level, delta, beta, est, bc, old)
                want = _run("reference", b, config, old=old, isr=old, dtype=torch.float64)
                _compare(_run(backend, b, config, old=old, isr=old), want, what)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_torch_matches_reference(loss_type, level):
    _sweep("torch", loss_type, level, old_cases=(True, False))


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_triton_matches_reference(loss_type, level):
    """Every loss type x level x beta x delta x estimator x bias correction through the closed-form
    gradient (off-policy: the general case; on-policy below and in test_on_policy_*)."""
    _sweep("triton", loss_type, level, old_cases=(True,))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo", "luspo"])
def test_on_policy_and_per_token_advantages(backend, loss_type):
    for level in LEVELS:
        for per_token in (False, True):
            b = _batch(seed=1, per_token_adv=per_token)
            config = _config(loss_type, level, 0.04, "k3", True, delta=1.5)
            want = _run("reference", b, config, old=False, isr=False, entropy=False, dtype=torch.float64)
            got = _run(backend, b, config, old=False, isr=False, entropy=False)
            _compare(got, want, (loss_type, level, per_token))


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_on_policy_gradient_is_the_policy_gradient(backend):
    """On-policy with no KL every clip-family loss has ratio 1 and gradient -A_t ν_t: for dapo
    ν = 1/N, for grpo ν = 1/(S n_s); the loss value itself is -sum A / N."""
    b = _batch(seed=2)
    m = b["mask"].double()
    sid = torch.repeat_interleave(torch.arange(len(CU) - 1), torch.tensor(CU).diff())
    A = b["adv"].double()[sid]
    n_s = torch.zeros(len(CU) - 1, dtype=torch.float64).index_add(0, sid, m)
    for loss_type, nu in (("dapo", m / m.sum()), ("grpo", m / ((len(CU) - 1) * n_s[sid].clamp(min=1)))):
        loss, stats, grad = _run(backend, b, _config(loss_type, "token"), old=False, isr=False, entropy=False)
        assert _rel(grad, -A * nu) <= RTOL
        assert _rel(loss, -(A * nu).sum()) <= RTOL
        assert stats["ratio_mean"].item() == pytest.approx(1.0, abs=1e-7)
        assert stats["clip_ratio/region_mean"].item() == 0.0


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_policy_loss_with_grad_equals_autograd(backend):
    b = _batch(seed=3)
    for config in (_config("dapo", "token", 0.04, "k3", True, 1.5, quantile=0.5), _config("luspo", "sequence", 0.04)):
        loss, stats, grad = _run(backend, b, config)
        with use_backend(backend):
            l2, s2, g2 = policy_loss_with_grad(
                b["logp"], b["adv"], b["cu"], old_logp=b["old"], ref_logp=b["ref"], entropy=b["entropy"],
                importance_sampling_ratio=b["isr"], mask=b["mask"], config=config, validate=False,
            )
        assert g2.dtype == torch.float32 and g2.shape == b["logp"].shape and not l2.requires_grad
        assert _rel(l2, loss) <= RTOL and _rel(g2, grad) <= RTOL
        for k in STAT_NAMES:
            assert torch.allclose(s2[k], stats[k], equal_nan=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(backend, dtype):
    b = _batch(seed=4)
    b = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in b.items()}  # the values both sides see
    config = _config("grpo", "sequence", 0.04, "k3", True, 1.5, quantile=0.7)
    want = _run("reference", b, config, dtype=torch.float64)
    loss, stats, grad = _run(backend, b, config, dtype=dtype)
    assert grad.dtype == dtype
    assert _rel(loss, want[0]) <= RTOL
    assert _rel(grad, want[2]) <= 1e-2  # the gradient is rounded to the input dtype (bf16: 8 bits)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_hand_computed_loss_and_stats(backend):
    """Two sequences: ratios (0.5, 1, 1.5) with A = +1 and (0.7, 2) with A = -1; eps 0.2, 0.2.
    Per token -min(c A, clip(c) A): 0.5 -> -0.5, 1 -> -1, 1.5 -> -1.2, 0.7 -> 0.8, 2 -> 2 (sum 0.1)."""
    ratios = torch.tensor([0.5, 1.0, 1.5, 0.7, 2.0], dtype=torch.float64)
    logp = torch.tensor([-1.0, -0.5, -2.0, -0.3, -1.1], dtype=torch.float64)
    old = logp - ratios.log()
    ref = logp - math.log(2.0)  # k3 with ref - logp = -ln 2: 0.5 + ln 2 - 1 for every token
    entropy = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.6], dtype=torch.float64)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    k3 = 0.5 + math.log(2.0) - 1.0
    expected_loss = {"dapo": 0.1 / 5, "bnpo": 0.1 / 5, "grpo": (-2.7 / 3 + 2.8 / 2) / 2, "luspo": 0.1 / 2,
                     "dr_grpo": 0.1 / (2 * 10)}
    for loss_type, want in expected_loss.items():
        config = LossConfig(loss_type=loss_type, epsilon_low=0.2, max_completion_length=10)
        with use_backend(backend):
            loss, stats = policy_loss(logp.float(), adv.float(), cu, old_logp=old.float(), ref_logp=ref.float(),
                                      entropy=entropy.float(), config=config)
        assert loss.item() == pytest.approx(want, rel=1e-5)
        # low: 0.7 with A < 0; high: 1.5 with A > 0 (2.0 has A < 0: not clipped high)
        assert stats["clip_ratio/low_mean"].item() == pytest.approx(1 / 5)
        assert stats["clip_ratio/high_mean"].item() == pytest.approx(1 / 5)
        assert stats["clip_ratio/region_mean"].item() == pytest.approx(2 / 5)
        assert stats["ratio_mean"].item() == pytest.approx(5.7 / 5, rel=1e-6)
        assert stats["kl"].item() == pytest.approx(k3, rel=1e-5)
        assert stats["entropy"].item() == pytest.approx(1.6 / 5, rel=1e-6)
    # with beta, the KL term adds beta * k3 per valid token (dapo: its mean)
    config = LossConfig(loss_type="dapo", epsilon_low=0.2, beta=0.1)
    with use_backend(backend):
        loss, stats = policy_loss(logp.float(), adv.float(), cu, old_logp=old.float(), ref_logp=ref.float(),
                                  config=config)
    assert loss.item() == pytest.approx(0.1 / 5 + 0.1 * k3, rel=1e-5)
    assert math.isnan(stats["entropy"].item())
    # cispo: its clip statistic (ratio > eps_high = 1.2 with A > 0: only 1.5) is reported as high/region
    config = LossConfig(loss_type="cispo", epsilon_high=1.2)
    with use_backend(backend):
        _, stats = policy_loss(logp.float(), adv.float(), cu, old_logp=old.float(), config=config)
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(1 / 5)
    assert stats["clip_ratio/region_mean"].item() == pytest.approx(1 / 5)
    assert stats["clip_ratio/low_mean"].item() == 0.0
    assert math.isnan(stats["kl"].item())
    # sapo: no hard clip, the clip statistics are NaN
    with use_backend(backend):
        _, stats = policy_loss(logp.float(), adv.float(), cu, old_logp=old.float(), config=LossConfig(loss_type="sapo"))
    assert all(math.isnan(stats[k].item()) for k in STAT_NAMES[:3])


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_num_items_in_batch_sets_the_dapo_normalizer(backend):
    b = _batch(seed=5)
    with use_backend(backend):
        base, _, g = policy_loss_with_grad(b["logp"], b["adv"], b["cu"], old_logp=b["old"], mask=b["mask"],
                                           config=LossConfig(loss_type="dapo"))
        n_valid = int(b["mask"].sum())
        for items in (100, torch.tensor(100.0)):
            loss, _, g2 = policy_loss_with_grad(b["logp"], b["adv"], b["cu"], old_logp=b["old"], mask=b["mask"],
                                                config=LossConfig(loss_type="dapo", num_items_in_batch=items))
            assert _rel(loss, base * n_valid / 100) <= RTOL and _rel(g2, g * n_valid / 100) <= RTOL


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_ignored_tokens_may_hold_anything(backend):
    """Values at masked tokens (inf, NaN: an LM head's ignored rows) never reach loss or gradient."""
    b = _batch(seed=6)
    config = _config("grpo", "sequence", 0.04, "k3", True, 1.5)
    clean = _run(backend, b, config, entropy=False)
    dirty = dict(b)
    for k, v in (("logp", math.inf), ("old", -math.inf), ("ref", math.nan), ("isr", math.nan)):
        dirty[k] = torch.where(b["mask"], b[k], torch.full_like(b[k], v))
    got = _run(backend, dirty, config, entropy=False)
    assert got[0] == clean[0] and torch.equal(got[2], clean[2])
    assert (got[2][~b["mask"]] == 0).all()


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_empty_batch(backend):
    logp = torch.empty(0, requires_grad=True)
    for cu in (torch.zeros(1, dtype=torch.int32), torch.zeros(3, dtype=torch.int32)):
        adv = torch.randn(cu.numel() - 1)
        with use_backend(backend):
            loss, stats = policy_loss(logp, adv, cu, config=LossConfig(loss_type="grpo"))
        assert loss.item() == 0.0
        loss.backward()
        assert logp.grad.shape == (0,)


CONFIG_ERRORS = [
    (dict(loss_type="ppo"), "loss_type must be one of"),
    (dict(importance_sampling_level="token_mean"), "importance_sampling_level must be one of"),
    (dict(kl_estimator="k4"), "kl_estimator must be one of"),
    (dict(epsilon_low=-0.1), "epsilon_low must be >= 0"),
    (dict(epsilon_high=-0.1), "epsilon_high must be >= 0"),
    (dict(loss_type="cispo", epsilon_high=0.0), "epsilon_high is the cap on the ratio"),
    (dict(delta=0.0), "delta must be > 0"),
    (dict(beta=-1.0), "beta must be >= 0"),
    (dict(beta=float("nan")), "beta must be a finite real"),
    (dict(sapo_temperature_pos=0.0), "sapo_temperature_pos must be > 0"),
    (dict(sapo_temperature_neg=-1.0), "sapo_temperature_neg must be > 0"),
    (dict(loss_type="dr_grpo"), "max_completion_length is required for loss_type='dr_grpo'"),
    (dict(max_completion_length=0), "max_completion_length must be a positive int"),
    (dict(top_entropy_quantile=-0.1), r"top_entropy_quantile must be in \[0, 1\]"),
    (dict(top_entropy_quantile=1.5), r"top_entropy_quantile must be in \[0, 1\]"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(num_items_in_batch=0), "num_items_in_batch must be > 0"),
    (dict(num_items_in_batch=torch.ones(2)), "num_items_in_batch must be a positive number or a 0-dim"),
]


@pytest.mark.parametrize("kwargs,message", CONFIG_ERRORS, ids=lambda x: str(x)[:40] if isinstance(x, dict) else "")
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**kwargs)


def test_config_defaults_and_bool_check():
    with pytest.raises(TypeError, match="use_bias_correction_kl must be a bool"):
        LossConfig(use_bias_correction_kl=1)
    config = LossConfig()
    assert (config.loss_type, config.importance_sampling_level, config.kl_estimator) == ("dapo", "token", "k3")
    assert (config.epsilon_low, config.epsilon_high, config.beta, config.delta) == (0.2, 0.2, 0.0, None)
    assert (config.sapo_temperature_pos, config.sapo_temperature_neg, config.top_entropy_quantile) == (1.0, 1.05, 1.0)
    assert LossConfig(epsilon_low=0.3).epsilon_high == 0.3


_T, _S = CU[-1], len(CU) - 1
INPUT_ERRORS = [
    (dict(config={"loss_type": "dapo"}), TypeError, "config must be a fastrft_kernels.LossConfig"),
    (dict(logp=torch.zeros(1, _T)), ValueError, "logp must be 1-D"),
    (dict(logp=torch.zeros(_T, dtype=torch.long)), TypeError, "logp must be a floating tensor"),
    (dict(cu_seqlens=torch.tensor(CU)), TypeError, "cu_seqlens must have dtype torch.int32"),
    (dict(cu_seqlens=torch.tensor([0, 5, _T - 1], dtype=torch.int32)), ValueError,
     "cu_seqlens must end at the number of tokens"),
    (dict(cu_seqlens=torch.tensor([0, 9, 5, _T], dtype=torch.int32)), ValueError, "cu_seqlens must be non-decreasing"),
    (dict(advantages=torch.randn(_S + 1)), ValueError,
     rf"advantages must hold one value per sequence \(S={_S}\) or per token"),
    (dict(advantages=torch.ones(_S, dtype=torch.long)), TypeError, "advantages must be a floating tensor"),
    *[(dict({name: torch.randn(_T - 1)}), ValueError, rf"{name} must have one value per token \(T={_T}\)")
      for name in ("old_logp", "ref_logp", "entropy", "importance_sampling_ratio")],
    *[(dict({name: torch.zeros(_T, dtype=torch.int32)}), TypeError, f"{name} must be a floating tensor")
      for name in ("old_logp", "ref_logp", "entropy", "importance_sampling_ratio")],
    (dict(mask=torch.ones(_T)), TypeError, "mask must have dtype torch.bool"),
    (dict(mask=torch.ones(_T + 1, dtype=torch.bool)), ValueError, rf"mask must have one value per token \(T={_T}\)"),
    (dict(config=LossConfig(beta=0.04)), ValueError, "ref_logp is required when config.beta > 0"),
    (dict(config=LossConfig(top_entropy_quantile=0.2)), ValueError,
     "entropy .* is required when config.top_entropy_quantile < 1"),
    (dict(old_logp=torch.randn(_T, device="meta")), ValueError, "old_logp is on meta"),
]


@pytest.mark.parametrize("kwargs,error,message", INPUT_ERRORS, ids=lambda x: "" if not isinstance(x, str) else x[:30])
def test_input_errors_name_the_argument(kwargs, error, message):
    b = _batch()
    args = dict(logp=b["logp"], advantages=b["adv"], cu_seqlens=b["cu"], config=LossConfig())
    args.update(kwargs)
    with pytest.raises(error, match=message):
        policy_loss(args.pop("logp"), args.pop("advantages"), args.pop("cu_seqlens"), **args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are observable on CUDA only")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_host_sync_on_cuda(backend):
    """policy_loss_with_grad(validate=False) and the backward never wait for the device."""
    if backend == "triton" and interpreting():
        pytest.skip("under TRITON_INTERPRET=1 the interpreter copies CUDA tensors to the host")
    b = {k: v.cuda() for k, v in _batch(seed=8).items()}
    config = _config("grpo", "sequence", 0.04, "k3", True, 1.5, quantile=0.5)
    kw = dict(old_logp=b["old"], ref_logp=b["ref"], entropy=b["entropy"], importance_sampling_ratio=b["isr"],
              mask=b["mask"], config=config, validate=False)
    with use_backend(backend):
        policy_loss_with_grad(b["logp"], b["adv"], b["cu"], **kw)  # compiles the kernel outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss, stats, g = policy_loss_with_grad(b["logp"], b["adv"], b["cu"], **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    want = _run("reference", {k: v.cpu() for k, v in b.items()}, config, dtype=torch.float64)
    assert _rel(loss.cpu(), want[0]) <= RTOL and _rel(g.cpu(), want[2]) <= RTOL
