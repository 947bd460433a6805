"""fastrft_kernels: fused ops for reinforcement fine-tuning, usable from any trainer.

Each op has `triton`, `torch` and `reference` implementations behind one function; see
`use_backend` and DESIGN.md. Public names load lazily so that importing the package costs
nothing until an op is used (and triton is imported only by the ops that launch it).
"""

from __future__ import annotations

import importlib

from ._backend import use_backend

# public name -> module that defines it (one op per file)
_EXPORTS = {
    "LossConfig": "loss_config",
    "group_advantages": "group_advantages",
    "policy_loss": "policy_loss",
    "logprob": "logprob",
    "linear_logprob": "linear_logprob",
    "linear_policy_loss": "linear_policy_loss",
    "LinearPolicyLoss": "linear_policy_loss",
    "Segments": "segments",
    "segments_from_cu_seqlens": "segments",
    "shared_prefix_segments": "segments",
    "bidirectional_span_segments": "segments",
    "segment_attention": "segment_attention",
    "varlen_attention": "segment_attention",
}

__all__ = ["use_backend", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastrft_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
