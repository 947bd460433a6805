"""Segment tables: builders, validation, and the Triton block plan against the dense mask."""

import pytest
import torch

from fastrft_kernels import Segments, bidirectional_span_segments, segments_from_cu_seqlens, shared_prefix_segments


def _dense_from_rule(T, rule):
    return torch.tensor([[bool(rule(i, j)) for j in range(T)] for i in range(T)])


def test_shared_prefix_mask_matches_the_rule():
    # group 0: prompt [0, 5), completions [5, 8), [8, 8) (empty), [8, 10); group 1: prompt [10, 13), c [13, 17)
    seg = shared_prefix_segments([5, 3], [[3, 0, 2], [4]])
    owner = {}  # token -> (group, prompt range, own range or None)
    layout = [(0, (0, 5), [(5, 8), (8, 8), (8, 10)]), (1, (10, 13), [(13, 17)])]
    for _g, (p0, p1), comps in layout:
        for i in range(p0, p1):
            owner[i] = ((p0, p1), None)
        for c0, c1 in comps:
            for i in range(c0, c1):
                owner[i] = ((p0, p1), (c0, c1))

    def rule(i, j):
        (p0, p1), own = owner[i]
        if own is None:
            return p0 <= j <= i
        return p0 <= j < p1 or own[0] <= j <= i

    assert torch.equal(seg.dense_mask(17), _dense_from_rule(17, rule))
    assert seg.table.dtype == torch.int32 and seg.table.shape == (1 + 2 * 3 + 1 + 2, 5)


def test_cu_seqlens_builder_causal_and_full_with_an_empty_sequence():
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    doc = [0, 0, 0, 2, 2, 2, 2]
    causal = segments_from_cu_seqlens(cu, causal=True).dense_mask(7)
    full = segments_from_cu_seqlens(cu, causal=False).dense_mask(7)
    assert torch.equal(causal, _dense_from_rule(7, lambda i, j: doc[i] == doc[j] and j <= i))
    assert torch.equal(full, _dense_from_rule(7, lambda i, j: doc[i] == doc[j]))


def test_bidirectional_spans_are_full_inside_and_causal_elsewhere():
    cu = torch.tensor([0, 9, 14], dtype=torch.int32)
    spans = [(2, 5), (10, 12)]
    seg = bidirectional_span_segments(cu, spans)
    doc = [0] * 9 + [1] * 5

    def span_of(i):
        return next((s for s in spans if s[0] <= i < s[1]), None)

    def rule(i, j):
        if doc[i] != doc[j]:
            return False
        return j <= i or (span_of(i) is not None and span_of(i) == span_of(j))

    assert torch.equal(seg.dense_mask(14), _dense_from_rule(14, rule))


def test_causal_entries_are_bottom_right_aligned():
    # 4 queries over 2 keys (k shorter than q): the first 2 queries see nothing, as flash-attn
    seg = Segments.from_entries([(0, 4, 0, 2, "causal")])
    assert seg.dense_mask(4).tolist() == [
        [False, False, False, False],
        [False, False, False, False],
        [True, False, False, False],
        [True, True, False, False],
    ]
    # 2 queries over 4 keys: the last query sees all 4
    seg = Segments.from_entries([(2, 4, 0, 4, 1)])
    assert seg.dense_mask(4)[2:].tolist() == [[True, True, True, False], [True, True, True, True]]


def test_overlapping_entries_are_a_union():
    seg = Segments.from_entries([(0, 4, 0, 3), (0, 4, 1, 4), (2, 4, 0, 4)], kind="full")
    assert seg.dense_mask(4).all()


@pytest.mark.parametrize("block_q,block_k", [(16, 32), (32, 16), (64, 64)])
def test_plan_visits_exactly_the_tiles_with_visible_pairs(block_q, block_k):
    # odd lengths, empty entries, overlap, a causal entry with k shorter than q, a query in no entry
    seg = Segments.from_entries(
        [
            (0, 37, 0, 37, "causal"),
            (37, 37, 0, 37, "full"),
            (37, 90, 0, 37, "full"),
            (37, 90, 37, 90, "causal"),
            (40, 60, 30, 45, "full"),
            (90, 130, 100, 110, "causal"),
            (131, 160, 131, 160, "full"),
            (64, 128, 0, 64, "full"),  # whole tiles at every block size; overlaps the entries above
        ]
    )
    T = 160
    mask = seg.dense_mask(T)
    plan = seg.plan(T, T, block_q, block_k, "cpu")
    assert plan is seg.plan(T, T, block_q, block_k, "cpu")  # cached: one build per micro-batch
    seen = set()
    for qb in range(plan.n_qblocks):
        for t in range(int(plan.q_count[qb])):
            code = int(plan.q_tiles[qb, t])
            kb, masked = code // 2, code % 2
            tile = mask[qb * block_q : (qb + 1) * block_q, kb * block_k : (kb + 1) * block_k]
            assert tile.any(), f"tile ({qb}, {kb}) is visited but fully masked"
            if not masked:  # a full tile must be all-visible and whole (no mask is evaluated)
                assert tile.shape == (block_q, block_k) and tile.all()
            seen.add((qb, kb, masked))
    for qb in range(plan.n_qblocks):
        for kb in range(plan.n_kblocks):
            tile = mask[qb * block_q : (qb + 1) * block_q, kb * block_k : (kb + 1) * block_k]
            assert tile.any() == any((qb, kb, m) in seen for m in (0, 1)), f"tile ({qb}, {kb})"
    # the transposed lists hold the same tiles
    seen_t = set()
    for kb in range(plan.n_kblocks):
        for t in range(int(plan.k_count[kb])):
            code = int(plan.k_tiles[kb, t])
            seen_t.add((code // 2, kb, code % 2))
    assert seen_t == seen
    assert plan.visible_pairs == int(mask.sum())
    assert plan.full_tiles > 0 and plan.masked_tiles > 0


@pytest.mark.parametrize(
    "entries,match",
    [
        ([(3, 2, 0, 4, 0)], "q_end=2 is before q_start=3"),
        ([(0, 2, 4, 1, 1)], "k_end=1 is before k_start=4"),
        ([(0, 2, -1, 1, 1)], "must be >= 0"),
        ([(0, 2, 0, 1, 2)], "kind must be"),
    ],
)
def test_bad_tables_are_rejected(entries, match):
    with pytest.raises(ValueError, match=match):
        Segments(torch.tensor(entries, dtype=torch.int32))


def test_bad_table_types_and_ranges():
    with pytest.raises(TypeError, match="int32"):
        Segments(torch.tensor([[0, 1, 0, 1, 0]], dtype=torch.int64))
    with pytest.raises(ValueError, match="5 columns"):
        Segments(torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="2-D"):
        Segments(torch.zeros(5, dtype=torch.int32))
    with pytest.raises(ValueError, match="kind must be"):
        Segments.from_entries([(0, 1, 0, 1, "sliding")])
    with pytest.raises(ValueError, match="beyond the number of key tokens T=8"):
        Segments.from_entries([(0, 4, 0, 9, "full")]).check(8)
    with pytest.raises(ValueError, match="beyond the number of query tokens T=8"):
        Segments.from_entries([(0, 9, 0, 4, "full")]).check(8)
    with pytest.raises(ValueError, match="one list per prompt"):
        shared_prefix_segments([3, 4], [[1, 2]])
    with pytest.raises(ValueError, match="overlaps"):
        bidirectional_span_segments(torch.tensor([0, 10], dtype=torch.int32), [(1, 5), (4, 6)])
    with pytest.raises(ValueError, match="inside one sequence"):
        bidirectional_span_segments(torch.tensor([0, 5, 10], dtype=torch.int32), [(3, 7)])
    with pytest.raises(ValueError, match="non-decreasing"):
        segments_from_cu_seqlens(torch.tensor([0, 5, 3], dtype=torch.int32))
