"""A TRL micro-batch laid out as fastrft's shared-prompt packed sequence (`shared_prompt=True`).

TRL hands `_compute_loss` B rows of [left-padded prompt | right-padded completion], each row
with its own copy of the prompt's images: a group of G rows computes its prompt and encodes its
images G times. Here the rows that share a prompt (same prompt ids, same pixels) become one
group, laid out once as [prompt+images | c1 | ... | cG] in a single flat sequence with no
padding. Segment attention (`fastrft_kernels.hf_attention`) lets each completion see its
prompt and itself, never a sibling, so every completion token gets the hidden state it would
get in its own row: the loss and gradients are TRL's (tests/test_trl_dropin.py).

TRL shuffles a generation batch into micro-batches, so a micro-batch may hold part of a group,
or one row of it: rows are grouped by content, never by their order.

`rows` [B, C] maps each (row, completion position) of TRL's layout to the packed hidden row that
predicts it: the prompt's last row for position 0 (shared by the group: its gradient sums over
the group's completions, as with separate copies), the completion's previous token after that.
Positions past a row's completion (padding) point at row 0; their targets are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import hf_attention
from .._segments import shared_prefix_segments


@dataclass
class Packed:
    """input_ids [1, T]; position_ids [3, 1, T] (mrope) or [1, T]; segments: the attention table;
    pixel_values [Np, D] / image_grid_thw [I, 3] or None; rows [B, C] int64 (module docstring);
    groups: how many distinct prompts; images: how many images the vision tower encodes."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: object
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    rows: torch.Tensor
    groups: int
    images: int


def _image_slices(inputs: dict, B: int):
    """Per row: (pixel rows [start, end), image grids [start, end)), or None without images."""
    pixels, grid = inputs.get("pixel_values"), inputs.get("image_grid_thw")
    if pixels is None:
        return None
    if grid is None:
        raise NotImplementedError(
            "shared_prompt=True supports VLMs whose images come with image_grid_thw (Qwen2-VL, Qwen2.5-VL, Qwen3-VL); "
            "use shared_prompt=False for this model"
        )
    num_images = inputs.get("num_images") or [1] * B
    if len(num_images) != B or sum(num_images) != grid.shape[0]:
        raise ValueError(f"num_images {num_images} does not match image_grid_thw with {grid.shape[0]} images")
    per_image = grid.prod(-1).tolist()  # pixel rows of each image
    out, img, row = [], 0, 0
    for n in num_images:
        rows_b = sum(per_image[img : img + n])
        out.append(((row, row + rows_b), (img, img + n)))
        img, row = img + n, row + rows_b
    return out


def _prompt_positions(model, body, ids: torch.Tensor, mm: torch.Tensor | None, grid: torch.Tensor | None):
    """[3, L] mrope positions of one unpadded prompt (the model's own get_rope_index), or [1, L]."""
    L = ids.numel()
    rope = getattr(body, "get_rope_index", None)
    if rope is None:
        return torch.arange(L, device=ids.device)[None]
    if grid is None:
        return torch.arange(L, device=ids.device).expand(3, L)
    kw = {"image_grid_thw": grid, "attention_mask": torch.ones(1, L, dtype=torch.long, device=ids.device)}
    if mm is not None:
        kw["mm_token_type_ids"] = mm[None]
    pos, _ = rope(ids[None], **kw)  # [3, 1, L]
    return pos[:, 0]


def pack(model, body, inputs: dict) -> Packed:
    """The packed layout of TRL's micro-batch `inputs` (prompt_ids/prompt_mask [B, P],
    completion_ids/completion_mask [B, C], optional pixel_values, image_grid_thw, num_images,
    mm_token_type_ids [B, P + C])."""
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"].bool()  # [B, P]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"].bool()  # [B, C]
    B, C = completion_ids.shape
    P = prompt_ids.shape[1]
    device = prompt_ids.device
    images = _image_slices(inputs, B)
    pixels, grid, mm = inputs.get("pixel_values"), inputs.get("image_grid_thw"), inputs.get("mm_token_type_ids")
    # a row's completion runs to its last unmasked token (TRL masks after the first eos)
    idx = torch.arange(C, device=device)
    lengths = torch.where(completion_mask, idx + 1, 0).amax(1).tolist()  # [B]

    groups: list[dict] = []
    by_ids: dict[tuple, list[int]] = {}
    for b in range(B):
        ids = prompt_ids[b][prompt_mask[b]]  # [Lp]
        px = gr = None
        if images is not None:
            (r0, r1), (i0, i1) = images[b]
            px, gr = pixels[r0:r1], grid[i0:i1]
        for g in by_ids.setdefault(tuple(ids.tolist()), []):
            same = (px is None) == (groups[g]["pixels"] is None) and (
                px is None or (torch.equal(gr, groups[g]["grid"]) and torch.equal(px, groups[g]["pixels"])))
            if same:
                break
        else:
            g = len(groups)
            by_ids[tuple(ids.tolist())].append(g)
            mm_b = mm[b, :P][prompt_mask[b]] if mm is not None else None
            groups.append({"ids": ids, "pixels": px, "grid": gr, "mm": mm_b, "members": []})
        groups[g]["members"].append(b)

    pieces, prompt_pos, prompt_lens, completion_lens = [], [], [], []
    rows = torch.zeros(B, C, dtype=torch.long)
    offset = 0
    for grp in groups:
        ids = grp["ids"]
        pieces.append(ids)
        prompt_lens.append(ids.numel())
        pos = _prompt_positions(model, body, ids, grp["mm"], grp["grid"])
        prompt_pos.append(pos.expand(3, -1))
        last_prompt_row, cursor = offset + ids.numel() - 1, offset + ids.numel()
        lens = []
        for b in grp["members"]:
            n = lengths[b]
            body_len = max(n - 1, 0)  # the last completion token predicts nothing that is scored
            pieces.append(completion_ids[b, :body_len])
            lens.append(body_len)
            if n:
                rows[b, 0] = last_prompt_row
                rows[b, 1:n] = torch.arange(cursor, cursor + body_len)
            cursor += body_len
        completion_lens.append(lens)
        offset = cursor
    mrope = getattr(body, "get_rope_index", None) is not None
    positions = hf_attention.shared_prefix_position_ids(prompt_pos, completion_lens)  # [3, T]
    with_pixels = [g for g in groups if g["pixels"] is not None]
    return Packed(
        input_ids=torch.cat(pieces)[None],  # [1, T]
        position_ids=positions[:, None] if mrope else positions[:1],  # [3, 1, T] | [1, T]
        segments=shared_prefix_segments(prompt_lens, completion_lens),
        pixel_values=torch.cat([g["pixels"] for g in with_pixels]) if with_pixels else None,
        image_grid_thw=torch.cat([g["grid"] for g in with_pixels]) if with_pixels else None,
        rows=rows.to(device),
        groups=len(groups),
        images=sum(g["grid"].shape[0] for g in with_pixels),
    )


def packed_hidden(model, body, packed: Packed) -> torch.Tensor:
    """The backbone on the packed sequence under segment attention: hidden states [B, C, H] in
    TRL's row layout (module docstring)."""
    vision = {}
    if packed.pixel_values is not None:
        vision = {"pixel_values": packed.pixel_values, "image_grid_thw": packed.image_grid_thw}
    hf_attention.recompute_with_forward_attention(model)  # TRL turns checkpointing on in train(): each call
    with hf_attention.segment_attention_on(model):
        out = body(input_ids=packed.input_ids, position_ids=packed.position_ids, segments=packed.segments,
                   use_cache=False, **vision)
    return out.last_hidden_state[0][packed.rows]  # [B, C, H]
