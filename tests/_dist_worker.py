"""Runs `fastrft.train.train` with a JSON config (argv[1]); launched by tests/test_distributed.py
under torchrun (or plainly for one process). FASTRFT_TEST_DIE_AT=step:rank makes that rank exit
mid-step (after its rollout), to test the others' exit."""

import json
import os
import sys

import torch

import fastrft.train as train_mod


def main():
    cfg = train_mod.GRPOConfig(**json.loads(sys.argv[1]))
    die = os.environ.get("FASTRFT_TEST_DIE_AT")
    if die:
        step, rank = (int(x) for x in die.split(":"))
        real = train_mod.compute_rewards
        calls = {"n": 0}

        def dying(*a, **k):
            calls["n"] += 1
            if calls["n"] == step and int(os.environ.get("RANK", 0)) == rank:
                os._exit(3)  # a crash: no clean-up, no collective
            return real(*a, **k)

        train_mod.compute_rewards = dying
    record = os.environ.get("FASTRFT_TEST_ROLLOUTS")
    if record:  # every completion's token ids, by global prompt index, one JSON line per rank and step
        real_sample = train_mod.sample_completions

        def sample(*a, **k):
            out = real_sample(*a, **k)
            rank = int(os.environ.get("RANK", 0))
            with open(f"{record}.{rank}", "a") as f:
                f.write(json.dumps([[c.tolist() for c in g] for g in out.completions]) + "\n")
            return out

        train_mod.sample_completions = sample
        if json.loads(sys.argv[1]).get("rollout_engine") == "vllm":  # the engine's rollouts, likewise
            from fastrft import vllm_engine

            real_generate = vllm_engine.VLLMEngine.generate

            def generate(self, *a, **k):
                out = real_generate(self, *a, **k)
                rank = int(os.environ.get("RANK", 0))
                with open(f"{record}.{rank}", "a") as f:
                    f.write(json.dumps([[c.tolist() for c in g] for g in out.completions]) + "\n")
                return out

            vllm_engine.VLLMEngine.generate = generate
    torch.set_num_threads(1)
    train_mod.train(cfg)


if __name__ == "__main__":
    main()
