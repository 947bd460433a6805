"""The kernel API's bad-input table, and hypothesis fuzzing of its public surface.

Every bad input gets a clear error (ValueError or TypeError) whose message names the argument:
never a crash from deep inside an op, never a silently wrong result. CASES is the table the
README summarizes (`python -m pytest tests/test_bad_inputs.py -k table -s` prints it with each
message). The fuzz tests draw shapes, dtypes, layouts and values at random: a call either
raises such an error or returns finite outputs equal to the float64 reference.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastrft_kernels import (
    LinearPolicyLoss,
    LossConfig,
    Segments,
    group_advantages,
    linear_logprob,
    linear_policy_loss,
    logprob,
    policy_loss,
    segment_attention,
    segments_from_cu_seqlens,
    shared_prefix_segments,
    use_backend,
    varlen_attention,
)

I32 = torch.int32


def _h(n=6, h=8):
    return torch.randn(n, h)


def _w(v=11, h=8):
    return torch.randn(v, h)


def _t(n=6, v=11):
    return torch.randint(0, v, (n,))


def _cu(*xs, dtype=I32):
    return torch.tensor(xs, dtype=dtype)


def _qkv(T=5, hq=2, hk=1, d=16, dtype=torch.float32):
    return torch.randn(T, hq, d, dtype=dtype), torch.randn(T, hk, d, dtype=dtype), torch.randn(T, hk, d, dtype=dtype)


def _seg(T=5):
    return segments_from_cu_seqlens(_cu(0, T))


# (case, call, error type, words the message must hold: the argument's name and what was expected)
CASES = [
    # linear_logprob
    ("hidden not a tensor", lambda: linear_logprob([[1.0]], _w(), _t(1)), TypeError, "hidden must be a torch.Tensor"),
    ("hidden 1-D", lambda: linear_logprob(torch.randn(8), _w(), _t(1)), ValueError, "hidden must be 2-D"),
    ("hidden integer", lambda: linear_logprob(torch.ones(6, 8, dtype=torch.long), _w(), _t()), TypeError, "hidden must be a floating"),
    ("weight H mismatch", lambda: linear_logprob(_h(), _w(h=9), _t()), ValueError, "weight must be [V, H]"),
    ("weight dtype differs", lambda: linear_logprob(_h(), _w().double(), _t()), TypeError, "weight must have the dtype of hidden"),
    ("bias wrong length", lambda: linear_logprob(_h(), _w(), _t(), bias=torch.randn(10)), ValueError, "bias must be [V]"),
    ("bias 2-D", lambda: linear_logprob(_h(), _w(), _t(), bias=torch.randn(11, 1)), ValueError, "bias must be 1-D"),
    ("temperature 0", lambda: linear_logprob(_h(), _w(), _t(), temperature=0.0), ValueError, "temperature must be a positive"),
    ("temperature nan", lambda: linear_logprob(_h(), _w(), _t(), temperature=float("nan")), ValueError, "temperature must be a positive"),
    ("temperature bool", lambda: linear_logprob(_h(), _w(), _t(), temperature=True), ValueError, "temperature must be a positive"),
    ("ignore_index float", lambda: linear_logprob(_h(), _w(), _t(), ignore_index=-100.0), TypeError, "ignore_index must be an int"),
    ("targets float", lambda: linear_logprob(_h(), _w(), torch.zeros(6)), TypeError, "targets must be an int64"),
    ("targets wrong length", lambda: linear_logprob(_h(), _w(), _t(5)), ValueError, "targets must have one entry per row"),
    ("target >= V", lambda: linear_logprob(_h(), _w(), torch.tensor([0, 1, 2, 3, 4, 11])), ValueError, "targets must lie in [0, 11)"),
    ("target negative, not ignore", lambda: linear_logprob(_h(), _w(), torch.tensor([0, 1, -1, 3, 4, 5])), ValueError, "targets must lie in [0, 11)"),
    ("lse wrong length", lambda: linear_logprob(_h(), _w(), _t(), lse=torch.zeros(5)), ValueError, "lse must be [N]"),
    ("weight on meta", lambda: linear_logprob(_h(), _w().to("meta"), _t()), ValueError, "weight is on meta"),
    # logprob
    ("logits 3-D", lambda: logprob(torch.randn(2, 3, 4), _t(2, 4)), ValueError, "logits must be 2-D"),
    ("logits int", lambda: logprob(torch.ones(2, 4, dtype=torch.int32), _t(2, 4)), TypeError, "logits must be a floating"),
    ("logprob temperature negative", lambda: logprob(torch.randn(2, 4), _t(2, 4), temperature=-1.0), ValueError, "temperature must be a positive"),
    ("logprob target out of range", lambda: logprob(torch.randn(2, 4), torch.tensor([0, 4])), ValueError, "targets must lie in [0, 4)"),
    # group_advantages
    ("rewards int", lambda: group_advantages(torch.ones(4, dtype=torch.long), 2), TypeError, "rewards must be a floating"),
    ("rewards 2-D", lambda: group_advantages(torch.ones(2, 2), 2), ValueError, "rewards must be 1-D"),
    ("group_size not dividing", lambda: group_advantages(torch.ones(5), 2), ValueError, "group_size=2 must divide"),
    ("group_size 0", lambda: group_advantages(torch.ones(4), 0), ValueError, "group_size must be a positive int"),
    ("group_size and group_ids", lambda: group_advantages(torch.ones(4), 2, group_ids=torch.zeros(4, dtype=torch.long)), ValueError, "give exactly one of group_size"),
    ("neither group_size nor ids", lambda: group_advantages(torch.ones(4)), ValueError, "give exactly one of group_size"),
    ("group_ids float", lambda: group_advantages(torch.ones(4), group_ids=torch.zeros(4)), TypeError, "group_ids must be an int32 or int64"),
    ("group_ids wrong length", lambda: group_advantages(torch.ones(4), group_ids=torch.zeros(3, dtype=torch.long)), ValueError, "group_ids must have one entry per reward"),
    ("scale unknown", lambda: group_advantages(torch.ones(4), 2, scale="std"), ValueError, "scale must be one of"),
    ("estimator unknown", lambda: group_advantages(torch.ones(4), 2, estimator="ppo"), ValueError, "estimator must be one of"),
    ("eps negative", lambda: group_advantages(torch.ones(4), 2, eps=-1.0), ValueError, "eps must be a real number >= 0"),
    # policy_loss
    ("cu_seqlens int64", lambda: policy_loss(-torch.rand(4), torch.ones(1), _cu(0, 4, dtype=torch.long), config=LossConfig()), TypeError, "cu_seqlens must have dtype torch.int32"),
    ("cu_seqlens decreasing", lambda: policy_loss(-torch.rand(4), torch.ones(2), _cu(0, 3, 2, 4), config=LossConfig()), ValueError, "cu_seqlens must be non-decreasing"),
    ("cu_seqlens not from 0", lambda: policy_loss(-torch.rand(4), torch.ones(1), _cu(1, 4), config=LossConfig()), ValueError, "cu_seqlens must start at 0"),
    ("cu_seqlens short of T", lambda: policy_loss(-torch.rand(4), torch.ones(1), _cu(0, 3), config=LossConfig()), ValueError, "cu_seqlens must end at the number of tokens T=4"),
    ("cu_seqlens empty", lambda: policy_loss(-torch.rand(0), torch.ones(0), _cu(dtype=I32), config=LossConfig()), ValueError, "cu_seqlens must hold at least one entry"),
    ("advantages wrong count", lambda: policy_loss(-torch.rand(4), torch.ones(3), _cu(0, 2, 4), config=LossConfig()), ValueError, "advantages must hold one value per sequence (S=2) or per token (T=4)"),
    ("advantages NaN", lambda: policy_loss(-torch.rand(4), torch.tensor([0.1, float("nan")]), _cu(0, 2, 4), config=LossConfig()), ValueError, "advantages must be finite"),
    ("old_logp wrong length", lambda: policy_loss(-torch.rand(4), torch.ones(1), _cu(0, 4), old_logp=torch.zeros(3), config=LossConfig()), ValueError, "old_logp must have one value per token (T=4)"),
    ("ref_logp missing with beta", lambda: policy_loss(-torch.rand(4), torch.ones(1), _cu(0, 4), config=LossConfig(beta=0.1)), ValueError, "ref_logp is required when config.beta > 0"),
    ("config not LossConfig", lambda: policy_loss(-torch.rand(4), torch.ones(1), _cu(0, 4), config={"loss_type": "dapo"}), TypeError, "config must be a fastrft_kernels.LossConfig"),
    ("logp int", lambda: policy_loss(torch.zeros(4, dtype=torch.long), torch.ones(1), _cu(0, 4), config=LossConfig()), TypeError, "logp must be a floating"),
    # LossConfig
    ("loss_type unknown", lambda: LossConfig(loss_type="ppo"), ValueError, "loss_type must be one of"),
    ("importance level unknown", lambda: LossConfig(importance_sampling_level="group"), ValueError, "importance_sampling_level must be one of"),
    ("epsilon_low negative", lambda: LossConfig(epsilon_low=-0.1), ValueError, "epsilon_low must be"),
    ("beta negative", lambda: LossConfig(beta=-1.0), ValueError, "beta must be"),
    ("kl_estimator unknown", lambda: LossConfig(kl_estimator="k4"), ValueError, "kl_estimator must be one of"),
    ("top_entropy_quantile above 1", lambda: LossConfig(top_entropy_quantile=1.5), ValueError, "top_entropy_quantile must be"),
    ("temperature 0 in config", lambda: LossConfig(temperature=0.0), ValueError, "temperature must be"),
    # linear_policy_loss / LinearPolicyLoss
    ("beta without ref_logp (fused)", lambda: LinearPolicyLoss(LossConfig(beta=0.04))(_h(4), _w(), _t(4), torch.ones(1), _cu(0, 4)), ValueError, "ref_logp is required when config.beta > 0"),
    ("fused targets wrong length", lambda: linear_policy_loss(_h(4), _w(), _t(3), torch.ones(1), _cu(0, 4), config=LossConfig()), ValueError, "targets must have one entry per row"),
    ("fused cu_seqlens beyond T", lambda: linear_policy_loss(_h(4), _w(), _t(4), torch.ones(1), _cu(0, 5), config=LossConfig()), ValueError, "cu_seqlens must end at the number of tokens T=4"),
    # segments and attention
    ("q 2-D", lambda: segment_attention(torch.randn(5, 16), *_qkv()[1:], _seg()), ValueError, "q must be 3-D"),
    ("q k dtypes differ", lambda: segment_attention(_qkv()[0].double(), *_qkv()[1:], _seg()), TypeError, "q, k and v must share one dtype"),
    ("GQA heads not dividing", lambda: segment_attention(*_qkv(hq=3, hk=2), _seg()), ValueError, "must be a multiple of k's heads"),
    ("k v shapes differ", lambda: segment_attention(_qkv()[0], _qkv()[1], torch.randn(4, 1, 16), _seg()), ValueError, "k and v must have the same shape"),
    ("head dim mismatch", lambda: segment_attention(torch.randn(5, 2, 8), *_qkv()[1:], _seg()), ValueError, "q and k must share the head dim"),
    ("segments not a table", lambda: segment_attention(*_qkv(), [(0, 5, 0, 5, "causal")]), TypeError, "segments must be a fastrft_kernels.Segments"),
    ("segment beyond T", lambda: segment_attention(*_qkv(), Segments.from_entries([(0, 6, 0, 6, "causal")])), ValueError, "beyond the number of query tokens"),
    ("segment kind unknown", lambda: Segments.from_entries([(0, 5, 0, 5, "sliding")]), ValueError, "kind must be 'full', 'causal'"),
    ("segment end before start", lambda: Segments.from_entries([(3, 2, 0, 5, "full")]), ValueError, "q_end=2 is before q_start=3"),
    ("negative prompt length", lambda: shared_prefix_segments([-1], [[2]]), ValueError, "prompt_lens[0] must be >= 0"),
    ("negative completion length", lambda: shared_prefix_segments([3], [[2, -2]]), ValueError, "completion_lens[0][1] must be >= 0"),
    ("varlen cu_seqlens float", lambda: varlen_attention(*_qkv(), torch.tensor([0.0, 5.0])), TypeError, "cu_seqlens"),
]


@pytest.mark.parametrize("case,call,exc,words", CASES, ids=[c[0] for c in CASES])
def test_table(case, call, exc, words):
    with pytest.raises(exc) as info:
        with use_backend("torch"):
            call()
    msg = str(info.value)
    assert words in msg, f"{case}: {msg!r} lacks {words!r}"
    assert "\n" not in msg.strip(), f"{case}: one line wanted, got {msg!r}"
    print(f"| {case} | {exc.__name__}: {msg} |")


def test_table_has_at_least_forty_cases():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


# ------------------------------------------------------------------------------------------- fuzz

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64])


def _named_error(err):
    """A clear error: ValueError/TypeError whose message starts by naming an argument or field."""
    return isinstance(err, (ValueError, TypeError)) and len(str(err)) > 10 and "\n" not in str(err).strip()


@FUZZ
@given(n=st.integers(0, 9), h=st.integers(1, 12), v=st.integers(1, 17), dtype=DTYPES, w_dtype=DTYPES,
       t_len=st.integers(0, 10), t_lo=st.integers(-120, 20), transpose=st.booleans(), backend=st.sampled_from(["torch", "reference"]))
def test_fuzz_linear_logprob(n, h, v, dtype, w_dtype, t_len, t_lo, transpose, backend):
    hidden = torch.randn(n, h).to(dtype) if dtype.is_floating_point else torch.ones(n, h, dtype=dtype)
    weight = torch.randn(h, v).t() if transpose else torch.randn(v, h)  # a non-contiguous view, or not
    weight = weight.to(w_dtype) if w_dtype.is_floating_point else weight.to(torch.long)
    targets = torch.randint(t_lo, t_lo + 30, (t_len,))
    try:
        with use_backend(backend):
            logp = linear_logprob(hidden, weight, targets)
    except Exception as err:  # noqa: BLE001 - the assertion says what is allowed
        assert _named_error(err), repr(err)
        return
    # accepted: the inputs were valid, and the answer is the float64 reference's
    assert dtype == w_dtype and t_len == n and dtype.is_floating_point
    with use_backend("reference"):
        ref = linear_logprob(hidden.double(), weight.double(), targets)
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 5e-2
    assert torch.isfinite(logp).all() and (logp <= 0).all()
    scale = float(ref.abs().max()) if n else 1.0
    torch.testing.assert_close(logp.double(), ref, rtol=tol, atol=tol * max(1.0, scale))


@FUZZ
@given(lens=st.lists(st.integers(-2, 6), min_size=0, max_size=5), adv_count=st.integers(0, 8),
       cu_dtype=st.sampled_from([torch.int32, torch.int64, torch.float32]), shuffle=st.booleans(),
       loss_type=st.sampled_from(["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"]),
       backend=st.sampled_from(["torch", "reference"]))
def test_fuzz_policy_loss(lens, adv_count, cu_dtype, shuffle, loss_type, backend):
    cu = [0]
    for length in lens:
        cu.append(cu[-1] + length)
    if shuffle and len(cu) > 2:
        cu[1], cu[2] = cu[2], cu[1]
    T = max(cu[-1], 0)
    logp = -torch.rand(T)
    cfg = LossConfig(loss_type=loss_type, max_completion_length=8, epsilon_high=5.0 if loss_type == "cispo" else 0.28)
    try:
        with use_backend(backend):
            loss, stats = policy_loss(logp.requires_grad_(), torch.randn(adv_count), torch.tensor(cu, dtype=cu_dtype),
                                      config=cfg)
    except Exception as err:  # noqa: BLE001
        assert _named_error(err), repr(err)
        return
    assert cu_dtype == torch.int32 and all(b >= a for a, b in zip(cu, cu[1:])) and adv_count in (len(cu) - 1, T)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logp.grad).all()


@FUZZ
@given(T=st.integers(0, 12), hq=st.integers(1, 4), hk=st.integers(1, 4), d=st.sampled_from([1, 8, 16, 300]),
       cu_last=st.integers(0, 14), dtype=DTYPES, backend=st.sampled_from(["torch", "reference"]))
def test_fuzz_segment_attention(T, hq, hk, d, cu_last, dtype, backend):
    mk = lambda h: (torch.randn(T, h, d).to(dtype) if dtype.is_floating_point else torch.ones(T, h, d, dtype=dtype))  # noqa: E731
    q, k, v = mk(hq), mk(hk), mk(hk)
    try:
        segs = segments_from_cu_seqlens(_cu(0, cu_last))
        with use_backend(backend):
            out = segment_attention(q, k, v, segs)
    except Exception as err:  # noqa: BLE001
        assert _named_error(err), repr(err)
        return
    assert hq % hk == 0 and d <= 256 and cu_last <= T and dtype.is_floating_point
    assert out.shape == q.shape and torch.isfinite(out).all()
