"""pytest-benchmark version of bench_linear_policy_loss on a small shape.

    pytest benchmarks/test_bench_linear_policy_loss.py                        # times (pytest-benchmark)
    pytest benchmarks/test_bench_linear_policy_loss.py --benchmark-disable    # one run each, as a check

Every provider computes the same loss on the same batch; each run checks it against naive.
"""

import pytest
import torch

from benchmarks import bench_linear_policy_loss as B

N, H, VOCAB, SEQ = 256, 64, 4096, 64


@pytest.fixture(autouse=True)
def _small_vocab(monkeypatch):
    monkeypatch.setattr(B, "V", VOCAB)


@pytest.mark.parametrize("provider", B.PROVIDERS)
def test_fwd_bwd(benchmark, provider):
    inputs = B.make_inputs(N, H, torch.float32, torch.device("cpu"), SEQ)
    step = B.make_step(provider, *inputs, SEQ)
    loss = benchmark(step)
    expected = B.make_step("naive", *inputs, SEQ)()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-4, atol=1e-6)
