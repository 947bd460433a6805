"""Rollout-engine mismatch correction: the importance-sampling ratio between the training
policy and the engine that sampled the completions (TRL's `vllm_importance_sampling_*`).

An engine such as vLLM samples from its own kernels, so the probability it gave a sampled token
is not exactly the training forward's, even with the same weights. With `logp_train` the
training policy's log-prob of each sampled token (before the update) and `logp_sampling` the
engine's, the ratio exp(logp_train - logp_sampling) reweights the loss toward the policy the
trainer optimises (TRL's grpo_trainer, "truncated importance sampling"):

    token_*     per token:    rho_t = exp(logp_train_t - logp_sampling_t)
    sequence_*  per sequence: rho   = exp(sum_t (logp_train_t - logp_sampling_t)), on all its tokens
    *_truncate  rho <- clamp(rho, clip_min, clip_max)
    *_mask      rho <- 0 where rho < clip_min or rho > clip_max (that token / sequence is left out)

Tokens are laid out as the packed targets of `fastrft.packing.MicroBatch` ([T], sequences
delimited by `cu_seqlens`); ignored targets get ratio 1 (they carry no loss anyway). A NaN
sampling log-prob (an engine that could not score the token) counts as no difference, as TRL
does. The ratio goes to `linear_policy_loss(..., importance_sampling_ratio=rho)`.
"""

from __future__ import annotations

import math

import torch

MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
IGNORE = -100


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"vllm_importance_sampling_mode must be one of {MODES}, got {mode!r}")


def importance_sampling_ratio(
    logp_train: torch.Tensor,
    logp_sampling: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    mode: str = "sequence_mask",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The correction ratio, [T] float32.

    logp_train, logp_sampling: [T] float, the training and sampling log-probs of each target;
    cu_seqlens: [S+1] int, sequence boundaries over the T targets; valid: [T] bool (False for
    ignored targets: ratio 1, left out of sequence sums) or None (all valid)."""
    check_mode(mode)
    if logp_train.shape != logp_sampling.shape or logp_train.dim() != 1:
        raise ValueError(
            f"logp_train {tuple(logp_train.shape)} and logp_sampling {tuple(logp_sampling.shape)} must both be [T]"
        )
    diff = logp_train.float() - logp_sampling.float().to(logp_train.device)
    diff = torch.nan_to_num(diff, nan=0.0)
    if valid is not None:
        diff = diff.masked_fill(~valid, 0.0)
    if mode.startswith("sequence"):
        cu = cu_seqlens.to(diff.device, torch.long)
        lengths = cu[1:] - cu[:-1]
        seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=diff.device), lengths)
        sums = torch.zeros(lengths.numel(), device=diff.device, dtype=diff.dtype).index_add_(0, seq, diff)
        diff = sums[seq]
    ratio = torch.exp(diff)
    lo = -math.inf if clip_min is None else clip_min
    hi = math.inf if clip_max is None else clip_max
    if mode.endswith("truncate"):
        ratio = ratio.clamp(min=clip_min, max=clip_max) if (clip_min is not None or clip_max is not None) else ratio
    else:
        ratio = ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)
    if valid is not None:
        ratio = ratio.masked_fill(~valid, 1.0)
    return ratio


class MismatchStats:
    """Accumulates one step's mismatch metrics over its micro-batches, logged under TRL's names:
    sampling/sampling_logp_difference/{mean,max} (|logp_train - logp_sampling| over valid
    tokens), sampling/importance_sampling_ratio/{min,mean,max} (per token for token_* modes,
    per sequence for sequence_* modes) and sampling/importance_sampling_ratio/masked_fraction
    (the share of those ratios set to 0 by a *_mask mode; 0 for *_truncate)."""

    def __init__(self, mode: str):
        check_mode(mode)
        self.per_sequence = mode.startswith("sequence")
        self.masking = mode.endswith("mask")
        self.diff_sum = 0.0
        self.diff_n = 0
        self.diff_max = 0.0
        self.ratios: list[torch.Tensor] = []

    @torch.no_grad()
    def add(self, logp_train, logp_sampling, ratio, cu_seqlens, valid=None) -> None:
        d = (logp_train.float() - logp_sampling.float().to(logp_train.device)).abs()
        ok = ~torch.isnan(d)
        if valid is not None:
            ok &= valid
        if ok.any():
            self.diff_sum += float(d[ok].sum())
            self.diff_n += int(ok.sum())
            self.diff_max = max(self.diff_max, float(d[ok].max()))
        if self.per_sequence:
            cu = cu_seqlens.to(ratio.device, torch.long)
            starts = cu[:-1][cu[1:] > cu[:-1]]
            r = ratio[starts]
            if valid is not None:  # a sequence with no scored token carries no ratio
                r = r[valid[starts]]
        else:
            r = ratio if valid is None else ratio[valid]
        self.ratios.append(r.detach().float().cpu())

    def metrics(self) -> dict[str, float]:
        r = torch.cat(self.ratios) if self.ratios else torch.zeros(0)
        out = {
            "sampling/sampling_logp_difference/mean": self.diff_sum / self.diff_n if self.diff_n else 0.0,
            "sampling/sampling_logp_difference/max": self.diff_max,
            "sampling/importance_sampling_ratio/min": float(r.min()) if r.numel() else 0.0,
            "sampling/importance_sampling_ratio/mean": float(r.mean()) if r.numel() else 0.0,
            "sampling/importance_sampling_ratio/max": float(r.max()) if r.numel() else 0.0,
            "sampling/importance_sampling_ratio/masked_fraction": (
                float((r == 0).float().mean()) if (self.masking and r.numel()) else 0.0
            ),
        }
        return out


def packed_sampling_logprobs(sampling_logprobs: list[torch.Tensor], seq_ids: torch.Tensor,
                             device=None) -> torch.Tensor:
    """The engine's log-probs laid out as a micro-batch's targets: `sampling_logprobs` holds the
    step's P*G completions in flat order ([n_j] each, one per completion token); `seq_ids` [S]
    the completions of the micro-batch in packed order. Returns [T] float32."""
    parts = [sampling_logprobs[i] for i in seq_ids.tolist()]
    out = torch.cat(parts) if parts else torch.zeros(0)
    return out.to(device=device, dtype=torch.float32)
