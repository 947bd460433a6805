"""Parity with TRL: trl 1.16's own `GRPOTrainer._compute_loss` and `get_high_entropy_mask`, run on a
padded batch, against `policy_loss` on the same batch packed.

No trainer is built: the two methods are called unbound, with the stand-in `self` of
benchmarks/_trl.py (one process, no gradient accumulation, mode "train"). TRL has only the k3 KL
estimator, so k1/k2 are held to the reference in test_policy_loss.py instead.
"""

import types

import pytest
import torch
from trl.trainer.grpo_trainer import GRPOTrainer

from benchmarks._trl import OneProcess, trl_self
from fastrft_kernels import LossConfig, policy_loss, use_backend
from fastrft_kernels._policy_loss import _high_entropy_mask

LENGTHS = [5, 0, 7, 1, 9, 4]  # an empty completion (an all-masked row for TRL)
MAXLEN = 12  # dr_grpo's max_completion_length


def _pad(x, cu, fill=0.0):
    """[T] packed -> [S, max_len] padded (rows left-aligned, as TRL's completions)."""
    S = cu.numel() - 1
    width = max(max(LENGTHS), 1)
    out = torch.full((S, width), fill, dtype=x.dtype)
    for s in range(S):
        a, b = int(cu[s]), int(cu[s + 1])
        out[s, : b - a] = x[a:b]
    return out


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + list(torch.tensor(LENGTHS).cumsum(0)), dtype=torch.int32)
    T, S = int(cu[-1]), len(LENGTHS)
    # fp32 values held in float64: TRL runs in float64, the triton path sees the very same numbers
    logp = -(torch.rand(T, generator=g) * 2 + 0.05)
    return dict(
        cu=cu,
        logp=logp.double(),
        old=(logp + 0.35 * torch.randn(T, generator=g)).double(),
        ref=(logp + 0.3 * torch.randn(T, generator=g)).double(),
        entropy=(torch.rand(T, generator=g) * 3).double(),
        isr=(0.5 + torch.rand(T, generator=g)).double(),
        tool_mask=torch.rand(T, generator=g) > 0.2,  # ignored tokens inside completions
        adv=torch.tensor([0.8, -0.4, -1.1, 0.3, 1.4, -0.6], dtype=torch.float64)[:S],
    )


def _trl_loss(config, b, *, off_policy, with_isr):
    cu = b["cu"]
    lengths = cu.diff()
    width = max(max(LENGTHS), 1)
    completion_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()  # [S, W]
    logps = _pad(b["logp"], cu).requires_grad_(True)  # [S, W] the "model output"
    inputs = {
        "prompt_ids": torch.zeros(len(LENGTHS), 1, dtype=torch.long),
        "prompt_mask": torch.ones(len(LENGTHS), 1, dtype=torch.long),
        "completion_ids": torch.zeros(len(LENGTHS), width, dtype=torch.long),
        "completion_mask": completion_mask,
        "tool_mask": _pad(b["tool_mask"].long(), cu, 0),
        "advantages": b["adv"],
        "num_items_in_batch": (completion_mask * _pad(b["tool_mask"].long(), cu, 0)).sum(),
        "ref_per_token_logps": _pad(b["ref"], cu),
    }
    if off_policy:
        inputs["old_per_token_logps"] = _pad(b["old"], cu)
    if with_isr:
        inputs["importance_sampling_ratio"] = _pad(b["isr"], cu, 1.0)
    ns = trl_self(config, logps, _pad(b["entropy"], cu), use_vllm=with_isr)
    loss = GRPOTrainer._compute_loss(ns, None, inputs)
    loss.backward()
    valid = completion_mask.bool()
    grad = logps.grad[valid]  # [T] back in packed order (rows are consecutive sequences)
    return loss.detach(), ns._metrics["train"], grad


CASES = [
    # (loss_type, level, beta, delta, bias correction, top_entropy_quantile, off-policy, IS ratio)
    ("grpo", "token", 0.0, None, False, 1.0, True, False),
    ("grpo", "sequence", 0.04, 1.5, True, 1.0, True, True),
    ("bnpo", "token", 0.04, 1.5, False, 0.6, True, True),
    ("dr_grpo", "token", 0.04, None, True, 1.0, True, False),
    ("dr_grpo", "sequence", 0.0, 1.5, False, 0.6, True, True),
    ("dapo", "token", 0.04, 1.5, True, 0.6, True, True),
    ("dapo", "token", 0.04, None, True, 1.0, False, False),  # on-policy: ratio 1, gradient flows
    ("dapo", "sequence", 0.04, None, False, 1.0, True, False),
    ("cispo", "token", 0.04, None, True, 1.0, True, True),
    ("cispo", "sequence", 0.0, None, False, 0.6, True, False),
    ("sapo", "token", 0.04, None, False, 1.0, True, True),
    ("sapo", "sequence", 0.04, None, True, 0.6, False, False),
    ("luspo", "sequence", 0.04, 1.5, True, 1.0, True, True),
    ("luspo", "token", 0.0, None, False, 0.6, True, False),
]


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x) for x in c))
def test_loss_gradient_and_metrics_equal_trl(case, backend):
    loss_type, level, beta, delta, bc, quantile, off_policy, with_isr = case
    config = LossConfig(
        loss_type=loss_type, importance_sampling_level=level, beta=beta, delta=delta, use_bias_correction_kl=bc,
        top_entropy_quantile=quantile, max_completion_length=MAXLEN,
        epsilon_high=5.0 if loss_type == "cispo" else 0.28,
    )
    b = _batch(seed=len(loss_type) + 10 * (level == "sequence"))
    want_loss, metrics, want_grad = _trl_loss(config, b, off_policy=off_policy, with_isr=with_isr)
    dtype = torch.float64 if backend != "triton" else torch.float32  # TRL ran in float64
    cast = lambda x: x.to(dtype)  # noqa: E731
    logp = cast(b["logp"]).requires_grad_(True)
    with use_backend(backend):
        loss, stats = policy_loss(
            logp, cast(b["adv"]), b["cu"], old_logp=cast(b["old"]) if off_policy else None,
            ref_logp=cast(b["ref"]), entropy=cast(b["entropy"]),
            importance_sampling_ratio=cast(b["isr"]) if with_isr else None, mask=b["tool_mask"], config=config,
        )
    loss.backward()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert abs(loss.item() - want_loss.item()) <= tol * max(1.0, abs(want_loss.item()))
    assert torch.allclose(logp.grad.double(), want_grad, rtol=tol, atol=tol * want_grad.abs().max().item())
    # TRL's logged metrics (one value each) against ours
    names = {"entropy": "entropy"}
    if beta != 0.0:
        names["kl"] = "kl"
    if loss_type == "cispo":
        names["cispo_clip_ratio"] = "clip_ratio/high_mean"
    elif loss_type != "sapo":
        names.update({k: k for k in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")})
    for trl_name, ours in names.items():
        (value,) = metrics[trl_name]
        assert stats[ours].item() == pytest.approx(value, rel=1e-5, abs=1e-7), trl_name
    assert ("kl" in metrics) == (beta != 0.0)


@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.75, 1.0 / 3.0])
def test_high_entropy_mask_equals_trl(quantile):
    """The sync-free quantile (sort with invalid entries last) gives TRL's mask bit for bit, ties included."""
    g = torch.Generator().manual_seed(7)
    T = 53
    entropy = torch.rand(T, generator=g)
    entropy[10:14] = entropy[3]  # ties at what may be the threshold
    mask = torch.rand(T, generator=g) > 0.3
    ns = types.SimpleNamespace(accelerator=OneProcess())
    want = GRPOTrainer.get_high_entropy_mask(ns, entropy[None], mask[None].long(), 1 - quantile)[0]
    got = _high_entropy_mask(entropy, mask, quantile)
    assert torch.equal(got, want)
    assert got.sum() > 0
    none = _high_entropy_mask(entropy, torch.zeros(T, dtype=torch.bool), quantile)
    assert not none.any()  # TRL: no valid token, no token kept


# ------------------------------------------------------------ TRL 1.16 features: vespo, OPSM, entropy bonus

def _trl_loss_ext(config, b, *, off_policy, with_isr, sampling, seq_isr=False):
    """`_trl_loss` plus the newer inputs: sampling logprobs (off-policy mask), differentiable entropies
    (entropy bonus), a per-sequence vLLM IS ratio (TRL's sequence_* modes, (B, 1))."""
    cu = b["cu"]
    lengths = cu.diff()
    S = len(LENGTHS)
    width = max(max(LENGTHS), 1)
    completion_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    logps = _pad(b["logp"], cu).requires_grad_(True)
    ents = _pad(b["entropy"], cu).requires_grad_(True)
    tool = _pad(b["tool_mask"].long(), cu, 0)
    inputs = {
        "prompt_ids": torch.zeros(S, 1, dtype=torch.long), "prompt_mask": torch.ones(S, 1, dtype=torch.long),
        "completion_ids": torch.zeros(S, width, dtype=torch.long), "completion_mask": completion_mask,
        "tool_mask": tool, "advantages": b["adv"], "num_items_in_batch": (completion_mask * tool).sum(),
        "ref_per_token_logps": _pad(b["ref"], cu),
    }
    if off_policy:
        inputs["old_per_token_logps"] = _pad(b["old"], cu)
    if sampling:
        inputs["sampling_per_token_logps"] = _pad(b["samp"], cu)
    if with_isr:
        # TRL's ratio is exp((old - sampling) * mask): exactly 1 at masked tokens
        isr = torch.where(b["tool_mask"], b["isr"], torch.ones_like(b["isr"]))
        inputs["importance_sampling_ratio"] = b["seq_isr"][:, None] if seq_isr else _pad(isr, cu, 1.0)
    ns = trl_self(config, logps, ents, use_vllm=with_isr)
    loss = GRPOTrainer._compute_loss(ns, None, inputs)
    loss.backward()
    valid = completion_mask.bool()
    ent_grad = torch.zeros_like(ents) if ents.grad is None else ents.grad
    return loss.detach(), ns._metrics["train"], logps.grad[valid], ent_grad[valid]


EXT_CASES = [
    # (loss_type, level, beta, quantile, off_policy, with_isr, extra LossConfig fields)
    ("vespo", "token", 0.0, 1.0, True, False, {}),
    ("vespo", "sequence", 0.04, 1.0, True, True, dict(use_bias_correction_kl=True)),
    ("vespo", "token", 0.04, 0.6, True, True, dict(vespo_k_pos=1.5, vespo_lambda_neg=2.5, entropy_coef=0.01)),
    ("vespo", "token", 0.0, 1.0, True, "seq", {}),  # TRL's sequence_* IS modes: a (B, 1) ratio
    ("dapo", "token", 0.0, 1.0, True, False, dict(off_policy_mask_threshold=0.05)),
    ("grpo", "sequence", 0.04, 1.0, True, True, dict(off_policy_mask_threshold=0.0, delta=1.5)),
    ("cispo", "token", 0.0, 0.6, True, True, dict(off_policy_mask_threshold=0.1, entropy_coef=0.02)),
    ("bnpo", "token", 0.04, 0.0, True, False, {}),  # top_entropy_quantile = 0: the maximum-entropy tokens
    ("dapo", "token", 0.0, 0.0, False, False, dict(entropy_coef=0.05)),
    ("grpo", "token", 0.04, 1.0, True, True, dict(entropy_coef=-0.03)),
    ("luspo", "sequence", 0.0, 0.6, True, False, dict(off_policy_mask_threshold=0.02, entropy_coef=0.01)),
]


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("case", EXT_CASES, ids=lambda c: "-".join(str(x) for x in c[:6]) + "-" + "-".join(c[6]))
def test_trl_116_features_equal_trl(case, backend):
    loss_type, level, beta, quantile, off_policy, with_isr, extra = case
    config = LossConfig(
        loss_type=loss_type, importance_sampling_level=level, beta=beta, top_entropy_quantile=quantile,
        max_completion_length=MAXLEN, epsilon_high=5.0 if loss_type == "cispo" else 0.28, **extra,
    )
    b = _batch(seed=len(loss_type) + 3 * len(extra) + 10 * (level == "sequence"))
    g = torch.Generator().manual_seed(99)
    T = b["logp"].numel()
    b["samp"] = (b["old"] + 0.2 * torch.randn(T, generator=g).double())
    b["samp"][3] = float("nan")  # an unscorable token: read as no KL evidence
    b["seq_isr"] = (0.6 + torch.rand(len(LENGTHS), generator=g)).double()
    # TRL's sequence_* ratio is exp of a masked sum: 1 for a sequence without valid tokens
    has_tool = [bool(b["tool_mask"][b["cu"][i]:b["cu"][i + 1]].any()) for i in range(len(LENGTHS))]
    b["seq_isr"][torch.tensor(has_tool).logical_not()] = 1.0
    sampling = config.off_policy_mask_threshold is not None
    want_loss, metrics, want_grad, want_ent_grad = _trl_loss_ext(
        config, b, off_policy=off_policy, with_isr=bool(with_isr), sampling=sampling, seq_isr=with_isr == "seq")
    dtype = torch.float64 if backend != "triton" else torch.float32
    cast = lambda x: x.to(dtype)  # noqa: E731
    logp = cast(b["logp"]).requires_grad_(True)
    ent = cast(b["entropy"]).requires_grad_(True)
    isr = None
    if with_isr == "seq":  # vespo sums log(isr) over a sequence: one factor at each sequence's first token
        isr = torch.ones(T, dtype=torch.float64)
        cu = b["cu"]
        for s in range(len(LENGTHS)):
            valid = b["tool_mask"][cu[s]:cu[s + 1]].nonzero()
            if len(valid):  # at the first valid token (sequences with none: TRL's factor is unused there too?)
                isr[cu[s] + valid[0, 0]] = b["seq_isr"][s]
        isr = cast(isr)
    elif with_isr:
        isr = cast(b["isr"])
    with use_backend(backend):
        loss, stats = policy_loss(
            logp, cast(b["adv"]), b["cu"], old_logp=cast(b["old"]) if off_policy else None,
            ref_logp=cast(b["ref"]), entropy=ent, importance_sampling_ratio=isr, mask=b["tool_mask"],
            sampling_logp=cast(b["samp"]) if sampling else None, config=config,
        )
    loss.backward()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert abs(loss.item() - want_loss.item()) <= tol * max(1.0, abs(want_loss.item()))
    assert torch.allclose(logp.grad.double(), want_grad, rtol=tol, atol=tol * max(want_grad.abs().max().item(), 1e-3))
    got_ent_grad = torch.zeros(T, dtype=torch.float64) if ent.grad is None else ent.grad.double()
    assert torch.allclose(got_ent_grad, want_ent_grad, rtol=tol, atol=tol)
    names = {"entropy": "entropy"}
    if beta != 0.0:
        names["kl"] = "kl"
    if loss_type == "cispo":
        names["cispo_clip_ratio"] = "clip_ratio/high_mean"
    elif loss_type == "vespo":
        names["vespo/phi_seq_mean"] = "vespo/phi_seq_mean"
    elif loss_type != "sapo":
        names.update({k: k for k in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                                     "clip_ratio/low_min", "clip_ratio/high_max")})
    if config.entropy_coef != 0.0:
        names["policy_loss"] = "policy_loss"
    for trl_name, ours in names.items():
        (value,) = metrics[trl_name]
        assert stats[ours].item() == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True), trl_name
    assert set(metrics) - {"entropy_coef"} <= set(names), sorted(metrics)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_clip_min_max_metrics_equal_trl(backend):
    """clip_ratio/low_min and high_max (TRL's nanmin/nanmax of per-sequence means) on the base cases."""
    for case in CASES:
        loss_type, level, beta, delta, bc, quantile, off_policy, with_isr = case
        if loss_type not in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
            continue
        config = LossConfig(loss_type=loss_type, importance_sampling_level=level, beta=beta, delta=delta,
                            use_bias_correction_kl=bc, top_entropy_quantile=quantile, max_completion_length=MAXLEN,
                            epsilon_low=0.1, epsilon_high=0.12)
        b = _batch(seed=len(loss_type) + 10 * (level == "sequence"))
        _, metrics, _ = _trl_loss(config, b, off_policy=off_policy, with_isr=with_isr)
        dtype = torch.float64 if backend != "triton" else torch.float32
        cast = lambda x, dtype=dtype: x.to(dtype)  # noqa: E731
        with use_backend(backend):
            _, stats = policy_loss(
                cast(b["logp"]), cast(b["adv"]), b["cu"], old_logp=cast(b["old"]) if off_policy else None,
                ref_logp=cast(b["ref"]), entropy=cast(b["entropy"]),
                importance_sampling_ratio=cast(b["isr"]) if with_isr else None, mask=b["tool_mask"], config=config,
            )
        for k in ("clip_ratio/low_min", "clip_ratio/high_max"):
            (value,) = metrics[k]
            assert stats[k].item() == pytest.approx(value, rel=1e-6, abs=1e-7, nan_ok=True), (case, k)
