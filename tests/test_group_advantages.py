"""group_advantages: every backend against the float64 reference, TRL's own formula, hand values, errors."""

import pytest
import torch

from fastrft_kernels import group_advantages, use_backend
from fastrft_kernels._backend import interpreting

BACKENDS = ("reference", "torch", "triton")
NAN = float("nan")


def _rewards():
    """7 groups of 5 with every corner: NaNs, a zero-spread group, one- and zero-valid groups."""
    r = torch.randn(35, dtype=torch.float64) * 2.0 + 0.3  # [35]
    r[1] = NAN  # group 0: one NaN among five
    r[5:10] = 0.1  # group 1: all equal (zero std; 0.1 does not sum exactly in fp32)
    r[10:14] = NAN  # group 2: one valid member
    r[15:20] = NAN  # group 3: no valid member
    r[22] = NAN  # group 4: four valid
    r[25:27] = torch.tensor([1.0, 1.0], dtype=torch.float64)  # group 5: a tie, not zero std overall
    return r


def _check(out, ref, dtype=torch.float32, rtol=1e-5):
    assert out.dtype == dtype
    assert torch.isfinite(out).all(), "every advantage must be finite (NaN rewards give 0)"
    err = (out.double() - ref).abs().max().item()
    assert err <= rtol * max(ref.abs().max().item(), 1.0), err


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale,estimator", [("group", "grpo"), ("batch", "grpo"), ("none", "grpo"), ("group", "rloo")])
def test_contiguous_groups_match_reference(backend, scale, estimator):
    r = _rewards()
    with use_backend("reference"):
        ref = group_advantages(r, 5, scale=scale, estimator=estimator)  # float64 spec
    with use_backend(backend):
        out = group_advantages(r.float(), 5, scale=scale, estimator=estimator)
    _check(out, ref)
    assert (out[5:20] == 0).all()  # zero std, one valid member, no valid member: exactly 0
    assert out[1] == 0 and out[22] == 0  # NaN rewards
    assert (out[[0, 2, 3, 4]] != 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale,estimator", [("group", "grpo"), ("batch", "grpo"), ("none", "grpo"), ("none", "rloo")])
def test_noncontiguous_group_ids_equal_the_sorted_layout(backend, scale, estimator):
    r = _rewards()
    ids = torch.arange(35) // 5 * 7 + 3  # arbitrary, non-dense group values
    perm = torch.randperm(35)
    with use_backend("reference"):
        ref = group_advantages(r, 5, scale=scale, estimator=estimator)
    with use_backend(backend):
        out = group_advantages(r[perm].float(), group_ids=ids[perm].int(), scale=scale, estimator=estimator)
    _check(out, ref[perm])


def test_hand_values():
    r = torch.tensor([1.0, 2.0, 3.0, NAN, 4.0, 4.0, 6.0, 10.0], dtype=torch.float64)
    eps = 1e-4
    for backend in BACKENDS:
        with use_backend(backend):
            grpo = group_advantages(r, 4)
            rloo = group_advantages(r, 4, estimator="rloo")
            none = group_advantages(r, 4, scale="none")
        # group 0: mean 2, unbiased std 1; group 1: mean 6, std sqrt(((-2)^2*2 + 0 + 16)/3) = sqrt(8)
        s1 = 8.0**0.5
        want = [-1 / (1 + eps), 0.0, 1 / (1 + eps), 0.0, -2 / (s1 + eps), -2 / (s1 + eps), 0.0, 4 / (s1 + eps)]
        torch.testing.assert_close(grpo.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-7)
        # rloo: r - mean of the others; group 1: 4 - 20/3, 4 - 20/3, 6 - 6, 10 - 14/3
        want = [1 - 2.5, 0.0, 3 - 1.5, 0.0, 4 - 20 / 3, 4 - 20 / 3, 0.0, 10 - 14 / 3]
        torch.testing.assert_close(rloo.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-7)
        want = [-1.0, 0.0, 1.0, 0.0, -2.0, -2.0, 0.0, 4.0]
        torch.testing.assert_close(none.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_matches_trl_formula(scale):
    """TRL's `_generate_and_score_completions` arithmetic, with its own `nanstd`, on rewards whose groups
    all have distinct values (TRL gives ~1e-4-scaled rounding noise, not 0, on zero-spread groups)."""
    # imported here: the GPU kit's machine may lack TRL, and the other tests need none of it
    nanstd = pytest.importorskip("trl.trainer.utils", reason="TRL is not installed").nanstd
    G = 6
    r = torch.randn(4 * G, dtype=torch.float64)
    r[[2, 9, 10]] = NAN
    r[18:23] = NAN  # one valid member: TRL's NaN std, then nan_to_num -> 0
    mean = torch.nanmean(r.view(-1, G), dim=1).repeat_interleave(G)
    std = nanstd(r.view(-1, G), dim=1).repeat_interleave(G) if scale == "group" else nanstd(r).expand_as(r)
    want = r - mean
    if scale != "none":
        want = want / (std + 1e-4)
    want = torch.nan_to_num(want, nan=0.0)
    for backend in BACKENDS:
        with use_backend(backend):
            out = group_advantages(r.float(), G, scale=scale)
        _check(out, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_half_precision_rewards(dtype, backend):
    r = _rewards().to(dtype)
    with use_backend("reference"):
        ref = group_advantages(r.double(), 5)
    with use_backend(backend):
        out = group_advantages(r, 5)
    _check(out, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_singleton_groups(backend):
    with use_backend(backend):
        assert group_advantages(torch.empty(0), 4).shape == (0,)
        out = group_advantages(torch.randn(6) + 1.0, 1)
    assert out.shape == (6,) and (out == 0).all()  # a group of one has no spread


ERRORS = [
    (dict(rewards=torch.randn(2, 4)), ValueError, "rewards must be 1-D"),
    (dict(rewards=torch.arange(8)), TypeError, "rewards must be a floating tensor"),
    (dict(rewards=[1.0] * 8), TypeError, "rewards must be a torch.Tensor"),
    (dict(group_size=3), ValueError, "group_size=3 must divide"),
    (dict(group_size=0), ValueError, "group_size must be a positive int"),
    (dict(group_size=None), ValueError, "exactly one of group_size .* and group_ids"),
    (dict(group_ids=torch.zeros(8, dtype=torch.long)), ValueError, "exactly one of group_size .* and group_ids"),
    (dict(group_size=None, group_ids=torch.zeros(7, dtype=torch.long)), ValueError,
     r"group_ids must have one entry per reward \(8\)"),
    (dict(group_size=None, group_ids=torch.zeros(8)), TypeError, "group_ids must be an int32 or int64"),
    (dict(group_size=None, group_ids=torch.zeros(2, 4, dtype=torch.long)), ValueError, "group_ids must be 1-D"),
    (dict(group_size=None, group_ids=torch.zeros(8, dtype=torch.long, device="meta")), ValueError,
     "group_ids is on meta"),
    (dict(scale="global"), ValueError, "scale must be one of .*'group', 'batch', 'none'"),
    (dict(estimator="ppo"), ValueError, "estimator must be one of .*'grpo', 'rloo'"),
    (dict(eps=-1.0), ValueError, "eps must be"),
]


@pytest.mark.parametrize("kwargs,error,message", ERRORS, ids=lambda x: "" if not isinstance(x, str) else x[:30])
def test_errors_name_the_argument(kwargs, error, message):
    args = dict(rewards=torch.randn(8), group_size=4)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        group_advantages(args.pop("rewards"), args.pop("group_size"), **args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are observable on CUDA only")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_host_sync_on_cuda(backend):
    if backend == "triton" and interpreting():
        pytest.skip("under TRITON_INTERPRET=1 the interpreter copies CUDA tensors to the host")
    r = _rewards().float().cuda()
    ids = (torch.arange(35) // 5 * 7 + 3)[torch.randperm(35)].cuda()
    with use_backend(backend):
        group_advantages(r, group_ids=ids, scale="batch")  # compiles the kernel outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            outs = [group_advantages(r, 5), group_advantages(r, group_ids=ids, scale="batch"),
                    group_advantages(r, 5, estimator="rloo")]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    with use_backend("reference"):
        want = group_advantages(r.cpu().double(), 5)
    _check(outs[0].cpu(), want)
