"""Shared read-side helpers: the per-target context, payload parsing, display masks, percentiles.

No apsw import: the connection arrives already limited and with REGEXP registered (query.py).
The aggregation helpers (`nearest_rank`, `percentiles_by`) are the seams a rollup path replaces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Iterable, Mapping, Sequence

from datasource import filters
from datasource.model import BadRequest, Clause, Field, Frame, TargetSpec


@dataclass(frozen=True)
class Ctx:
    """One target being answered: connection, parsed spec and display options."""

    conn: Any
    spec: TargetSpec
    aliases: Mapping[str, str]
    mask_emails: bool
    rollups: bool = True  # False: every target reads raw events (the reference the tests compare to)

    @cached_property
    def reader(self) -> Any:
        """The range planner's reader for this target (datasource/query_plan.py)."""
        from datasource.query_plan import Reader

        return Reader(self.conn, self.spec.clauses, self.rollups)

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return list(self.conn.execute(sql, tuple(params)))

    def where(self, from_ms: int | None = None, to_ms: int | None = None) -> tuple[str, list[Any]]:
        """`ts_ms` window (default: the spec's) AND every clause, for the events table."""
        return events_where(self.spec.clauses, self.spec.from_ms if from_ms is None else from_ms,
                            self.spec.to_ms if to_ms is None else to_ms, self.conn)

    def account_label(self, label: str | None, key: str | None) -> str:
        text = label or key or "-"
        return mask_email(text) if self.mask_emails else text

    def api_key_label(self, key_hash: str | None, masked: str | None) -> str:
        return api_key_display(key_hash, masked, self.aliases)


def events_where(clauses: Iterable[Clause], from_ms: int, to_ms: int, conn: Any = None) -> tuple[str, list[Any]]:
    """`ts_ms` window AND every clause, as a raw piece of the range planner writes it (with `conn`,
    a search may read its shared matching ids)."""
    from datasource.query_plan import RAW, Piece, Plan

    piece = Piece(RAW, from_ms, to_ms)
    return Plan([piece], None, conn).where(piece, clauses)


def mask_email(text: str) -> str:
    """`alice@example.com` -> `ali***@example.com`; anything without `@` is unchanged."""
    local, at, domain = text.partition("@")
    if not at or not local or not domain:
        return text
    return f"{local[:3]}***@{domain}"


def api_key_display(key_hash: str | None, masked: str | None, aliases: Mapping[str, str]) -> str:
    """Alias when configured, else the masked key, else `sha256:<12 hex>`, else `unknown key`."""
    if not key_hash:
        return "unknown key"
    alias = aliases.get(key_hash)
    if alias:
        return alias
    return masked or f"sha256:{key_hash[:12]}"


def nearest_rank(sorted_values: Sequence[float], pct: int) -> float | None:
    """Nearest-rank percentile over values > 0 (already sorted): the k-th, k = ceil(pct/100 * n)."""
    values = [v for v in sorted_values if v is not None and v > 0]
    if not values:
        return None
    k = max(1, (len(values) * pct + 99) // 100)
    return values[k - 1]


def percentiles_by(rows: Iterable[tuple[Any, float]], pcts: Sequence[int]) -> dict[Any, list[float | None]]:
    """Group `(key, value)` rows and give each key its nearest-rank percentiles."""
    groups: dict[Any, list[float]] = {}
    for key, value in rows:
        groups.setdefault(key, []).append(value)
    return {key: [nearest_rank(sorted(vals), p) for p in pcts] for key, vals in groups.items()}


def ratio(num: float | None, den: float | None, clamp: bool = False) -> float | None:
    if not den:
        return None
    value = (num or 0) / den
    return min(max(value, 0.0), 1.0) if clamp else value


def change_pct(current: float | None, previous: float | None) -> float | None:
    if current is None or not previous:
        return None
    return (current - previous) / previous * 100.0


# --- payload values ------------------------------------------------------------------


def payload_int(payload: Mapping[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    """An integer payload value; above `hi` is capped, malformed or below `lo` is a BadRequest."""
    raw = payload.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise BadRequest(f"payload {name!r}: {raw!r} is not an integer") from None
    if value < lo:
        raise BadRequest(f"payload {name!r}: must be at least {lo}")
    return min(value, hi)


def payload_choice(payload: Mapping[str, Any], name: str, choices: Iterable[str], default: str | None) -> str | None:
    raw = payload.get(name)
    if isinstance(raw, list) and len(raw) == 1:
        raw = raw[0]
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in filters.ALL_VALUES):
        return default
    allowed = list(choices)
    value = str(raw).strip()
    if value not in allowed:
        raise BadRequest(f"payload {name!r}: {value!r} is not one of {', '.join(allowed)}")
    return value


# --- frames ----------------------------------------------------------------------------

Column = tuple[str, str]  # (name, type)


def table_frame(name: str, columns: Sequence[Column], rows: Sequence[Sequence[Any]],
                units: Mapping[str, str] | None = None, meta: dict[str, Any] | None = None) -> Frame:
    """Rows (tuples in column order) -> one data frame with a field per column."""
    units = units or {}
    fields = []
    for i, (col, kind) in enumerate(columns):
        config = {"unit": units[col]} if col in units else None
        fields.append(Field(col, kind, [_clean(row[i]) for row in rows], config))
    return Frame(name=name, fields=fields, meta=meta)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def sort_rows(rows: list[dict[str, Any]], keys: Sequence[tuple[str, bool]]) -> list[dict[str, Any]]:
    """Stable multi-key sort; each key is (column, descending); None sorts last either way."""
    out = list(rows)
    for col, desc in reversed(keys):
        present = [r for r in out if r[col] is not None]
        missing = [r for r in out if r[col] is None]
        out = sorted(present, key=lambda r: r[col], reverse=desc) + missing
    return out


RowFn = Callable[[Ctx], list[Frame]]

UNITS = {
    "success_rate": "percentunit", "failure_rate": "percentunit", "share": "percentunit",
    "cache_hit_rate": "percentunit", "cost_share": "percentunit", "est_cost_usd": "currencyUSD",
    "avg_latency_ms": "ms", "p95_latency_ms": "ms", "latency_ms": "ms", "ttft_ms": "ms",
    "quota_used_pct": "percent", "lag_s": "s",
}
