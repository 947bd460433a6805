"""transformers integration: segment attention as an attention implementation ("fastrft_segment").

    from fastrft_kernels.hf_attention import enable_segment_attention, shared_prefix_position_ids
    enable_segment_attention(model)                       # text and vision attention
    out = model(input_ids=ids[None], position_ids=pos[:, None], pixel_values=pix,
                image_grid_thw=grid, segments=shared_prefix_segments(P, C))

How it plugs in (transformers 5.x, read from modeling_qwen2_5_vl.py / masking_utils.py):
- `AttentionInterface.register("fastrft_segment", segment_attention_forward)`: every
  attention module of a model whose config names this implementation calls it with
  query [B, Hq, L, D], key/value [B, Hk, S, D] and the forward's extra keyword arguments;
  that is how `segments=` given to `model(...)` reaches each text layer.
- `AttentionMaskInterface.register("fastrft_segment", ...)` returning None: the text model
  builds no [T, T] mask at all (the segment table is the mask). A 2-D padding mask with
  zeros is rejected: a packed batch has no padding.
- Vision tower (Qwen2-VL, Qwen2.5-VL): transformers sends the whole packed tower to the
  attention function with its `cu_seqlens` (per image, or per window) only when the
  implementation's name contains "flash" (`is_flash_attention_requested`); any other name
  gets one call per image / window, split on the host. So the vision config is set to a
  second name for the same function, VISION_NAME = "fastrft_segment_flash_varlen" (our
  kernel, not flash-attn; assigned to the vision configs directly, see
  `enable_segment_attention`): one call per vision layer, table from `cu_seq_lens_q` via
  `varlen_attention(causal=False)` (built once per cu_seqlens tensor, which the tower
  reuses across its layers). A call per image still works (is_causal=False: one full entry).
  The tower computes each image once whatever the text layout.

Text kwargs: `segments` (a `Segments` table over the packed tokens, batch size 1) selects
the packed path; without it each batch row is one causal sequence (bottom-right aligned,
so decoding with a KV cache works), which is what `generate` needs.

Positions for a packed shared-prefix batch (what the trainer, fastrft/packing.py, does):
Qwen2/2.5-VL use mrope, position ids [3, T] (temporal, height, width). For each group:
1. the prompt alone (text + image tokens) gets its ids from the model's own rule:
   `pos, _ = model.model.get_rope_index(prompt_ids[None], mm_token_type_ids[None],
   image_grid_thw=grids_of_this_prompt)` -> pos[:, 0] is [3, Lp];
2. completion j is text, so its 3 rows are equal and continue from the prompt:
   next = pos.max() + 1; completion positions next, next + 1, ... (every completion restarts
   at `next`: it sees the prompt, never a sibling). This is exactly what get_rope_index
   gives for the unpacked prompt + completion when the prompt ends in text (it always does:
   the chat template ends with the assistant header).
`shared_prefix_position_ids(prompt_positions, completion_lens)` assembles [3, T] in the
token order of `shared_prefix_segments`. Pass it to the model as position_ids[:, None]
([3, 1, T]; a 3-row tensor means no separate text positions, so transformers builds no
packed-sequence mask from them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from ._segment_attention import segment_attention, varlen_attention
from ._segments import CAUSAL, FULL, Segments

NAME = "fastrft_segment"
VISION_NAME = "fastrft_segment_flash_varlen"  # "flash" in the name: see the module docstring

# a few small tables reused across layers and calls: (Lq, Lk, B, kind) -> Segments
_SIMPLE_TABLES: dict = {}


def _simple_table(L: int, S: int, B: int, kind: int) -> Segments:
    key = (L, S, B, kind)
    seg = _SIMPLE_TABLES.get(key)
    if seg is None:
        if len(_SIMPLE_TABLES) > 64:  # decoding walks S upward: keep the cache bounded
            _SIMPLE_TABLES.clear()
        seg = Segments(torch.tensor([[b * L, (b + 1) * L, b * S, (b + 1) * S, kind] for b in range(B)],
                                    dtype=torch.int32).reshape(-1, 5))
        _SIMPLE_TABLES[key] = seg
    return seg


def segment_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    segments: Segments | None = None,
    **kwargs,
):
    """The attention function transformers calls for "fastrft_segment".

    query: [B, Hq, L, D], key/value: [B, Hk, S, D] (any float dtype; mixed dtypes under autocast
    run in the autocast dtype).
    segments: table over the B*L packed tokens (text layers; requires B == 1 and L == S).
    Returns (out [B, L, Hq, D] in query's dtype, None): no attention weights are formed.
    """
    if dropout:
        raise ValueError(f"fastrft_segment does not implement attention dropout, got dropout={dropout}")
    if sliding_window is not None:
        raise ValueError(f"fastrft_segment does not implement sliding windows, got sliding_window={sliding_window}")
    if attention_mask is not None:
        raise ValueError(
            "fastrft_segment takes no attention mask: pack the batch (no padding) and pass segments=; "
            f"got a mask of shape {tuple(attention_mask.shape)}"
        )
    if not (query.dtype == key.dtype == value.dtype):
        # under autocast, rotary embeddings leave q and k in fp32 while v comes from a bf16 linear:
        # attention runs in the autocast dtype, as autocast runs transformers' SDPA
        dev = query.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else value.dtype
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    B, Hq, L, D = query.shape
    S = key.shape[2]
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is not None:
        # packed vision tower (or any caller in flash-attn's varlen convention), batch 1
        if B != 1:
            raise ValueError(f"cu_seq_lens_q= needs one packed sequence (batch 1), got batch {B}")
        cu_k = kwargs.get("cu_seq_lens_k")
        out = varlen_attention(
            query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),  # [T, H, D]
            cu_q.to(torch.int32), None if cu_k is None else cu_k.to(torch.int32),
            causal=bool(causal), softmax_scale=scaling,
        )
        return out[None], None
    if not causal:
        # vision tower: one image / window per call, every token sees every token
        table = _simple_table(L, S, B, FULL)
    elif segments is not None:
        if B != 1 or L != S:
            raise ValueError(
                f"segments= needs one packed sequence without a KV cache (batch 1, L == S), got batch {B}, "
                f"L={L}, S={S}"
            )
        table = segments
    else:
        table = _simple_table(L, S, B, CAUSAL)
    q = query.transpose(1, 2).reshape(B * L, Hq, D)  # [B*L, Hq, D]
    k = key.transpose(1, 2).reshape(B * S, key.shape[1], D)  # [B*S, Hk, D]
    v = value.transpose(1, 2).reshape(B * S, value.shape[1], D)
    out = segment_attention(q, k, v, table, softmax_scale=scaling)  # [B*L, Hq, D]
    return out.view(B, L, Hq, D), None


def _no_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
             attention_mask=None, **kwargs):
    """Mask builder for "fastrft_segment": nothing to build (the segment table is the mask)."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "fastrft_segment runs packed batches without padding: got an attention_mask with zeros. "
            "Pack the sequences into one row and pass segments= instead."
        )
    return None


def register() -> str:
    """Registers the attention and mask implementations (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for name in (NAME, VISION_NAME):
        AttentionInterface.register(name, segment_attention_forward)
        AttentionMaskInterface.register(name, _no_mask)
    return NAME


def enable_segment_attention(model):
    """Switches `model` (text and vision sub-models) to segment attention; returns it.

    After this, `model(..., segments=table)` runs the text layers packed through the table,
    and the vision tower attends within each image / window of its own cu_seqlens.
    """
    register()
    model.set_attn_implementation(NAME)
    # The vision configs get VISION_NAME by direct assignment, after the checks: given to
    # set_attn_implementation, a name containing "flash" is taken for a flash-attn build to
    # preload (transformers 5.25: "Could not find the currently requested flash attention
    # implementation"). The attention modules read config._attn_implementation at each call.
    vision = [getattr(model.config, k) for k in getattr(model.config, "sub_configs", {}) if "vision" in k]
    vision_types = tuple({type(c) for c in vision})
    for module in model.modules():  # sub-models may hold copies of the sub-config
        cfg = getattr(module, "config", None)
        if vision_types and isinstance(cfg, vision_types):
            vision.append(cfg)
    for cfg in vision:
        cfg._attn_implementation = VISION_NAME
    return model


@contextlib.contextmanager
def segment_attention_on(model):
    """Runs the block with `model`'s text and vision attention switched to segment attention,
    then restores the previous implementation. Generation needs the previous one: `generate`
    runs left-padded batches with a padding mask, which segment attention refuses."""
    previous = model.config._attn_implementation
    if previous == NAME:
        yield model
        return
    enable_segment_attention(model)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def recompute_with_forward_attention(model) -> None:
    """Makes activation checkpointing (transformers' `gradient_checkpointing_enable`) recompute each
    layer with the attention its forward ran with. The recompute runs in backward, after
    `segment_attention_on` has restored the previous implementation: without this a packed
    forward would be recomputed with another attention, ignoring `segments` (torch raises "a
    different number of tensors was saved"). Wraps each checkpointing layer's function, keeping
    its own checkpoint options; idempotent, and a no-op for layers without checkpointing."""
    for module in model.modules():
        original = getattr(module, "_gradient_checkpointing_func", None)
        if not getattr(module, "gradient_checkpointing", False) or original is None or getattr(original, "_fastrft", 0):
            continue

        def checkpointed(fn, *args, _original=original, **kwargs):
            if model.config._attn_implementation != NAME:
                return _original(fn, *args, **kwargs)

            def run(*a, **k):
                with segment_attention_on(model):
                    return fn(*a, **k)

            return _original(run, *args, **kwargs)

        checkpointed._fastrft = 1
        module._gradient_checkpointing_func = checkpointed


def shared_prefix_position_ids(prompt_positions: Sequence[torch.Tensor], completion_lens: Sequence[Sequence[int]]):
    """mrope positions [3, T] (int64) for groups packed as [prompt | c1 | ... | cG].

    prompt_positions: P tensors [3, Lp] (each prompt's own ids, e.g. from get_rope_index on
    the prompt alone); completion_lens: P lists of completion lengths. Completion tokens get
    next, next+1, ... on all 3 rows, next = that prompt's max position + 1 (see module doc).
    Token order matches `shared_prefix_segments(prompt_lens, completion_lens)`.
    """
    if len(prompt_positions) != len(completion_lens):
        raise ValueError(
            f"completion_lens must hold one list per prompt ({len(prompt_positions)}), got {len(completion_lens)}"
        )
    parts = []
    for p, (pos, comps) in enumerate(zip(prompt_positions, completion_lens)):
        if not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.shape[0] != 3:
            raise ValueError(f"prompt_positions[{p}] must be a [3, Lp] tensor, got {getattr(pos, 'shape', pos)}")
        pos = pos.to(torch.int64)
        parts.append(pos)
        nxt = int(pos.max()) + 1 if pos.numel() else 0
        for lc in comps:
            parts.append((nxt + torch.arange(int(lc), device=pos.device)).expand(3, -1))
    if not parts:
        return torch.zeros(3, 0, dtype=torch.int64)
    return torch.cat(parts, dim=1)
