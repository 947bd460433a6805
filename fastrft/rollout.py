"""Rollouts with transformers' `generate`: G sampled completions per prompt.

What transformers 5.23 does with `num_return_sequences=G`: `_expand_inputs_for_generation`
repeats input_ids, pixel_values and image_grid_thw G times *before* the prefill, so every
image goes through the vision encoder G times and every prompt is prefilled G times. Here the
prompts (and their images) are prefilled once, all but the last prompt token, the KV cache is
expanded G times (`DynamicCache.batch_repeat_interleave`, with Qwen-VL's mrope `rope_deltas`),
and `generate` continues from that cache: it runs only the last prompt token and the new
tokens. Greedy output is token-for-token the same as the plain route
(tests/test_train_rollout.py checks it). Models whose cache cannot be expanded fall back to
`num_return_sequences`.
Measured on the tiny model (CPU, 1 thread, 8 prompts x 8 samples, 32 new tokens; a loaded
2-core machine): 0.154 s against 0.214 s with 16 image tokens per prompt, 0.228 s against
0.370 s with 64.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class PromptBatch:
    """P prompts, processed once. `ids[i]`: [Lp_i] int64 (unpadded); `pixel_values[i]`:
    [N_i, C] float (the patches of prompt i's images, or None); `image_grid_thw[i]`: [I_i, 3]
    int64 or None; `mm_token_type_ids[i]`: [Lp_i] int64 or None; `inputs`: the padded
    processor output (left padding) that generation uses."""

    ids: list[torch.Tensor]
    pixel_values: list[torch.Tensor | None]
    image_grid_thw: list[torch.Tensor | None]
    mm_token_type_ids: list[torch.Tensor | None]
    inputs: dict


@dataclass
class Rollout:
    """`completions[i][j]`: [Lc] int64, completion j of prompt i, ending with eos unless
    truncated (no padding); `truncated`: [P*G] bool; `texts`: P*G decoded completions;
    `seconds` and `new_tokens` measure the sampling."""

    prompts: PromptBatch
    completions: list[list[torch.Tensor]]
    truncated: torch.Tensor
    texts: list[str]
    seconds: float = 0.0
    new_tokens: int = 0
    shared_prefill: bool = field(default=False)


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def encode_prompts(processor, texts: list[str], images: list[list], max_prompt_length: int) -> PromptBatch:
    """Runs the processor once on P rendered prompts (`texts`, with their `images`: P lists of
    PIL images, empty for text-only rows). A prompt longer than `max_prompt_length` tokens
    (image tokens included) is an error, never a silent cut: cutting would drop image tokens
    and break the image/placeholder match."""
    tok = _tokenizer(processor)
    flat_images = [im for ims in images for im in ims]
    kwargs = dict(text=texts, return_tensors="pt", padding=True)
    if flat_images:
        kwargs["images"] = flat_images
    if processor is tok:
        tok.padding_side = "left"
        inputs = dict(tok(texts, return_tensors="pt", padding=True, add_special_tokens=False))
    else:
        tok.padding_side = "left"
        inputs = dict(processor(**kwargs))
    mask = inputs["attention_mask"].bool()  # [P, L]
    lengths = mask.sum(1).tolist()
    for i, n in enumerate(lengths):
        if n > max_prompt_length:
            raise ValueError(
                f"prompt {i} is {n} tokens (image tokens included), longer than max_prompt_length="
                f"{max_prompt_length}: raise max_prompt_length or shorten the prompt/images"
            )
    ids = [inputs["input_ids"][i][mask[i]] for i in range(len(texts))]
    mm = inputs.get("mm_token_type_ids")
    mm_ids = [mm[i][mask[i]] if mm is not None else None for i in range(len(texts))]
    pixel_values, grids = [], []
    grid_all = inputs.get("image_grid_thw")
    start_patch, start_image = 0, 0
    for ims in images:
        if not ims:
            pixel_values.append(None)
            grids.append(None)
            continue
        grid = grid_all[start_image : start_image + len(ims)]  # [I_i, 3]
        n_patches = int(grid.prod(-1).sum())
        pixel_values.append(inputs["pixel_values"][start_patch : start_patch + n_patches])
        grids.append(grid)
        start_patch += n_patches
        start_image += len(ims)
    return PromptBatch(ids, pixel_values, grids, mm_ids, inputs)


def _placeholder_ids(processor) -> list[int]:
    """Image/video placeholder token ids: a completion that emitted one would no longer match
    its images in the training forward (transformers counts placeholders to place features)."""
    ids = [getattr(processor, name, None) for name in ("image_token_id", "video_token_id")]
    return sorted({i for i in ids if isinstance(i, int) and i >= 0})


def _sampling_kwargs(processor, *, max_new_tokens, temperature, top_p, top_k) -> dict:
    tok = _tokenizer(processor)
    greedy = temperature is None or temperature <= 0
    kw = dict(max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if placeholders := _placeholder_ids(processor):
        kw["suppress_tokens"] = placeholders
    if greedy:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k if top_k else None)
    return kw


def _expand(t: torch.Tensor | None, g: int) -> torch.Tensor | None:
    return None if t is None else t.repeat_interleave(g, dim=0)


def _generate_shared_prefill(model, inputs: dict, g: int, kw: dict) -> torch.Tensor:
    """Prefill each prompt once (all but its last token), expand the cache G times, continue."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]  # [P, L]
    mm = inputs.get("mm_token_type_ids")
    prefill = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    out = model(
        input_ids=ids[:, :-1],
        attention_mask=mask[:, :-1],
        **({"mm_token_type_ids": mm[:, :-1]} if mm is not None else {}),
        **prefill,
        use_cache=True,
        logits_to_keep=1,  # the prefill's logits are not used: 1 row instead of L x V
    )
    cache = out.cache if "cache" in out else out.past_key_values  # transformers 5.25 renamed it
    cache.batch_repeat_interleave(g)
    inner = getattr(model, "model", None)
    if getattr(inner, "rope_deltas", None) is not None:  # Qwen-VL: mrope offset of text after images
        inner.rope_deltas = inner.rope_deltas.repeat_interleave(g, dim=0)
    # No pixel_values from here on: the images are in the cache (no new image token follows).
    return model.generate(
        input_ids=_expand(ids, g),
        attention_mask=_expand(mask, g),
        **({"mm_token_type_ids": _expand(mm, g)} if mm is not None else {}),
        **{_cache_kwarg(model): cache},
        **kw,
    )


def _cache_kwarg(model) -> str:
    """`generate`'s name for a given KV cache: `cache` where transformers renamed it (there
    `past_key_values` warns a FutureWarning on every call), else `past_key_values`."""
    import inspect

    try:
        src = inspect.getsource(inspect.unwrap(type(model).generate))  # decorators included
    except (OSError, TypeError):
        return "past_key_values"
    return "cache" if 'new_name="cache"' in src else "past_key_values"


@torch.no_grad()
def sample_completions(
    model,
    processor,
    prompts: PromptBatch,
    *,
    num_generations: int,
    max_completion_length: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    share_prefill: bool = True,
    keyed_sampler=None,
) -> Rollout:
    """G completions for each prompt of `prompts` (temperature <= 0: greedy).

    `keyed_sampler`: a `fastrft.sampling.KeyedSampler` (temperature, top-k/p and counter-based
    Gumbel noise; greedy on the result), so that the samples do not depend on the batch or rank;
    it needs the shared-prefill route (rows prompt-major).

    Returns a `Rollout` whose completions stop at eos (kept) or at max_completion_length
    (marked truncated)."""
    tok = _tokenizer(processor)
    kw = _sampling_kwargs(
        processor, max_new_tokens=max_completion_length, temperature=temperature, top_p=top_p, top_k=top_k
    )
    g = num_generations
    if keyed_sampler is not None and kw["do_sample"]:
        from transformers import LogitsProcessorList

        keyed_sampler.prompt_len = prompts.inputs["input_ids"].shape[1]
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None,
                  logits_processor=LogitsProcessorList([keyed_sampler]))
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    inputs = prompts.inputs
    shared = share_prefill and inputs["input_ids"].shape[1] > 1
    if keyed_sampler is not None and not shared:
        raise ValueError("keyed (rank-invariant) sampling needs share_prefill and prompts of more than one token")
    try:
        if shared:
            try:
                seqs = _generate_shared_prefill(model, inputs, g, kw)
            except (AttributeError, NotImplementedError, TypeError):
                if keyed_sampler is not None:
                    raise
                shared = False  # a cache without batch_repeat_interleave, or a model without logits_to_keep
        if not shared:
            if kw["do_sample"]:
                seqs = model.generate(**inputs, num_return_sequences=g, **kw)
            else:  # greedy: G identical copies
                seqs = model.generate(**inputs, **kw).repeat_interleave(g, dim=0)
    finally:
        inner = getattr(model, "model", None)
        if getattr(inner, "rope_deltas", None) is not None:
            inner.rope_deltas = None  # a stale offset would shift the next prefill's positions
        model.train(was_training)
    seconds = time.perf_counter() - t0
    new = seqs[:, inputs["input_ids"].shape[1] :]  # [P*G, <= max_completion_length]
    eos = tok.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
    completions, truncated = [], []
    for r in range(new.shape[0]):
        row = new[r].tolist()
        stop = next((k for k, t in enumerate(row) if t in eos_ids), None)
        # a row without eos ran to max_new_tokens (generate pads only rows that finished)
        truncated.append(stop is None)
        ids = row if stop is None else row[: stop + 1]
        completions.append(torch.tensor(ids, dtype=torch.long))
    texts = tok.batch_decode([c.tolist() for c in completions], skip_special_tokens=True)
    grouped = [completions[i * g : (i + 1) * g] for i in range(len(prompts.ids))]
    n_new = sum(len(c) for c in completions)
    return Rollout(prompts, grouped, torch.tensor(truncated), texts, seconds, n_new, shared)
