"""`policy_loss`: the GRPO loss family (TRL's `_compute_loss`) on packed per-token log-probabilities.

    loss, stats = policy_loss(logp, advantages, cu_seqlens, old_logp=..., ref_logp=..., config=LossConfig())

Packed layout: `logp` [T] holds the completion tokens of S sequences back to back, sequence s
being `logp[cu_seqlens[s]:cu_seqlens[s+1]]`. For one process and no gradient accumulation the
loss equals trl 1.16 `GRPOTrainer._compute_loss` on the same batch padded to [S, max_len]
(tests/test_trl_parity.py calls TRL's own code). Per token t of sequence s, with m_t the `mask`
(False for tokens whose target is ignore_index, and nothing else: padding does not exist here):

    log-ratio   lr_t = logp_t - old_t          (old = logp.detach() when old_logp is None: ratio 1, gradient flows)
    ratio       c_t  = exp(lr_t)                token level
                c_t  = exp(sum_s m lr / max(n_s, 1))   sequence level (GSPO), n_s = valid tokens of s
    policy      clip (grpo, bnpo, dr_grpo, dapo, luspo):  -min(min(c, delta) A, clamp(c, 1-eps_low, 1+eps_high) A)
                cispo: -sg(min(c, eps_high)) A logp     sapo: -sigmoid(tau (c - 1)) 4 / tau A, tau by sign(A)
    per token   L_t = policy * entropy_mask * importance_sampling_ratio + beta * KL_t
    KL          k1 = logp - ref, k2 = (logp - ref)^2 / 2, k3 = exp(ref - logp) - (ref - logp) - 1,
                times c when use_bias_correction_kl (TRL's order: the IS ratio and the entropy
                mask multiply the policy term only, never the KL term)
    loss        grpo, sapo: mean over s of (sum_s m L) / max(n_s, 1)     bnpo: sum m L / max(N, 1)
                dr_grpo: sum m L / (S max_completion_length)   dapo, cispo: sum m L / max(num_items_in_batch, 1)
                luspo: mean over s of sum_s m L           (N = valid tokens; empty sequences count in S)

The loss is differentiable with respect to `logp` only; old_logp, ref_logp, entropy, advantages and
the importance-sampling ratio are data. With S = 0 every denominator is clamped to 1: the loss is 0.
Values of logp/old_logp/ref_logp at masked tokens never reach the loss (they are replaced by 0
before any exp), so ignored rows may hold anything finite or not.

Statistics (0-dim device tensors, TRL's metric names, no host sync):
- `clip_ratio/low_mean`, `clip_ratio/high_mean`, `clip_ratio/region_mean`: TRL's fractions of
  clipped ratios (computed on the ratio after the `delta` cap, as TRL does), a mean over valid
  tokens, or over the S sequences when both the ratio (sequence level) and the advantages (per
  sequence) are one per sequence (TRL's (B, 1) case). For cispo TRL logs `cispo_clip_ratio`
  (ratio > eps_high with A > 0): it is reported as `high_mean` and `region_mean`, and `low_mean`
  is 0. sapo has no hard clip: the three are NaN there (TRL logs none).
- `kl`: the mean of the (bias-corrected) KL estimate over valid tokens; NaN without ref_logp
  (with beta = 0, a given ref_logp still yields the statistic).
- `entropy`: the mean of `entropy` over valid tokens; NaN when no entropy is given.
- `ratio_mean`: the mean importance ratio before the delta cap, over valid tokens (per sequence at
  the sequence level).

Host reads: `policy_loss` validates `cu_seqlens` on the host once (`_checks.check_cu_seqlens`
reads it: one sync per call). `policy_loss_with_grad(..., validate=False)` skips every check and,
on the torch and triton backends, never reads a tensor on the host (no `.item()`, no boolean
indexing, no branch on a tensor's value, no host-to-device copy); the fused `linear_policy_loss`
validates once and calls it so. The reference backend reads cu_seqlens (it loops in Python).

Backends:
- `reference`: a Python loop over sequences, TRL's formulas verbatim on each, float64 for float64
  logp; gradients by autograd. The spec.
- `torch`: vectorized segment sums (`index_add`), fp32 (float64 for float64 logp), autograd.
- `triton`: a `torch.autograd.Function` over one kernel, `_policy_loss_fwd_kernel`, launched twice with
  one program per sequence looping its tokens in blocks of 512. Phase 0 (segmented reduction):
  the valid count and sum of log-ratios (sequence level: the sequence's ratio), then the
  sequence's sums of the per-token loss, of R_s = sum of dL_u/dc_s (the part of the gradient a
  sequence ratio spreads over its tokens) and of the statistics. A handful of [S]-sized torch ops
  on the device turn those into the normalizers ν_s, the loss and the statistics. Phase 1
  (finalizer): the closed-form g_t = d loss / d logp_t through ratio, clip (torch's subgradients:
  clamp's bounds inclusive, min's ties split half and half, as autograd of the reference gives),
  KL and normalizer; at the sequence level g_t also gets ν_s c_s R_s m_t / max(n_s, 1). Backward is
  `grad_out * g`. Both phases share one copy of the per-token algebra, so the loss and its
  gradient cannot drift apart. One program per sequence leaves SMs idle when S < 132, but the
  work is O(T) elementwise on [T] vectors (microseconds at T = 64k), next to an LM head of
  O(T V H).

`policy_loss_with_grad(...)` (internal; same arguments, plus `validate`) returns (loss, stats,
g_logp [T] fp32) with g_logp = d loss / d logp for every backend (torch and reference: autograd on
a detached leaf; triton: phase 1 of the kernel). The fused LM-head loss consumes g_logp.
"""

import math

import torch

from ._backend import resolve_backend
from ._checks import acc_dtype, check_config, check_loss_args, check_tensor
from ._loss_config import LossConfig
from ._triton import HAVE_TRITON, kernel_output, tl, triton

STAT_NAMES = (
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "kl",
    "entropy",
    "ratio_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_max",
    "vespo/phi_seq_mean",
)
_VESPO_LOG_MIN = math.log(1e-8)  # TRL's lower clamp of vespo's log-weights

_CLIP_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")



# --------------------------------------------------------------------------------------- public API


def policy_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    sampling_logp: torch.Tensor | None = None,
    config: LossConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO-family loss of packed sequences (see the module docstring for the formulas).

    Args:
        logp: (T,), float16/bfloat16/float32/float64: log-probability of each completion token
            under the policy being trained; the only differentiable input.
        advantages: (S,) one per sequence, or (T,) one per token (S == T is read per sequence), float.
        cu_seqlens: (S + 1,), int32: sequence boundaries (flash-attn's convention); read on the host.
        old_logp: (T,), float, or None: log-probabilities under the policy that sampled (None: on-policy).
        ref_logp: (T,), float, or None: reference-model log-probabilities; required when config.beta > 0.
        entropy: (T,), float, or None: per-token entropy; required when config.top_entropy_quantile < 1.
        importance_sampling_ratio: (T,), float, or None: rollout-engine correction multiplying the
            policy term of each token (TRL's vLLM importance sampling).
        mask: (T,), bool, or None: tokens that count (False where the target is ignore_index).
        sampling_logp: (T,), float, or None: log-probabilities under the rollout engine, read by the
            off-policy mask only (TRL's sampling_per_token_logps; None: old_logp).
        config: LossConfig.

    With config.entropy_coef != 0 the loss is `policy - entropy_coef * H` (H: the mean of `entropy`
    over the valid tokens, the high-entropy ones when top_entropy_quantile < 1); it is then
    differentiable in `entropy` too, through that term only.

    Returns:
        loss: 0-dim float32 (float64 for float64 logp on the torch and reference backends).
        stats: dict of 0-dim tensors, keys STAT_NAMES (TRL's metric names plus `ratio_mean`) and
        `policy_loss` (the loss without the entropy bonus, TRL's metric of that name).
    """
    _validate(logp, advantages, cu_seqlens, old_logp, ref_logp, entropy, importance_sampling_ratio, mask, config,
              sampling_logp)
    args = (logp, advantages, cu_seqlens, old_logp, ref_logp, entropy, importance_sampling_ratio, mask, config)
    backend = resolve_backend(logp.device)
    if backend == "reference":
        loss, stats = _reference(*args, sampling_logp)
    elif backend == "torch":
        loss, stats = _torch_loss(*args, sampling_logp)
    else:
        outs = _PolicyLossFunction.apply(*args, sampling_logp)
        loss, stats = outs[0], dict(zip(STAT_NAMES, outs[1:]))
    stats["policy_loss"] = loss.detach()
    if config.entropy_coef != 0.0:
        loss = loss - config.entropy_coef * entropy_bonus(entropy, mask, config).to(loss.dtype)
    return loss, stats


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor | None, config: LossConfig) -> torch.Tensor:
    """TRL's entropy bonus H: the mean of `entropy` over the valid tokens that the policy term acts on
    (mask, times the high-entropy mask when top_entropy_quantile < 1), differentiable in entropy."""
    valid = torch.ones_like(entropy, dtype=torch.bool) if mask is None else mask  # [T]
    eff = valid
    if config.top_entropy_quantile < 1.0:
        eff = _high_entropy_mask(entropy, valid, config.top_entropy_quantile)
    eff = eff.to(entropy.dtype)
    return (entropy * eff).sum() / eff.sum().clamp(min=1.0)


def policy_loss_with_grad(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    sampling_logp: torch.Tensor | None = None,
    config: LossConfig,
    validate: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """(loss, stats, g_logp): `policy_loss` plus g_logp (T,) float32 = d loss / d logp, nothing retained.

    Internal: for the fused LM-head loss, which turns g_logp into gradients of hidden and weight.
    `validate=False` skips the argument checks, including the host read of cu_seqlens (the
    caller has checked them once). The entropy bonus (config.entropy_coef) is NOT included: the
    caller adds `- entropy_coef * entropy_bonus(...)` on its differentiable entropies.
    """
    if validate:
        _validate(logp, advantages, cu_seqlens, old_logp, ref_logp, entropy, importance_sampling_ratio, mask, config,
                  sampling_logp)
    args = (advantages, cu_seqlens, old_logp, ref_logp, entropy, importance_sampling_ratio, mask, config)
    backend = resolve_backend(logp.device)
    if backend == "triton":
        return _triton_forward(logp, *args, sampling_logp, need_grad=True)
    fn = _reference if backend == "reference" else _torch_loss
    dtype = acc_dtype(logp.dtype)
    leaf = logp.detach().to(dtype).requires_grad_(True)  # [T]
    with torch.enable_grad():
        loss, stats = fn(leaf, *args, sampling_logp)
        (g,) = torch.autograd.grad(loss, leaf, allow_unused=True)
    if g is None:  # T == 0
        g = torch.zeros_like(leaf)
    return loss.detach(), stats, g


# ---------------------------------------------------------------------------------- argument checks


def _validate(logp, advantages, cu_seqlens, old_logp, ref_logp, entropy, isr, mask, config, sampling_logp=None):
    check_config(config)
    check_tensor("logp", logp, ndim=1, float_=True)
    T = logp.numel()
    if mask is not None:
        check_tensor("mask", mask, ndim=1, dtype=torch.bool)
        if mask.numel() != T:
            raise ValueError(f"mask must have one value per token (T={T}), got {mask.numel()}")
    per_token = dict(old_logp=old_logp, ref_logp=ref_logp, entropy=entropy, importance_sampling_ratio=isr,
                     sampling_logp=sampling_logp)
    check_loss_args(config, T, advantages, cu_seqlens, per_token=per_token, logp=logp, mask=mask)
    if config.top_entropy_quantile < 1.0 and entropy is None:
        raise ValueError(
            f"entropy (T,) is required when config.top_entropy_quantile < 1 (got {config.top_entropy_quantile}): "
            "the high-entropy token mask is computed from it"
        )
    if config.entropy_coef != 0.0 and entropy is None:
        raise ValueError(
            f"entropy (T,) is required when config.entropy_coef != 0 (got {config.entropy_coef}): the entropy "
            "bonus is its mean"
        )


# ---------------------------------------------------------------------------------------- reference


def _reference(logp, advantages, cu_seqlens, old_logp, ref_logp, entropy, isr, mask, config, sampling_logp=None):
    """The spec: TRL's `_compute_loss` formulas applied one sequence at a time."""
    dt = acc_dtype(logp.dtype)
    device = logp.device
    T = logp.numel()
    cu = cu_seqlens.tolist()
    S = len(cu) - 1
    data = lambda x: None if x is None else x.detach().to(dt)  # noqa: E731
    old, ref, isr_, adv = data(old_logp), data(ref_logp), data(isr), data(advantages)
    samp = data(sampling_logp)
    lp_all = logp.to(dt)
    m_all = torch.ones(T, dtype=torch.bool, device=device) if mask is None else mask
    per_token_adv = adv.numel() == T and T != S
    emask_all = None
    if config.top_entropy_quantile < 1.0:
        ent = entropy.detach()
        local = ent[m_all].float()  # TRL's get_high_entropy_mask: the quantile in fp32
        if local.numel() == 0:
            emask_all = torch.zeros(T, dtype=torch.bool, device=device)
        else:
            thr = torch.quantile(local, 1 - config.top_entropy_quantile)
            emask_all = ((ent * m_all) >= thr) & m_all
    eps_low, eps_high = config.epsilon_low, config.epsilon_high
    seq_loss, seq_n, seq_c1 = [], [], []
    kl_parts, c1_parts, flags = [], [], []  # per token (or per sequence) pieces of the statistics
    seq_flags, phi_parts = [], []  # per-sequence clip fractions (TRL's masked_seq_mean), vespo weights
    for s in range(S):
        sl = slice(cu[s], cu[s + 1])
        lp, m = lp_all[sl], m_all[sl].to(dt)
        # TRL multiplies by the mask; zeroing masked entries first keeps garbage there out of exp
        lp = torch.where(m > 0, lp, torch.zeros_like(lp))
        o = lp.detach() if old is None else torch.where(m > 0, old[sl], torch.zeros_like(lp))
        A = adv[sl] if per_token_adv else adv[s].reshape(1)  # TRL's (B, T) or (B, 1)
        log_ratio = lp - o
        if config.importance_sampling_level == "token":
            log_w = log_ratio
        else:
            log_w = ((log_ratio * m).sum() / m.sum().clamp(min=1.0)).reshape(1)
        coef_1 = torch.exp(log_w)
        opm = None
        if config.off_policy_mask_threshold is not None:  # TRL's get_off_policy_mask
            smp = o if samp is None else torch.where(m > 0, samp[sl], torch.zeros_like(lp))
            kl_div = torch.nan_to_num(smp - lp.detach(), nan=0.0)
            avg_kl = (kl_div * m).sum() / m.sum().clamp(min=1.0)
            opm = ((A >= 0) | (avg_kl <= config.off_policy_mask_threshold)).to(dt)
        per_token_kl = None
        if ref is not None:
            r = torch.where(m > 0, ref[sl], torch.zeros_like(lp))
            if config.kl_estimator == "k1":
                per_token_kl = lp - r
            elif config.kl_estimator == "k2":
                per_token_kl = 0.5 * (lp - r) ** 2
            else:
                per_token_kl = torch.exp(r - lp) - (r - lp) - 1
            if config.use_bias_correction_kl:
                per_token_kl = per_token_kl * coef_1
        if config.loss_type == "cispo":
            clamped = torch.clamp(coef_1, max=eps_high).detach()
            per_token_loss = -clamped * A * lp
            high = (coef_1 > eps_high) & (A > 0)
            low = torch.zeros_like(high)
        elif config.loss_type in _CLIP_TYPES:
            coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
            if config.delta is not None:
                coef_1 = torch.clamp(coef_1, max=config.delta)
            per_token_loss = -torch.min(coef_1 * A, coef_2 * A)
            low = (coef_1 < 1 - eps_low) & (A < 0)
            high = (coef_1 > 1 + eps_high) & (A > 0)
        elif config.loss_type == "vespo":  # TRL's get_gamma_weights, one sequence
            with torch.no_grad():
                seq_lr = (torch.clamp(log_ratio.detach(), -20.0, 20.0) * m).sum().reshape(1)  # TRL's (B, 1)
                if isr_ is not None:
                    r_is = torch.where(m > 0, isr_[sl], torch.ones_like(lp))
                    seq_lr = seq_lr + torch.clamp(torch.log(r_is), _VESPO_LOG_MIN, 20.0).sum()
                log_w_seq = torch.clamp(seq_lr, _VESPO_LOG_MIN, 20.0)
                nonneg = A >= 0
                k = torch.where(nonneg, config.vespo_k_pos, config.vespo_k_neg)  # fp32, as TRL's
                lam = torch.where(nonneg, config.vespo_lambda_pos, config.vespo_lambda_neg).clamp(min=1e-4)
                phi = torch.exp(lam + k * log_w_seq - lam * torch.exp(log_w_seq))
                phi = phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).to(dt)  # [1] or [n]
            per_token_loss = -phi * A * lp
            phi_parts.append(phi.sum() if not per_token_adv else (phi * m).sum())
            low = high = None
        else:  # sapo
            tau = torch.where(A > 0, config.sapo_temperature_pos, config.sapo_temperature_neg).to(dt)
            per_token_loss = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * A
            low = high = None
        per_token_loss = per_token_loss.expand(lp.shape)
        if opm is not None:
            per_token_loss = per_token_loss * opm
        if emask_all is not None:
            per_token_loss = per_token_loss * emask_all[sl]
        if isr_ is not None and config.loss_type != "vespo":
            per_token_loss = per_token_loss * torch.where(m > 0, isr_[sl], torch.ones_like(lp))
        if config.beta != 0.0:
            per_token_loss = per_token_loss + config.beta * per_token_kl
        seq_loss.append((per_token_loss * m).sum())
        seq_n.append(m.sum())
        seq_c1.append(torch.exp(log_w.detach()))
        if per_token_kl is not None:
            kl_parts.append((per_token_kl.detach() * m).sum())
        if low is not None:
            if config.importance_sampling_level == "sequence" and not per_token_adv:  # TRL's (B, 1) case
                flags.append((low.to(dt).sum(), high.to(dt).sum(), torch.ones((), dtype=dt, device=device)))
                seq_flags.append((low.to(dt).sum(), high.to(dt).sum()))
            else:
                lw, hg = low.expand(lp.shape).to(dt), high.expand(lp.shape).to(dt)
                flags.append(((lw * m).sum(), (hg * m).sum(), m.sum()))
                seq_flags.append(((lw * m).sum() / m.sum(), (hg * m).sum() / m.sum()))  # NaN when empty
        if config.importance_sampling_level == "token":
            c1_parts.append((torch.exp(log_w.detach()) * m).sum())
        else:
            c1_parts.append(torch.exp(log_w.detach()).sum())
    zero = torch.zeros((), dtype=dt, device=device)
    # S = 0 (then T = 0): an empty sum still hangs off logp, so backward gives its (empty) gradient
    seq_loss = torch.stack(seq_loss) if S else lp_all.sum().reshape(1)[:0]
    seq_n = torch.stack(seq_n) if S else zero.new_zeros(0)
    N = seq_n.sum()
    lt = config.loss_type
    if lt in ("grpo", "sapo"):
        loss = (seq_loss / seq_n.clamp(min=1.0)).sum() / max(S, 1)
    elif lt == "bnpo":
        loss = seq_loss.sum() / N.clamp(min=1.0)
    elif lt == "dr_grpo":
        loss = seq_loss.sum() / (max(S, 1) * config.max_completion_length)
    elif lt in ("dapo", "cispo", "vespo"):
        items = N if config.num_items_in_batch is None else torch.as_tensor(config.num_items_in_batch).to(dt)
        loss = seq_loss.sum() / items.to(device).clamp(min=1.0)
    else:  # luspo
        loss = seq_loss.sum() / max(S, 1)
    stats = {}
    if config.loss_type in _CLIP_TYPES and S:
        nanmin = lambda v: v[~v.isnan()].min() if (~v.isnan()).any() else _nan(dt, device)  # noqa: E731
        nanmax = lambda v: v[~v.isnan()].max() if (~v.isnan()).any() else _nan(dt, device)  # noqa: E731
        stats["clip_ratio/low_min"] = nanmin(torch.stack([f[0] for f in seq_flags]))
        stats["clip_ratio/high_max"] = nanmax(torch.stack([f[1] for f in seq_flags]))
    else:
        stats["clip_ratio/low_min"] = stats["clip_ratio/high_max"] = _nan(dt, device)
    if config.loss_type == "vespo":
        den = N.clamp(min=1.0) if per_token_adv else max(S, 1)
        stats["vespo/phi_seq_mean"] = sum(phi_parts, zero) / den
    else:
        stats["vespo/phi_seq_mean"] = _nan(dt, device)
    if config.loss_type in ("sapo", "vespo"):
        for k in STAT_NAMES[:3]:
            stats[k] = _nan(dt, device)
    else:
        lo_sum = sum((f[0] for f in flags), zero)
        hi_sum = sum((f[1] for f in flags), zero)
        cnt = sum((f[2] for f in flags), zero).clamp(min=1.0)
        stats["clip_ratio/low_mean"] = lo_sum / cnt
        stats["clip_ratio/high_mean"] = hi_sum / cnt
        stats["clip_ratio/region_mean"] = (lo_sum + hi_sum) / cnt
    stats["kl"] = sum(kl_parts, zero) / N.clamp(min=1.0) if ref is not None else _nan(dt, device)
    if entropy is not None:
        stats["entropy"] = (entropy.detach().to(dt) * m_all).sum() / N.clamp(min=1.0)
    else:
        stats["entropy"] = _nan(dt, device)
    ratio_den = N.clamp(min=1.0) if config.importance_sampling_level == "token" else max(S, 1)
    stats["ratio_mean"] = sum(c1_parts, zero) / ratio_den
    return loss, {k: stats[k] for k in STAT_NAMES}


# --------------------------------------------------------------------------------------- torch path


def _torch_loss(logp, advantages, cu_seqlens, old_logp, ref_logp, entropy, isr, mask, config, sampling_logp=None):
    """Vectorized over tokens and sequences (segment sums with index_add), differentiable in logp."""
    dt = acc_dtype(logp.dtype)
    device = logp.device
    T = logp.numel()
    S = cu_seqlens.numel() - 1
    sid = _segment_ids(cu_seqlens, T)  # [T]
    m = torch.ones(T, dtype=torch.bool, device=device) if mask is None else mask  # [T]
    mf = m.to(dt)  # [T]
    zeros = torch.zeros(T, dtype=dt, device=device)  # [T]
    seg_sum = lambda x: torch.zeros(S, dtype=dt, device=device).index_add(0, sid, x)  # noqa: E731  [T] -> [S]

    lp = torch.where(m, logp.to(dt), zeros)  # [T] masked entries never reach an exp
    old = lp.detach() if old_logp is None else torch.where(m, old_logp.detach().to(dt), zeros)  # [T]
    adv = advantages.detach().to(dt)
    per_seq_adv = adv.numel() == S
    A = adv[sid] if per_seq_adv else adv  # [T]
    n_seq = seg_sum(mf)  # [S]
    N = n_seq.sum()
    log_ratio = lp - old  # [T]
    seq_level = config.importance_sampling_level == "sequence"
    if seq_level:
        log_w_seq = seg_sum(log_ratio * mf) / n_seq.clamp(min=1)  # [S]
        coef_1 = torch.exp(log_w_seq)[sid]  # [T]
    else:
        coef_1 = torch.exp(log_ratio)  # [T]
    eps_low, eps_high = config.epsilon_low, config.epsilon_high
    per_token_kl = None
    if ref_logp is not None:
        ref = torch.where(m, ref_logp.detach().to(dt), zeros)  # [T]
        if config.kl_estimator == "k1":
            per_token_kl = lp - ref
        elif config.kl_estimator == "k2":
            per_token_kl = 0.5 * (lp - ref) ** 2
        else:
            per_token_kl = torch.exp(ref - lp) - (ref - lp) - 1
        if config.use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1  # [T]
    opm, phi, phi_stat = _policy_factors(
        lp.detach(), old, sampling_logp, A, adv, isr, m, sid, n_seq, config, dt, per_seq_adv
    )
    capped = coef_1
    if config.loss_type == "vespo":
        per_token_loss = -phi * A * lp
        low = high = None
    elif config.loss_type == "cispo":
        per_token_loss = -torch.clamp(coef_1, max=eps_high).detach() * A * lp
        low = torch.zeros(T, dtype=torch.bool, device=device)
        high = (coef_1 > eps_high) & (A > 0)
    elif config.loss_type in _CLIP_TYPES:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        if config.delta is not None:
            capped = torch.clamp(coef_1, max=config.delta)
        per_token_loss = -torch.min(capped * A, coef_2 * A)
        low = (capped < 1 - eps_low) & (A < 0)
        high = (capped > 1 + eps_high) & (A > 0)
    else:  # sapo
        # fp32 temperatures, as TRL's torch.where over two Python floats makes them (1.05 -> 1.04999995);
        # 0-dim CPU tensors enter a device op as scalars, with no copy
        pos = torch.tensor(config.sapo_temperature_pos, dtype=torch.float32)
        neg = torch.tensor(config.sapo_temperature_neg, dtype=torch.float32)
        tau = torch.where(A > 0, pos, neg).to(dt)  # [T]
        per_token_loss = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * A
        low = high = None
    if opm is not None:
        per_token_loss = per_token_loss * opm
    if config.top_entropy_quantile < 1.0:
        per_token_loss = per_token_loss * _high_entropy_mask(entropy, m, config.top_entropy_quantile)
    if isr is not None and config.loss_type != "vespo":
        per_token_loss = per_token_loss * torch.where(m, isr.detach().to(dt), torch.ones_like(zeros))
    if config.beta != 0.0:
        per_token_loss = per_token_loss + config.beta * per_token_kl
    seq_loss = seg_sum(per_token_loss * mf)  # [S]
    loss = (_normalizers(config, n_seq, dt) * seq_loss).sum()

    stats = {}
    Nc = N.clamp(min=1)
    stats["vespo/phi_seq_mean"] = phi_stat
    if low is None:
        for k in STAT_NAMES[:3]:
            stats[k] = _nan(dt, device)
    elif seq_level and per_seq_adv:  # TRL's (B, 1) case
        stats.update(_sequence_clip_stats(torch.exp(log_w_seq.detach()), adv, config, dt))
    else:
        stats["clip_ratio/low_mean"] = (low.to(dt) * mf).sum() / Nc
        stats["clip_ratio/high_mean"] = (high.to(dt) * mf).sum() / Nc
        stats["clip_ratio/region_mean"] = ((low | high).to(dt) * mf).sum() / Nc
    if low is None or config.loss_type not in _CLIP_TYPES:
        stats["clip_ratio/low_min"] = stats["clip_ratio/high_max"] = _nan(dt, device)
    elif not (seq_level and per_seq_adv):
        stats["clip_ratio/low_min"] = _seq_nanmin(seg_sum(low.to(dt) * mf), n_seq, largest=False)
        stats["clip_ratio/high_max"] = _seq_nanmin(seg_sum(high.to(dt) * mf), n_seq, largest=True)
    stats["kl"] = (per_token_kl.detach() * mf).sum() / Nc if per_token_kl is not None else _nan(dt, device)
    stats["entropy"] = (
        (torch.where(m, entropy.detach().to(dt), zeros)).sum() / Nc if entropy is not None else _nan(dt, device)
    )
    if seq_level:
        stats["ratio_mean"] = torch.exp(log_w_seq.detach()).sum() / max(S, 1)
    else:
        stats["ratio_mean"] = (coef_1.detach() * mf).sum() / Nc
    return loss, {k: stats[k] for k in STAT_NAMES}


def _policy_factors(lp_det, old, sampling_logp, A, advantages, isr, m, sid, n_seq, config, dt, per_seq_adv):
    """The detached per-token factors of the policy term that are functions of whole sequences,
    on the device with no host read (shared by the torch path and the triton launcher):

    opm [T] (or None): TRL's off-policy sequence mask, 1 keep / 0 drop;
    phi [T] (or None): vespo's gamma weight of the sequence ratio (TRL's get_gamma_weights);
    phi_stat: 0-dim, TRL's `vespo/phi_seq_mean` (a mean over sequences, or over valid tokens with
    per-token advantages); NaN unless vespo.
    lp_det, old: [T] masked (0 at invalid tokens), dt; A [T]; m [T] bool; sid [T]; n_seq [S].
    """
    S = n_seq.numel()
    device = lp_det.device
    zeros = torch.zeros_like(lp_det)
    seg_sum = lambda x: torch.zeros(S, dtype=dt, device=device).index_add(0, sid, x)  # noqa: E731
    opm = phi = None
    phi_stat = _nan(dt, device)
    if config.off_policy_mask_threshold is not None:
        smp = old if sampling_logp is None else torch.where(m, sampling_logp.detach().to(dt), zeros)
        kl_div = torch.where(m, torch.nan_to_num(smp - lp_det, nan=0.0), zeros)  # [T]
        avg_kl = seg_sum(kl_div) / n_seq.clamp(min=1)  # [S]
        opm = ((A >= 0) | (avg_kl[sid] <= config.off_policy_mask_threshold)).to(dt)  # [T]
    if config.loss_type == "vespo":
        seq_lr = seg_sum(torch.where(m, torch.clamp(lp_det - old, -20.0, 20.0), zeros))  # [S]
        if isr is not None:
            log_is = torch.clamp(torch.log(isr.detach().to(dt)), _VESPO_LOG_MIN, 20.0)
            seq_lr = seq_lr + seg_sum(torch.where(m, log_is, zeros))
        log_w = torch.clamp(seq_lr, _VESPO_LOG_MIN, 20.0)  # [S]
        # per sequence (TRL's (B, 1)) or per token when the advantages are
        adv = advantages.detach().to(dt) if per_seq_adv else A  # [S] or [T]
        if not per_seq_adv:
            log_w = log_w[sid]  # [T]
        nonneg = adv >= 0
        # fp32 k and lambda, as TRL's torch.where over Python floats makes them
        f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731 0-dim CPU: enters as a scalar
        k = torch.where(nonneg, f32(config.vespo_k_pos), f32(config.vespo_k_neg)).to(dt)
        lam = torch.where(nonneg, f32(config.vespo_lambda_pos), f32(config.vespo_lambda_neg)).clamp(min=1e-4).to(dt)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        if per_seq_adv:  # the mean over the S sequences, empty ones included (phi = 1 there)
            phi_stat = phi.sum() / max(S, 1)
            phi = phi[sid]  # [T]
        else:
            mf = m.to(dt)
            phi_stat = (phi * mf).sum() / mf.sum().clamp(min=1)
    return opm, phi, phi_stat


def _seq_nanmin(sums, n_seq, *, largest):
    """TRL's nanmin (largest=False) / nanmax of the per-sequence means sums / n_seq over the
    sequences with a valid token (0/0 is NaN there); NaN when there is none. No host read."""
    ok = n_seq > 0
    vals = sums / n_seq.clamp(min=1)
    fill = math.inf if not largest else -math.inf
    pad = torch.full((1,), fill, dtype=vals.dtype, device=vals.device)  # S = 0: min over one fill
    ext = torch.cat([torch.where(ok, vals, torch.full_like(vals, fill)), pad])
    r = ext.max() if largest else ext.min()
    return torch.where(ok.any(), r, torch.full_like(r, math.nan))


def _sequence_clip_stats(c_seq, adv, config, dtype):
    """TRL's clip fractions in its (B, 1) case (a sequence-level ratio and one advantage per
    sequence): one flag per sequence, a mean over the S sequences. c_seq [S]: the sequence
    ratios before the delta cap; adv [S]. Shared by the torch path and the triton launcher."""
    S = c_seq.numel()
    if config.loss_type == "cispo":
        lo = torch.zeros(S, dtype=torch.bool, device=c_seq.device)  # [S] cispo has no lower clip
        hi = (c_seq > config.epsilon_high) & (adv > 0)  # [S]
    else:
        cap = c_seq if config.delta is None else c_seq.clamp(max=config.delta)  # [S]
        lo = (cap < 1 - config.epsilon_low) & (adv < 0)
        hi = (cap > 1 + config.epsilon_high) & (adv > 0)
    S1 = max(S, 1)
    ones = torch.ones(S, dtype=dtype, device=c_seq.device)  # every sequence counts, empty ones included
    return {
        "clip_ratio/low_mean": lo.to(dtype).sum() / S1,
        "clip_ratio/high_mean": hi.to(dtype).sum() / S1,
        "clip_ratio/region_mean": (lo | hi).to(dtype).sum() / S1,
        "clip_ratio/low_min": _seq_nanmin(lo.to(dtype), ones, largest=False),
        "clip_ratio/high_max": _seq_nanmin(hi.to(dtype), ones, largest=True),
    }


def _high_entropy_mask(entropy, valid, quantile):
    """TRL's `get_high_entropy_mask` (one process) without a host sync: tokens whose entropy is at
    least the (1 - quantile) quantile of the valid tokens' entropies, valid tokens only.

    torch.quantile needs the valid entries as their own tensor (a boolean index: a host sync);
    instead invalid entries sort last as +inf and the rank (1 - q)(n - 1) of torch's linear
    interpolation is formed on the device, in the same dtype and order of operations, so the
    threshold is bit-identical to TRL's.
    """
    e = entropy.detach()  # [T]
    e32 = e.float()  # [T] TRL takes the quantile in fp32 (`.float()`) and compares in the input dtype
    T = e.numel()
    if T == 0:
        return valid.clone()
    ordered = torch.sort(torch.where(valid, e32, torch.full_like(e32, math.inf))).values  # [T], valid first
    last = (valid.sum() - 1).to(torch.float32)  # n - 1 (-1 when no token is valid: all-False mask below)
    # fp32(n - 1) * fp32(1 - q), as torch.quantile's `q * last_index` (a Python scalar: no copy to the device)
    rank = (last * (1.0 - quantile)).clamp(min=0)  # 0-dim
    below = rank.long().clamp(max=T - 1).reshape(1)  # [1]
    above = rank.ceil().long().clamp(max=T - 1).reshape(1)  # [1]
    threshold = torch.lerp(ordered.index_select(0, below), ordered.index_select(0, above), rank - below)  # [1]
    return ((e * valid) >= threshold) & valid  # [T]


def _segment_ids(cu_seqlens, T):
    """(T,) int64 sequence index of each token, on the device (empty sequences own no token)."""
    pos = torch.arange(T, dtype=torch.int32, device=cu_seqlens.device)  # [T]
    return torch.searchsorted(cu_seqlens[1:].contiguous(), pos, right=True)  # [T]


def _normalizers(config, n_seq, dtype):
    """ν_s (S,): the weight of sequence s's sum of m L in the loss (TRL's normalizers).

    Host numbers enter as fills (torch.full), never as host-to-device copies: a pageable copy
    waits for the device.
    """
    S = n_seq.numel()
    S1 = max(S, 1)
    lt = config.loss_type
    full = lambda value: torch.full((S,), value, dtype=dtype, device=n_seq.device)  # noqa: E731
    if lt in ("grpo", "sapo"):
        return 1.0 / (S1 * n_seq.clamp(min=1))
    if lt == "dr_grpo":
        return full(1.0 / (S1 * config.max_completion_length))
    if lt == "luspo":
        return full(1.0 / S1)
    items = config.num_items_in_batch if lt in ("dapo", "cispo") else None  # bnpo: the valid tokens
    if items is None:
        return (1.0 / n_seq.sum().clamp(min=1)).expand(S)
    if isinstance(items, torch.Tensor):
        return (1.0 / items.to(device=n_seq.device, dtype=dtype).clamp(min=1)).expand(S)
    return full(1.0 / max(float(items), 1.0))


def _nan(dtype, device):
    return torch.full((), math.nan, dtype=dtype, device=device)


# --------------------------------------------------------------------- triton kernels and launchers

_POLICY_CODE = {"cispo": 1, "sapo": 2, "vespo": 3}  # every other loss type is the clip objective (0)
_KL_CODE = {"k1": 1, "k2": 2, "k3": 3}
_NCOL = 8  # columns of the per-sequence output of phase 0, see _policy_loss_fwd_kernel
_BLOCK = 512  # tokens per loop step of a sequence program (completions run 100s-10,000s of tokens)


if HAVE_TRITON:
    from ._triton import fp32_ptr, i8_ptr, i32_ptr

    @triton.jit
    def _policy_loss_fwd_kernel(
        # [T] each (adv: [S] or [T]), cast to fp32 by the launcher
        logp_ptr: fp32_ptr, old_ptr: fp32_ptr, ref_ptr: fp32_ptr, adv_ptr: fp32_ptr, isr_ptr: fp32_ptr,
        emask_ptr: i8_ptr, mask_ptr: i8_ptr,  # [T] bool masks viewed as int8
        cu_ptr: i32_ptr,  # [S + 1]
        # [S, NCOL], phase 0 out: n, mean log-ratio, sum mL, R = sum m dL/dc, sum mK, low, high, sum mc
        seq_ptr: fp32_ptr,
        coef_ptr: fp32_ptr,  # [S, 3], phase 1 in: ν_s, c_s (sequence ratio), ν_s c_s R_s / max(n_s, 1)
        g_ptr: fp32_ptr,  # [T], phase 1 out: d loss / d logp
        eps_low: tl.float32, eps_high: tl.float32, delta: tl.float32, beta: tl.float32,
        tau_pos: tl.float32, tau_neg: tl.float32,
        PHASE: tl.constexpr,  # 0: per-sequence sums; 1: per-token gradient
        POLICY: tl.constexpr,  # 0 clip, 1 cispo, 2 sapo, 3 vespo
        SEQ_LEVEL: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, KL_IN_LOSS: tl.constexpr,
        KL_EST: tl.constexpr, BIAS_CORR: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_MASK: tl.constexpr,
        HAS_EMASK: tl.constexpr, HAS_ISR: tl.constexpr, ADV_PER_TOKEN: tl.constexpr,
        NCOL: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """One program per sequence, looping its tokens in blocks. The two phases share the per-token
        algebra (one copy of it, so the loss and its gradient cannot drift apart)."""
        s = tl.program_id(0)
        start = tl.load(cu_ptr + s).to(tl.int64)
        end = tl.load(cu_ptr + s + 1).to(tl.int64)
        arange = tl.arange(0, BLOCK)
        if ADV_PER_TOKEN:
            seq_adv = 0.0
        else:
            seq_adv = tl.load(adv_ptr + s).to(tl.float32)
        mean_lr = 0.0
        c_seq = 1.0
        nu = 1.0
        g_seq = 0.0
        if PHASE == 0:
            if SEQ_LEVEL:
                # pass 1: valid count and sum of log-ratios -> the sequence's ratio (GSPO)
                n1 = tl.zeros([BLOCK], dtype=tl.float32)
                lr1 = tl.zeros([BLOCK], dtype=tl.float32)
                for i in range(start, end, BLOCK):
                    offs = i + arange
                    valid = offs < end
                    if HAS_MASK:
                        valid = valid & (tl.load(mask_ptr + offs, mask=valid, other=0) != 0)
                    lp = tl.load(logp_ptr + offs, mask=valid, other=0.0)
                    if HAS_OLD:
                        lr1 += lp - tl.load(old_ptr + offs, mask=valid, other=0.0)
                    n1 += valid.to(tl.float32)
                mean_lr = tl.sum(lr1, axis=0) / tl.maximum(tl.sum(n1, axis=0), 1.0)
                c_seq = tl.exp(mean_lr)
        else:
            nu = tl.load(coef_ptr + s * 3)
            c_seq = tl.load(coef_ptr + s * 3 + 1)
            g_seq = tl.load(coef_ptr + s * 3 + 2)
        n_acc = tl.zeros([BLOCK], dtype=tl.float32)
        loss_acc = tl.zeros([BLOCK], dtype=tl.float32)
        r_acc = tl.zeros([BLOCK], dtype=tl.float32)
        kl_acc = tl.zeros([BLOCK], dtype=tl.float32)
        low_acc = tl.zeros([BLOCK], dtype=tl.float32)
        high_acc = tl.zeros([BLOCK], dtype=tl.float32)
        c_acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(start, end, BLOCK):
            offs = i + arange
            inb = offs < end
            valid = inb
            if HAS_MASK:
                valid = valid & (tl.load(mask_ptr + offs, mask=inb, other=0) != 0)
            # masked-out tokens read lp = old = ref = 0 and isr = 1: whatever they hold never reaches an exp
            lp = tl.load(logp_ptr + offs, mask=valid, other=0.0)
            zero = tl.zeros_like(lp)
            one = zero + 1.0
            if ADV_PER_TOKEN:
                A = tl.load(adv_ptr + offs, mask=valid, other=0.0)
            else:
                A = zero + seq_adv
            w = one  # entropy mask x IS ratio: weights of the policy term only (TRL's order)
            if HAS_ISR:
                w = tl.load(isr_ptr + offs, mask=valid, other=1.0)
            if HAS_EMASK:
                w = tl.where(tl.load(emask_ptr + offs, mask=valid, other=0) != 0, w, 0.0)
            if SEQ_LEVEL:
                c1 = zero + c_seq
            elif HAS_OLD:
                c1 = tl.exp(lp - tl.load(old_ptr + offs, mask=valid, other=0.0))
            else:
                c1 = one  # exp(logp - logp.detach())
            # policy term P, dP/dc (through the ratio) and dP/dlogp at a fixed ratio (cispo)
            if POLICY == 0:
                c2 = tl.minimum(tl.maximum(c1, 1.0 - eps_low), 1.0 + eps_high)
                if HAS_DELTA:
                    cap = tl.minimum(c1, delta)
                    g_cap = tl.where(c1 <= delta, one, zero)  # clamp's gradient: bound inclusive
                else:
                    cap = c1
                    g_cap = one
                g_c2 = tl.where((c1 >= 1.0 - eps_low) & (c1 <= 1.0 + eps_high), one, zero)
                a = cap * A
                b = c2 * A
                P = -tl.minimum(a, b)
                # torch.min's subgradient: the smaller side gets it; a tie (on-policy: always) splits it
                dP = -A * tl.where(a < b, g_cap, tl.where(a > b, g_c2, 0.5 * (g_cap + g_c2)))
                dP_direct = zero
                low = (cap < 1.0 - eps_low) & (A < 0.0)
                high = (cap > 1.0 + eps_high) & (A > 0.0)
            elif POLICY == 1:
                capped = tl.minimum(c1, eps_high)  # detached in TRL: no gradient through the ratio
                P = -capped * A * lp
                dP = zero
                dP_direct = -capped * A
                low = zero > 0.0  # cispo has no lower clip: all False
                high = (c1 > eps_high) & (A > 0.0)
            elif POLICY == 3:
                # vespo: -phi A logp, phi (detached, with the off-policy mask) is the weight w
                P = -A * lp
                dP = zero
                dP_direct = -A
                low = zero > 0.0
                high = low
            else:
                tau = tl.where(A > 0.0, tau_pos, tau_neg)
                sg = tl.sigmoid(tau * (c1 - 1.0))
                P = -sg * 4.0 / tau * A
                dP = -4.0 * A * sg * (1.0 - sg)
                dP_direct = zero
                low = zero > 0.0  # no hard clip in sapo: its clip statistics are NaN (set on the host side)
                high = low
            # KL estimate k, its derivative at a fixed ratio, and the bias-corrected K = k c
            k = zero
            dk = zero
            if HAS_REF:
                d = tl.load(ref_ptr + offs, mask=valid, other=0.0) - lp
                if KL_EST == 1:
                    k = -d
                    dk = one
                elif KL_EST == 2:
                    k = 0.5 * d * d
                    dk = -d
                else:
                    ed = tl.exp(d)
                    k = ed - d - 1.0
                    dk = 1.0 - ed
            K = k
            dK = dk
            if BIAS_CORR:
                K = k * c1
                dK = dk * c1
            if PHASE == 0:
                L = P * w
                if KL_IN_LOSS:
                    L += beta * K
                n_acc += valid.to(tl.float32)
                loss_acc += tl.where(valid, L, 0.0)
                if SEQ_LEVEL:
                    r = dP * w
                    if KL_IN_LOSS and BIAS_CORR:
                        r += beta * k
                    r_acc += tl.where(valid, r, 0.0)
                kl_acc += tl.where(valid, K, 0.0)
                low_acc += (low & valid).to(tl.float32)
                high_acc += (high & valid).to(tl.float32)
                c_acc += tl.where(valid, c1, 0.0)
            else:
                g = dP_direct * w
                if not SEQ_LEVEL:
                    g += dP * w * c1  # d c / d logp = c at the token level
                if KL_IN_LOSS:
                    g += beta * dK
                    if BIAS_CORR and not SEQ_LEVEL:
                        g += beta * k * c1
                # the sequence ratio's share: d c_s / d logp_t = c_s m_t / max(n_s, 1), summed over s
                g = nu * g + g_seq
                tl.store(g_ptr + offs, tl.where(valid, g, 0.0), mask=inb)
        if PHASE == 0:
            row = seq_ptr + s.to(tl.int64) * NCOL
            tl.store(row + 0, tl.sum(n_acc, axis=0))
            tl.store(row + 1, mean_lr)
            tl.store(row + 2, tl.sum(loss_acc, axis=0))
            tl.store(row + 3, tl.sum(r_acc, axis=0))
            tl.store(row + 4, tl.sum(kl_acc, axis=0))
            tl.store(row + 5, tl.sum(low_acc, axis=0))
            tl.store(row + 6, tl.sum(high_acc, axis=0))
            tl.store(row + 7, tl.sum(c_acc, axis=0))


def _flags(config, ref_logp, isr, mask, advantages, T, S):
    """The kernel's constexpr switches for these inputs and this config."""
    per_token_adv = advantages.numel() == T and T != S
    return dict(
        POLICY=_POLICY_CODE.get(config.loss_type, 0),
        SEQ_LEVEL=config.importance_sampling_level == "sequence",
        HAS_REF=ref_logp is not None,
        KL_IN_LOSS=config.beta != 0.0,
        KL_EST=_KL_CODE[config.kl_estimator],
        BIAS_CORR=config.use_bias_correction_kl,
        HAS_DELTA=config.delta is not None and config.loss_type in _CLIP_TYPES,
        HAS_MASK=mask is not None,
        HAS_EMASK=config.top_entropy_quantile < 1.0,
        HAS_ISR=isr is not None,
        ADV_PER_TOKEN=per_token_adv,
    )


def _triton_forward(logp, advantages, cu_seqlens, old_logp, ref_logp, entropy, isr, mask, config, sampling_logp=None,
                    *, need_grad):
    """Phase 0 of the kernel, the [S]-sized normalizer and statistics ops, then phase 1 when need_grad.

    The sequence-wide factors of the policy term (off-policy mask, vespo's gamma weight) are
    formed before the launch with [T]/[S]-sized torch ops and enter the kernel, multiplied with
    the rollout importance-sampling ratio, as its per-token policy weight (the isr input)."""
    device = logp.device
    T = logp.numel()
    S = cu_seqlens.numel() - 1
    f32 = lambda x: None if x is None else x.detach().float().contiguous()  # noqa: E731 [T] vectors: <= 4T bytes
    lp, old, ref, adv, isr_, ent = f32(logp), f32(old_logp), f32(ref_logp), f32(advantages), f32(isr), f32(entropy)
    m = None if mask is None else mask.contiguous()
    cu = cu_seqlens.contiguous()  # [S + 1] int32
    valid = torch.ones(T, dtype=torch.bool, device=device) if m is None else m  # [T]
    emask = _high_entropy_mask(ent, valid, config.top_entropy_quantile) if config.top_entropy_quantile < 1.0 else None
    phi_stat = _nan(torch.float32, device)
    if config.off_policy_mask_threshold is not None or config.loss_type == "vespo":
        sid = _segment_ids(cu, T)  # [T]
        zeros = torch.zeros_like(lp)
        lpm = torch.where(valid, lp, zeros)
        oldm = lpm if old is None else torch.where(valid, old, zeros)
        per_seq_adv = adv.numel() == S
        A = adv[sid] if per_seq_adv else adv  # [T]
        n_seq = torch.zeros(S, dtype=torch.float32, device=device).index_add(0, sid, valid.float())  # [S]
        opm, phi, phi_stat = _policy_factors(
            lpm, oldm, sampling_logp, A, adv, isr_, valid, sid, n_seq, config, torch.float32, per_seq_adv
        )
        w = phi if config.loss_type == "vespo" else isr_  # vespo: the IS ratio is inside phi
        if opm is not None:
            w = opm if w is None else w * opm
        isr_ = None if w is None else w.contiguous()
    elif config.loss_type == "vespo":
        isr_ = None
    flags = _flags(config, ref_logp, isr_, mask, advantages, T, S)
    as_i8 = lambda b: b.view(torch.int8)  # noqa: E731 bool -> int8, no copy
    dummy = lp  # stands in for absent optional inputs (never read: the constexpr flags say so)
    ptrs = (
        lp,
        old if old is not None else dummy,
        ref if ref is not None else dummy,
        adv,
        isr_ if isr_ is not None else dummy,
        as_i8(emask) if emask is not None else as_i8(valid),
        as_i8(m) if m is not None else as_i8(valid),
    )
    delta = float(config.delta) if config.delta is not None else 0.0
    scalars = (float(config.epsilon_low), float(config.epsilon_high), delta, float(config.beta),
               float(config.sapo_temperature_pos), float(config.sapo_temperature_neg))
    seq = kernel_output((S, _NCOL), dtype=torch.float32, device=device)  # [S, 8]
    launch = lambda phase, coef, g: _policy_loss_fwd_kernel[(S,)](  # noqa: E731
        *ptrs, cu, seq, coef, g, *scalars, PHASE=phase, HAS_OLD=old is not None, NCOL=_NCOL,
        BLOCK=_BLOCK, num_warps=4, **flags,
    )
    if S > 0:
        launch(0, seq, lp)  # coef and g are not touched in phase 0
    n_seq = seq[:, 0]  # [S]
    N = n_seq.sum()
    Nc = N.clamp(min=1)
    S1 = max(S, 1)
    nu = _normalizers(config, n_seq, torch.float32)  # [S]
    loss = (nu * seq[:, 2]).sum()
    seq_level = flags["SEQ_LEVEL"]
    c_seq = torch.exp(seq[:, 1])  # [S] (1 at the token level, where column 1 is 0)

    stats = {}
    stats["vespo/phi_seq_mean"] = phi_stat
    if config.loss_type in ("sapo", "vespo"):
        for k in STAT_NAMES[:3]:
            stats[k] = _nan(torch.float32, device)
    elif seq_level and not flags["ADV_PER_TOKEN"]:  # TRL's (B, 1) case
        stats.update(_sequence_clip_stats(c_seq, adv, config, torch.float32))
    else:
        lo, hi = seq[:, 5].sum(), seq[:, 6].sum()
        stats["clip_ratio/low_mean"] = lo / Nc
        stats["clip_ratio/high_mean"] = hi / Nc
        stats["clip_ratio/region_mean"] = (lo + hi) / Nc
    if config.loss_type not in _CLIP_TYPES:
        stats["clip_ratio/low_min"] = stats["clip_ratio/high_max"] = _nan(torch.float32, device)
    elif not (seq_level and not flags["ADV_PER_TOKEN"]):
        stats["clip_ratio/low_min"] = _seq_nanmin(seq[:, 5], n_seq, largest=False)
        stats["clip_ratio/high_max"] = _seq_nanmin(seq[:, 6], n_seq, largest=True)
    stats["kl"] = seq[:, 4].sum() / Nc if ref is not None else _nan(torch.float32, device)
    stats["entropy"] = (
        torch.where(valid, ent, torch.zeros_like(ent)).sum() / Nc if ent is not None else _nan(torch.float32, device)
    )
    stats["ratio_mean"] = c_seq.sum() / S1 if seq_level else seq[:, 7].sum() / Nc
    stats = {k: stats[k] for k in STAT_NAMES}
    if not need_grad:
        return loss, stats, None

    coef = torch.stack([nu, c_seq, nu * c_seq * seq[:, 3] / n_seq.clamp(min=1)], dim=1).contiguous()  # [S, 3]
    g = kernel_output((T,), dtype=torch.float32, device=device)  # [T]
    if S > 0:
        launch(1, coef, g)
    return loss, stats, g


# ----------------------------------------------------------------------------------------- autograd


class _PolicyLossFunction(torch.autograd.Function):
    """Forward: both phases of the kernel; backward: grad_out * g, g the closed-form d loss / d logp."""

    @staticmethod
    def forward(ctx, logp, advantages, cu_seqlens, old_logp, ref_logp, entropy, isr, mask, config, sampling_logp):
        loss, stats, g = _triton_forward(
            logp, advantages, cu_seqlens, old_logp, ref_logp, entropy, isr, mask, config, sampling_logp,
            need_grad=logp.requires_grad,
        )
        ctx.logp_dtype = logp.dtype
        ctx.save_for_backward(g if g is not None else loss)
        values = [stats[k] for k in STAT_NAMES]
        ctx.mark_non_differentiable(*values)
        return (loss, *values)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        (g,) = ctx.saved_tensors
        return (grad_loss * g).to(ctx.logp_dtype), None, None, None, None, None, None, None, None, None


# ------------------------------------------------------------------------------- AOT configurations


def aot_configs():
    """Every shipped configuration of the kernel, for ahead-of-time compilation (aot.py).

    The launcher casts per-token inputs to fp32 (every producer in this package returns fp32
    log-probabilities; a cast of a [T] vector is at most 4T bytes): every pointer has its own
    type. One entry per phase, objective (clip, cispo, sapo) and level, with every optional
    input present and the heaviest KL (k3, bias-corrected) and delta: the most live registers.
    """
    from .aot import AOTKernel

    return [
        AOTKernel(
            _policy_loss_fwd_kernel, None,
            dict(
                PHASE=phase, POLICY=policy, SEQ_LEVEL=seq_level, HAS_OLD=True, HAS_REF=True, KL_IN_LOSS=True,
                KL_EST=3, BIAS_CORR=True, HAS_DELTA=policy == 0, HAS_MASK=True, HAS_EMASK=True, HAS_ISR=True,
                ADV_PER_TOKEN=False, NCOL=_NCOL, BLOCK=_BLOCK,
            ),
            num_warps=4, num_stages=1,
        )
        for phase in (0, 1)
        for policy in (0, 1, 2, 3)  # clip, cispo, sapo, vespo
        for seq_level in (False, True)
    ]
