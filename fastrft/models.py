"""Loading models and processors, and the few facts the trainer needs about them.

`model` is "tiny" (the embedded Qwen2.5-VL of `fastrft.synthetic`, built from a config), a
local `save_pretrained` folder or a hub id. Image-text-to-text models load with
`AutoModelForImageTextToText` and `AutoProcessor`; text-only causal LMs with
`AutoModelForCausalLM` and `AutoTokenizer`. Qwen2-VL and Qwen2.5-VL (mrope positions) are
first-class; Qwen3-VL where transformers supports it.
"""

from __future__ import annotations

import torch

MROPE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


def load_processor(name: str):
    """The processor of `name` (or its tokenizer for a text-only model)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        proc = AutoProcessor.from_pretrained(name)
        if hasattr(proc, "image_processor"):
            return proc
    except (ValueError, TypeError, AttributeError, ImportError, OSError, KeyError):
        pass
    # AutoProcessor gave a bare tokenizer or failed: a text-only model, or a Qwen-VL folder
    # whose processor class cannot load here (its video processor needs torchvision)
    tok = AutoTokenizer.from_pretrained(name)
    try:
        image_processor = AutoImageProcessor.from_pretrained(name, backend="pil")
    except (ValueError, TypeError, OSError, ImportError, KeyError):
        return tok
    from .synthetic import image_text_processor

    return image_text_processor(image_processor, tok, getattr(tok, "chat_template", None))


def load_model(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, image_size: int = 56):
    """(model, processor) for `name`; "tiny" builds the embedded model from `seed`."""
    if name == "tiny":
        from . import synthetic

        processor = synthetic.make_processor(image_size)
        return synthetic.make_model(processor, seed=seed).to(dtype), processor
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(name)
    try:
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype)
    except ValueError:  # not an image-text-to-text architecture: a text-only causal LM
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    del config
    return model, load_processor(name)


def is_mrope(model) -> bool:
    return getattr(model.config, "model_type", None) in MROPE_MODEL_TYPES


def lm_head(model) -> torch.nn.Linear:
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (LM head)")
    return head


def body(model):
    """The model without its LM head: returns hidden states [B, T, H] (vision included)."""
    inner = getattr(model, "model", None)
    if inner is None:
        raise ValueError(f"{type(model).__name__} has no `.model` body to run without the LM head")
    return inner


def prompt_positions(model, ids: torch.Tensor, mm_token_type_ids, image_grid_thw) -> torch.Tensor:
    """Position ids of one unpadded prompt `ids` [L]: mrope [3, L] for Qwen-VL models (image
    tokens get their (t, h, w) grid positions), else [1, L] = arange(L)."""
    L = ids.shape[0]
    if not is_mrope(model) or image_grid_thw is None:
        pos = torch.arange(L, device=ids.device)
        return pos.expand(3, L) if is_mrope(model) else pos[None]
    kw = {"image_grid_thw": image_grid_thw, "attention_mask": torch.ones(1, L, dtype=torch.long, device=ids.device)}
    if mm_token_type_ids is not None:
        kw["mm_token_type_ids"] = mm_token_type_ids[None]
    pos, _ = body(model).get_rope_index(ids[None], **kw)  # [3, 1, L]
    return pos[:, 0]
