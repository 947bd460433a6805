"""The GRPO loop: one optimizer step equals a naive padded implementation of the same loss;
a crash mid-run (a reward function returning the wrong length) leaves the run folder intact
and resuming from the latest checkpoint gives exactly the weights of an uninterrupted run;
bad inputs fail before anything is written."""

import json
import sys
import textwrap

import pytest
import torch

import fastrft.train as train_mod
from fastrft import checkpoint as ckpt
from fastrft import rewards, synthetic
from fastrft.metrics import read_metrics
from fastrft.train import GRPOConfig, train

SMALL = dict(prompts_per_step=4, num_generations=4, max_completion_length=3, eval_size=0, progress=False,
             train_size=64, warmup_steps=0, save_steps=0)


def _weights(path):
    model = synthetic.make_model(synthetic.make_processor(), seed=123)
    ckpt.load_weights(model, path)
    return model.state_dict()


def test_one_step_equals_naive_padded(tmp_path, monkeypatch):
    recorded = []
    real = train_mod.sample_completions

    def record(*a, **k):
        out = real(*a, **k)
        recorded.append(out)
        return out

    monkeypatch.setattr(train_mod, "sample_completions", record)
    # TRL's defaults (the demo's are beta 0.04 and scale_rewards none): the naive loss below is TRL's dapo
    cfg = GRPOConfig(output_dir=str(tmp_path / "run"), max_steps=1, learning_rate=1e-2, adam_epsilon=1e-4,
                     max_grad_norm=0.5, beta=0.0, scale_rewards="group", **SMALL)
    train(cfg)
    got = _weights(ckpt.latest_checkpoint(tmp_path / "run"))

    # naive: G padded copies of every prompt and image, full logits, TRL's dapo loss written out
    (rollout,) = recorded
    processor = synthetic.make_processor()
    model = synthetic.make_model(processor, seed=cfg.seed)
    G, prompts = cfg.num_generations, rollout.prompts
    seqs = [(i, torch.cat([prompts.ids[i], c])) for i, g in enumerate(rollout.completions) for c in g]
    L = max(len(s) for _, s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)  # [B, L], right padding
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    comp = torch.zeros(len(seqs), L)  # 1 at completion tokens
    for b, (i, s) in enumerate(seqs):
        ids[b, : len(s)], mask[b, : len(s)] = s, 1
        comp[b, len(prompts.ids[i]) : len(s)] = 1
    out = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == processor.image_token_id).long(),
                pixel_values=torch.cat([prompts.pixel_values[i] for i, _ in seqs]),
                image_grid_thw=torch.cat([prompts.image_grid_thw[i] for i, _ in seqs]))
    logp = out.logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, L-1]
    m = comp[:, 1:]
    rows = [r for r in train_mod.load_rows("shapes", size=cfg.train_size, seed=cfg.seed, tasks=cfg.synthetic_tasks)]
    sampler = train_mod.PromptSampler(len(rows), cfg.seed)
    sols = [rows[k]["solution"] for k in sampler.next(cfg.prompts_per_step) for _ in range(G)]
    ids = [c.tolist() for g in rollout.completions for c in g]
    r = torch.tensor(rewards.shapes(rollout.texts, sols, completion_ids=ids), dtype=torch.float64).view(-1, G)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1, 1).float()  # [B, 1]
    ratio = torch.exp(logp - logp.detach())
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - cfg.epsilon, 1 + cfg.epsilon) * adv)
    loss = (per_token * m).sum() / m.sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    opt.step()
    moved = 0
    for name, p in model.state_dict().items():
        torch.testing.assert_close(got[name], p, rtol=0, atol=cfg.learning_rate * 1e-2, msg=name)
        moved += int((p != synthetic.make_model(processor, seed=cfg.seed).state_dict()[name]).any()) if moved < 3 else 0
    assert moved >= 3  # the step changed the weights (the comparison is not of two unmoved models)


REWARDS = """
from fastrft.rewards import shapes
STATE = {"calls": 0, "fail_at": None}
def flaky(completions, solution, **kw):
    STATE["calls"] += 1
    if STATE["calls"] == STATE["fail_at"]:
        return [0.0]  # the wrong length
    return shapes(completions, solution)
"""


def test_crash_leaves_folder_intact_and_resume_is_exact(tmp_path, monkeypatch):
    (tmp_path / "flaky_rewards.py").write_text(textwrap.dedent(REWARDS))
    monkeypatch.syspath_prepend(str(tmp_path))
    import flaky_rewards

    base = {**SMALL, "max_steps": 4, "save_steps": 2, "reward_funcs": ["flaky_rewards:flaky"], "learning_rate": 3e-3}
    straight = tmp_path / "straight"
    train(GRPOConfig(output_dir=str(straight), **base))

    run = tmp_path / "run"
    flaky_rewards.STATE.update(calls=0, fail_at=3)
    with pytest.raises(ValueError, match="reward function 'flaky_rewards:flaky' must return a list of 16"):
        train(GRPOConfig(output_dir=str(run), **base))
    assert [p.name for p in ckpt.checkpoint_dirs(run)] == ["step-000002"]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"] == [1, 2]
    with pytest.raises(ValueError, match="already holds a run: pass --resume true"):
        train(GRPOConfig(output_dir=str(run), **base))  # a fresh run would overwrite it: refused

    flaky_rewards.STATE.update(fail_at=None)
    train(GRPOConfig(output_dir=str(run), resume=True, **base))
    a, b = _weights(ckpt.latest_checkpoint(straight)), _weights(ckpt.latest_checkpoint(run))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_a = [r for r in read_metrics(straight / "metrics.jsonl") if r["kind"] == "train"]
    rows_b = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    assert [r["reward"] for r in rows_a] == [r["reward"] for r in rows_b]
    assert (run / "curves.png").stat().st_size > 0 and (run / "config.yaml").is_file()
    sys.modules.pop("flaky_rewards", None)


@pytest.mark.parametrize(
    "override, match",
    [
        ({"reward_funcs": ["no_such_module:f"]}, "cannot import module"),
        ({"dataset": "/nonexistent/data.jsonl"}, "does not exist"),
        ({"max_prompt_length": 8}, "longer than max_prompt_length=8"),
        ({"resume": True}, "no checkpoint"),
    ],
)
def test_bad_inputs_fail_cleanly(tmp_path, override, match):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        train(GRPOConfig(output_dir=str(out), max_steps=1, **{**SMALL, **override}))
    # errors found before the loop write nothing; the prompt-length error happens in step 1,
    # after the config was saved, and leaves no checkpoint
    assert not out.exists() or not ckpt.checkpoint_dirs(out)


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="has no rows"):
        train(GRPOConfig(output_dir=str(tmp_path / "run"), dataset=str(tmp_path / "empty.jsonl"), **SMALL))
    assert not (tmp_path / "run").exists()


def test_jsonl_dataset_and_summary(tmp_path):
    rows = synthetic.make_split(12, seed=5)
    path = synthetic.write_jsonl(rows, tmp_path / "data", "train")
    out = tmp_path / "run"
    res = train(GRPOConfig(output_dir=str(out), dataset=str(path), eval_dataset=str(path), max_steps=2,
                           reward_funcs=["shapes"], **{**SMALL, "eval_size": 8}))
    assert res["before"]["n"] == 8 and res["after"]["n"] == 8
    assert json.loads((out / "summary.json").read_text())["after"]["n"] == 8
    row = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"][-1]
    for key in ("reward", "rewards/shapes", "accuracy", "completion_length", "clip_ratio/region_mean", "loss",
                "rollout_tokens_per_s", "train_tokens_per_s", "peak_memory_mb", "grad_norm"):
        assert key in row, key


def test_eval_cli_on_a_saved_model(tmp_path, capsys):
    from fastrft.__main__ import main

    path = synthetic.save_tiny(tmp_path / "tiny", seed=7)  # a local save_pretrained folder
    assert main(["eval", "--model", str(path), "--eval_size", "12", "--synthetic_tasks", "colour,position"]) == 0
    out = capsys.readouterr().out
    res = json.loads(out[out.index("{"):])
    assert res["n"] == 12 and 0.0 <= res["accuracy"] <= 1.0
    assert set(res) == {"accuracy", "n", "accuracy/colour", "accuracy/position"}
