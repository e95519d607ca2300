"""Typed values shared by every layer (no I/O, no package imports).

The per-event types (Normalized, Rejected here; TokenCounts, HeaderMeta and QuotaWindow beside
the code that builds them) are plain slotted dataclasses, not frozen ones: a frozen dataclass's
__init__ sets each field through object.__setattr__ (13 fields: 3.4 us against 0.34 us) and it
pickles through generated __getstate__/__setstate__ (Normalized to a normalize worker and back:
3.1 + 2.0 us an item against 1.4 + 0.8). Nothing changes them once built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Normalized:
    """One CPA usage event, ready to store.

    `row` maps events-table column names to values (everything an API may read);
    `private` maps event_private column names (raw fail body, client IP, XFF,
    redacted raw JSON) that no query, API or export ever reads; `ledger_hash`
    is the 16-byte prefix of sha256(event_hash parts) used by the dedup ledger.
    """

    row: dict[str, Any]
    private: dict[str, Any]
    ledger_hash: bytes


@dataclass(frozen=True, slots=True)
class Control:
    """A control payload on the usage stream: `refresh` or `support_refresh`."""

    kind: str


@dataclass(slots=True)
class Rejected:
    """An item that cannot become an event: goes to dead_letters with the reason."""

    reason: str
    payload: bytes


@dataclass(slots=True)
class InsertResult:
    inserted: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    inserted_ids: list[int] = field(default_factory=list)

    def add(self, other: "InsertResult") -> None:
        self.inserted += other.inserted
        self.duplicates += other.duplicates
        self.dead_letters += other.dead_letters
        self.inserted_ids.extend(other.inserted_ids)


# --- read side ----------------------------------------------------------------


class BadRequest(ValueError):
    """The client asked for something invalid (unknown target, bad payload value): a 400."""


class Unavailable(RuntimeError):
    """The store cannot answer now (busy, a query limit hit): a 503."""


@dataclass(frozen=True, slots=True)
class Clause:
    """One filter condition. op: '=', '!=', '=~', '!~', '<', '>'.

    For '=' and '!=' `values` are alternatives (any of them matches); for '=~'
    and '!~' there is one regex; for '<' and '>' one number.
    """

    key: str
    op: str
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TargetSpec:
    """One Grafana target, parsed: what to compute, over which window and filter."""

    target: str
    payload: dict[str, Any]
    from_ms: int
    to_ms: int
    interval_ms: int
    max_data_points: int
    clauses: tuple[Clause, ...]
    now_ms: int


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    type: str  # "time" | "number" | "string" | "boolean"
    values: list[Any]
    config: dict[str, Any] | None = None
    labels: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Frame:
    name: str
    fields: list[Field]
    meta: dict[str, Any] | None = None
