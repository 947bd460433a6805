"""The divergence guard of the training loop: a step whose loss or gradient norm is not
finite is skipped (no optimizer step, no LR-schedule step, the optimizer state untouched),
counted (`skipped_steps` in metrics.jsonl) and, after `max_nonfinite_steps` such steps in a
row, the run stops with `DivergenceError` (one line) before the step's checkpoint is written,
so the last checkpoint, whose weights are the last good ones, stays the one to resume from.

The counts live in the run's `history` dict (`skipped_steps`, `nonfinite_streak`), which every
checkpoint saves, so a resumed run counts on exactly as the uninterrupted one would."""

from __future__ import annotations

import math


class DivergenceError(ValueError):
    """`max_nonfinite_steps` steps in a row had a non-finite loss or gradient norm (a ValueError:
    the command line prints it as one line, exit code 2, like other errors of the run's inputs)."""


class NonFiniteGuard:
    def __init__(self, max_consecutive: int):
        if max_consecutive < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive

    @staticmethod
    def finite(loss: float, grad_norm: float) -> bool:
        """True when an update with this loss and (pre-clip) gradient norm may be applied."""
        return math.isfinite(loss) and math.isfinite(grad_norm)

    def end_step(self, skipped: bool, history: dict) -> None:
        """Counts a step in `history`: skipped (non-finite) or good (ends a streak)."""
        if skipped:
            history["skipped_steps"] = history.get("skipped_steps", 0) + 1
            history["nonfinite_streak"] = history.get("nonfinite_streak", 0) + 1
        else:
            history["nonfinite_streak"] = 0

    def stop_if_diverged(self, history: dict, step: int, loss: float, grad_norm: float, checkpoint=None) -> None:
        """DivergenceError when the last `max_consecutive` steps were all skipped."""
        streak = history.get("nonfinite_streak", 0)
        if streak >= self.max_consecutive:
            where = (f"the last checkpoint, {checkpoint}, is intact" if checkpoint is not None
                     else "no checkpoint was written")
            raise DivergenceError(
                f"stopped at step {step}: {streak} steps in a row had a non-finite loss or gradient norm "
                f"(last: loss={loss:g}, grad_norm={grad_norm:g}; max_nonfinite_steps={self.max_consecutive}); {where}"
            )
