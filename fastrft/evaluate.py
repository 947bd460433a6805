"""Held-out evaluation: one greedy completion per prompt, scored by the accuracy reward.

Accuracy is the fraction of prompts whose `accuracy_reward` is exactly 1 (a correct answer);
rows the reward cannot score (None) are left out of the fraction. With a `task` column (the
synthetic data has one) the accuracy per task is reported too.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from .data import load_image, render_prompt
from .rewards import compute_rewards
from .rollout import encode_prompts, sample_completions


@torch.no_grad()
def evaluate(model, processor, rows: list[dict], reward_fn, *, max_prompt_length: int, max_completion_length: int,
             batch_size: int = 64, system_prompt: str | None = None, image_size: int = 56) -> dict:
    """{"accuracy", "n", "accuracy/<task>"...} of greedy completions on `rows`."""
    correct, per_task = [], defaultdict(list)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = encode_prompts(
            processor,
            [render_prompt(processor, r, system_prompt) for r in chunk],
            [[load_image(im, where=getattr(r, "where", None), image_size=image_size) for im in r["images"]]
             for r in chunk],
            max_prompt_length,
        )
        out = sample_completions(
            model, processor, prompts, num_generations=1, max_completion_length=max_completion_length, temperature=0.0
        )
        columns = {k: [r.get(k) for r in chunk] for k in chunk[0] if k != "images"}
        _, total = compute_rewards(
            {"accuracy": reward_fn}, [1.0], [r["problem"] for r in chunk], out.texts,
            [c.tolist() for g in out.completions for c in g], columns,
        )
        for r, v in zip(chunk, total.tolist()):
            if math.isnan(v):
                continue
            correct.append(v == 1.0)
            if "task" in r:
                per_task[r["task"]].append(v == 1.0)
    result = {"accuracy": sum(correct) / len(correct) if correct else float("nan"), "n": len(correct)}
    for task, vals in sorted(per_task.items()):
        result[f"accuracy/{task}"] = sum(vals) / len(vals)
    return result
