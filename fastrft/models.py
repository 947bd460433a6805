"""Loading models and processors, and the few facts the trainer needs about them.

`load_model` takes a local `save_pretrained` folder or a hub id (`model: "tiny"`, the embedded
Qwen2.5-VL, is built by `fastrft.synthetic` with `image_text_processor` below instead).
Image-text-to-text models load with `AutoModelForImageTextToText` and `AutoProcessor`;
text-only causal LMs with `AutoModelForCausalLM` and `AutoTokenizer`. Qwen2-VL and Qwen2.5-VL
(mrope positions) are first-class; Qwen3-VL where transformers supports it.
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
    return image_text_processor(image_processor, tok, getattr(tok, "chat_template", None))


def image_text_processor(image_processor, tokenizer, chat_template=None):
    """Qwen2.5-VL's processor (image-token expansion, mm_token_type_ids, chat template) without
    its video processor: transformers' Qwen2-VL video processor needs torchvision, which the
    CPU install does not carry, and the processor's constructor refuses a missing one."""
    from transformers import ProcessorMixin, Qwen2_5_VLProcessor

    class ImageTextProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageTextProcessor(image_processor, tokenizer, chat_template=chat_template)


def load_model(name: str, *, dtype: torch.dtype = torch.float32):
    """(model, processor) of the folder or hub id `name`."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    try:
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype)
    except ValueError:  # not an image-text-to-text architecture: a text-only causal LM
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
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
