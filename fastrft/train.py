"""GRPO for vision-language models, the whole loop in one file.

One step, named after the algorithm:
  1. sample prompts        a fresh seeded permutation of the data each epoch
  2. rollouts              G sampled completions per prompt (transformers' generate); each
                           prompt and its images prefilled once, the KV cache shared by the G
  3. rewards               a weighted sum of reward functions; None (unscorable) -> NaN
  4. group_advantages      (r - group mean) / (group std + eps); NaN rewards get 0
  5. pack                  each group once as [prompt+images | c1 | ... | cG], micro-batches
                           under a token budget, no padding, each image encoded once
  6. linear_policy_loss    LM head + log-prob + clipped policy loss, fused, on completion rows
                           only (never a [tokens, vocab] tensor)
  7. backward, clip, AdamW step, LR schedule
  8. log, evaluate, checkpoint

`train()` runs these steps inline, in this order; the set-up and resume, the metrics row and
checkpoints are small functions below it.

Left out on purpose: one process only (no FSDP/DeepSpeed/tensor parallel); generation runs
in transformers (no vLLM/SGLang server); a group is never split across micro-batches (a group
larger than the token budget forms a micro-batch alone); no value model, no reward model
(a user reward function can call one); no multi-turn or tool rollouts; no LoRA; no gradient
checkpointing. `num_iterations` > 1 reuses each rollout for that many optimizer updates
(TRL's mu), with old log-probs from the policy before the first of them.

Config: the dataclass `GRPOConfig` below (TRL's `GRPOConfig` names where one exists), a YAML
file and `--key value` overrides: `fastrft train --config configs/shapes.yaml --seed 3`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from fastrft_kernels import LossConfig, group_advantages, linear_logprob, linear_policy_loss

from . import checkpoint as ckpt
from . import models, packing, synthetic
from .config import save_config
from .data import PromptSampler, load_image, load_rows, render_prompt
from .evaluate import evaluate
from .metrics import MetricsLog, plot_curves
from .rewards import compute_rewards, load_reward
from .rollout import encode_prompts, sample_completions


@dataclass
class GRPOConfig:
    # --- model and data
    model: str = "tiny"  # "tiny" (the embedded Qwen2.5-VL, built in code) | a local folder | a hub id
    dataset: str = "shapes"  # "shapes" (synthetic) | .jsonl | .json | .parquet | a datasets folder
    eval_dataset: str | None = None  # None: the held-out synthetic split for "shapes", else no eval
    synthetic_tasks: list[str] = field(default_factory=lambda: ["colour", "count", "position"])
    train_size: int = 4096  # synthetic training rows
    eval_size: int = 192  # held-out rows evaluated (synthetic: generated; files: the first ones); 0: no eval
    image_size: int = 56  # synthetic image side in px (4 image tokens at 56)
    system_prompt: str | None = None
    output_dir: str = "runs/shapes"
    seed: int = 0
    # --- rollouts
    max_steps: int = 400  # GRPO steps (one rollout each)
    prompts_per_step: int = 16  # prompts per step; completions per step = prompts_per_step * num_generations
    num_generations: int = 8  # G
    max_prompt_length: int = 512  # a longer prompt (image tokens included) is an error, never cut
    max_completion_length: int = 2
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    share_prefill: bool = True  # prefill each prompt once and share its KV cache with its G samples
    # --- rewards and advantages
    reward_funcs: list[str] = field(default_factory=lambda: ["shapes"])  # names or module:function
    reward_weights: list[float] | None = None  # None: all 1
    accuracy_reward: str = "shapes"  # eval accuracy = fraction where this reward is exactly 1
    scale_rewards: str = "group"  # group | batch | none (TRL)
    advantage_estimator: str = "grpo"  # grpo | rloo
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal (DAPO)
    # --- loss (TRL GRPOConfig names and meanings)
    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo | cispo | sapo | luspo
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    beta: float = 0.0  # KL weight; > 0 keeps a frozen reference model
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    num_iterations: int = 1  # optimizer updates per rollout (TRL's mu); > 1 computes old log-probs
    mask_truncated_completions: bool = False
    # --- optimizer
    learning_rate: float = 3e-4
    lr_scheduler_type: str = "constant"  # constant | linear | cosine (after warmup)
    warmup_steps: int = 10
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    token_budget: int = 16384  # tokens per packed micro-batch
    bf16: bool = True  # bf16 autocast on GPU (CPU always runs fp32)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: int = 0  # CPU threads for torch ops; 0: torch's default
    # --- evaluation, logging, checkpoints
    eval_steps: int = 100  # 0: evaluate only before and after training
    eval_batch_size: int = 64
    save_steps: int = 200  # 0: only at the end
    save_total_limit: int = 2
    resume: bool = False  # continue from the latest checkpoint in output_dir
    log_entropy: bool = True  # mean policy entropy on completion tokens (one extra no-grad LM-head pass)
    progress: bool = True

    def __post_init__(self):
        checks = {
            "scale_rewards": ("group", "batch", "none"),
            "advantage_estimator": ("grpo", "rloo"),
            "lr_scheduler_type": ("constant", "linear", "cosine"),
        }
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("max_steps", "prompts_per_step", "num_generations", "max_prompt_length",
                     "max_completion_length", "num_iterations", "token_budget"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (a group of one has no advantage), got {self.num_generations}")
        if not self.reward_funcs:
            raise ValueError("reward_funcs must name at least one reward function")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} entries, reward_funcs {len(self.reward_funcs)}"
            )
        self.loss_config()  # LossConfig checks loss_type, epsilons, delta, beta

    def loss_config(self, **kw) -> "LossConfig":
        return LossConfig(
            loss_type=self.loss_type,
            importance_sampling_level=self.importance_sampling_level,
            epsilon_low=self.epsilon,
            epsilon_high=self.epsilon_high,
            delta=self.delta,
            beta=self.beta,
            max_completion_length=self.max_completion_length,
            temperature=self.temperature if self.temperature > 0 else 1.0,
            **kw,
        )


def lr_lambda(cfg: GRPOConfig):
    """Linear warmup over warmup_steps, then constant / linear decay / cosine decay to 0."""
    total = cfg.max_steps * cfg.num_iterations
    warm = cfg.warmup_steps * cfg.num_iterations

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.lr_scheduler_type == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        if cfg.lr_scheduler_type == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def train(cfg: GRPOConfig) -> dict:
    """Runs GRPO as `cfg` says; returns {"before": eval, "after": eval, "run_dir"}."""
    t_start = time.perf_counter()
    device, run_dir, G = _device(cfg), Path(cfg.output_dir), cfg.num_generations
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)

    # everything that can fail on bad input (data, rewards, model) fails before the run folder is touched
    train_rows, eval_rows = _train_rows(cfg), _eval_rows(cfg)
    reward_funcs, weights, accuracy_fn = _rewards(cfg)
    model, processor = _model_and_processor(cfg)
    model.to(device).train()
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if cfg.beta > 0 else None  # frozen, for the KL
    head = models.lm_head(model)  # weight [V, H]
    ref_head = models.lm_head(ref_model) if ref_model is not None else None
    temperature = cfg.loss_config().temperature  # log-probs of the distribution the rollouts sampled from
    sampler = PromptSampler(len(train_rows), cfg.seed)
    optimizer, scheduler = _optimizer(cfg, model)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.bf16)
    start_step, history, log = _open_run(cfg, run_dir, model, ref_model, optimizer, scheduler, sampler)

    def run_eval(step: int) -> dict | None:  # greedy held-out accuracy, logged; None without eval data
        with autocast:
            return _evaluate(cfg, model, processor, eval_rows, accuracy_fn, log=log, step=step)

    if "before" not in history:
        history["before"] = run_eval(0)
        _print_before(history["before"])
    bar = _progress_bar(cfg, start_step)

    for step in range(start_step + 1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        _reset_peak_memory(device)

        # 1. sample prompts: P rows, each rendered and encoded once with its images
        idx = sampler.next(cfg.prompts_per_step)
        rows = [train_rows[i] for i in idx]
        prompts = _prompts_for(processor, rows, idx, cfg, device)

        # 2. rollouts: G completions per prompt
        with autocast:
            rollout = sample_completions(
                model, processor, prompts, num_generations=G, max_completion_length=cfg.max_completion_length,
                temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, share_prefill=cfg.share_prefill,
            )

        # 3. rewards: every dataset column but the images reaches the reward functions
        problems = [r["problem"] for r in rows for _ in range(G)]
        columns = {k: [r.get(k) for r in rows for _ in range(G)] for k in rows[0] if k != "images"}
        completion_ids = [c.tolist() for group in rollout.completions for c in group]  # P*G token lists
        per_func, rewards = compute_rewards(reward_funcs, weights, problems, rollout.texts, completion_ids,
                                            columns)  # [P*G, F], [P*G]

        # 4. group advantages
        advantages = group_advantages(rewards, G, scale=cfg.scale_rewards, estimator=cfg.advantage_estimator)  # [P*G]
        keep = list(range(len(rows)))
        if cfg.dynamic_sampling:  # groups of equal rewards carry no signal: leave them out
            r = rewards.view(-1, G).nan_to_num(0)  # [P, G]
            keep = ((r.amax(1) - r.amin(1)) > 0).nonzero().flatten().tolist()

        # 5. pack: each kept group once, micro-batches under the token budget
        t_train = time.perf_counter()
        scored = (~rollout.truncated).tolist() if cfg.mask_truncated_completions else None
        groups = packing.make_groups(model, rollout.prompts, rollout.completions, scored)
        batches = [mb.to(device) for mb in packing.pack_groups([groups[i] for i in keep], cfg.token_budget)]
        n_valid = sum(int((mb.targets != packing.IGNORE).sum()) for mb in batches)
        advantages = advantages.to(device)  # a micro-batch takes its completions' by seq_ids

        # old log-probs (num_iterations > 1: the policy before this rollout's first update) and
        # reference log-probs (beta > 0), no grad: [N] per micro-batch
        with torch.no_grad(), autocast:
            old_logp = [_logprob(model, head, mb, temperature) if cfg.num_iterations > 1 else None for mb in batches]
            ref_logp = [_logprob(ref_model, ref_head, mb, temperature) if cfg.beta > 0 else None for mb in batches]

        # 6-7. fused policy loss on completion rows, backward, clip, step
        loss_cfg, mb_weights = _loss_weighting(cfg, batches, n_valid)
        stats_sum: dict[str, float] = {}
        loss_total, grad_norm, entropy_sum = 0.0, float("nan"), 0.0
        for it in range(cfg.num_iterations):
            optimizer.zero_grad(set_to_none=True)
            for b, (mb, weight) in enumerate(zip(batches, mb_weights)):
                with autocast:
                    hidden = packing.completion_hidden(model, mb)  # [N, H]
                    loss, stats = linear_policy_loss(
                        hidden, head.weight, mb.targets, advantages[mb.seq_ids], mb.cu_seqlens, bias=head.bias,
                        old_logp=old_logp[b], ref_logp=ref_logp[b], config=loss_cfg,
                    )
                (loss * weight).backward()
                if cfg.log_entropy and it == 0:  # 0 at ignored rows: summed here, divided by valid rows below
                    entropy_sum += _entropy_sum(hidden.detach(), head, mb, temperature)
                loss_total += float(loss.detach()) * weight / cfg.num_iterations
                for k, v in stats.items():
                    if math.isfinite(v := float(v)):
                        stats_sum[k] = stats_sum.get(k, 0.0) + v * weight / cfg.num_iterations
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
            optimizer.step()
            scheduler.step()
        t_end = time.perf_counter()

        # 8. log, evaluate, checkpoint
        accuracy = _accuracy(accuracy_fn, reward_funcs, per_func, problems, rollout.texts, columns)
        train_stats = {"groups_kept": len(keep), "loss": loss_total, "grad_norm": grad_norm,
                       "lr": scheduler.get_last_lr()[0], **stats_sum,
                       **({"entropy": entropy_sum / max(n_valid, 1)} if cfg.log_entropy else {})}
        row = _metrics_row(cfg, step, rollout, rewards, per_func, list(reward_funcs), accuracy, train_stats, batches,
                           times=(t0, t_train, t_end), device=device)
        log.log(row)
        bar.set_postfix(reward=f"{row['reward']:.3f}", acc=f"{row['accuracy']:.2f}",
                        tok_s=f"{row['train_tokens_per_s']:.0f}")
        bar.update(1)
        if step == cfg.max_steps:
            history["after"] = run_eval(step)
        elif cfg.eval_steps and step % cfg.eval_steps == 0:
            run_eval(step)
        if step == cfg.max_steps or (cfg.save_steps and step % cfg.save_steps == 0):
            _save_checkpoint(cfg, run_dir, step, model, processor, ref_model, optimizer, scheduler, sampler, history)
    before, after = _finish(run_dir, history, bar, log, time.perf_counter() - t_start)
    return {"before": before, "after": after, "run_dir": str(run_dir)}


# ----------------------------------------------------------------------------- set-up and resume


def _device(cfg: GRPOConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _train_rows(cfg: GRPOConfig) -> list[dict]:
    size = cfg.train_size if cfg.dataset == "shapes" else None
    return load_rows(cfg.dataset, split="train", size=size, seed=cfg.seed, tasks=cfg.synthetic_tasks)


def _rewards(cfg: GRPOConfig) -> tuple[dict, list[float], Callable]:
    """({name: function} of the training rewards, their weights, the accuracy reward)."""
    funcs = {name: load_reward(name) for name in cfg.reward_funcs}
    return funcs, cfg.reward_weights or [1.0] * len(funcs), load_reward(cfg.accuracy_reward)


def _model_and_processor(cfg: GRPOConfig):
    """(model, processor) of `cfg.model`: "tiny" builds the embedded model of `fastrft.synthetic`
    from the seed; anything else is a local folder or a hub id."""
    if cfg.model == "tiny":
        processor = synthetic.make_processor(cfg.image_size)
        return synthetic.make_model(processor, seed=cfg.seed), processor
    return models.load_model(cfg.model)


def _eval_rows(cfg: GRPOConfig):
    if cfg.eval_size == 0:
        return None
    if cfg.eval_dataset is not None:
        return load_rows(cfg.eval_dataset, size=cfg.eval_size)
    if cfg.dataset == "shapes":
        return load_rows("shapes", split="test", size=cfg.eval_size, seed=cfg.seed, tasks=cfg.synthetic_tasks)
    return None


def _optimizer(cfg: GRPOConfig, model):
    """AdamW and its LR schedule (`lr_lambda`), stepped once per optimizer update."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def _open_run(cfg: GRPOConfig, run_dir: Path, model, ref_model, optimizer, scheduler, sampler):
    """Starts the run folder, or with `cfg.resume` loads its latest checkpoint into the model, the
    reference model, the optimizer, the LR schedule, the sampler and the RNGs (a fresh run over
    a folder with checkpoints is refused); writes config.yaml and opens the metrics log, cut
    back to the resumed step. Returns (the last step done, the eval history, the log)."""
    latest = ckpt.latest_checkpoint(run_dir)
    if cfg.resume and latest is None:
        raise ValueError(f"resume: no checkpoint in {run_dir / 'checkpoints'}")
    if not cfg.resume and latest is not None:
        raise ValueError(
            f"{run_dir} already holds checkpoints: pass --resume true to continue that run, or another --output_dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    step, history = 0, {}
    if cfg.resume:
        ckpt.load_weights(model, latest)
        state = ckpt.load_trainer_state(latest)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        ckpt.set_rng_state(state["rng"])
        if ref_model is not None:
            ckpt.load_weights(ref_model, latest / "reference")
        step, history = state["step"], state.get("history", {})
    save_config(cfg, run_dir / "config.yaml")
    return step, history, MetricsLog(run_dir, resume_step=step if cfg.resume else None)


def _progress_bar(cfg: GRPOConfig, start_step: int):
    """tqdm over the steps (disabled without `cfg.progress`); a log file, not a terminal, gets a
    line every 10 s instead of one per step."""
    return tqdm(total=cfg.max_steps, initial=start_step, desc="grpo", dynamic_ncols=True, file=sys.stdout,
                mininterval=0.1 if sys.stdout.isatty() else 10.0, disable=not cfg.progress)


# ----------------------------------------------------------------------------- the step's pieces


def _prompts_for(processor, rows: list[dict], row_ids: list[int], cfg: GRPOConfig, device: torch.device):
    """`rows` (dataset rows `row_ids`) rendered with the chat template and encoded with their
    images, the padded inputs for `generate` on `device`."""
    texts = [render_prompt(processor, r, cfg.system_prompt) for r in rows]
    images = [[load_image(im, row_index=i, image_size=cfg.image_size) for im in r["images"]]
              for i, r in zip(row_ids, rows)]
    prompts = encode_prompts(processor, texts, images, cfg.max_prompt_length)
    prompts.inputs = {k: v.to(device) for k, v in prompts.inputs.items()}
    return prompts


def _loss_weighting(cfg: GRPOConfig, batches, n_valid: int) -> tuple[LossConfig, list[float]]:
    """The loss config of the step and each micro-batch's weight, so that the step's loss is one
    batch's loss however it was packed: dapo/cispo divide by the step's valid tokens (weight
    1); bnpo weights micro-batch means by their valid tokens, the per-sequence means by their
    sequences."""
    if cfg.loss_type in ("dapo", "cispo"):
        return cfg.loss_config(num_items_in_batch=max(n_valid, 1)), [1.0] * len(batches)
    if cfg.loss_type == "bnpo":
        return cfg.loss_config(), [int((mb.targets != packing.IGNORE).sum()) / max(n_valid, 1) for mb in batches]
    n_seq = sum(mb.seq_ids.numel() for mb in batches)
    return cfg.loss_config(), [mb.seq_ids.numel() / max(n_seq, 1) for mb in batches]


def _logprob(model, head, mb: packing.MicroBatch, temperature: float) -> torch.Tensor:
    """Log-probs [N] of a micro-batch's targets under `model` (LM head `head`), fused."""
    return linear_logprob(packing.completion_hidden(model, mb), head.weight, mb.targets, bias=head.bias,
                          temperature=temperature)


def _evaluate(cfg: GRPOConfig, model, processor, rows: list[dict] | None, accuracy_fn, *, log: MetricsLog | None = None,
              step: int = 0) -> dict | None:
    """Greedy accuracy of `model` on `rows` under the run's prompt and length settings, written
    to `log` as an "eval" row; None without rows."""
    if rows is None:
        return None
    t0 = time.perf_counter()
    res = evaluate(model, processor, rows, accuracy_fn, max_prompt_length=cfg.max_prompt_length,
                   max_completion_length=cfg.max_completion_length, batch_size=cfg.eval_batch_size,
                   system_prompt=cfg.system_prompt, image_size=cfg.image_size)
    if log is not None:
        log.log({"kind": "eval", "step": step, **res, "seconds": time.perf_counter() - t0})
    return res


# ----------------------------------------------------------------------------- metrics and checkpoints


def _accuracy(accuracy_fn, reward_funcs: dict, per_func, problems, texts, columns) -> float:
    """Fraction of sampled completions the accuracy reward scores exactly 1."""
    for j, f in enumerate(reward_funcs.values()):
        if f is accuracy_fn:
            vals = per_func[:, j]
            break
    else:
        _, vals = compute_rewards({"accuracy": accuracy_fn}, [1.0], problems, texts, [[] for _ in texts], columns)
    ok = ~vals.isnan()
    return float((vals[ok] == 1.0).float().mean()) if ok.any() else float("nan")


def _metrics_row(cfg: GRPOConfig, step: int, rollout, rewards, per_func, reward_names: list[str], accuracy: float,
                 train_stats: dict, batches, *, times: tuple[float, float, float], device: torch.device) -> dict:
    """The step's row of metrics.jsonl: rewards [P*G] and per function [P*G, F] of the sampled
    completions, the update's `train_stats`, throughput, seconds and peak memory."""
    t0, t_train, t_end = times
    lengths = [c.numel() for group in rollout.completions for c in group]
    scored = ~rewards.isnan()
    train_tokens = sum(mb.n_tokens for mb in batches) * cfg.num_iterations
    # each image is encoded once per forward pass: the updates, old log-probs, the reference
    passes = cfg.num_iterations + (cfg.num_iterations > 1) + (cfg.beta > 0)
    return {
        "kind": "train",
        "step": step,
        "reward": float(rewards.nanmean()),
        "reward_std": float(rewards[scored].std()) if scored.sum() > 1 else 0.0,
        **{f"rewards/{name}": float(per_func[:, j].nanmean()) for j, name in enumerate(reward_names)},
        "accuracy": accuracy,
        "completion_length": sum(lengths) / len(lengths),
        "truncated_fraction": float(rollout.truncated.float().mean()),
        **train_stats,
        "rollout_tokens_per_s": rollout.new_tokens / max(rollout.seconds, 1e-9),
        "train_tokens_per_s": train_tokens / max(t_end - t_train, 1e-9),
        "train_tokens": train_tokens,
        "completion_tokens": sum(lengths),
        "images_encoded": sum(0 if mb.image_grid_thw is None else mb.image_grid_thw.shape[0] for mb in batches)
        * passes,
        "rollout_seconds": rollout.seconds,
        "train_seconds": t_end - t_train,
        "micro_batches": len(batches),
        "step_seconds": t_end - t0,
        "peak_memory_mb": _peak_memory_mb(device),
    }


def _entropy_sum(hidden: torch.Tensor, head, mb: packing.MicroBatch, temperature: float) -> float:
    """Sum over a micro-batch's rows of the policy's entropy (0 at ignored rows), no grad."""
    with torch.no_grad():
        _, ent = linear_logprob(hidden, head.weight, mb.targets, bias=head.bias, temperature=temperature,
                                return_entropy=True)  # [N]
    return float(ent.sum())


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the process's peak RSS
    except ImportError:  # pragma: no cover
        return float("nan")


def _print_before(before: dict | None) -> None:
    if before is not None:
        print(f"held-out accuracy before training: {before['accuracy']:.3f} ({before['n']} prompts, greedy)",
              flush=True)


def _finish(run_dir: Path, history: dict, bar, log: MetricsLog, seconds: float) -> tuple[dict | None, dict | None]:
    """Closes the progress bar and the log; writes the curves and summary.json, prints the
    held-out accuracy before -> after (per task too). Returns (before, after)."""
    bar.close()
    log.close()
    plot_curves(run_dir)
    before, after = history.get("before"), history.get("after")
    if before is not None and after is not None:
        print(f"held-out accuracy: before {before['accuracy']:.3f} -> after {after['accuracy']:.3f} "
              f"({after['n']} prompts, greedy; {seconds:.0f} s)", flush=True)
        for k in sorted(after):
            if k.startswith("accuracy/"):
                print(f"  {k[9:]:>10}: {before.get(k, float('nan')):.3f} -> {after[k]:.3f}")
    (run_dir / "summary.json").write_text(json.dumps({"before": before, "after": after}, indent=2))
    return before, after


def _save_checkpoint(cfg: GRPOConfig, run_dir: Path, step: int, model, processor, ref_model, optimizer, scheduler,
                     sampler, history: dict) -> None:
    """Checkpoint `step` (weights, processor, the trainer state `_resume` reads, the reference
    model under reference/), then the curves."""
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "sampler": sampler.state_dict(),
        "history": history,
        "config": dataclasses.asdict(cfg),
    }
    path = ckpt.save_checkpoint(run_dir, step, model, processor, state, keep=cfg.save_total_limit)
    if ref_model is not None:
        ref_model.save_pretrained(path / "reference", safe_serialization=True)
    plot_curves(run_dir)
