"""`LossConfig`: the options of the GRPO loss family, under TRL `GRPOConfig`'s names and meanings.

A TRL user reads it at sight: `loss_type`, `importance_sampling_level`, `epsilon_low` (TRL's
`epsilon`), `epsilon_high`, `delta`, `beta`, `use_bias_correction_kl`, `max_completion_length`,
`sapo_temperature_pos/neg`, `vespo_k_pos/lambda_pos/k_neg/lambda_neg`, `off_policy_mask_threshold`,
`entropy_coef`, `top_entropy_quantile` and `temperature` keep TRL's defaults and
semantics (checked against trl 1.16's `grpo_config.py` / `GRPOTrainer._compute_loss`). Two
fields are ours: `kl_estimator` (TRL hard-codes k3) and `num_items_in_batch` (TRL passes it in
the inputs dict; here it rides with the options so one object describes the normalizer).
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Options of `policy_loss` / `linear_policy_loss` (TRL `GRPOConfig` names and meanings).

    Fields:
        loss_type: one of grpo, bnpo, dr_grpo, dapo (TRL's default), cispo, sapo, luspo, vespo; sets the
            per-token objective (clip, cispo, soft gate, gamma weight) and how token losses are normalized.
            vespo (TRL 1.16): -phi(w) A logp with phi(w) = exp(lambda + k log w - lambda w) a detached
            weight of the sequence ratio w = exp(sum of clamp(log-ratio, -20, 20) [+ sum of clamped
            log importance_sampling_ratio]), clamped in log space to [log 1e-8, 20]; k, lambda by the
            sign of A (A >= 0: vespo_k_pos, vespo_lambda_pos). Normalized as dapo. The rollout
            importance_sampling_ratio enters phi, never multiplies the token loss.
        importance_sampling_level: "token" (one ratio per token) or "sequence" (GSPO: the mean
            log-ratio over a sequence's valid tokens, one ratio per sequence).
        epsilon_low: lower clip, the ratio is clipped below at 1 - epsilon_low (TRL `epsilon`).
        epsilon_high: upper clip at 1 + epsilon_high (None -> epsilon_low; DAPO suggests 0.28).
            For loss_type="cispo" it is instead the cap on the (detached) ratio itself, min(ratio,
            epsilon_high), as in TRL, which suggests about 5.0 there.
        delta: two-sided clip (INTELLECT-2): the unclipped ratio is capped at delta; None = off.
            TRL recommends delta > 1 + epsilon_high.
        beta: weight of the KL penalty against the reference policy; 0 needs no ref_logp.
        kl_estimator: k1 = logp - ref, k2 = (logp - ref)^2 / 2, k3 = exp(ref - logp) - (ref - logp) - 1
            (Schulman's estimators; TRL uses k3).
        use_bias_correction_kl: multiply the KL estimate by the importance ratio (TRL's coef_1),
            DeepSeek-V3.2's unbiased KL gradient. Default False here; trl 1.16 defaults to True.
        max_completion_length: the constant dr_grpo divides by (per sequence); required for dr_grpo.
        num_items_in_batch: dapo/cispo normalizer (a count, or a 0-dim device tensor);
            None -> the number of valid completion tokens in the batch.
        sapo_temperature_pos: sapo gate temperature for tokens with positive advantage (TRL 1.0).
        sapo_temperature_neg: sapo gate temperature for tokens with non-positive advantage (TRL 1.05).
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: vespo's gamma shape and rate for
            non-negative / negative advantages (TRL's defaults 2, 3, 3, 2; lambda is clamped at 1e-4).
        off_policy_mask_threshold: DeepSeek-V3.2's off-policy sequence mask (TRL's OPSM): a sequence's
            policy term is dropped when its advantage is negative and the mean over its valid tokens of
            sampling_logp - logp (NaN read as 0) exceeds the threshold; None = off. `sampling_logp`
            defaults to old_logp (itself defaulting to logp).
        entropy_coef: entropy bonus, loss - entropy_coef * H, H the mean entropy over the valid tokens
            (the high-entropy ones when top_entropy_quantile < 1), TRL's static `entropy_coef`; the
            gradient flows through the entropy (linear_policy_loss computes it differentiably).
        top_entropy_quantile: keep in the policy term only the top-rho quantile of valid tokens by
            entropy (1.0 keeps all; 0.0 keeps the maximum-entropy tokens; TRL's get_high_entropy_mask);
            < 1 needs per-token entropies.
        temperature: divides the logits inside linear_policy_loss (TRL's sampling temperature);
            policy_loss takes log-probabilities that already include it.
    """

    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    epsilon_low: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    beta: float = 0.0
    kl_estimator: str = "k3"
    use_bias_correction_kl: bool = False
    max_completion_length: int | None = None
    num_items_in_batch: int | float | torch.Tensor | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    top_entropy_quantile: float = 1.0
    temperature: float = 1.0
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    off_policy_mask_threshold: float | None = None
    entropy_coef: float = 0.0

    def __post_init__(self):
        _choice("loss_type", self.loss_type, LOSS_TYPES)
        _choice("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        _choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _real("epsilon_low", self.epsilon_low, ">= 0", lambda v: v >= 0)
        if self.epsilon_high is None:
            # frozen dataclass: the documented default is resolved once, here
            object.__setattr__(self, "epsilon_high", float(self.epsilon_low))
        _real("epsilon_high", self.epsilon_high, ">= 0", lambda v: v >= 0)
        if self.loss_type == "cispo" and self.epsilon_high <= 0:
            raise ValueError(
                f"epsilon_high is the cap on the ratio for loss_type='cispo' and must be > 0 (TRL suggests 5.0), "
                f"got {self.epsilon_high}"
            )
        if self.delta is not None:
            _real("delta", self.delta, "> 0 (or None)", lambda v: v > 0)
        _real("beta", self.beta, ">= 0", lambda v: v >= 0)
        if not isinstance(self.use_bias_correction_kl, bool):
            raise TypeError(f"use_bias_correction_kl must be a bool, got {self.use_bias_correction_kl!r}")
        if self.max_completion_length is not None:
            if not isinstance(self.max_completion_length, numbers.Integral) or isinstance(
                self.max_completion_length, bool
            ) or self.max_completion_length <= 0:
                raise ValueError(
                    f"max_completion_length must be a positive int (or None), got {self.max_completion_length!r}"
                )
        if self.loss_type == "dr_grpo" and self.max_completion_length is None:
            raise ValueError(
                "max_completion_length is required for loss_type='dr_grpo' (its normalizer is "
                "num_sequences * max_completion_length), got None"
            )
        n = self.num_items_in_batch
        if n is not None:
            if isinstance(n, torch.Tensor):
                if n.dim() != 0 or n.is_complex() or n.dtype == torch.bool:
                    raise ValueError(
                        f"num_items_in_batch must be a positive number or a 0-dim real tensor, got a tensor of "
                        f"shape {tuple(n.shape)} and dtype {n.dtype}"
                    )
            else:
                _real("num_items_in_batch", n, "> 0 (or None)", lambda v: v > 0)
        _real("sapo_temperature_pos", self.sapo_temperature_pos, "> 0", lambda v: v > 0)
        _real("sapo_temperature_neg", self.sapo_temperature_neg, "> 0", lambda v: v > 0)
        _real("top_entropy_quantile", self.top_entropy_quantile, "in [0, 1]", lambda v: 0 <= v <= 1)
        _real("temperature", self.temperature, "> 0", lambda v: v > 0)
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            _real(name, getattr(self, name), "(any finite value)", lambda v: True)
        if self.off_policy_mask_threshold is not None:
            _real("off_policy_mask_threshold", self.off_policy_mask_threshold, "(or None)", lambda v: True)
        _real("entropy_coef", self.entropy_coef, "(any finite value)", lambda v: True)

    @property
    def needs_entropy(self) -> bool:
        """Whether the loss reads per-token entropies (the high-entropy mask or the entropy bonus)."""
        return self.top_entropy_quantile < 1.0 or self.entropy_coef != 0.0


def _choice(field: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{field} must be one of {choices}, got {value!r}")


def _real(field: str, value, expected: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{field} must be a finite real number {expected}, got {value!r}")
    if not ok(value):
        raise ValueError(f"{field} must be {expected}, got {value!r}")
