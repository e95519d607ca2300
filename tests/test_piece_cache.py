"""Merged sketch bins kept per rollup piece across requests (query_plan.PieceCache): reused while the
piece's rows are unchanged, recomputed as soon as a late event lands in them, and bounded."""

from __future__ import annotations

import pytest

from datasource import query_plan, rollup, store
from datasource.query_plan import Bins, PieceCache, Reader, _bins
from datasource.sketch import Sketch
from test_rollup import make_event

DAY = rollup.DAY_MS
D1 = 1_777_852_800_000  # 2026-05-04T00:00:00Z
GROUP = ("instance", "account_key")


def _event(n: int, ts_ms: int, account: str, latency: int):
    return make_event(n, ts_ms, provider="codex", account_key=account, status_code=200, latency_ms=latency)


@pytest.fixture()
def loaded(conn):
    query_plan.PIECES.clear()
    store.insert_batch(conn, [
        _event(1, D1 + 1_000, "acct-a", 100), _event(2, D1 + 2_000, "acct-a", 200),
        _event(3, D1 + DAY + 3_000, "acct-a", 300), _event(4, D1 + DAY + 4_000, "acct-b", 40),
    ], origin="test")
    return conn


def _blob_reads(conn, fn) -> tuple[object, list[str]]:
    seen: list[str] = []

    def trace(cursor, sql, bindings):
        if "latency_sketch FROM" in sql:
            seen.append(sql)
        return True

    conn.exec_trace = trace
    try:
        return fn(), seen
    finally:
        conn.exec_trace = None


def test_whole_days_merge_once_then_come_from_the_cache(loaded):
    reader = Reader(loaded, ())
    plan = reader.plan(D1, D1 + 2 * DAY, GROUP, sketches=True)
    assert [p.table for p in plan.pieces] == ["rollup_account_latency_day"]
    first, reads = _blob_reads(loaded, lambda: reader._distribution("latency_ms", D1, D1 + 2 * DAY, GROUP))
    assert len(reads) == 1
    # acct-a: 100, 200, 300 -> nearest-rank p50 200, p99 300 (sketch: within 1 %); acct-b: 40
    a50, a99 = first.percentiles(("default", "acct-a"), [50, 99])
    assert a50 == pytest.approx(200, rel=0.01) and a99 == pytest.approx(300, rel=0.01)
    assert first.percentiles(("default", "acct-b"), [50])[0] == pytest.approx(40, rel=0.01)
    assert first.sketches[("default", "acct-a")].count == 3
    again, reads = _blob_reads(loaded, lambda: reader._distribution("latency_ms", D1, D1 + 2 * DAY, GROUP))
    assert reads == []  # only the fingerprint was read
    assert again.sketches == first.sketches
    # the answer's sketches are copies: changing one leaves the cache as it was
    again.sketches[("default", "acct-a")].bins.clear()
    third = reader._distribution("latency_ms", D1, D1 + 2 * DAY, GROUP)
    assert third.sketches == first.sketches


def test_a_late_event_in_a_cached_day_is_seen_at_once(loaded):
    reader = Reader(loaded, ())
    before = reader._distribution("latency_ms", D1, D1 + 2 * DAY, GROUP)
    assert before.sketches[("default", "acct-a")].count == 3
    store.insert_batch(loaded, [_event(5, D1 + 5_000, "acct-a", 5_000)], origin="test")  # day 1, arrives late
    after, reads = _blob_reads(loaded, lambda: reader._distribution("latency_ms", D1, D1 + 2 * DAY, GROUP))
    assert len(reads) == 1
    a = after.sketches[("default", "acct-a")]
    assert a.count == 4
    # 100, 200, 300, 5000: p50 200 (rank 2), p99 5000 (rank 4)
    assert after.percentiles(("default", "acct-a"), [50, 99]) == pytest.approx([200, 5000], rel=0.01)
    want = Sketch()
    want.extend([100, 200, 300, 5000])
    assert a.bins == want.bins
    # and the same with the cache emptied (computed from the blobs)
    query_plan.PIECES.clear()
    assert reader._distribution("latency_ms", D1, D1 + 2 * DAY, GROUP).sketches == after.sketches


def test_piece_cache_keeps_to_its_budget_oldest_first():
    cache = PieceCache(max_bins=12)  # one piece may hold at most 12 // 4 = 3 bins

    def piece(n_bins: int) -> dict[tuple, Bins]:  # n_bins bins over two groups
        return {("k",): _bins({i: 1 for i in range(n_bins - 1)}), ("j",): _bins({99: 2})}

    entries = {name: piece(3) for name in "abcd"}
    for name, merged in entries.items():
        cache.put((name,), (1,), merged)  # 4 x 3 = 12 bins: all kept
    assert all(cache.get((name,), (1,)) is merged for name, merged in entries.items())
    assert cache.get(("a",), (2,)) is None  # another fingerprint: the rows changed
    e = piece(2)
    cache.put(("e",), (1,), e)  # 12 + 2 > 12: the oldest (a) goes, 11 held
    assert cache.get(("a",), (1,)) is None
    assert [cache.get((name,), (1,)) is not None for name in "bcde"] == [True] * 4
    cache.put(("f",), (1,), piece(4))  # more than a quarter of the budget: not kept, nothing evicted
    assert cache.get(("f",), (1,)) is None and cache.get(("b",), (1,)) is entries["b"]
    small = {("k",): _bins({7: 1})}
    cache.put(("b",), (2,), small)  # replacing an entry frees its 3 bins first: 11 - 3 + 1 = 9 held
    assert cache.get(("b",), (2,)) is small and cache.get(("b",), (1,)) is None
    assert [cache.get((name,), (1,)) is not None for name in "cde"] == [True] * 3
    cache.put(("g",), (1,), piece(3))  # 9 + 3 = 12: nothing evicted
    assert [cache.get((name,), (1,)) is not None for name in "cdeg"] == [True] * 4


def test_cached_bins_are_compact_and_equal_to_the_decoded_sketch():
    """The caches hold (indexes, counts) int64 arrays: 16 bytes a bin, the same bins decode gives."""
    sk = Sketch()
    sk.extend([1, 2, 2, 350, 350, 350, 90_000] + list(range(1, 400)))
    blob = sk.to_bytes()
    indexes, counts = query_plan.decoded(blob)
    assert dict(zip(indexes, counts)) == sk.bins
    assert indexes.itemsize == counts.itemsize == 8 and sum(counts) == 406
    assert query_plan.decoded(blob)[0] is indexes  # the second call is the cached entry


def test_memo_drops_expired_entries_when_it_stores(monkeypatch):
    """An entry past MEMO_TTL_S goes at the next put, not only once 64 are held."""
    clock = [100.0]
    monkeypatch.setattr(query_plan.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(query_plan, "_memo", {})

    class Conn:
        filename = "x.db"

        def total_changes(self) -> int:
            return 0

        def pragma(self, name: str) -> int:
            return 1

    conn = Conn()
    query_plan._memo_put(conn, ("a",), "A")
    clock[0] += query_plan.MEMO_TTL_S / 2
    query_plan._memo_put(conn, ("b",), "B")
    assert query_plan._memo_get(conn, ("a",)) == "A" and len(query_plan._memo) == 2
    clock[0] += query_plan.MEMO_TTL_S * 0.75  # a is now past the TTL, b is not
    query_plan._memo_put(conn, ("c",), "C")
    assert len(query_plan._memo) == 2
    assert query_plan._memo_get(conn, ("a",)) is None
    assert [query_plan._memo_get(conn, (k,)) for k in "bc"] == ["B", "C"]


def test_an_answer_built_on_a_miss_owns_its_bins(loaded):
    reader = Reader(loaded, ())
    first = reader._distribution("latency_ms", D1, D1 + 2 * DAY, GROUP)  # a miss: merged from the blobs
    want = {key: dict(s.bins) for key, s in first.sketches.items()}
    first.sketches[("default", "acct-a")].bins.clear()  # the caller changes what it was given
    again, reads = _blob_reads(loaded, lambda: reader._distribution("latency_ms", D1, D1 + 2 * DAY, GROUP))
    assert reads == []  # a hit, and the cache kept the merged bins as they were
    assert {key: s.bins for key, s in again.sketches.items()} == want
    assert again.sketches[("default", "acct-a")].count == 3
