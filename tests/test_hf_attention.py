"""transformers integration: a packed shared-prefix batch through a tiny random Qwen2.5-VL gives
the same completion log-probs and parameter gradients as every prompt + completion run alone
with SDPA (fp32)."""

import pytest
import torch

from fastrft_kernels import shared_prefix_segments, use_backend
from fastrft_kernels.hf_attention import NAME, VISION_NAME, enable_segment_attention, shared_prefix_position_ids

transformers = pytest.importorskip("transformers")
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402

IMAGE, VSTART, VEND = 250, 252, 253


def _tiny_model():
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=256, hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 10000.0},
        ),
        vision_config=dict(
            depth=2, hidden_size=64, intermediate_size=96, num_heads=2, out_hidden_size=128,
            fullatt_block_indexes=[1], window_size=56, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        ),
        image_token_id=IMAGE, video_token_id=251, vision_start_token_id=VSTART, vision_end_token_id=VEND,
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).float()
    model.set_attn_implementation("sdpa")
    return model


def _prompt(grid, text_a, text_b, g):
    """token ids [Lp], mm_token_type_ids [Lp], pixel patches [t*h*w, 3*2*14*14]."""
    t, h, w = grid
    n_img = t * h * w // 4  # 2x2 patches merge into one LLM token
    ids = torch.cat([
        torch.randint(0, 240, (text_a,), generator=g), torch.tensor([VSTART]),
        torch.full((n_img,), IMAGE), torch.tensor([VEND]), torch.randint(0, 240, (text_b,), generator=g),
    ])
    types = (ids == IMAGE).to(torch.int32)
    pixels = torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=g)
    return ids, types, pixels


def _completion_logp(logits, ids, pred_rows):
    """log p(ids[i]) from logits[pred_rows[i]]: [n]."""
    return torch.log_softmax(logits[pred_rows], -1).gather(1, ids[:, None]).squeeze(1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_shared_prefix_matches_unpacked_sdpa(backend, monkeypatch):
    from fastrft_kernels import _segment_attention as sa_module
    from fastrft_kernels import hf_attention

    real = sa_module.segment_attention
    calls = []  # (table, Tq) of every segment attention call: proves text and vision both go through it

    def counting(q, k, v, table, **kw):
        calls.append((table, q.shape[0]))
        return real(q, k, v, table, **kw)

    monkeypatch.setattr(hf_attention, "segment_attention", counting)  # text layers
    monkeypatch.setattr(sa_module, "segment_attention", counting)  # varlen_attention: vision layers
    model = _tiny_model()
    g = torch.Generator(torch.get_default_device()).manual_seed(1)  # CUDA under FASTRFT_TEST_DEVICE=cuda
    grids = [(1, 4, 6), (1, 2, 4)]  # 24 patches (6 tokens; windows of 2x2 tokens), 8 patches (2 tokens)
    prompts = [_prompt(grids[0], 3, 4, g), _prompt(grids[1], 5, 2, g)]
    comp_lens = [[5, 1, 7], [4, 6]]
    comps = [[torch.randint(0, 240, (n,), generator=g) for n in lens] for lens in comp_lens]
    weights = [[torch.randn(n, generator=g) for n in lens] for lens in comp_lens]  # a loss that weighs tokens

    # ---- reference: each prompt + completion alone, SDPA, positions from the model's own rule
    ref_logp, ref_pos = [], []
    model.zero_grad()
    loss = 0.0
    for p, (ids, types, pixels) in enumerate(prompts):
        grid = torch.tensor([grids[p]])
        for j, c in enumerate(comps[p]):
            full = torch.cat([ids, c])[None]  # [1, Lp + Lc]
            tt = torch.cat([types, torch.zeros(len(c), dtype=torch.int32)])[None]
            pos, _ = model.model.get_rope_index(full, tt, image_grid_thw=grid)  # [3, 1, L]
            logits = model(input_ids=full, position_ids=pos, pixel_values=pixels, image_grid_thw=grid).logits[0]
            rows = torch.arange(len(ids) - 1, len(ids) - 1 + len(c))
            lp = _completion_logp(logits, c, rows)
            loss = loss + (lp * weights[p][j]).sum()
            ref_logp.append(lp.detach())
            ref_pos.append(pos[:, 0, len(ids):])
    loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # ---- packed: each prompt and image once, completions after it, one segment table
    enable_segment_attention(model)
    assert model.config._attn_implementation == NAME
    assert model.config.vision_config._attn_implementation == VISION_NAME
    model.zero_grad()
    prompt_pos = [model.model.get_rope_index(ids[None], types[None], image_grid_thw=torch.tensor([grids[p]]))[0][:, 0]
                  for p, (ids, types, _) in enumerate(prompts)]
    position_ids = shared_prefix_position_ids(prompt_pos, comp_lens)  # [3, T]
    input_ids = torch.cat([torch.cat([ids, *comps[p]]) for p, (ids, _, _) in enumerate(prompts)])[None]
    segments = shared_prefix_segments([len(ids) for ids, _, _ in prompts], comp_lens)
    with use_backend(backend):
        logits = model(
            input_ids=input_ids, position_ids=position_ids[:, None], segments=segments,
            pixel_values=torch.cat([px for _, _, px in prompts]), image_grid_thw=torch.tensor(grids),
        ).logits[0]  # [T, V]
        got_logp, got_pos = [], []
        loss = 0.0
        start = 0
        for p, (ids, _, _) in enumerate(prompts):
            last_prompt_row = start + len(ids) - 1
            cursor = start + len(ids)
            for j, c in enumerate(comps[p]):
                # token 0 is predicted from the prompt's last row, token i from the completion's row i-1
                rows = torch.cat([torch.tensor([last_prompt_row]), torch.arange(cursor, cursor + len(c) - 1)])
                lp = _completion_logp(logits, c, rows)
                loss = loss + (lp * weights[p][j]).sum()
                got_logp.append(lp.detach())
                got_pos.append(position_ids[:, cursor:cursor + len(c)])
                cursor += len(c)
            start = cursor
        loss.backward()

    text_calls = [t for t, _ in calls if t is segments]
    vision_calls = [(t, n) for t, n in calls if t is not segments]
    assert len(text_calls) == 2  # one per text layer, the whole packed batch at once
    # vision: one call per layer over all 32 patches, each image once. Layer 0 attends per
    # window of 2x2 merged tokens (image 0 is 2x3 merged tokens -> windows of 16 and 8
    # patches; image 1 is 1x2 -> one of 8), layer 1 (full attention) per image (24, 8).
    assert [n for _, n in vision_calls] == [32, 32]
    assert [t.entries() for t, _ in vision_calls] == [
        [(0, 16, 0, 16, 0), (16, 24, 16, 24, 0), (24, 32, 24, 32, 0)],
        [(0, 24, 0, 24, 0), (24, 32, 24, 32, 0)],
    ]
    for a, b in zip(got_pos, ref_pos):
        assert torch.equal(a, b), "completion mrope positions must continue from the prompt"
    for i, (a, b) in enumerate(zip(got_logp, ref_logp)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), f"completion {i}: max diff {(a - b).abs().max():.2e}"
    got_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got_grads) == set(ref_grads)
    assert any("visual" in n for n in got_grads) and any("language_model" in n for n in got_grads)
    for n, ref in ref_grads.items():
        err = (got_grads[n] - ref).norm() / ref.norm().clamp_min(1e-12)
        assert err <= 2e-5, f"{n}: gradient rel err {err:.2e}"


def test_without_segments_each_row_is_causal_and_padding_is_refused():
    model = _tiny_model()
    ids = torch.randint(0, 240, (2, 9))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        enable_segment_attention(model)
        got = model(input_ids=ids).logits
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, :3] = 0
        with pytest.raises(ValueError, match="without padding"):
            model(input_ids=ids, attention_mask=mask)


def test_position_ids_helper_checks_its_arguments():
    with pytest.raises(ValueError, match="one list per prompt"):
        shared_prefix_position_ids([torch.zeros(3, 4, dtype=torch.long)], [[1], [2]])
    with pytest.raises(ValueError, match=r"\[3, Lp\]"):
        shared_prefix_position_ids([torch.zeros(4)], [[1]])
    pos = shared_prefix_position_ids([torch.tensor([[0, 1, 1, 4], [0, 1, 2, 4], [0, 2, 1, 4]])], [[2, 0, 1]])
    assert pos.tolist() == [[0, 1, 1, 4, 5, 6, 5], [0, 1, 2, 4, 5, 6, 5], [0, 2, 1, 4, 5, 6, 5]]


def test_autocast_mixed_dtypes_run_in_the_autocast_dtype():
    """Under bf16 autocast with fp32 weights, rotary embeddings leave q and k in fp32 while v comes
    from a bf16 linear: the attention runs in bf16, as autocast runs SDPA (without this every
    packed forward under autocast, the trainer's on GPU and TRL's bf16 default, raised)."""
    model = _tiny_model()
    ids = torch.randint(0, 240, (2, 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(input_ids=ids).logits.float()  # sdpa
        enable_segment_attention(model)
        got = model(input_ids=ids).logits.float()
    assert torch.isfinite(got).all()
    assert ((got - ref).norm() / ref.norm()).item() < 2e-2  # bf16 rounding, two attention orders
