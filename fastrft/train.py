"""GRPO for vision-language models, the whole loop in one file.

One step, named after the algorithm:
  1. sample prompts        a fresh seeded permutation of the data each epoch
  2. rollouts              G sampled completions per prompt: transformers' generate (each
                           prompt and its images prefilled once, the KV cache shared by the G)
                           or a colocated vLLM engine (rollout_engine, fastrft/vllm_engine.py)
  3. rewards               a weighted sum of reward functions; None (unscorable) -> NaN
  4. group_advantages      (r - group mean) / (group std + eps); NaN rewards get 0
  5. pack                  each group once as [prompt+images | c1 | ... | cG], micro-batches
                           under a token budget, no padding, each image encoded once
  6. linear_policy_loss    LM head + log-prob + clipped policy loss, fused, on completion rows
                           only (never a [tokens, vocab] tensor)
     (vLLM rollouts: times the importance-sampling correction exp(train - vLLM log-prob),
     truncated or masked as vllm_importance_sampling_mode says; fastrft/mismatch.py)
  7. backward, clip, AdamW step, LR schedule; vLLM rollouts: the new weights into the engine
  8. log, evaluate, checkpoint

`train()` runs these steps inline, in this order; the set-up and resume, the metrics row and
checkpoints are small functions below it.

Several GPUs of one node: `torchrun --nproc_per_node N -m fastrft train` (fastrft/distributed.py: data
parallel over groups, FSDP2, keyed sampling; the loop below is the same with a few reductions).
Left out on purpose: more than one node, DeepSpeed, tensor parallel; generation runs
in transformers or in a vLLM engine inside the training process (no vLLM/SGLang server); a
group is never split across micro-batches (a group larger than the token budget forms a
micro-batch alone); no value model, no reward model
(a user reward function can call one); no multi-turn or tool rollouts. LoRA: fastrft/lora.py;
gradient checkpointing: `gradient_checkpointing`.
`num_iterations` > 1 reuses each rollout for that many optimizer updates
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastrft_kernels import LossConfig, group_advantages, linear_logprob, linear_policy_loss

from . import checkpoint as ckpt
from . import distributed, mismatch, models, packing, runs, sampling, synthetic
from .config import save_config
from .data import PromptSampler, load_image, load_rows, render_prompt
from .evaluate import evaluate
from .guard import NonFiniteGuard
from .metrics import MetricsLog, plot_curves
from .rewards import compute_rewards, load_reward
from .rollout import encode_prompts, sample_completions


@dataclass
class GRPOConfig:
    # --- model and data
    model: str = "tiny"  # "tiny" (the embedded Qwen2.5-VL, built in code) | a local folder | a hub id
    dataset: str = "shapes"  # "shapes" (synthetic) | .jsonl | .json | .parquet | a datasets folder
    # None: the synthetic held-out split for "shapes", else eval_size rows held out of dataset
    eval_dataset: str | None = None
    synthetic_tasks: list[str] = field(default_factory=lambda: ["colour"])  # shapes tasks: colour, count, position
    train_size: int = 4096  # synthetic training rows
    # held-out rows (synthetic: generated; a file: at most 10% of it, or of eval_dataset); 0: no eval
    eval_size: int = 192
    skip_bad_rows: bool = False  # leave out rows that fail the pre-run check (counted, reported) instead of stopping
    image_size: int = 56  # synthetic image side in px (4 image tokens at 56)
    system_prompt: str | None = None
    output_dir: str | None = None  # None: runs/shapes for the demo, runs/<dataset file stem> for a file
    # replace output_dir's earlier run (checkpoints, metrics); without it such a folder is an error
    overwrite: bool = False
    seed: int = 0
    # --- rollouts
    max_steps: int = 250  # GRPO steps (one rollout each)
    prompts_per_step: int = 16  # prompts per step; completions per step = prompts_per_step * num_generations
    num_generations: int = 8  # G
    max_prompt_length: int = 512  # a longer prompt (image tokens included) is an error, never cut
    max_completion_length: int | None = None  # None: 2 for the demo (one word, then eos), 256 for a file (TRL)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    share_prefill: bool = True  # prefill each prompt once and share its KV cache with its G samples
    rollout_engine: str = "auto"  # auto (vllm on CUDA when importable, else hf) | hf (transformers' generate) | vllm
    # --- vLLM rollouts (rollout_engine vllm; TRL GRPOConfig names and meanings)
    vllm_gpu_memory_utilization: float | None = None  # GPU memory share for vLLM; on CPU the share of host
    #   memory its process may hold (RSS included; the rest is KV cache); None: 0.3 GPU (TRL), CPU: RSS + 1 GiB
    vllm_max_model_length: int | None = None  # vLLM context window; None: from the model config
    vllm_enable_sleep_mode: bool = False  # release vLLM's weights and KV cache while training (CUDA only)
    vllm_importance_sampling_correction: bool = True  # weight the loss by exp(train - vLLM log-prob)
    # token_truncate | token_mask | sequence_truncate | sequence_mask
    vllm_importance_sampling_mode: str = "sequence_mask"
    vllm_importance_sampling_clip_max: float | None = 3.0  # C_max: *_truncate clamps above it, *_mask zeroes above it
    vllm_importance_sampling_clip_min: float | None = None  # C_min: *_truncate clamps below it, *_mask zeroes below it
    vllm_importance_sampling_cap: float | None = None  # TRL's deprecated name of clip_max (sets it when given)
    # --- rewards and advantages
    reward_funcs: list[str] | None = None  # names or module:function; None: [shapes] for the demo, [accuracy] else
    reward_weights: list[float] | None = None  # None: all 1
    # accuracy = fraction where this reward is exactly 1; None: shapes or accuracy if given, else the first
    accuracy_reward: str | None = None
    scale_rewards: str | None = None  # group | batch | none (TRL); None: none for the demo, group (TRL's) else
    advantage_estimator: str = "grpo"  # grpo | rloo
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal (DAPO)
    reward_timeout: float = 60.0  # seconds per reward-function call (whole batch); 0: no limit
    reward_errors: str = "skip"  # a reward function that raises or overruns: skip (its rows NaN, counted) | raise
    # --- loss (TRL GRPOConfig names and meanings)
    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo | cispo | sapo | luspo
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    beta: float | None = None  # KL weight; > 0 keeps a frozen reference model; None: 0.04 for the demo, 0 (TRL's) else
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
    # a step with a non-finite loss or grad norm is skipped; this many in a row stop the run
    max_nonfinite_steps: int = 3
    token_budget: int = 16384  # tokens per packed micro-batch
    bf16: bool = True  # bf16 autocast on GPU (CPU always runs fp32)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # CPU threads for torch ops; 0: 1 for a small model (measured: fastrft/runs.py), else torch's default
    num_threads: int = 0
    # --- several GPUs, memory (fastrft/distributed.py): `torchrun --nproc_per_node N -m fastrft train ...`
    nproc_per_node: int = 1  # `fastrft train --nproc_per_node N` launches torchrun with N ranks (one node)
    rank_invariant_sampling: bool | None = None  # keyed rollout noise (fastrft/sampling.py); None: on with N ranks
    fsdp_reshard_after_forward: bool = True  # FSDP2: free each block's gathered weights after its forward
    fsdp_cpu_offload: bool = False  # FSDP2: parameters, gradients and optimizer state in host memory
    gradient_checkpointing: bool = False  # recompute text layers and vision blocks in backward
    # --- LoRA (peft; TRL's names): only the adapters train, checkpoints hold the adapter and the merged model
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None  # None: the text model's attention and MLP projections
    dist_timeout: float = 600.0  # seconds a collective waits for a rank before the run stops with an error
    # --- evaluation, logging, checkpoints
    eval_steps: int = 50  # 0: evaluate only before and after training
    eval_batch_size: int = 64
    save_steps: int = 125  # 0: only at the end
    save_total_limit: int = 2
    resume: bool = False  # continue from the latest checkpoint in output_dir
    log_entropy: bool = True  # mean policy entropy on completion tokens (one extra no-grad LM-head pass)
    progress: bool = True
    report_to: str = "none"  # none | tensorboard (event files in output_dir/tensorboard, besides metrics.jsonl)

    def __post_init__(self):
        from .runs import resolve_defaults

        resolve_defaults(self)  # the data-dependent defaults (None fields)
        checks = {
            "scale_rewards": ("group", "batch", "none"),
            "advantage_estimator": ("grpo", "rloo"),
            "lr_scheduler_type": ("constant", "linear", "cosine"),
            "report_to": ("none", "tensorboard"),
        }
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("max_steps", "prompts_per_step", "num_generations", "max_prompt_length",
                     "max_completion_length", "num_iterations", "token_budget"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        from .vllm_engine import ENGINES, check_memory_fraction

        if self.rollout_engine not in ENGINES:
            raise ValueError(f"rollout_engine must be one of {ENGINES}, got {self.rollout_engine!r}")
        mismatch.check_mode(self.vllm_importance_sampling_mode)
        if self.vllm_importance_sampling_cap is not None:
            self.vllm_importance_sampling_clip_max = self.vllm_importance_sampling_cap
        if self.vllm_gpu_memory_utilization is not None:
            check_memory_fraction(self.vllm_gpu_memory_utilization)
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations must be >= 2 (a group of one has no advantage), got {self.num_generations}"
            )
        if not self.reward_funcs:
            raise ValueError("reward_funcs must name at least one reward function")
        if self.reward_errors not in ("skip", "raise"):
            raise ValueError(f"reward_errors must be one of ('skip', 'raise'), got {self.reward_errors!r}")
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} entries, reward_funcs {len(self.reward_funcs)}"
            )
        self.loss_config()  # LossConfig checks loss_type, epsilons, delta, beta

    def loss_config(self, **kw) -> LossConfig:
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
    dist = distributed.setup(cfg)  # torchrun: this rank's share of a data-parallel run (fastrft/distributed.py)
    device, run_dir, G = _device(cfg), Path(cfg.output_dir), cfg.num_generations
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)

    # everything that can fail on bad input (data, rewards, model) fails before the run folder is touched
    train_rows, eval_rows = _train_rows(cfg), _eval_rows(cfg)
    reward_funcs, weights, accuracy_fn = _rewards(cfg)
    model, processor = _model_and_processor(cfg)
    # CPU threads; every row checked (images decoded, prompts tokenized, lengths): fastrft/runs.py
    train_rows, eval_rows, data_report = runs.prepare(cfg, model, processor, train_rows, eval_rows, device)
    model.to(device).train()
    engine = _rollout_engine(cfg, model, processor, device, train_rows)  # None: transformers' generate
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if cfg.beta > 0 else None  # frozen, for the KL
    if cfg.use_peft:  # adapters injected in place (fastrft/lora.py); the reference above is the base model
        from . import lora

        lora.apply(cfg, model)
    if cfg.gradient_checkpointing:
        distributed.enable_gradient_checkpointing(model)
    if dist.enabled:  # resumed weights into the full model, then FSDP2 over the blocks and the root
        distributed.resume_weights(cfg, run_dir, model, ref_model)
        distributed.shard(cfg, model, dist, device)
    head = models.lm_head(model)  # weight [V, H]
    ref_head = models.lm_head(ref_model) if ref_model is not None else None
    temperature = cfg.loss_config().temperature  # log-probs of the distribution the rollouts sampled from
    sampler = PromptSampler(len(train_rows), cfg.seed)
    optimizer, scheduler = _optimizer(cfg, model)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.bf16)
    if dist.enabled:  # rank 0 opens the folder; every rank loads the sharded optimizer state
        start_step, history, log = distributed.open_run(cfg, dist, run_dir, model, optimizer, scheduler, sampler,
                                                        _open_run)
    else:
        start_step, history, log = _open_run(cfg, run_dir, model, ref_model, optimizer, scheduler, sampler)
    guard = NonFiniteGuard(cfg.max_nonfinite_steps)  # its counts live in `history`, saved with each checkpoint
    log.log({**data_report, "step": start_step})  # rows checked and skipped, threads
    if engine is not None and start_step > 0:
        with distributed.gathered(model):
            engine.sync_weights(model)  # resumed: the checkpoint's weights

    def run_eval(step: int) -> dict | None:  # greedy held-out accuracy, logged; None without eval data
        with autocast, distributed.gathered(model):
            return _evaluate(cfg, model, processor, eval_rows, accuracy_fn, log=log, step=step)

    if "before" not in history:
        history["before"] = run_eval(0)
        if dist.main:
            _print_before(history["before"])
    bar = _progress_bar(cfg, start_step)

    for step in range(start_step + 1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        _reset_peak_memory(device)

        # 1. sample prompts: P rows, each rendered and encoded once with its images
        idx = dist.local(sampler.next(cfg.prompts_per_step))  # several ranks: this rank's contiguous share
        rows = [train_rows[i] for i in idx]
        prompts, images = _prompts_for(processor, rows, idx, cfg, device)

        # 2. rollouts: G completions per prompt
        if engine is None:
            keyed = distributed.keyed(cfg, dist) and cfg.temperature > 0  # noise keyed by (step, global prompt, ...)
            with autocast, distributed.gathered(model):
                rollout = sample_completions(
                    model, processor, prompts, num_generations=G, max_completion_length=cfg.max_completion_length,
                    temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, share_prefill=cfg.share_prefill,
                    keyed_sampler=sampling.KeyedSampler(
                        seed=cfg.seed, step=step, prompt_offset=dist.rank * len(idx), num_generations=G, prompt_len=0,
                        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p) if keyed else None,
                )
        else:  # seeded per step: a resumed run samples what the uninterrupted one would have
            rollout = engine.generate(prompts, images, num_generations=G,
                                      max_completion_length=cfg.max_completion_length,
                                      temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                      seed=cfg.seed * 1_000_003 + step, prompt_offset=dist.rank * len(idx))

        # 3. rewards: every dataset column but the images reaches the reward functions
        problems = [r["problem"] for r in rows for _ in range(G)]
        columns = {k: [r.get(k) for r in rows for _ in range(G)] for k in rows[0] if k != "images"}
        completion_ids = [c.tolist() for group in rollout.completions for c in group]  # P*G token lists
        reward_errors: dict[str, int] = {}  # rows each function could not score (raised, overran, inf)
        per_func, rewards = compute_rewards(reward_funcs, weights, problems, rollout.texts, completion_ids,
                                            columns, timeout=cfg.reward_timeout, on_error=cfg.reward_errors,
                                            errors=reward_errors)  # [P*G, F], [P*G]

        # 4. group advantages
        # (several ranks: over the step's rewards from every rank, then this rank's share)
        advantages = dist.local(group_advantages(dist.gather(rewards), G, scale=cfg.scale_rewards,
                                                 estimator=cfg.advantage_estimator))  # [P*G]
        keep = list(range(len(rows)))
        if cfg.dynamic_sampling:  # groups of equal rewards carry no signal: leave them out
            r = rewards.view(-1, G).nan_to_num(0)  # [P, G]
            keep = ((r.amax(1) - r.amin(1)) > 0).nonzero().flatten().tolist()
            # no group with signal: no update this step (nothing to learn from), counted in updates_skipped
            history["updates_skipped"] = history.get("updates_skipped", 0) + (not dist.all_max(len(keep)))

        # 5. pack: each kept group once, micro-batches under the token budget
        t_train = time.perf_counter()
        scored = (~rollout.truncated).tolist() if cfg.mask_truncated_completions else None
        groups = packing.make_groups(model, rollout.prompts, rollout.completions, scored)
        batches = [mb.to(device) for mb in packing.pack_groups([groups[i] for i in keep], cfg.token_budget)]
        n_valid = sum(int((mb.targets != packing.IGNORE).sum()) for mb in batches)
        # several ranks: the normalizers over the step, and as many micro-batches everywhere (weight-0 repeats)
        batches, n_valid, n_seq, n_real = distributed.balance(dist, batches, groups, n_valid, device)
        advantages = advantages.to(device)  # a micro-batch takes its completions' by seq_ids

        # old log-probs (num_iterations > 1: the policy before this rollout's first update) and
        # reference log-probs (beta > 0), no grad: [N] per micro-batch
        with torch.no_grad(), autocast:
            old_logp = [_logprob(model, head, mb, temperature) if cfg.num_iterations > 1 else None for mb in batches]
            ref_logp = [_logprob(ref_model, ref_head, mb, temperature) if cfg.beta > 0 else None for mb in batches]

        # vLLM rollouts: the engine's log-probs of the sampled tokens, flat over the P*G completions
        correct = engine is not None and cfg.vllm_importance_sampling_correction
        sampling_logp = [lp for group in rollout.sampling_logprobs for lp in group] if correct else None
        stats_mismatch = mismatch.MismatchStats(cfg.vllm_importance_sampling_mode) if correct else None
        is_ratio, lse = [None] * len(batches), [None] * len(batches)

        # 6-7. fused policy loss on completion rows, backward, clip, step
        loss_cfg, mb_weights = _loss_weighting(cfg, batches[:n_real], n_valid, n_seq)
        mb_weights += [0.0] * (len(batches) - n_real)
        stats_sum: dict[str, float] = {}
        loss_total, grad_norm, entropy_sum, nonfinite = 0.0, float("nan"), 0.0, False
        for it in range(cfg.num_iterations):
            optimizer.zero_grad(set_to_none=True)
            for b, (mb, weight) in enumerate(zip(batches, mb_weights)):
                with autocast:
                    hidden = packing.completion_hidden(model, mb)  # [N, H]
                    if correct and it == 0:  # [N] ratio from the policy before this rollout's first update
                        is_ratio[b], lse[b] = _sampling_correction(cfg, hidden.detach(), head, mb, old_logp[b],
                                                                   sampling_logp, temperature, stats_mismatch)
                    loss, stats = linear_policy_loss(
                        hidden, head.weight, mb.targets, advantages[mb.seq_ids], mb.cu_seqlens, bias=head.bias,
                        old_logp=old_logp[b], ref_logp=ref_logp[b], importance_sampling_ratio=is_ratio[b],
                        lse=lse[b] if it == 0 else None, config=loss_cfg,
                    )
                if cfg.log_entropy and it == 0 and b < n_real:  # 0 at ignored rows: divided by valid rows below
                    entropy_sum += _entropy_sum(hidden.detach(), head, mb, temperature)  # (FSDP: head still gathered)
                (loss * (weight * dist.world)).backward()  # several ranks: FSDP averages, the losses add up
                loss_total += float(loss.detach()) * weight / cfg.num_iterations
                for k, v in stats.items():
                    if math.isfinite(v := float(v)):
                        stats_sum[k] = stats_sum.get(k, 0.0) + v * weight / cfg.num_iterations
            grad_norm = distributed.clip_grad_norm_(model, cfg.max_grad_norm)
            if not guard.finite(loss_total, grad_norm):  # no update from it; optimizer and schedule untouched
                nonfinite = True
                break
            if dist.all_max(len(keep)):
                optimizer.step()
                scheduler.step()
        t_end = time.perf_counter()
        guard.end_step(nonfinite, history)
        sync_seconds = 0.0
        if engine is not None:  # the new weights into vLLM (several ranks: each gathers the full model)
            with distributed.gathered(model):
                sync_seconds = engine.sync_weights(model)

        # 8. log, evaluate, checkpoint (several ranks: the step's sums and rewards over every rank)
        if dist.enabled:
            loss_total, entropy_sum, n_kept = dist.all_sum([loss_total, entropy_sum, len(keep)])
            n_kept, stats_sum = int(n_kept), dist.sum_dict(stats_sum)
            rewards, per_func = dist.gather(rewards), dist.gather(per_func)
        accuracy = _accuracy(accuracy_fn, reward_funcs, per_func, problems, rollout.texts, columns)
        train_stats = {"groups_kept": n_kept if dist.enabled else len(keep),
                       **({"updates_skipped": history.get("updates_skipped", 0)} if cfg.dynamic_sampling else {}),
                       "loss": loss_total, "grad_norm": grad_norm, "skipped_steps": history.get("skipped_steps", 0),
                       **{f"reward_errors/{name}": n for name, n in reward_errors.items()},
                       "lr": scheduler.get_last_lr()[0], **stats_sum,
                       **({"entropy": entropy_sum / max(n_valid, 1)} if cfg.log_entropy else {}),
                       **(stats_mismatch.metrics() if stats_mismatch is not None else {})}
        row = _metrics_row(cfg, step, rollout, rewards, per_func, list(reward_funcs), accuracy, train_stats, batches,
                           times=(t0, t_train, t_end + sync_seconds), device=device)
        if engine is not None:
            row["sync_seconds"] = sync_seconds
        log.log(row)
        guard.stop_if_diverged(history, step, loss_total, grad_norm, ckpt.latest_checkpoint(run_dir))
        bar.set_postfix(reward=f"{row['reward']:.3f}", acc=f"{row['accuracy']:.2f}",
                        tok_s=f"{row['train_tokens_per_s']:.0f}", refresh=False)  # drawn at the bar's interval
        bar.update(1)
        if step == cfg.max_steps:
            history["after"] = run_eval(step)
        elif cfg.eval_steps and step % cfg.eval_steps == 0:
            run_eval(step)
        if step == cfg.max_steps or (cfg.save_steps and step % cfg.save_steps == 0):
            if dist.enabled:
                distributed.save_checkpoint(cfg, dist, run_dir, step, model, processor, ref_model, optimizer,
                                            scheduler, sampler, history)
            else:
                _save_checkpoint(cfg, run_dir, step, model, processor, ref_model, optimizer, scheduler, sampler,
                                 history)
    if engine is not None:
        engine.close()
    if not dist.main:
        bar.close()
        return {"before": history.get("before"), "after": history.get("after"), "run_dir": str(run_dir)}
    before, after = _finish(run_dir, history, bar, log, time.perf_counter() - t_start)
    return {"before": before, "after": after, "run_dir": str(run_dir)}


# ----------------------------------------------------------------------------- set-up and resume


def _device(cfg: GRPOConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _train_rows(cfg: GRPOConfig) -> list[dict]:
    size = cfg.train_size if cfg.dataset == "shapes" else None
    rows = load_rows(cfg.dataset, split="train", size=size, seed=cfg.seed, tasks=cfg.synthetic_tasks)
    if cfg.dataset != "shapes" and cfg.eval_dataset is None:  # a held-out split of the file is evaluated
        rows, _ = runs.split_rows(rows, runs.held_out_rows(cfg, len(rows)), cfg.seed)
    return rows


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


def _rollout_engine(cfg: GRPOConfig, model, processor, device: torch.device, train_rows: list[dict]):
    """The colocated vLLM engine for `cfg.rollout_engine` vllm (auto: when vLLM is importable), or
    None for transformers' generate. Built from the policy before the run folder is touched: vLLM
    missing, a model vLLM cannot serve and a memory share it refuses are one-line errors
    (`vllm_engine.EngineError`)."""
    from . import vllm_engine

    if vllm_engine.resolve_engine(cfg.rollout_engine) == "hf":
        return None
    if cfg.vllm_enable_sleep_mode and device.type != "cuda":
        print("vllm_enable_sleep_mode: vLLM has no sleep mode on CPU; the engine stays awake", flush=True)
    fraction = cfg.vllm_gpu_memory_utilization
    if fraction is None:  # 0.3 on GPU; on CPU what the process holds + 1 GiB of KV cache
        fraction = vllm_engine.default_memory_fraction(model, device)
    bf16 = device.type == "cuda" and cfg.bf16
    return vllm_engine.VLLMEngine(
        model, processor, device=device, gpu_memory_utilization=fraction, max_model_length=cfg.vllm_max_model_length,
        enable_sleep_mode=cfg.vllm_enable_sleep_mode, dtype=torch.bfloat16 if bf16 else torch.float32, seed=cfg.seed,
        max_num_seqs=max(256, cfg.prompts_per_step * cfg.num_generations),
        max_images_per_prompt=max((len(r["images"]) for r in train_rows), default=0),
    )


def _eval_rows(cfg: GRPOConfig):
    if cfg.eval_size == 0:
        return None
    if cfg.eval_dataset is not None:
        return load_rows(cfg.eval_dataset, size=cfg.eval_size)
    if cfg.dataset == "shapes":
        return load_rows("shapes", split="test", size=cfg.eval_size, seed=cfg.seed, tasks=cfg.synthetic_tasks)
    rows = load_rows(cfg.dataset)  # held-out rows of the training file (the same draw as _train_rows)
    _, held = runs.split_rows(rows, runs.held_out_rows(cfg, len(rows)), cfg.seed)
    return held or None


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
    if cfg.resume and latest is None and not (run_dir / "config.yaml").is_file():
        raise ValueError(f"resume: no checkpoint in {run_dir / 'checkpoints'}")
    # a run stopped before its first checkpoint resumes from step 0: the same seed, the same steps
    resume = cfg.resume and latest is not None
    if not cfg.resume and latest is not None:
        if not cfg.overwrite:
            raise ValueError(f"{run_dir} already holds a run: pass --resume true to continue it, --overwrite true to "
                             "replace it, or another --output_dir")
        ckpt_root = run_dir / "checkpoints"  # --overwrite: the earlier run's outputs go, nothing else in the folder
        import shutil

        shutil.rmtree(ckpt_root)
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
        for name in ("metrics.jsonl", "summary.json", "curves.png", "config.yaml"):
            (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    step, history = 0, {}
    if resume:  # the same data and steps left (checked before anything loads or config.yaml is rewritten)
        runs.check_resume(cfg, run_dir, int(latest.name.split("-")[-1]))
        if model is not None:  # None: a sharded run loaded them before sharding (fastrft/distributed.py)
            ckpt.load_weights(model, latest)
        state = ckpt.load_trainer_state(latest)
        if state.get("optimizer") is not None:
            if model is not None:  # None: a sharded run (fastrft/distributed.py loads it: load_full_optimizer)
                optimizer.load_state_dict(state["optimizer"])
        elif model is not None:  # a sharded run's checkpoint: the optimizer state is in DCP form
            from .distributed import load_optimizer

            load_optimizer(model, optimizer, latest)
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        ckpt.set_rng_state(state["rng"])
        if ref_model is not None:
            ckpt.load_weights(ref_model, latest / "reference")
        step, history = state["step"], state.get("history", {})
    save_config(cfg, run_dir / "config.yaml")
    return step, history, MetricsLog(run_dir, resume_step=step if resume else None,
                                     tensorboard=cfg.report_to == "tensorboard")


def _progress_bar(cfg: GRPOConfig, start_step: int):
    """tqdm over the steps (disabled without `cfg.progress`); a log file, not a terminal, gets a
    line every 10 s instead of one per step."""
    return tqdm(total=cfg.max_steps, initial=start_step, desc="grpo", dynamic_ncols=True, file=sys.stdout,
                mininterval=0.1 if sys.stdout.isatty() else 10.0, disable=not cfg.progress)


# ----------------------------------------------------------------------------- the step's pieces


def _prompts_for(processor, rows: list[dict], row_ids: list[int], cfg: GRPOConfig, device: torch.device):
    """`rows` (dataset rows `row_ids`) rendered with the chat template and encoded with their
    images, the padded inputs for `generate` on `device`; and the images (P lists of PIL images,
    which a vLLM engine takes as they are)."""
    texts = [render_prompt(processor, r, cfg.system_prompt) for r in rows]
    images = [[load_image(im, where=getattr(r, "where", None), image_size=cfg.image_size) for im in r["images"]]
              for r in rows]
    prompts = encode_prompts(processor, texts, images, cfg.max_prompt_length)
    prompts.inputs = {k: v.to(device) for k, v in prompts.inputs.items()}
    return prompts, images


def _loss_weighting(cfg: GRPOConfig, batches, n_valid: int, n_seq: int | None = None) -> tuple[LossConfig, list[float]]:
    """The loss config of the step and each micro-batch's weight, so that the step's loss is one
    batch's loss however it was packed: dapo/cispo divide by the step's valid tokens (weight
    1); bnpo weights micro-batch means by their valid tokens, the per-sequence means by their
    sequences."""
    if cfg.loss_type in ("dapo", "cispo"):
        return cfg.loss_config(num_items_in_batch=max(n_valid, 1)), [1.0] * len(batches)
    if cfg.loss_type == "bnpo":
        return cfg.loss_config(), [int((mb.targets != packing.IGNORE).sum()) / max(n_valid, 1) for mb in batches]
    if n_seq is None:  # several ranks pass the step's total
        n_seq = sum(mb.seq_ids.numel() for mb in batches)
    return cfg.loss_config(), [mb.seq_ids.numel() / max(n_seq, 1) for mb in batches]


def _logprob(model, head, mb: packing.MicroBatch, temperature: float) -> torch.Tensor:
    """Log-probs [N] of a micro-batch's targets under `model` (LM head `head`), fused."""
    return linear_logprob(packing.completion_hidden(model, mb), head.weight, mb.targets, bias=head.bias,
                          temperature=temperature)


def _sampling_correction(cfg: GRPOConfig, hidden: torch.Tensor, head, mb: packing.MicroBatch, old_logp, sampling_logp,
                         temperature: float, stats: mismatch.MismatchStats):
    """The importance-sampling ratio [N] of a micro-batch's targets, exp(training log-prob before
    the update - vLLM's sampling log-prob), truncated or masked per the config, and the LM
    head's log-sum-exp [N] when it was computed here (the loss then skips that GEMM); the
    mismatch metrics go to `stats`."""
    lse = None
    with torch.no_grad():
        if old_logp is None:  # on-policy: the training log-prob is the loss's own, before the step
            old_logp, lse = linear_logprob(hidden, head.weight, mb.targets, bias=head.bias, temperature=temperature,
                                           return_lse=True)
        vllm_logp = mismatch.packed_sampling_logprobs(sampling_logp, mb.seq_ids, device=hidden.device)  # [N]
        valid = mb.targets != packing.IGNORE
        ratio = mismatch.importance_sampling_ratio(
            old_logp, vllm_logp, mb.cu_seqlens, mode=cfg.vllm_importance_sampling_mode,
            clip_min=cfg.vllm_importance_sampling_clip_min, clip_max=cfg.vllm_importance_sampling_clip_max, valid=valid,
        )
        stats.add(old_logp, vllm_logp, ratio, mb.cu_seqlens, valid)
    return ratio, lse


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
    # the reference model is written inside the checkpoint before its atomic rename (never missing from one)
    ref = None
    if ref_model is not None:
        ref = lambda tmp: ref_model.save_pretrained(tmp / "reference", safe_serialization=True)  # noqa: E731
    ckpt.save_checkpoint(run_dir, step, model, processor, state, keep=cfg.save_total_limit, extra=ref)
    plot_curves(run_dir)
