"""TRL drop-in: TRL GRPOTrainer's loss from hidden states through `linear_policy_loss`.

    from fastrft_kernels.integrations.trl import FusedGRPOTrainer
    trainer = FusedGRPOTrainer(model=model, reward_funcs=..., args=GRPOConfig(...), train_dataset=...)

or, on a trainer already built, `use_fused_loss(trainer)`. Everything else (generation, rewards,
advantages, old and reference log-probabilities, the optimizer, logging) stays TRL's.

What `_compute_loss` becomes: the model's backbone runs through the *wrapped* module (the
DDP/FSDP object the Trainer calls, so its hooks fire and gradients are all-reduced); inside that
forward, the hidden states of the completion positions go straight into `linear_policy_loss`
with the LM head's weight: no [tokens, vocab] tensor exists. The forward is a patch of the
unwrapped model's `forward` that only acts when called with the keyword `fastrft_loss=`; any
other call (generation, TRL's own log-probability passes) is the original forward.

TRL's meaning, option by option (trl 1.16 `GRPOTrainer._compute_loss`, read, not copied):
every `loss_type` (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo), `importance_sampling_level`,
`beta` (k3 KL with `use_bias_correction_kl`), `epsilon`/`epsilon_high`, `delta`,
`top_entropy_quantile` (one process), `off_policy_mask_threshold`, static `entropy_coef`, the vLLM
importance-sampling correction (token or sequence modes), tool masks, gradient accumulation and
`steps_per_generation` (dapo/cispo/vespo: the loss is divided by num_items_in_batch /
num_processes * accumulation / steps_per_generation; the others by the accumulation steps).
Metrics are logged under TRL's names with TRL's cross-process reductions: `entropy`, `kl`,
`clip_ratio/{low_mean,high_mean,region_mean,low_min,high_max}`, `cispo_clip_ratio`,
`vespo/phi_seq_mean`, `policy_loss` and `entropy_coef` (entropy bonus).

Refused with an error naming the option (never silently ignored): adaptive entropy control
(`entropy_target`/adaptive mode), MoE router aux loss, `top_entropy_quantile < 1` with more than
one process (TRL's threshold is a quantile over all ranks' tokens), models whose logits are
scaled or soft-capped after the LM head, TRL versions outside SUPPORTED_TRL.

`shared_prompt=True` (VLMs with image_grid_thw, e.g. Qwen2/2.5-VL, and text models): the rows of a
micro-batch that share a prompt are laid out once as [prompt+images | c1 | ... | cG] under segment
attention, so each prompt is computed and each image encoded once per micro-batch instead of once
per completion (`_shared_prompt.py`). Logged either way: `fastrft/forward_tokens` and
`fastrft/images_encoded`, what the decoder and the vision tower computed.

Importing this module does not import trl; `FusedGRPOTrainer` is built on first access.
"""

from __future__ import annotations

import functools
import types

import torch

from .._linear_policy_loss import linear_policy_loss
from .._loss_config import LossConfig
from . import _shared_prompt

SUPPORTED_TRL = (">=1.16.0", "<1.17")  # the loss options and input keys read here are trl 1.16's
_MIN, _MAX = (1, 16, 0), (1, 17, 0)
_MM_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "token_type_ids",
            "mm_token_type_ids", "image_position_ids", "spatial_shapes")
_DAPO_FAMILY = ("dapo", "cispo", "vespo")


def check_trl_version(version: str | None = None) -> str:
    """The installed trl version, or a clear error when it is outside SUPPORTED_TRL."""
    if version is None:
        import trl

        version = trl.__version__
    parts = []
    for p in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit()) if not p.isdigit() else p
        parts.append(int(digits or 0))
    while len(parts) < 3:
        parts.append(0)
    if not (_MIN <= tuple(parts) < _MAX):
        raise RuntimeError(
            f"fastrft_kernels.integrations.trl supports trl {', '.join(SUPPORTED_TRL)}; trl {version} is installed. "
            "Its GRPOTrainer._compute_loss may differ: install a supported trl (pip install 'trl>=1.16,<1.17')."
        )
    return version


# ------------------------------------------------------------------------------ the model patch


class _Request:
    """What the patched forward needs to compute the loss, and what it hands back (stats)."""

    def __init__(self, n_completion: int, call, shared_prompt_inputs: dict | None = None):
        self.n_completion = n_completion
        self.call = call  # (hidden [B*C, H], weight, bias) -> (loss, stats)
        self.shared_prompt_inputs = shared_prompt_inputs  # TRL's inputs, to pack (shared_prompt=True)
        self.stats = None
        self.packed = None


def _backbone(model):
    import transformers

    major = int(transformers.__version__.split(".")[0])
    text = model.config.get_text_config()
    if text is not model.config and major < 5:
        return model.model  # VLMs before transformers 5 expose their backbone as `model`
    return model.base_model


def _check_head(model) -> None:
    text = model.config.get_text_config()
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        value = getattr(text, name, None)
        if value is not None and value != 1.0:
            raise ValueError(
                f"fastrft's fused loss takes logits = hidden @ lm_head.weight.T (+ bias); this model's config sets "
                f"{name}={value!r}, which transforms the logits after the head: not supported"
            )


def patch_model(model) -> None:
    """Make `model(..., fastrft_loss=request)` compute the fused loss inside the model's forward.

    `model` is the unwrapped transformers model (PEFT: its base model). Idempotent."""
    if getattr(model, "_fastrft_patched", False):
        return
    _check_head(model)
    original = model.forward

    @functools.wraps(original)
    def forward(*args, fastrft_loss: _Request | None = None, **kwargs):
        if fastrft_loss is None:
            return original(*args, **kwargs)
        body = _backbone(model)
        if fastrft_loss.shared_prompt_inputs is not None:  # one packed sequence, each prompt and image once
            fastrft_loss.packed = _shared_prompt.pack(model, body, fastrft_loss.shared_prompt_inputs)
            hidden = _shared_prompt.packed_hidden(model, body, fastrft_loss.packed)  # [B, C, H]
        else:
            kwargs["use_cache"] = False
            hidden = body(*args, **kwargs).last_hidden_state  # [B, L, H]
            C = fastrft_loss.n_completion
            # position P - 1 + j predicts completion token j (TRL's logits[:, :-1][:, -C:])
            hidden = hidden[:, -C - 1:-1]  # [B, C, H]
        head = model.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 DTensor shards: the whole head for this call
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        hidden = hidden.reshape(-1, hidden.shape[-1]).to(device=weight.device, dtype=weight.dtype)  # [B*C, H]
        loss, stats = fastrft_loss.call(hidden, weight, bias)
        fastrft_loss.stats = stats
        return {"loss": loss}

    model.forward = forward
    model._fastrft_patched = True


# ------------------------------------------------------------------------------ the loss


def _check_supported(trainer) -> None:
    if getattr(trainer, "use_adaptive_entropy", False):
        raise NotImplementedError(
            "fastrft's fused loss supports a static entropy_coef; adaptive entropy control (entropy_target) is not "
            "supported"
        )
    if getattr(trainer, "aux_loss_enabled", False):
        raise NotImplementedError(
            "fastrft's fused loss does not support the MoE router aux loss (output_router_logits)"
        )
    if trainer.top_entropy_quantile < 1.0 and trainer.accelerator.num_processes > 1:
        raise NotImplementedError(
            f"top_entropy_quantile={trainer.top_entropy_quantile} < 1 with {trainer.accelerator.num_processes} "
            "processes is not supported by fastrft's fused loss (TRL's threshold is a quantile over all ranks)"
        )
    if getattr(trainer.args, "use_liger_kernel", False):
        raise ValueError("use_liger_kernel and fastrft's fused loss both replace the LM head: pick one")


def _first_valid(ratio_seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, 1] per-sequence factors -> [B, C] with the factor at each row's first valid token, 1 elsewhere
    (vespo sums log-ratios over a sequence's tokens: one factor per sequence)."""
    B, C = mask.shape
    first = torch.where(mask.bool().any(1), mask.float().argmax(1), torch.full((B,), C, device=mask.device))
    onehot = torch.arange(C, device=mask.device)[None, :] == first[:, None]  # [B, C]
    return torch.where(onehot, ratio_seq.expand(B, C), torch.ones_like(ratio_seq.expand(B, C)))


def fused_compute_loss(trainer, model, inputs):
    """TRL GRPOTrainer._compute_loss, computed through `linear_policy_loss` inside the wrapped forward."""
    _check_supported(trainer)
    acc = trainer.accelerator
    mode = "train" if trainer.model.training else "eval"
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    B, C = completion_ids.shape
    device = completion_ids.device
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]  # [B, C]
    targets = completion_ids.masked_fill(mask == 0, -100).reshape(-1)  # [B*C]
    cu = torch.arange(B + 1, dtype=torch.int32, device=device) * C  # one sequence per row, padding ignored
    adv = inputs["advantages"]
    adv_flat = adv if adv.dim() == 1 else adv.reshape(-1)
    per_token = lambda x: None if x is None else x.expand(B, C).reshape(-1)  # noqa: E731 (B, 1) or (B, C)
    old = per_token(inputs.get("old_per_token_logps"))
    ref = per_token(inputs.get("ref_per_token_logps")) if trainer.beta != 0.0 else None
    thr = getattr(trainer, "off_policy_mask_threshold", None)
    sampling = per_token(inputs.get("sampling_per_token_logps")) if thr is not None else None
    isr_raw = inputs.get("importance_sampling_ratio")
    loss_type = trainer.loss_type
    if loss_type == "vespo":
        isr = None
        if isr_raw is not None:
            per_seq = isr_raw.shape[-1] == 1 and C > 1
            isr = (_first_valid(isr_raw, mask) if per_seq else isr_raw.expand(B, C)).reshape(-1)
    elif trainer.use_vllm and trainer.vllm_importance_sampling_correction:
        isr = per_token(isr_raw)
    else:
        isr = None

    accum = trainer.current_gradient_accumulation_steps if mode == "train" else 1
    num_items = None
    if loss_type in _DAPO_FAMILY:
        num_items = inputs["num_items_in_batch"].clamp(min=1.0)
        scale = acc.num_processes * (trainer.args.steps_per_generation / accum if mode == "train" else 1.0)
    else:
        scale = 1.0 / accum
    bonus = bool(getattr(trainer, "_entropy_bonus_enabled", False))
    entropy_coef = float(trainer.entropy_coef) / (accum * scale) if bonus else 0.0
    args = trainer.args
    config = LossConfig(
        loss_type=loss_type,
        importance_sampling_level=trainer.importance_sampling_level,
        epsilon_low=float(trainer.epsilon_low),
        epsilon_high=float(trainer.epsilon_high),
        delta=getattr(args, "delta", None),
        beta=float(trainer.beta),
        kl_estimator="k3",
        use_bias_correction_kl=bool(getattr(args, "use_bias_correction_kl", False)),
        max_completion_length=trainer.max_completion_length,
        num_items_in_batch=num_items,
        sapo_temperature_pos=getattr(args, "sapo_temperature_pos", 1.0),
        sapo_temperature_neg=getattr(args, "sapo_temperature_neg", 1.05),
        top_entropy_quantile=float(trainer.top_entropy_quantile),
        temperature=float(trainer.temperature),
        vespo_k_pos=getattr(args, "vespo_k_pos", 2.0),
        vespo_lambda_pos=getattr(args, "vespo_lambda_pos", 3.0),
        vespo_k_neg=getattr(args, "vespo_k_neg", 3.0),
        vespo_lambda_neg=getattr(args, "vespo_lambda_neg", 2.0),
        off_policy_mask_threshold=thr,
        entropy_coef=entropy_coef,
    )
    f32 = lambda x: None if x is None else x.float()  # noqa: E731

    def call(hidden, weight, bias):
        return linear_policy_loss(
            hidden, weight, targets, f32(adv_flat), cu, bias=bias, old_logp=f32(old), ref_logp=f32(ref),
            importance_sampling_ratio=f32(isr), sampling_logp=f32(sampling), config=config, compute_entropy=True,
        )

    shared = getattr(trainer, "_fastrft_shared_prompt", False)
    request = _Request(C, call, shared_prompt_inputs=inputs if shared else None)
    model_inputs = {} if shared else {"input_ids": input_ids, "attention_mask": attention_mask}
    for key in () if shared else _MM_KEYS:
        if inputs.get(key) is not None:
            model_inputs[key] = inputs[key]
    with acc.autocast():  # through the wrapped module: DDP/FSDP hooks fire
        out = model(**model_inputs, fastrft_loss=request)
    loss = out["loss"] * scale
    _log_metrics(trainer, mode, request.stats, mask, adv, config, scale, bonus)
    _log_work(trainer, mode, request.packed, input_ids, inputs)
    return loss


def _log_work(trainer, mode, packed, input_ids, inputs):
    """What the forward computed: `fastrft/forward_tokens` (tokens through the decoder) and
    `fastrft/images_encoded` (images through the vision tower), summed over processes."""
    if packed is not None:
        tokens, images = packed.input_ids.numel(), packed.images
    else:  # TRL's layout: every row, padding included (the decoder computes it)
        grid = inputs.get("image_grid_thw")
        tokens, images = input_ids.numel(), 0 if grid is None else grid.shape[0]
    acc = trainer.accelerator
    totals = acc.reduce(torch.tensor([float(tokens), float(images)], device=input_ids.device), reduction="sum")
    trainer._metrics[mode]["fastrft/forward_tokens"].append(totals[0].item())
    trainer._metrics[mode]["fastrft/images_encoded"].append(totals[1].item())


def _log_metrics(trainer, mode, stats, mask, adv, config, scale, bonus):
    from trl.trainer.utils import nanmax, nanmin

    acc = trainer.accelerator
    metrics = trainer._metrics[mode]
    B = mask.shape[0]
    n_tok = mask.sum().float()
    n_seq = torch.tensor(float(B), device=mask.device)
    seq_case = config.importance_sampling_level == "sequence" and adv.dim() == 1  # TRL's (B, 1) tensors

    def global_mean(value, count):
        totals = acc.reduce(torch.stack([value.double().nan_to_num(0.0) * count, count.double()]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    if bonus:
        pl = stats["policy_loss"] * (scale if config.loss_type in _DAPO_FAMILY else 1.0)
        metrics["policy_loss"].append(acc.gather(pl.detach().reshape(1)).nanmean().item())
        if mode == "train" and acc.sync_gradients:
            metrics["entropy_coef"].append(trainer.entropy_coef)
    if config.beta != 0.0:
        metrics["kl"].append(global_mean(stats["kl"], n_tok))
    metrics["entropy"].append(global_mean(stats["entropy"], n_tok))
    count = n_seq if seq_case else n_tok
    if config.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        for k in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            metrics[k].append(global_mean(stats[k], count))
        metrics["clip_ratio/low_min"].append(nanmin(acc.gather(stats["clip_ratio/low_min"].reshape(1))).item())
        metrics["clip_ratio/high_max"].append(nanmax(acc.gather(stats["clip_ratio/high_max"].reshape(1))).item())
    elif config.loss_type == "cispo":
        metrics["cispo_clip_ratio"].append(global_mean(stats["clip_ratio/high_mean"], count))
    elif config.loss_type == "vespo":
        count = n_seq if adv.dim() == 1 else n_tok
        metrics["vespo/phi_seq_mean"].append(global_mean(stats["vespo/phi_seq_mean"], count))


# ------------------------------------------------------------------------------ public entry points


def _unwrapped(trainer):
    model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return model


def use_fused_loss(trainer, *, shared_prompt: bool = False):
    """Make an existing trl GRPOTrainer compute its loss with fastrft's fused kernels; returns it.
    shared_prompt: pack the rows that share a prompt into one sequence (module docstring)."""
    check_trl_version()
    from trl import GRPOTrainer

    if not isinstance(trainer, GRPOTrainer):
        raise TypeError(f"use_fused_loss expects a trl.GRPOTrainer, got {type(trainer).__name__}")
    if getattr(trainer.args, "use_liger_kernel", False):
        raise ValueError("use_liger_kernel and fastrft's fused loss both replace the LM head: pick one")
    patch_model(_unwrapped(trainer))
    if not isinstance(trainer, _trainer_class_or_none() or ()):
        trainer._compute_loss = types.MethodType(fused_compute_loss, trainer)
    trainer._fastrft_shared_prompt = shared_prompt
    return trainer


_CLASS = None


def _trainer_class_or_none():
    return _CLASS


def _make_trainer_class():
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    check_trl_version()
    from trl import GRPOTrainer

    class FusedGRPOTrainer(GRPOTrainer):
        """`trl.GRPOTrainer` with the loss computed by fastrft's fused LM-head kernels (same arguments,
        plus `shared_prompt`); see the module docstring."""

        def __init__(self, *args, shared_prompt: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            use_fused_loss(self, shared_prompt=shared_prompt)

        def _compute_loss(self, model, inputs):
            return fused_compute_loss(self, model, inputs)

    _CLASS = FusedGRPOTrainer
    return _CLASS


def __getattr__(name):
    if name == "FusedGRPOTrainer":
        return _make_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FusedGRPOTrainer", "use_fused_loss", "check_trl_version", "SUPPORTED_TRL"]  # noqa: F822 (module __getattr__)
