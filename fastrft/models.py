"""Loading models and processors, and the few facts the trainer needs about them.

`load_model` takes a local `save_pretrained` folder or a hub id (`model: "tiny"`, the embedded
Qwen2.5-VL, is built by `fastrft.synthetic` with `image_text_processor` below instead).
Image-text-to-text models load with `AutoModelForImageTextToText` and `AutoProcessor`;
text-only causal LMs with `AutoModelForCausalLM` and `AutoTokenizer`. Qwen2-VL and Qwen2.5-VL
(mrope positions) are first-class; Qwen3-VL where transformers supports it.
"""

from __future__ import annotations

import os

import torch

MROPE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


def load_processor(name: str, **kw):
    """The processor of `name` (or its tokenizer for a text-only model); `kw` to from_pretrained."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        proc = AutoProcessor.from_pretrained(name, **kw)
        if hasattr(proc, "image_processor"):
            return proc
    except (ValueError, TypeError, AttributeError, ImportError, OSError, KeyError):
        pass
    # AutoProcessor gave a bare tokenizer or failed: a text-only model, or a Qwen-VL folder
    # whose processor class cannot load here (its video processor needs torchvision)
    tok = AutoTokenizer.from_pretrained(name, **kw)
    try:
        image_processor = AutoImageProcessor.from_pretrained(name, backend="pil", **kw)
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


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub's endpoint (HF_ENDPOINT), no retries."""
    import os
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def check_model_source(name: str) -> bool:
    """Says what is wrong with `--model name` before transformers does (a missing folder read as
    a malformed repo id, a typo spending half a minute on hub retries, a run folder read as an
    unrecognized model). Returns True when `name` must load from the local cache only (offline)."""
    import difflib
    import os
    from pathlib import Path

    p = Path(name).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            return False
        ckpts = sorted((p / "checkpoints").glob("step-*")) if (p / "checkpoints").is_dir() else []
        if ckpts or (p / "config.yaml").is_file():
            hint = (f": pass one of its checkpoints, e.g. --model {ckpts[-1]}" if ckpts
                    else " (it has no checkpoint yet)")
            raise ValueError(f"--model {name} is a run folder, not a model{hint}")
        raise ValueError(f"--model {name} is a folder without a model (no config.json): pass a save_pretrained "
                         "folder, a checkpoint (runs/<run>/checkpoints/step-N) or tiny")
    # a hub id is "name" or "org/name"; a path (./x, /x, a/b/c, or runs/x where runs/ exists here) is a folder
    looks_local = name.startswith((".", "/", "~")) or name.count("/") >= 2 or \
        (name.count("/") == 1 and Path(name.split("/")[0]).is_dir())
    close = difflib.get_close_matches(name, ["tiny"], n=1, cutoff=0.6)
    if looks_local or close:
        hint = "did you mean tiny (the embedded model)? " if close else ""
        runs_dir = Path("runs")
        found = sorted(runs_dir.glob("*/checkpoints/step-*"))[-3:] if runs_dir.is_dir() else []
        more = f"; checkpoints here: {', '.join(map(str, found))}" if found else ""
        raise ValueError(f"--model {name}: no such folder; {hint}--model takes tiny, a local model folder or a "
                         f"hub id (org/name){more}")
    if os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0") or not _hub_reachable():
        return True  # offline: the local cache only, at once (no retries)
    return False


def _check_cache(name: str, offline: bool) -> None:
    """Offline: the model must be in the local cache (looked up there first, so that nothing asks
    the network and retries); then the hub libraries are put offline. OSError when it is not."""
    if not offline:
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise OSError(f"{name} is not in the local cache")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


def load_model(name: str, *, dtype: torch.dtype = torch.float32):
    """(model, processor) of the folder or hub id `name` (checked first: `check_model_source`)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    offline = check_model_source(name)
    kw = {"local_files_only": True} if offline else {}
    try:
        _check_cache(name, offline)
    except OSError:
        raise ValueError(f"--model {name}: offline (the hub at {os.environ.get('HF_ENDPOINT', 'huggingface.co')} "
                         "cannot be reached, or HF_HUB_OFFLINE is set) and the model is not in the local cache: "
                         "download it where there is a network (huggingface-cli download "
                         f"{name}) or pass a local folder") from None
    try:
        try:
            model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, **kw)
        except ValueError as e:  # not an image-text-to-text architecture: a text-only causal LM
            if offline and "local_files_only" in str(e):
                raise OSError(str(e)) from e
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kw)
        return model, load_processor(name, **kw)
    except OSError as e:
        if offline:
            raise ValueError(f"--model {name}: offline (the hub at {os.environ.get('HF_ENDPOINT', 'huggingface.co')} "
                             "cannot be reached, or HF_HUB_OFFLINE is set) and the model is not in the local cache: "
                             "download it where there is a network (huggingface-cli download "
                             f"{name}) or pass a local folder") from None
        raise ValueError(f"--model {name}: cannot load it from the hub ({str(e).splitlines()[0]})") from None


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
