"""fastrft_kernels: fused ops for reinforcement fine-tuning, usable from any trainer.

Each op has `triton`, `torch` and `reference` implementations behind one function; see
`use_backend` and DESIGN.md. One op per file, and each file is named after its op: the
imports below bind the functions over the submodules of the same name (a submodule import
binds the module as a package attribute, so lazy loading would let
`fastrft_kernels.segment_attention` turn into a module once anything imported it).
"""

from __future__ import annotations

from ._backend import use_backend
from .group_advantages import group_advantages
from .linear_logprob import linear_logprob
from .linear_policy_loss import LinearPolicyLoss, linear_policy_loss
from .logprob import logprob
from .loss_config import LossConfig
from .policy_loss import policy_loss
from .segment_attention import segment_attention, varlen_attention
from .segments import Segments, bidirectional_span_segments, segments_from_cu_seqlens, shared_prefix_segments

__all__ = [
    "use_backend",
    "LossConfig",
    "group_advantages",
    "policy_loss",
    "logprob",
    "linear_logprob",
    "linear_policy_loss",
    "LinearPolicyLoss",
    "Segments",
    "segments_from_cu_seqlens",
    "shared_prefix_segments",
    "bidirectional_span_segments",
    "segment_attention",
    "varlen_attention",
]
