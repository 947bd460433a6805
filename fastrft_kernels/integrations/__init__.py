"""Integrations of fastrft_kernels with trainers. Each submodule imports its framework only when used.

- `fastrft_kernels.integrations.trl`: `FusedGRPOTrainer` (a drop-in `trl.GRPOTrainer`) and
  `use_fused_loss(trainer)`: TRL's GRPO loss from hidden states through `linear_policy_loss`.
"""
