"""Worker for tests/test_trl_dropin.py::test_ddp_two_processes (run under torchrun, gloo).

One SGD step of FusedGRPOTrainer's loss on a fixed global batch of 8 completions, each rank
taking its half, the model wrapped by the trainer's accelerator (DDP), or sharded with FSDP2
(`fully_shard` on each decoder layer, then the root, as accelerate's FSDP2 plugin does). Writes the
full parameters after the step to <out>/params-<rank>-of-<world>[-fsdp2].pt.
"""

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(out, loss_type, wrap="ddp"):
    from fastrft_kernels.integrations.trl import FusedGRPOTrainer, fused_compute_loss
    from tests.test_trl_dropin import _args, _dataset, _reward, _tiny_text_model

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    with tempfile.TemporaryDirectory() as tmp:
        from pathlib import Path

        model, tok = _tiny_text_model(save_dir=Path(tmp) / "model")
        args = _args(Path(tmp), "ddp", loss_type=loss_type, per_device_train_batch_size=8 // world,
                     num_generations=2, ddp_backend="gloo" if world > 1 else None, beta=0.04)
        trainer = FusedGRPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=_dataset(),
                                   processing_class=tok)
    assert trainer.accelerator.num_processes == world
    g = torch.Generator().manual_seed(1)
    B, P, C, V = 8, 5, 6, model.config.vocab_size
    lengths = torch.tensor([6, 3, 1, 6, 4, 2, 5, 6])
    cmask = (torch.arange(C)[None] < lengths[:, None]).long()
    full = {
        "prompt_ids": torch.randint(3, V, (B, P), generator=g),
        "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": torch.randint(3, V, (B, C), generator=g),
        "completion_mask": cmask,
        "advantages": torch.randn(B, generator=g),
        "old_per_token_logps": -torch.rand(B, C, generator=g) * 4,
        "ref_per_token_logps": -torch.rand(B, C, generator=g) * 4,
    }
    full["prompt_mask"][1, :2] = 0  # left padding
    per = B // world
    inputs = {k: v[rank * per:(rank + 1) * per] for k, v in full.items()}
    inputs["num_items_in_batch"] = cmask.sum()  # TRL's: over the whole generation batch, all ranks
    trainer.current_gradient_accumulation_steps = 1
    if wrap == "fsdp2" and world > 1:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        for layer in trainer.model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(trainer.model)
        assert isinstance(wrapped, FSDPModule) and hasattr(wrapped.lm_head.weight, "full_tensor")
    else:
        wrapped = trainer.accelerator.prepare_model(trainer.model)
        assert (world == 1) or isinstance(wrapped, torch.nn.parallel.DistributedDataParallel), type(wrapped)
    wrapped.train()
    loss = fused_compute_loss(trainer, wrapped, inputs)
    loss.backward()
    with torch.no_grad():
        for p in trainer.model.parameters():
            p -= 0.5 * p.grad
    full = lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p  # noqa: E731 (FSDP2: DTensor shards)
    suffix = "-fsdp2" if wrap == "fsdp2" and world > 1 else ""
    torch.save({n: full(p).detach().clone() for n, p in trainer.model.named_parameters()},
               os.path.join(out, f"params-{rank}-of-{world}{suffix}.pt"))
    print("OK", rank, loss.item(), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
