"""Pure, mergeable log-bucket histogram for latency and TTFT percentiles.

DDSketch construction with relative accuracy a = 1 %: bucket i holds the values
in (gamma^(i-1), gamma^i] with gamma = (1 + a) / (1 - a), and a bucket reports
its values as 2 * gamma^i / (gamma + 1), which is within a of every value in it.
Quantiles use nearest rank (the k-th smallest value, k = ceil(q * n)), the rule
the reference uses for p95; values <= 0 (and None) are not samples, again like
the reference, so a sketch only ever holds positive values.

Serialization is sparse and compact: a version byte, the number of buckets, then
per bucket (in index order) a varint index delta (zigzag for the first index)
and a varint count. Two sketches of the same accuracy merge by adding counts,
so hourly sketches add up to daily, monthly, or across dimensions exactly as
the union of their samples would.
"""

from __future__ import annotations

import math
from itertools import accumulate
from typing import Iterable, Mapping

ACCURACY = 0.01
GAMMA = (1 + ACCURACY) / (1 - ACCURACY)
_LOG_GAMMA = math.log(GAMMA)
_MIDPOINT = 2.0 / (GAMMA + 1.0)
FORMAT_VERSION = 1


class SketchError(ValueError):
    """Bytes that are not a serialized sketch of this format."""


def bucket_index(value: float) -> int:
    """The bucket holding a positive value: ceil(log_gamma(value))."""
    return math.ceil(math.log(value) / _LOG_GAMMA)


def bucket_value(index: int) -> float:
    """The value a bucket reports: within ACCURACY of anything stored in it."""
    return GAMMA**index * _MIDPOINT


def rank(q: float, n: int) -> int:
    """Nearest rank k = ceil(q * n), clamped to [1, n], computed without float drift.

    q is taken to 6 decimals, so 0.95 * 100 is exactly 95 (plain floats give
    95.00000000000001 for some n and would pick the 96th value).
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within [0, 1], got {q!r}")
    scaled = round(q * 1_000_000)
    k = (n * scaled + 999_999) // 1_000_000
    return min(max(k, 1), n)


class Sketch:
    """A sparse histogram: bucket index -> count of samples."""

    __slots__ = ("bins", "count")

    def __init__(self, bins: Mapping[int, int] | None = None) -> None:
        self.bins: dict[int, int] = dict(bins) if bins else {}
        self.count: int = sum(self.bins.values())

    def add(self, value: float | None) -> None:
        """Record one sample; None, zero and negative values are ignored."""
        if value is None or value <= 0:
            return
        i = math.ceil(math.log(value) / _LOG_GAMMA)
        bins = self.bins
        bins[i] = bins.get(i, 0) + 1
        self.count += 1

    def extend(self, values: Iterable[float | None]) -> None:
        for value in values:
            self.add(value)

    def merge(self, other: "Sketch") -> None:
        """Add another sketch's samples into this one."""
        bins = self.bins
        for i, c in other.bins.items():
            bins[i] = bins.get(i, 0) + c
        self.count += other.count

    def quantile(self, q: float) -> float | None:
        """Nearest-rank q-quantile estimate; None when there are no samples."""
        if self.count == 0:
            return None
        k = rank(q, self.count)
        seen = 0
        for i in sorted(self.bins):
            seen += self.bins[i]
            if seen >= k:
                return GAMMA**i * _MIDPOINT
        raise AssertionError("bucket counts do not add up to count")  # pragma: no cover

    def quantiles(self, qs: Iterable[float]) -> list[float | None]:
        """Several quantiles in one pass over the sorted buckets."""
        wanted = list(qs)
        if self.count == 0:
            return [None] * len(wanted)
        order = sorted(range(len(wanted)), key=lambda j: wanted[j])
        out: list[float | None] = [None] * len(wanted)
        keys = sorted(self.bins)
        pos, seen = 0, 0
        for j in order:
            k = rank(wanted[j], self.count)
            while seen < k:
                seen += self.bins[keys[pos]]
                pos += 1
            out[j] = GAMMA ** keys[pos - 1] * _MIDPOINT
        return out

    def to_bytes(self) -> bytes:
        return encode(self.bins)

    @classmethod
    def from_bytes(cls, data: bytes | None) -> "Sketch":
        return cls(decode(data)) if data else cls()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sketch) and self.bins == other.bins

    def __repr__(self) -> str:
        return f"Sketch(count={self.count}, buckets={len(self.bins)})"


# --- serialization ------------------------------------------------------------


def _put_varint(out: bytearray, n: int) -> None:
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def encode(bins: Mapping[int, int]) -> bytes:
    """Sparse bytes: version, bucket count, then (index delta, count) varint pairs."""
    out = bytearray((FORMAT_VERSION,))
    keys = sorted(i for i, c in bins.items() if c) if 0 in bins.values() else sorted(bins)
    _put_varint(out, len(keys))
    if not keys:
        return bytes(out)
    first = keys[0]
    _put_varint(out, (first << 1) ^ (first >> 63))  # zigzag: small negatives stay small
    prev = first
    append = out.append
    for i in keys:
        if i != first:
            delta = i - prev
            if delta < 0x80:
                append(delta)
            else:
                _put_varint(out, delta)
            prev = i
        c = bins[i]
        if c < 0x80:
            append(c)
        else:
            _put_varint(out, c)
    return bytes(out)


def _header(data: bytes) -> tuple[int, int, int] | None:
    """(bucket count, first index, offset of the rest), or None when not a simple header."""
    pos, values = 1, []
    for _ in range(2):
        n, shift = 0, 0
        while True:
            if pos >= len(data):
                return None
            b = data[pos]
            pos += 1
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
        values.append(n)
        if values[0] == 0:
            return None
    z = values[1]
    return values[0], (z >> 1) ^ -(z & 1), pos


def decode(data: bytes) -> dict[int, int]:
    """Inverse of encode(); raises SketchError on anything malformed."""
    if not data or data[0] != FORMAT_VERSION:
        raise SketchError("not a sketch (unknown format version)")
    head = _header(data)
    if head is not None:
        # Fast path (most blobs): every delta and count below 128 is one byte, so the rest
        # is count0, delta1, count1, ... and C-level slicing does the work.
        n, first, pos = head
        rest = data[pos:]
        if len(rest) == 2 * n - 1 and (not rest or max(rest) < 0x80):
            deltas = rest[1::2]
            if 0 not in deltas:
                return dict(zip(accumulate(deltas, initial=first), rest[0::2]))
    values: list[int] = []
    n, shift, pos, size = 0, 0, 1, len(data)
    while pos < size:
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b & 0x80:
            shift += 7
            continue
        values.append(n)
        n, shift = 0, 0
    if shift or not values or len(values) != 1 + 2 * values[0]:
        raise SketchError("truncated or malformed sketch")
    bins: dict[int, int] = {}
    z = values[1] if values[0] else 0
    i = (z >> 1) ^ -(z & 1)
    for j in range(1, len(values), 2):
        if j > 1:
            if values[j] == 0:
                raise SketchError("bucket indexes must increase")
            i += values[j]
        bins[i] = values[j + 1]
    return bins


# Decoded bins of blobs merge_bytes() produced lately, keyed by the blob itself, so
# the next merge into the same rollup row skips decoding (the writer merges into
# the same day's blob batch after batch). Content-keyed, so never stale; bounded.
_recent: dict[bytes, dict[int, int]] = {}
_RECENT_MAX = 4096


# Bins of the blobs encoded for the batch being stored (`encode_batch`), keyed by the blob: the
# merge function reads the new side's bins here instead of decoding the blob again. Content-keyed
# like `_recent`; replaced by every batch (`new_batch`), so it holds one batch's blobs at most.
_batch: dict[bytes, Mapping[int, int]] = {}


def new_batch() -> None:
    """Forget the previous batch's encoded blobs."""
    _batch.clear()


def encode_batch(bins: Mapping[int, int]) -> bytes:
    """encode(bins), remembered for merge_bytes until the next batch. The bins must not change."""
    blob = encode(bins)
    _batch[blob] = bins
    return blob


def merge_bytes(a: bytes | None, b: bytes | None) -> bytes | None:
    """Merge two serialized sketches (either may be None); the SQL merge function."""
    if not a:
        return b
    if not b:
        return a
    bins = _recent.pop(a, None)
    if bins is None:
        bins = decode(a)
    added = _batch.get(b)
    for i, c in (decode(b) if added is None else added).items():
        bins[i] = bins.get(i, 0) + c
    merged = encode(bins)
    if len(_recent) >= _RECENT_MAX:
        _recent.clear()
    _recent[merged] = bins
    return merged


def merge_all(blobs: Iterable[bytes | None]) -> Sketch:
    """One sketch from many serialized ones (None entries are skipped)."""
    total = Sketch()
    bins = total.bins
    for blob in blobs:
        if blob:
            for i, c in decode(blob).items():
                bins[i] = bins.get(i, 0) + c
    total.count = sum(bins.values())
    return total
