"""`linear_policy_loss`: the GRPO loss family straight from hidden states and the LM head.

    loss, stats = linear_policy_loss(hidden, lm_head.weight, targets, advantages, cu_seqlens, config=cfg)

It is `linear_logprob` then `policy_loss`, fused so that no [T, V] tensor ever exists:

- forward: `linear_logprob` (pass A; rows whose target is ignore_index cost nothing) gives logp
  [T] (and the entropy [T] when `config.top_entropy_quantile < 1`); the loss finalizer
  (`policy_loss_with_grad`) returns the loss, the statistics and the per-token gradient
  g_t = d loss / d logp_t [T] fp32 in the same pass;
- backward: grad_out * g feeds pass B of `linear_logprob` (recompute each logit tile, form
  dlogits in registers, dX and dW with tile GEMMs; see _linear_logprob.py).
The entropy enters the loss only through the top-quantile mask, which has no gradient, so pass B
never carries an entropy term here.

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
from ._policy_loss import policy_loss, policy_loss_with_grad


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
    lse: torch.Tensor | None = None,
    config: LossConfig,
    ignore_index: int = -100,
):
    """The policy loss of `config` on log softmax((hidden @ weight.T + bias) / config.temperature)[targets].

    Args:
        hidden: [T, H] float16 / bfloat16 / float32 (float64 on the torch and reference backends),
            the hidden states that predict each packed completion token.
        weight: [V, H] the LM head, same dtype. bias: optional [V].
        targets: [T] int64 token ids in [0, V), or `ignore_index` (left out of the loss).
        advantages: [S] per sequence or [T] per token (read per sequence when S == T), float.
        cu_seqlens: [S+1] int32, 0 = cu_seqlens[0] <= ... <= cu_seqlens[S] = T.
        old_logp, ref_logp, importance_sampling_ratio: optional [T] float (see `policy_loss`).
        lse: optional [T] float32 from a no-grad `linear_logprob(..., return_lse=True)` with the same
            weights and temperature (the old-logprob pass): skips pass A's GEMM in the forward.
            Ignored when `config.top_entropy_quantile < 1` (entropy needs pass A).
        config: LossConfig.

    Returns:
        (loss, stats): loss a 0-dim float32 tensor (float64 for float64 inputs), differentiable
        w.r.t. hidden, weight and bias; stats a dict of 0-dim tensors (TRL's metric names, see
        `policy_loss`); stats["entropy"] is the mean entropy when it was computed.
    """
    _validate(hidden, weight, targets, advantages, cu_seqlens, bias, old_logp, ref_logp,
              importance_sampling_ratio, lse, config, ignore_index)
    want_entropy = config.top_entropy_quantile < 1.0
    mask = targets != ignore_index  # [T]
    out = linear_logprob(
        hidden, weight, targets, bias=bias, temperature=config.temperature, ignore_index=ignore_index,
        return_entropy=want_entropy, lse=lse,
    )
    logp, ent = (out if want_entropy else (out, None))
    kwargs = dict(old_logp=old_logp, ref_logp=ref_logp, entropy=None if ent is None else ent.detach(),
                  importance_sampling_ratio=importance_sampling_ratio, mask=mask, config=config)
    if resolve_backend(hidden.device) == "reference":
        return policy_loss(logp, advantages, cu_seqlens, **kwargs)  # plain autograd end to end
    loss, stats, g = policy_loss_with_grad(logp.detach(), advantages, cu_seqlens, validate=False, **kwargs)
    if logp.requires_grad:
        loss = _AttachLossGrad.apply(logp, loss, g.to(logp.dtype))
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
                ref_logp=None, importance_sampling_ratio=None, lse=None):
        """See `linear_policy_loss`: hidden [T, H], lm_head_weight [V, H], targets [T] -> (loss, stats)."""
        return linear_policy_loss(
            hidden, lm_head_weight, targets, advantages, cu_seqlens, bias=bias, old_logp=old_logp,
            ref_logp=ref_logp, importance_sampling_ratio=importance_sampling_ratio, lse=lse,
            config=self.config, ignore_index=self.ignore_index,
        )

    def extra_repr(self) -> str:
        return f"config={self.config!r}"


# ---------------------------------------------------------------------------------- argument checks


def _validate(hidden, weight, targets, advantages, cu_seqlens, bias, old_logp, ref_logp, isr, lse, config,
              ignore_index):
    check_config(config)
    _check_args(hidden, weight, targets, bias, config.temperature, ignore_index, lse)
    per_token = dict(old_logp=old_logp, ref_logp=ref_logp, importance_sampling_ratio=isr)
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
