"""`linear_policy_loss`: the GRPO loss family straight from hidden states and the LM head.

    loss, stats = linear_policy_loss(hidden, lm_head.weight, targets, advantages, cu_seqlens, config=cfg)

It is `linear_logprob` then `policy_loss`, fused so that no [T, V] tensor ever exists:

- forward: `linear_logprob` (pass A; rows whose target is ignore_index cost nothing) gives logp
  [T] (and the entropy [T] when `config.top_entropy_quantile < 1`); the loss finalizer
  (`policy_loss_with_grad`) returns the loss, the statistics and the per-token gradient
  g_t = d loss / d logp_t [T] fp32 in the same pass;
- backward: grad_out * g feeds pass B of `linear_logprob` (recompute each logit tile, form
  dlogits in registers, dX and dW with tile GEMMs; see _linear_logprob.py).
The entropy enters the loss through the top-quantile mask, which has no gradient, and through the
entropy bonus (config.entropy_coef), whose gradient reaches pass B through linear_logprob's entropy
output.

`config.temperature` divides the logits (as TRL does); mask = targets != ignore_index (TRL's
completion mask and tool mask alike: such tokens are out of the loss and every normalizer).

Host syncs: one read of cu_seqlens for validation, and one `nonzero` for the completion rows
(linear_logprob: the kernels' grid needs their count).
"""

import torch

from ._backend import resolve_backend
from ._checks import check_config, check_loss_args
from ._linear_logprob import _check_args, linear_logprob
from ._loss_config import LossConfig
from ._policy_loss import entropy_bonus, policy_loss, policy_loss_with_grad

# --------------------------------------------------------------------------------------- public API


def linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    sampling_logp: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    config: LossConfig,
    ignore_index: int = -100,
    compute_entropy: bool = False,
):
    """The policy loss of `config` on log softmax((hidden @ weight.T + bias) / config.temperature)[targets].

    Args:
        hidden: [T, H] float16 / bfloat16 / float32 (float64 on the torch and reference backends),
            the hidden states that predict each packed completion token.
        weight: [V, H] the LM head, same dtype. bias: optional [V].
        targets: [T] int64 token ids in [0, V), or `ignore_index` (left out of the loss).
        advantages: [S] per sequence or [T] per token (read per sequence when S == T), float.
        cu_seqlens: [S+1] int32, 0 = cu_seqlens[0] <= ... <= cu_seqlens[S] = T.
        old_logp, ref_logp, importance_sampling_ratio, sampling_logp: optional [T] float (see `policy_loss`).
        lse: optional [T] float32 from a no-grad `linear_logprob(..., return_lse=True)` with the same
            weights and temperature (the old-logprob pass): skips pass A's GEMM in the forward.
            Ignored when entropies are computed (entropy needs pass A).
        config: LossConfig. With config.entropy_coef != 0 the entropy bonus is differentiable
            through the entropies (pass B carries its term).
        compute_entropy: compute the entropies even when the loss does not need them, for
            stats["entropy"] (TRL always logs it).

    Returns:
        (loss, stats): loss a 0-dim float32 tensor (float64 for float64 inputs), differentiable
        w.r.t. hidden, weight and bias; stats a dict of 0-dim tensors (TRL's metric names, see
        `policy_loss`); stats["entropy"] is the mean entropy when it was computed.
    """
    _validate(hidden, weight, targets, advantages, cu_seqlens, bias, old_logp, ref_logp,
              importance_sampling_ratio, lse, config, ignore_index, sampling_logp)
    want_entropy = config.needs_entropy or compute_entropy
    mask = targets != ignore_index  # [T]
    out = linear_logprob(
        hidden, weight, targets, bias=bias, temperature=config.temperature, ignore_index=ignore_index,
        return_entropy=want_entropy, lse=lse,
    )
    logp, ent = (out if want_entropy else (out, None))
    kwargs = dict(old_logp=old_logp, ref_logp=ref_logp, importance_sampling_ratio=importance_sampling_ratio,
                  sampling_logp=sampling_logp, mask=mask, config=config)
    if resolve_backend(hidden.device) == "reference":
        return policy_loss(logp, advantages, cu_seqlens, entropy=ent, **kwargs)  # plain autograd end to end
    ent_data = None if ent is None else ent.detach()
    loss, stats, g = policy_loss_with_grad(logp.detach(), advantages, cu_seqlens, validate=False, entropy=ent_data,
                                           **kwargs)
    stats["policy_loss"] = loss.detach()
    if logp.requires_grad:
        loss = _AttachLossGrad.apply(logp, loss, g.to(logp.dtype))
    if config.entropy_coef != 0.0:
        loss = loss - config.entropy_coef * entropy_bonus(ent, mask, config).to(loss.dtype)
    return loss, stats


class LinearPolicyLoss(torch.nn.Module):
    """`linear_policy_loss` as a module holding its LossConfig.

        loss_fn = LinearPolicyLoss(LossConfig(loss_type="dapo", beta=0.04))
        loss, stats = loss_fn(hidden, model.lm_head.weight, targets, advantages, cu_seqlens,
                              old_logp=old_logp, ref_logp=ref_logp)
    """

    def __init__(self, config: LossConfig | None = None, *, ignore_index: int = -100, **config_fields):
        super().__init__()
        if config is not None and config_fields:
            raise ValueError("give either config or LossConfig fields as keywords, not both")
        self.config = config if config is not None else LossConfig(**config_fields)
        check_config(self.config)
        self.ignore_index = ignore_index

    def forward(self, hidden, lm_head_weight, targets, advantages, cu_seqlens, *, bias=None, old_logp=None,
                ref_logp=None, importance_sampling_ratio=None, sampling_logp=None, lse=None):
        """See `linear_policy_loss`: hidden [T, H], lm_head_weight [V, H], targets [T] -> (loss, stats)."""
        return linear_policy_loss(
            hidden, lm_head_weight, targets, advantages, cu_seqlens, bias=bias, old_logp=old_logp,
            ref_logp=ref_logp, importance_sampling_ratio=importance_sampling_ratio, sampling_logp=sampling_logp,
            lse=lse,
            config=self.config, ignore_index=self.ignore_index,
        )

    def extra_repr(self) -> str:
        return f"config={self.config!r}"


# ---------------------------------------------------------------------------------- argument checks


def _validate(hidden, weight, targets, advantages, cu_seqlens, bias, old_logp, ref_logp, isr, lse, config,
              ignore_index, sampling_logp=None):
    check_config(config)
    _check_args(hidden, weight, targets, bias, config.temperature, ignore_index, lse)
    per_token = dict(old_logp=old_logp, ref_logp=ref_logp, importance_sampling_ratio=isr, sampling_logp=sampling_logp)
    check_loss_args(config, hidden.shape[0], advantages, cu_seqlens, per_token=per_token, hidden=hidden)


# ----------------------------------------------------------------------------------------- autograd


class _AttachLossGrad(torch.autograd.Function):
    """loss with d loss / d logp = g, computed by the loss finalizer in the forward pass."""

    @staticmethod
    def forward(ctx, logp, loss, g):
        ctx.save_for_backward(g)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_out):
        (g,) = ctx.saved_tensors
        return grad_out * g, None, None  # [T]
