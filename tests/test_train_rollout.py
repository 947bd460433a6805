"""Rollouts: the shared prefill (prompt and images once, KV cache expanded G times) gives the
same next-token distributions as transformers' plain generate on G copies; eos and
truncation are marked."""

import pytest
import torch

from fastrft import synthetic
from fastrft.data import load_image, load_rows, render_prompt
from fastrft.rollout import encode_prompts, sample_completions


@pytest.fixture(scope="module")
def tiny():
    processor = synthetic.make_processor()
    model = synthetic.make_model(processor, seed=1).eval()
    rows = load_rows("shapes", split="test", size=3)
    rows[1] = dict(rows[1], problem="what colour is the how many shapes ?")  # another length: left padding
    texts = [render_prompt(processor, r) for r in rows]
    prompts = encode_prompts(processor, texts, [[load_image(i) for i in r["images"]] for r in rows], 64)
    return model, processor, prompts


def test_shared_prefill_matches_plain_generate(tiny):
    model, processor, prompts = tiny
    G, L = 3, prompts.inputs["input_ids"].shape[1]
    inputs = prompts.inputs
    rep = {k: v.repeat_interleave(G, 0) for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")}
    rep["pixel_values"] = torch.cat([pv for pv in prompts.pixel_values for _ in range(G)])
    rep["image_grid_thw"] = torch.cat([g for g in prompts.image_grid_thw for _ in range(G)])
    kw = dict(do_sample=False, max_new_tokens=4, output_scores=True, return_dict_in_generate=True,
              eos_token_id=-1, suppress_tokens=[processor.image_token_id, processor.video_token_id])
    with torch.no_grad():
        plain = model.generate(**rep, **kw)
    from fastrft.rollout import _generate_shared_prefill

    with torch.no_grad():
        shared = _generate_shared_prefill(model, inputs, G, kw)
    model.model.rope_deltas = None
    assert torch.equal(plain.sequences, shared.sequences)
    for a, b in zip(plain.scores, shared.scores):
        fin = torch.isfinite(a)
        assert torch.equal(fin, torch.isfinite(b))
        torch.testing.assert_close(a[fin], b[fin], rtol=1e-4, atol=1e-4)
    assert L == inputs["input_ids"].shape[1]


def test_sampling_marks_eos_and_truncation(tiny):
    model, processor, prompts = tiny
    torch.manual_seed(0)
    out = sample_completions(model, processor, prompts, num_generations=4, max_completion_length=3, temperature=1.5)
    assert out.shared_prefill and len(out.completions) == 3 and all(len(g) == 4 for g in out.completions)
    eos = processor.tokenizer.eos_token_id
    flat = [c for g in out.completions for c in g]
    for c, trunc in zip(flat, out.truncated.tolist()):
        assert 1 <= c.numel() <= 3
        assert (eos not in c.tolist()) == trunc
        if not trunc:
            assert c[-1].item() == eos and eos not in c[:-1].tolist()
        assert processor.image_token_id not in c.tolist()  # placeholders are never sampled
    assert out.new_tokens == sum(c.numel() for c in flat)
    assert len(out.texts) == 12


def test_greedy_is_deterministic_and_plain_route_agrees(tiny):
    model, processor, prompts = tiny
    a = sample_completions(model, processor, prompts, num_generations=2, max_completion_length=3, temperature=0)
    b = sample_completions(model, processor, prompts, num_generations=2, max_completion_length=3, temperature=0,
                           share_prefill=False)
    assert not b.shared_prefill
    for ga, gb in zip(a.completions, b.completions):
        assert torch.equal(ga[0], ga[1]) and all(torch.equal(x, y) for x, y in zip(ga, gb))
