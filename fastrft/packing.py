"""Shared-prompt packing: each GRPO group laid out once as [prompt+images | c1 | ... | cG].

A group's prompt and images appear once in a micro-batch; its G completions follow and each
attends to the whole prompt and to itself causally, never to a sibling
(`fastrft_kernels.shared_prefix_segments`). Micro-batches are filled with whole groups up to a
token budget, one flat sequence each: no padding token is ever computed.

Which rows feed the LM head: completion token k of completion j is predicted from the hidden
state of the token before it. For k = 0 that is the prompt's last row, shared by all G
completions: the gather takes that one row G times (`rows` repeats its index), so its
gradient is the sum over the G completions, exactly as if each completion had its own copy
of the prompt. The last token of a completion (its eos) predicts nothing that is scored, so it
is left out of the input: a completion of n tokens adds n - 1 tokens to the micro-batch.

Positions: Qwen-VL's mrope gives the prompt's image tokens their (t, h, w) grid positions and
text tokens equal (t, h, w); completion tokens continue from the prompt, max(prompt positions)
+ 1 + k on all three axes, as generation gave them
(`fastrft_kernels.hf_attention.shared_prefix_position_ids`). Text models use 0..L-1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastrft_kernels import hf_attention, shared_prefix_segments

from . import models

IGNORE = -100


@dataclass
class Group:
    """One prompt and its completions. `ids`: [Lp] int64; `positions`: [3, Lp] or [1, Lp];
    `pixel_values`: [N, C] or None; `image_grid_thw`: [I, 3] or None; `completions`: G tensors
    [n_j] int64 (n_j >= 1); `seq_ids`: G indices of the completions in the step's flat order;
    `scored`: G bools (False: the completion's tokens are left out of the loss, e.g. truncated
    completions under mask_truncated_completions)."""

    ids: torch.Tensor
    positions: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    completions: list[torch.Tensor]
    seq_ids: list[int]
    scored: list[bool]

    @property
    def n_tokens(self) -> int:
        return self.ids.numel() + sum(max(c.numel() - 1, 0) for c in self.completions)


@dataclass
class MicroBatch:
    """A packed micro-batch of T tokens holding S completions with N scored targets.

    input_ids [T] int64; position_ids [3, T] (mrope) or [1, T] int64; segments: the attention
    table; pixel_values [Np, C] / image_grid_thw [I, 3] or None; rows [N] int64: the hidden row
    that predicts each target; targets [N] int64 (IGNORE where unscored); cu_seqlens [S+1] int32
    over the N targets; seq_ids [S] int64: each completion's index in the step."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: object
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    rows: torch.Tensor
    targets: torch.Tensor
    cu_seqlens: torch.Tensor
    seq_ids: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device) -> MicroBatch:
        move = lambda t: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return MicroBatch(**{k: move(v) for k, v in self.__dict__.items()})


def make_groups(model, prompts, completions, scored: list[bool] | None = None) -> list[Group]:
    """Groups from a rollout: `prompts` a `rollout.PromptBatch`, `completions` P lists of G."""
    groups, k = [], 0
    for i, comps in enumerate(completions):
        ids = prompts.ids[i]
        mm = prompts.mm_token_type_ids[i]
        pos = models.prompt_positions(model, ids, mm, prompts.image_grid_thw[i])
        n = len(comps)
        seq_ids = list(range(k, k + n))
        ok = [True] * n if scored is None else [bool(scored[j]) for j in seq_ids]
        groups.append(Group(ids, pos, prompts.pixel_values[i], prompts.image_grid_thw[i], list(comps), seq_ids, ok))
        k += n
    return groups


def pack_groups(groups: list[Group], token_budget: int) -> list[MicroBatch]:
    """Whole groups into micro-batches of at most `token_budget` tokens (first-fit decreasing;
    a group larger than the budget gets a micro-batch of its own)."""
    if token_budget <= 0:
        raise ValueError(f"token_budget must be > 0, got {token_budget}")
    bins: list[list[Group]] = []
    sizes: list[int] = []
    for g in sorted(groups, key=lambda g: -g.n_tokens):
        for b, used in enumerate(sizes):
            if used + g.n_tokens <= token_budget:
                bins[b].append(g)
                sizes[b] += g.n_tokens
                break
        else:
            bins.append([g])
            sizes.append(g.n_tokens)
    return [pack_one(b) for b in bins]


def pack_one(groups: list[Group]) -> MicroBatch:
    """One micro-batch from `groups`, in order."""
    ids, pixels, grids = [], [], []
    rows, targets, cu, seq_ids = [], [], [0], []
    completion_lens = []  # per group, the input length (n - 1) of each completion
    offset = 0
    for g in groups:
        lp = g.ids.numel()
        ids.append(g.ids)
        if g.pixel_values is not None:
            pixels.append(g.pixel_values)
            grids.append(g.image_grid_thw)
        last_prompt_row = offset + lp - 1
        cursor = offset + lp
        for c, sid, ok in zip(g.completions, g.seq_ids, g.scored):
            body = c[:-1]  # [n-1]: the last token predicts nothing scored
            ids.append(body)
            rows.append(torch.tensor([last_prompt_row], dtype=torch.long))
            rows.append(torch.arange(cursor, cursor + body.numel(), dtype=torch.long))
            targets.append(c if ok else torch.full_like(c, IGNORE))
            cu.append(cu[-1] + c.numel())
            seq_ids.append(sid)
            cursor += body.numel()
        completion_lens.append([c.numel() - 1 for c in g.completions])
        offset = cursor
    prompt_lens = [g.ids.numel() for g in groups]
    # a text model's [1, Lp] positions go in as 3 equal rows and come back as one
    n_axes = groups[0].positions.shape[0]
    positions = hf_attention.shared_prefix_position_ids([g.positions.expand(3, -1) for g in groups],
                                                        completion_lens)  # [3, T]
    return MicroBatch(
        input_ids=torch.cat(ids),
        position_ids=positions[:n_axes],  # [3, T] | [1, T]
        segments=shared_prefix_segments(prompt_lens, completion_lens),
        pixel_values=torch.cat(pixels) if pixels else None,
        image_grid_thw=torch.cat(grids) if grids else None,
        rows=torch.cat(rows),
        targets=torch.cat(targets),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        seq_ids=torch.tensor(seq_ids, dtype=torch.long),
    )


segment_attention_on = hf_attention.segment_attention_on  # switch to packed attention for one block


def packed_forward(model, mb: MicroBatch) -> torch.Tensor:
    """The model body (no LM head) on one packed micro-batch: hidden states [T, H]. Images
    (pixel_values [Np, C], image_grid_thw [I, 3]) go through the vision tower once each."""
    pos = mb.position_ids[:, None] if mb.position_ids.shape[0] == 3 else mb.position_ids  # [3, 1, T] | [1, T]
    vision = {}
    if mb.pixel_values is not None:
        vision = {"pixel_values": mb.pixel_values, "image_grid_thw": mb.image_grid_thw}
    with segment_attention_on(model):
        out = models.body(model)(input_ids=mb.input_ids[None], position_ids=pos, segments=mb.segments,
                                 use_cache=False, **vision)
    return out.last_hidden_state[0]


def completion_hidden(model, mb: MicroBatch) -> torch.Tensor:
    """Hidden states of the rows that predict each completion token, [N, H]: the prompt's
    last row once per completion (its gradient sums over the G completions)."""
    root = model.__dict__.get("_fastrft_fsdp_root")  # FSDP2: through the sharded root (fastrft/distributed.py)
    if root is not None:
        return root(mb)
    return packed_forward(model, mb)[mb.rows]
