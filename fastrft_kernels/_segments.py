"""Segment tables: which keys each query of a packed sequence attends to.

A table is a list of entries (q_start, q_end, k_start, k_end, kind) over absolute token
positions of one packed sequence of T tokens. Query i of an entry (q_start <= i < q_end)
sees key j of that entry (k_start <= j < k_end) when the entry is `full` (kind 0), or
when it is `causal` (kind 1) and j - k_start <= (i - q_start) + (k_len - q_len), i.e.
causal aligned bottom-right inside the entry as flash-attn's varlen kernel does (with
k_len < q_len the first q_len - k_len queries of the entry see none of its keys).

Semantics of several entries: a query attends to the *union* of the keys every entry
holding it lets it see. Overlapping entries are accepted and deduplicated: a key that two
entries of a query both cover counts once in that query's softmax (the mask is the OR of
the entries' masks, never a sum). A query that sees no key outputs 0 with lse = -inf.

The builders below produce the three layouts a VLM trainer needs; none of them overlaps
keys for one query, so dedup never costs anything there.

A `Segments` object is built once per micro-batch on the host. `Segments.plan(...)` turns
it, once per (T, block sizes, device), into the block lists the Triton kernels walk; the
plan is cached on the object, so every layer of a model reuses it with no host sync.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from ._checks import check_cu_seqlens, check_tensor

FULL = 0
CAUSAL = 1
_KIND_NAMES = {"full": FULL, "causal": CAUSAL}


def _kind_code(kind, where: str) -> int:
    if isinstance(kind, str):
        if kind not in _KIND_NAMES:
            raise ValueError(f"{where}: kind must be 'full', 'causal', 0 or 1, got {kind!r}")
        return _KIND_NAMES[kind]
    if isinstance(kind, bool) or not isinstance(kind, (int, np.integer)) or int(kind) not in (FULL, CAUSAL):
        raise ValueError(f"{where}: kind must be 'full', 'causal', 0 or 1, got {kind!r}")
    return int(kind)


@dataclasses.dataclass(frozen=True)
class SegmentPlan:
    """Block lists for one (table, T, block_q, block_k, device); built once, read by every layer.

    Tile (qb, kb) covers query rows [qb*block_q, (qb+1)*block_q) and key columns
    [kb*block_k, (kb+1)*block_k). A tile is *skipped* when no query of it sees a key of it,
    *full* when one entry alone makes every element visible (no mask is evaluated), and
    *masked* otherwise (the mask is the OR over the entries of that q-block).

    q_tiles:   [n_qblocks, max_k] int32, code kb*2 + masked, the key blocks each q-block
               visits in ascending order (padding past q_count is never read)
    q_count:   [n_qblocks] int32
    q_entries: [n_qblocks, max_e] int32, indices of the table entries whose query range
               meets the q-block (the ones a masked tile ORs over)
    q_ecount:  [n_qblocks] int32
    k_tiles:   [n_kblocks, max_q] int32, code qb*2 + masked: the transposed lists the
               dK/dV pass walks
    k_count:   [n_kblocks] int32
    table:     [n, 5] int32 on `device` (entries read by masked tiles)
    """

    num_tokens: int  # queries (Tq)
    num_keys: int  # keys (Tk)
    block_q: int
    block_k: int
    n_qblocks: int
    n_kblocks: int
    q_tiles: torch.Tensor
    q_count: torch.Tensor
    q_entries: torch.Tensor
    q_ecount: torch.Tensor
    k_tiles: torch.Tensor
    k_count: torch.Tensor
    table: torch.Tensor
    full_tiles: int
    masked_tiles: int
    visible_pairs: int  # (query, key) pairs attended, for FLOP counts


@dataclasses.dataclass(frozen=True, eq=False)
class Segments:
    """A segment table: `table` is an int32 tensor [n, 5] of (q_start, q_end, k_start, k_end, kind).

    kind 0 = full, 1 = causal (bottom-right aligned). Validated at construction (shape,
    dtype, start <= end, non-negative, known kind); ranges against the token count T are
    checked by `check(T)`, which every attention call runs once per T (cached).
    """

    table: torch.Tensor
    _host: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
    _cache: dict = dataclasses.field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self):
        t = self.table
        check_tensor("segments.table", t, ndim=2, dtype=torch.int32)
        if t.shape[1] != 5:
            raise ValueError(
                f"segments.table must have 5 columns (q_start, q_end, k_start, k_end, kind), got shape {tuple(t.shape)}"
            )
        host = t.detach().cpu().numpy().astype(np.int64)  # one host read per micro-batch
        for i, (qs, qe, ks, ke, kind) in enumerate(host.tolist()):
            if min(qs, qe, ks, ke) < 0:
                raise ValueError(f"segments entry {i} {(qs, qe, ks, ke)}: positions must be >= 0")
            if qe < qs:
                raise ValueError(f"segments entry {i}: q_end={qe} is before q_start={qs}")
            if ke < ks:
                raise ValueError(f"segments entry {i}: k_end={ke} is before k_start={ks}")
            _kind_code(kind, f"segments entry {i}")
        object.__setattr__(self, "_host", host)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_entries(cls, entries: Iterable[Sequence], kind=None, device=None) -> Segments:
        """Builds a table by hand.

        entries: 5-tuples (q_start, q_end, k_start, k_end, kind) with kind 0/1 or
        "full"/"causal", or 4-tuples when `kind` (int or "full"|"causal") gives one kind for all.
        """
        rows = []
        default = None if kind is None else _kind_code(kind, "from_entries(kind=...)")
        for i, e in enumerate(entries):
            e = tuple(e)
            if len(e) == 4 and default is not None:
                e = (*e, default)
            if len(e) != 5:
                raise ValueError(
                    f"from_entries: entry {i} must be (q_start, q_end, k_start, k_end, kind)"
                    f"{' or a 4-tuple with kind=' if default is None else ''}, got {e!r}"
                )
            for v, name in zip(e[:4], ("q_start", "q_end", "k_start", "k_end")):
                if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                    raise TypeError(f"from_entries: entry {i} {name} must be an int, got {v!r}")
            rows.append([int(v) for v in e[:4]] + [_kind_code(e[4], f"from_entries: entry {i}")])
        table = torch.tensor(rows, dtype=torch.int32).reshape(-1, 5)
        return cls(table.to(device) if device is not None else table)

    # ----------------------------------------------------------------- queries
    @property
    def num_entries(self) -> int:
        return int(self._host.shape[0])

    def entries(self) -> list[tuple[int, int, int, int, int]]:
        return [tuple(r) for r in self._host.tolist()]

    def check(self, num_q: int, num_k: int | None = None) -> None:
        """Every query range lies inside [0, num_q] and every key range inside [0, num_k]
        (num_k defaults to num_q: one packed sequence of T tokens)."""
        num_k = num_q if num_k is None else num_k
        key = ("check", num_q, num_k)
        if key in self._cache:
            return
        for i, (_qs, qe, _ks, ke, _) in enumerate(self._host.tolist()):
            if qe > num_q:
                raise ValueError(f"segments entry {i}: q_end={qe} is beyond the number of query tokens T={num_q}")
            if ke > num_k:
                raise ValueError(f"segments entry {i}: k_end={ke} is beyond the number of key tokens T={num_k}")
        self._cache[key] = True

    def dense_mask(self, num_q: int, num_k: int | None = None, device=None) -> torch.Tensor:
        """[Tq, Tk] bool, mask[i, j] = query i sees key j (the OR over entries). For references
        and small T only: it holds Tq * Tk bytes."""
        num_k = num_q if num_k is None else num_k
        self.check(num_q, num_k)
        i = torch.arange(num_q, device=device)[:, None]  # [Tq, 1]
        j = torch.arange(num_k, device=device)[None, :]  # [1, Tk]
        mask = torch.zeros(num_q, num_k, dtype=torch.bool, device=device)
        for qs, qe, ks, ke, kind in self._host.tolist():
            m = (i >= qs) & (i < qe) & (j >= ks) & (j < ke)
            if kind == CAUSAL:
                m &= (j - i) <= (ke - qe)
            mask |= m
        return mask

    def query_chunks(self, num_q: int, num_k: int, chunk: int, device=None) -> list[tuple]:
        """Host-side chunking for the torch path, cached per (sizes, chunk, device).

        Queries are cut where the set of entries holding them changes (every q_start and
        q_end), and consecutive runs are merged up to `chunk` queries. Each chunk is
        (q0, q1, keys, cols, sel): `keys` the union of its entries' key ranges, as a slice
        when contiguous or an int64 index tensor on `device` (a completion's chunk gathers
        the prompt and itself, skipping its siblings in between), `cols` the absolute key
        positions [L] on `device`, `sel` the entry indices the chunk ORs over.
        """
        device = torch.device(device) if device is not None else self.table.device
        key = ("chunks", num_q, num_k, chunk, str(device))
        if key in self._cache:
            return self._cache[key]
        self.check(num_q, num_k)
        rows = [r for r in self._host.tolist() if r[0] < r[1] and r[2] < r[3]]
        cuts = sorted({0, num_q, *(r[0] for r in rows), *(r[1] for r in rows)})
        pieces = []  # runs of queries with one entry set, split to at most `chunk`
        for a, b in zip(cuts[:-1], cuts[1:]):
            for s0 in range(a, b, chunk):
                pieces.append((s0, min(s0 + chunk, b)))
        merged = []
        for a, b in pieces:
            if merged and b - merged[-1][0] <= chunk:
                merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        out = []
        for q0, q1 in merged:
            sel = [e for e, r in enumerate(self._host.tolist())
                   if r[0] < r[1] and r[2] < r[3] and r[0] < q1 and r[1] > q0]
            if not sel:
                out.append((q0, q1, None, None, sel))
                continue
            spans = sorted((int(self._host[e, 2]), int(self._host[e, 3])) for e in sel)
            union = [list(spans[0])]
            for ks, ke in spans[1:]:
                if ks <= union[-1][1]:
                    union[-1][1] = max(union[-1][1], ke)
                else:
                    union.append([ks, ke])
            cols = torch.cat([torch.arange(ks, ke) for ks, ke in union]).to(device)  # [L]
            keys = (union[0][0], union[0][1]) if len(union) == 1 else cols
            out.append((q0, q1, keys, cols, sel))
        self._cache[key] = out
        return out

    def plan(self, num_q: int, num_k: int, block_q: int, block_k: int, device=None) -> SegmentPlan:
        """The Triton block lists for num_q queries and num_k keys, cached per (sizes, blocks, device)."""
        device = torch.device(device) if device is not None else self.table.device
        key = ("plan", num_q, num_k, block_q, block_k, str(device))
        if key not in self._cache:
            self.check(num_q, num_k)
            self._cache[key] = _build_plan(self._host, num_q, num_k, block_q, block_k, device)
        return self._cache[key]


def _build_plan(host: np.ndarray, Tq: int, Tk: int, BQ: int, BK: int, device) -> SegmentPlan:
    nq = max(1, math.ceil(Tq / BQ))
    nk = max(1, math.ceil(Tk / BK))
    state = np.zeros((nq, nk), dtype=np.int8)  # 0 skip, 1 masked, 2 full
    entries_of_qblock: list[list[int]] = [[] for _ in range(nq)]
    intervals = []  # (row, lo, hi) key interval per query row and entry, for the exact pair count
    for e, (qs, qe, ks, ke, kind) in enumerate(host.tolist()):
        if qs >= qe or ks >= ke:
            continue
        s = ke - qe  # causal: query i sees key j iff j - i <= s
        rows = np.arange(qs, qe)
        hi = np.minimum(ke, rows + s + 1) if kind == CAUSAL else np.full_like(rows, ke)
        intervals.append((rows, np.full_like(rows, ks), np.maximum(hi, ks)))
        if kind == CAUSAL and qe - 1 + s < ks:
            continue  # no query of the entry sees any of its keys
        qb = np.arange(qs // BQ, (qe - 1) // BQ + 1)  # [a]
        kb = np.arange(ks // BK, (ke - 1) // BK + 1)  # [b]
        r0 = qb * BQ
        c0 = kb * BK
        r_lo = np.maximum(r0, qs)[:, None]  # [a, 1]
        r_hi = np.minimum(r0 + BQ, qe)[:, None]
        c_lo = np.maximum(c0, ks)[None, :]  # [1, b]
        c_hi = np.minimum(c0 + BK, ke)[None, :]
        inside = ((r_lo == r0[:, None]) & (r_hi == (r0 + BQ)[:, None])
                  & (c_lo == c0[None, :]) & (c_hi == (c0 + BK)[None, :]))
        if kind == CAUSAL:
            any_visible = c_lo <= r_hi - 1 + s  # the tile's last row sees its first column
            full = inside & (c_hi - 1 <= r_lo + s)  # its first row sees its last column
        else:
            any_visible = np.ones_like(inside)
            full = inside
        tile = np.where(full, 2, np.where(any_visible, 1, 0)).astype(np.int8)
        sub = state[qb[0] : qb[-1] + 1, kb[0] : kb[-1] + 1]
        np.maximum(sub, tile, out=sub)
        for b in qb.tolist():
            entries_of_qblock[b].append(e)

    visible = _union_pairs(intervals, Tk)

    def lists(mat: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        counts = (mat > 0).sum(axis=1)
        width = max(1, int(counts.max()) if counts.size else 1)
        out = np.zeros((mat.shape[0], width), dtype=np.int32)
        for r in range(mat.shape[0]):
            idx = np.nonzero(mat[r])[0]
            out[r, : idx.size] = idx * 2 + (mat[r, idx] == 1)
        return torch.from_numpy(out).to(device), torch.from_numpy(counts.astype(np.int32)).to(device)

    q_tiles, q_count = lists(state)
    k_tiles, k_count = lists(state.T)
    e_width = max(1, max(len(x) for x in entries_of_qblock))
    q_entries = np.zeros((nq, e_width), dtype=np.int32)
    for b, lst in enumerate(entries_of_qblock):
        q_entries[b, : len(lst)] = lst
    return SegmentPlan(
        num_tokens=Tq,
        num_keys=Tk,
        block_q=BQ,
        block_k=BK,
        n_qblocks=nq,
        n_kblocks=nk,
        q_tiles=q_tiles,
        q_count=q_count,
        q_entries=torch.from_numpy(q_entries).to(device),
        q_ecount=torch.tensor([len(x) for x in entries_of_qblock], dtype=torch.int32).to(device),
        k_tiles=k_tiles,
        k_count=k_count,
        table=torch.from_numpy(host.astype(np.int32)).reshape(-1, 5).contiguous().to(device)
        if host.size
        else torch.zeros(1, 5, dtype=torch.int32, device=device),
        full_tiles=int((state == 2).sum()),
        masked_tiles=int((state == 1).sum()),
        visible_pairs=visible,
    )


def _union_pairs(intervals, Tk: int) -> int:
    """Number of (query, key) pairs in the union of per-row key intervals (overlaps once)."""
    if not intervals:
        return 0
    rows = np.concatenate([r for r, _, _ in intervals]).astype(np.int64)
    off = rows * (Tk + 1)  # rows apart on one line: intervals of different rows never touch
    lo = np.concatenate([x for _, x, _ in intervals]) + off
    hi = np.concatenate([x for _, _, x in intervals]) + off
    order = np.lexsort((lo, rows))
    lo, hi = lo[order], hi[order]
    reach = np.maximum.accumulate(hi)  # furthest end covered so far
    start = np.maximum(lo, np.concatenate([[lo[0]], reach[:-1]]))
    return int(np.clip(hi - start, 0, None).sum())


# --------------------------------------------------------------------------- builders
def segments_from_cu_seqlens(cu_seqlens: torch.Tensor, causal: bool = True) -> Segments:
    """One entry per packed sequence: packed documents (causal), or a vision encoder's
    per-image / per-window attention (causal=False).

    cu_seqlens: [S+1] int32, 0 = cu[0] <= ... <= cu[S] = T (flash-attn's convention).
    Returns a table of S entries (cu[s], cu[s+1], cu[s], cu[s+1], kind).
    """
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtype=torch.int32)
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must hold at least one entry (0), got an empty tensor")
    check_cu_seqlens(cu_seqlens, int(cu_seqlens[-1]))
    cu = cu_seqlens.detach().cpu().to(torch.int32)
    table = torch.stack([cu[:-1], cu[1:], cu[:-1], cu[1:], torch.full_like(cu[1:], CAUSAL if causal else FULL)], dim=1)
    return Segments(table.contiguous())


def shared_prefix_segments(prompt_lens: Sequence[int], completion_lens: Sequence[Sequence[int]]) -> Segments:
    """GRPO groups packed once each as [prompt | c1 | ... | cG], groups one after another.

    prompt_lens: P prompt lengths (images included); completion_lens: P lists of completion
    lengths (G may differ between groups). The prompt is causal in itself; completion j
    sees the whole prompt (full) and itself (causal), never a sibling. Token layout:
    group p starts where group p-1 ends; its completions follow its prompt in order.
    Returns a table of sum_p (1 + 2 G_p) entries.
    """
    prompt_lens = [int(x) for x in prompt_lens]
    if len(completion_lens) != len(prompt_lens):
        raise ValueError(
            f"completion_lens must hold one list per prompt ({len(prompt_lens)}), got {len(completion_lens)}"
        )
    rows = []
    pos = 0
    for p, (lp, comps) in enumerate(zip(prompt_lens, completion_lens)):
        if lp < 0:
            raise ValueError(f"prompt_lens[{p}] must be >= 0, got {lp}")
        p0, p1 = pos, pos + lp
        rows.append((p0, p1, p0, p1, CAUSAL))
        pos = p1
        for j, lc in enumerate(comps):
            lc = int(lc)
            if lc < 0:
                raise ValueError(f"completion_lens[{p}][{j}] must be >= 0, got {lc}")
            rows.append((pos, pos + lc, p0, p1, FULL))
            rows.append((pos, pos + lc, pos, pos + lc, CAUSAL))
            pos += lc
    return Segments(torch.tensor(rows, dtype=torch.int32).reshape(-1, 5))


def bidirectional_span_segments(cu_seqlens: torch.Tensor, spans: Sequence[Sequence[int]]) -> Segments:
    """Causal text with full attention inside each span (Gemma-3-style images).

    cu_seqlens: [S+1] int32 packed sequences, each causal. spans: (start, end) absolute
    token positions, each inside one sequence, not overlapping one another. A token of a
    span sees every token of its span (and, causally, everything before the span in its
    sequence); a token after the span sees it causally as usual.
    Entries: per sequence, the causal entries of the text runs between spans, and per span
    one full entry (span rows x keys [sequence start, span end)).
    """
    check_cu_seqlens(cu_seqlens, int(cu_seqlens[-1]) if cu_seqlens.numel() else 0)
    cu = cu_seqlens.tolist()
    spans = sorted((int(a), int(b)) for a, b in spans)
    rows = []
    si = 0
    for s in range(len(cu) - 1):
        a, b = cu[s], cu[s + 1]
        cursor = a  # rows before `cursor` are already covered
        while si < len(spans) and spans[si][0] < b:
            s0, s1 = spans[si]
            if s0 < a or s1 > b or s1 < s0:
                raise ValueError(f"spans[{si}]=({s0}, {s1}) must lie inside one sequence, here [{a}, {b})")
            if s0 < cursor:
                raise ValueError(f"spans[{si}]=({s0}, {s1}) overlaps the span before it")
            if s0 > cursor:
                # causal text rows [cursor, s0) over keys [a, s0): bottom-right aligned == plain causal
                rows.append((cursor, s0, a, s0, CAUSAL))
            if s1 > s0:
                rows.append((s0, s1, a, s1, FULL))
            cursor = s1
            si += 1
        if cursor < b:
            rows.append((cursor, b, a, b, CAUSAL))
    if si < len(spans):
        raise ValueError(f"spans[{si}]={spans[si]} lies beyond the last sequence (T={cu[-1]})")
    return Segments(torch.tensor(rows, dtype=torch.int32).reshape(-1, 5))
