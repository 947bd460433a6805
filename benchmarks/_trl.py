"""TRL's `GRPOTrainer._compute_loss` without a trainer: the stand-in `self` it is called with.

No trainer is built (that needs a model, a tokenizer and datasets): `_compute_loss` is called
unbound, with a `SimpleNamespace` carrying exactly the attributes it reads; the model call
`_get_per_token_logps_and_entropies` returns given tensors, and the accelerator is one process
(gather/reduce/pad are identities). One process, no gradient accumulation
(`current_gradient_accumulation_steps = steps_per_generation = 1`), mode "train".

Used by tests/test_trl_parity.py (parity) and benchmarks/bench_policy_loss.py (TRL as a provider).
"""

from __future__ import annotations

import collections
import types


class OneProcess:
    """The accelerator of a single process: gather, reduce and pad are identities."""

    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


def trl_self(config, logps, entropies, *, use_vllm: bool, accum: int = 1, steps_per_generation: int = 1,
             num_processes: int = 1) -> types.SimpleNamespace:
    """What `_compute_loss` reads off `self`, for a fastrft `LossConfig` (TRL's epsilon is our
    epsilon_low). logps, entropies: [S, max_len] padded, what the model call returns;
    use_vllm: TRL then multiplies by the inputs' importance_sampling_ratio."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    ns = types.SimpleNamespace(
        loss_type=config.loss_type,
        importance_sampling_level=config.importance_sampling_level,
        epsilon_low=config.epsilon_low,
        epsilon_high=config.epsilon_high,
        beta=config.beta,
        top_entropy_quantile=config.top_entropy_quantile,
        max_completion_length=config.max_completion_length,
        off_policy_mask_threshold=getattr(config, "off_policy_mask_threshold", None),
        use_vllm=use_vllm,
        vllm_importance_sampling_correction=use_vllm,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=getattr(config, "entropy_coef", 0.0) != 0.0,
        entropy_coef=getattr(config, "entropy_coef", 0.0),
        use_adaptive_entropy=False,
        current_gradient_accumulation_steps=accum,
        model=types.SimpleNamespace(training=True),
        accelerator=OneProcess(),
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        args=types.SimpleNamespace(
            delta=config.delta,
            use_bias_correction_kl=config.use_bias_correction_kl,
            sapo_temperature_pos=config.sapo_temperature_pos,
            sapo_temperature_neg=config.sapo_temperature_neg,
            steps_per_generation=steps_per_generation,
            vespo_k_pos=getattr(config, "vespo_k_pos", 2.0),
            vespo_lambda_pos=getattr(config, "vespo_lambda_pos", 3.0),
            vespo_k_neg=getattr(config, "vespo_k_neg", 3.0),
            vespo_lambda_neg=getattr(config, "vespo_lambda_neg", 2.0),
        ),
    )
    ns._get_per_token_logps_and_entropies = lambda *a, **k: (logps, entropies, None)
    ns.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, ns)
    ns.get_off_policy_mask = GRPOTrainer.get_off_policy_mask
    if hasattr(GRPOTrainer, "get_gamma_weights"):
        ns.get_gamma_weights = GRPOTrainer.get_gamma_weights
    if num_processes != 1:
        ns.accelerator.num_processes = num_processes
    return ns
