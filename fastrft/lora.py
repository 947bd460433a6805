"""LoRA through peft, with TRL's config names: `use_peft`, `lora_r`, `lora_alpha`, `lora_dropout`,
`lora_target_modules` (None: the text model's attention and MLP projections; the vision tower
and the LM head stay frozen).

The adapters are injected in place (`peft.inject_adapter_in_model`): the model keeps its class
and structure, so the packed body, the fused LM-head loss (on the frozen head's weight, which gets
no gradient) and FSDP2 (fastrft/distributed.py) run on it unchanged; only the adapter parameters
require grad. A checkpoint holds the adapter (adapter/adapter_model.safetensors + adapter_config.json,
what a resume loads: the frozen base is rebuilt from `model`) and the merged weights as a plain
transformers model (model.safetensors: W + alpha/r * B A for each adapted layer).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# in a subfolder: transformers' from_pretrained treats a folder with adapter_config.json as an adapter
ADAPTER_FILE = "adapter/adapter_model.safetensors"
ADAPTER_CONFIG = "adapter/adapter_config.json"
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _target_modules(cfg):
    if cfg.lora_target_modules:
        return list(cfg.lora_target_modules)
    # regex (full match): the text projections, not the vision tower's (whose MLP shares the names)
    return r"^(?!.*visual).*\.(" + "|".join(TEXT_TARGETS) + r")$"


def apply(cfg, model) -> torch.nn.Module:
    """Injects LoRA adapters into `model` in place and freezes everything else."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:  # pragma: no cover - the optional extra
        raise ImportError("use_peft needs peft: pip install 'fastrft[lora]'") from e
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=_target_modules(cfg), bias="none")
    inject_adapter_in_model(config, model)
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        n += "lora_" in name
    if n == 0:
        raise ValueError(f"lora_target_modules={cfg.lora_target_modules!r} matched no layer of the model")
    model.__dict__["_fastrft_lora"] = {"r": cfg.lora_r, "alpha": cfg.lora_alpha,
                                       "target_modules": config.target_modules if isinstance(config.target_modules, str)
                                       else sorted(config.target_modules)}
    cls_save = type(model).save_pretrained
    model.save_pretrained = lambda folder, state_dict=None, **kw: save(model, cls_save, folder, state_dict, **kw)
    return model


def is_lora(model) -> bool:
    return "_fastrft_lora" in getattr(model, "__dict__", {})


def merged_state_dict(state: dict, scaling: float) -> dict:
    """The weights of the model with each adapter merged (W + scaling * B A), under the names of
    the model without adapters; adapter tensors left out."""
    out = {}
    for k, v in state.items():
        if ".lora_" in k:
            continue
        if ".base_layer." in k:
            prefix, leaf = k.split(".base_layer.")
            a, b = state.get(f"{prefix}.lora_A.default.weight"), state.get(f"{prefix}.lora_B.default.weight")
            if leaf == "weight" and a is not None:
                v = v + scaling * (b.float() @ a.float()).to(v.dtype)
            out[f"{prefix}.{leaf}"] = v
        else:
            out[k] = v
    return out


def adapter_state_dict(state: dict) -> dict:
    return {k: v.detach().contiguous() for k, v in state.items() if ".lora_" in k}


def save(model, cls_save, folder, state_dict=None, **kw) -> None:
    """`save_pretrained` of a LoRA model: the merged model (transformers-loadable) and the adapter."""
    from safetensors.torch import save_file

    info = model.__dict__["_fastrft_lora"]
    state = state_dict if state_dict is not None else {k: v.detach() for k, v in model.state_dict().items()}
    merged = merged_state_dict(state, info["alpha"] / info["r"])
    Path(folder).mkdir(parents=True, exist_ok=True)
    plain = _without_adapters_view(model)
    cls_save(plain, folder, state_dict=merged, **kw)
    (Path(folder) / "adapter").mkdir(exist_ok=True)
    save_file({k: v.cpu() for k, v in adapter_state_dict(state).items()}, str(Path(folder) / ADAPTER_FILE))
    (Path(folder) / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", **info}, indent=2))


def _without_adapters_view(model):
    """The model object for transformers' save_pretrained (it writes the given state dict; the
    config and generation config come from the model)."""
    return model


def load_adapter(model, folder) -> None:
    """A checkpoint's adapter into a LoRA model whose frozen base is the run's `model`."""
    from safetensors.torch import load_file

    state = load_file(str(Path(folder) / ADAPTER_FILE))
    missing, unexpected = [], []
    own = dict(model.named_parameters())
    for k, v in state.items():
        if k not in own:
            unexpected.append(k)
            continue
        with torch.no_grad():
            own[k].copy_(v)
    missing = [k for k in own if ".lora_" in k and k not in state]
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(folder)!r}: adapter does not match the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
