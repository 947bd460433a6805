"""fastrft_kernels: fused ops for reinforcement fine-tuning, usable from any trainer.

Each op has `triton`, `torch` and `reference` implementations behind one function; see
`use_backend` and DESIGN.md. One op per private module (`_linear_logprob.py`, ...); this
package re-exports the public functions, as flash-attn's package does over
`flash_attn_interface`. `hf_attention` (the transformers integration) and `aot` (the
ahead-of-time compile gate) are public modules.
"""

from __future__ import annotations

from ._backend import use_backend
from ._group_advantages import group_advantages
from ._linear_logprob import linear_logprob
from ._linear_policy_loss import LinearPolicyLoss, linear_policy_loss
from ._logprob import logprob
from ._loss_config import LossConfig
from ._policy_loss import policy_loss
from ._segment_attention import segment_attention, varlen_attention
from ._segments import Segments, bidirectional_span_segments, segments_from_cu_seqlens, shared_prefix_segments

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
