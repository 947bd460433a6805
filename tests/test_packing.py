"""Shared-prompt packing: the packed batch (each prompt and image once, G completions after it,
segment attention) gives the same per-token log-probs and the same gradient for every
parameter as running each prompt + completion alone, unpadded, with transformers' SDPA."""

import pytest
import torch

from fastrft import models, packing, synthetic
from fastrft.data import load_image, load_rows, render_prompt
from fastrft.rollout import encode_prompts
from fastrft_kernels import linear_logprob


@pytest.fixture(scope="module")
def setup():
    processor = synthetic.make_processor()
    model = synthetic.make_model(processor, seed=4)
    rows = load_rows("shapes", split="test", size=2)
    rows[1] = dict(rows[1], problem="where is the circle ? answer : what colour")  # prompts of other lengths
    texts = [render_prompt(processor, r) for r in rows]
    prompts = encode_prompts(processor, texts, [[load_image(i) for i in r["images"]] for r in rows], 64)
    g = torch.Generator().manual_seed(1)
    words = torch.arange(10, len(processor.tokenizer))  # plain word ids (no image placeholders)
    lens = [[1, 4, 2], [3, 1, 5]]  # a 1-token completion is the prompt's last row alone
    completions = [[words[torch.randint(len(words), (n,), generator=g)] for n in ls] for ls in lens]
    return model, processor, prompts, completions


def _reference(model, prompts, completions, weights):
    """Each prompt + completion alone through the full model (SDPA, batch 1, no padding)."""
    model.zero_grad(set_to_none=True)
    logps, k = [], 0
    for i, comps in enumerate(completions):
        for c in comps:
            ids = torch.cat([prompts.ids[i], c])[None]  # [1, Lp + n]
            out = model(input_ids=ids, pixel_values=prompts.pixel_values[i], image_grid_thw=prompts.image_grid_thw[i],
                        mm_token_type_ids=torch.cat([prompts.mm_token_type_ids[i], torch.zeros_like(c)])[None])
            lp = out.logits[0, len(prompts.ids[i]) - 1 : -1].log_softmax(-1)  # [n, V]
            logp = lp.gather(-1, c[:, None]).squeeze(-1)  # [n]
            (logp * weights[k : k + len(c)]).sum().backward()
            logps.append(logp.detach())
            k += len(c)
    return torch.cat(logps), {n: p.grad.clone() for n, p in model.named_parameters()}


def _packed(model, prompts, completions, weights, token_budget):
    model.zero_grad(set_to_none=True)
    groups = packing.make_groups(model, prompts, completions)
    batches = packing.pack_groups(groups, token_budget)
    head = models.lm_head(model)
    logp = torch.full((len(weights),), float("nan"))
    offsets = torch.tensor([0] + [len(c) for g in completions for c in g]).cumsum(0)
    for mb in batches:
        hidden = packing.completion_hidden(model, mb)  # [N, H]
        lp = linear_logprob(hidden, head.weight, mb.targets)  # [N]
        index = torch.cat([torch.arange(offsets[s], offsets[s + 1]) for s in mb.seq_ids.tolist()])
        (lp * weights[index]).sum().backward()
        logp[index] = lp.detach()
    return logp, {n: p.grad.clone() for n, p in model.named_parameters()}, batches


@pytest.mark.parametrize("token_budget", [10_000, 1])  # one micro-batch; one group per micro-batch
def test_packed_equals_each_sample_alone(setup, token_budget):
    model, _, prompts, completions = setup
    n = sum(len(c) for g in completions for c in g)
    weights = torch.randn(n, generator=torch.Generator().manual_seed(2))
    ref_logp, ref_grads = _reference(model, prompts, completions, weights)
    logp, grads, batches = _packed(model, prompts, completions, weights, token_budget)
    assert len(batches) == (1 if token_budget > 1 else 2)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-5)
    for name, g in ref_grads.items():
        scale = g.abs().max().clamp_min(1e-6)
        err = (grads[name] - g).abs().max() / scale
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"


def test_layout(setup):
    model, processor, prompts, completions = setup
    groups = packing.make_groups(model, prompts, completions, scored=[True, False, True, True, True, True])
    mb = packing.pack_one(groups)
    lp = [len(i) for i in prompts.ids]
    lens = [[len(c) for c in g] for g in completions]
    # each prompt once, each completion without its last token
    assert mb.n_tokens == sum(lp) + sum(n - 1 for g in lens for n in g)
    assert int((mb.input_ids == processor.image_token_id).sum()) == 8  # 2 images x 4 tokens, once each
    assert mb.pixel_values.shape[0] == 32 and mb.image_grid_thw.shape == (2, 3)
    assert mb.cu_seqlens.tolist() == [0, 1, 5, 7, 10, 11, 16]
    # the first target of every completion is predicted by its prompt's last row
    starts = mb.cu_seqlens[:-1].long()
    assert mb.rows[starts[:3]].tolist() == [lp[0] - 1] * 3
    assert mb.rows[starts[3:]].tolist() == [lp[0] + 0 + 3 + 1 + lp[1] - 1] * 3  # after group 0: 0 + 3 + 1 rows
    assert (mb.targets[1:5] == packing.IGNORE).all()  # completion 1 unscored
    assert torch.equal(mb.targets[5:7], completions[0][2])
    # completion positions continue from the prompt's largest position, on all 3 mrope axes
    p0 = models.prompt_positions(model, prompts.ids[0], prompts.mm_token_type_ids[0], prompts.image_grid_thw[0])
    nxt = int(p0.max()) + 1
    assert torch.equal(mb.position_ids[:, : lp[0]], p0)
    assert mb.position_ids[:, lp[0] : lp[0] + 3].tolist() == [[nxt, nxt + 1, nxt + 2]] * 3


def test_budget_packing():
    def grp(lp, ns):
        ids = torch.ones(lp, dtype=torch.long)
        return packing.Group(ids, torch.arange(lp)[None], None, None, [torch.ones(n, dtype=torch.long) for n in ns],
                             list(range(len(ns))), [True] * len(ns))

    groups = [grp(5, [3, 3]), grp(20, [2]), grp(4, [1, 1]), grp(3, [2, 2])]  # 9, 21, 4, 5 tokens
    batches = packing.pack_groups(groups, token_budget=14)
    # first-fit decreasing: 21 alone (over budget), 9 + 5, 4
    assert sorted(mb.n_tokens for mb in batches) == [4, 14, 21]
    assert all(mb.input_ids.numel() == int(mb.position_ids.shape[1]) for mb in batches)
    with pytest.raises(ValueError, match="token_budget must be > 0"):
        packing.pack_groups(groups, 0)


def test_text_only_model_packed_equals_alone():
    """A text-only causal LM (Qwen2): 1-row positions, the segment table through its layers."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = synthetic.make_tokenizer()
    torch.manual_seed(3)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in ("what colour is the circle ?", "how many shapes ?")]
    prompts = encode_prompts(tok, texts, [[], []], 64)
    g = torch.Generator().manual_seed(5)
    completions = [[torch.randint(10, len(tok), (n,), generator=g) for n in ns] for ns in ([2, 3], [1, 4])]
    n = sum(len(c) for gr in completions for c in gr)
    weights = torch.randn(n, generator=g)

    model.zero_grad(set_to_none=True)
    ref = []
    k = 0
    for i, gr in enumerate(completions):
        for c in gr:
            logits = model(input_ids=torch.cat([prompts.ids[i], c])[None]).logits[0]
            lp = logits[len(prompts.ids[i]) - 1 : -1].log_softmax(-1).gather(-1, c[:, None]).squeeze(-1)
            (lp * weights[k : k + len(c)]).sum().backward()
            ref.append(lp.detach())
            k += len(c)
    ref_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    logp, grads, batches = _packed(model, prompts, completions, weights, 10_000)
    assert batches[0].position_ids.shape[0] == 1
    torch.testing.assert_close(logp, torch.cat(ref), rtol=1e-5, atol=1e-5)
    for name, gr in ref_grads.items():
        err = (grads[name] - gr).abs().max() / gr.abs().max().clamp_min(1e-6)
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"
