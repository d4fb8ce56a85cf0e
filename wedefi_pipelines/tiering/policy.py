"""Tier decisions and tier layouts as pure functions (no I/O, no Dagster).

A month's tier follows the age of its newest row (DESIGN.md section 4): hot under
`hot_days`, cold past `cold_days`, warm between; an empty month ages from its upper bound.
The month's bounds often decide without looking at the data (a month that ended more than
a year ago is cold whatever it holds); only a month straddling a threshold needs its
real newest row, which `bounds_decide` says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from enum import Enum

from wedefi_pipelines import partitioning as p
from wedefi_pipelines.settings import TierAges


class Tier(str, Enum):
    HOT = "hot"
    WARM = "warm"
    COLD = "cold"


@dataclass(frozen=True)
class TierDecision:
    month: date
    tier: Tier
    reason: str


def tier_of_age(age: timedelta, ages: TierAges) -> Tier:
    if age < timedelta(days=ages.hot_days):
        return Tier.HOT
    if age > timedelta(days=ages.cold_days):
        return Tier.COLD
    return Tier.WARM


def bounds_decide(month: date, now: datetime, ages: TierAges) -> Tier | None:
    """The tier when the month's bounds alone decide it, else None (the newest row decides).

    The newest row lies in [start, end), so its age lies in (now - end, now - start];
    an empty month's age is now - end, the youngest end of that range.
    """
    now = p.to_utc_naive(now)
    start, end = p.month_bounds(month)
    youngest, oldest = tier_of_age(now - end, ages), tier_of_age(now - start, ages)
    return youngest if youngest == oldest else None


def classify(month: date, newest: datetime | None, now: datetime, ages: TierAges) -> TierDecision:
    """The month's tier from its newest row (None: the month is empty, its upper bound counts)."""
    now = p.to_utc_naive(now)
    if newest is None:
        reference, what = p.month_bounds(month)[1], "the month is empty; its end"
    else:
        reference, what = p.to_utc_naive(newest), "its newest row"
    age = now - reference
    tier = tier_of_age(age, ages)
    days = age.total_seconds() / 86400
    limits = {Tier.HOT: f"< {ages.hot_days} days", Tier.WARM: f"{ages.hot_days}..{ages.cold_days} days",
              Tier.COLD: f"> {ages.cold_days} days"}
    return TierDecision(month, tier, f"{what} ({reference:%Y-%m-%d %H:%M}) is {days:.1f} days old ({limits[tier]}): {tier.value}")


def classify_months(spans: dict[date, datetime | None], now: datetime, ages: TierAges) -> dict[date, TierDecision]:
    return {month: classify(month, newest, now, ages) for month, newest in sorted(spans.items())}


# -- layouts -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class WarmLayout:
    """How a warm child is laid out: rows rewritten in `order` (the warm workload reads one
    token's or one wallet's history), BRIN over `brin` (columns that correlate with that
    order: a range of pages then holds one key's consecutive times), and the per-child
    btrees in `replaces` dropped, because that order makes them redundant."""

    order: tuple[str, ...]
    brin: tuple[str, ...]
    replaces: tuple[str, ...]
    pages_per_range: int = 16
    sample_key: str = ""  # the column the representative warm query filters on

    def brin_name(self, table: p.RangeTable, month: date) -> str:
        name = f"{p.child_name(table, month)}_{'_'.join(self.brin)}_brin"
        if len(name.encode()) > 63:
            raise ValueError(f"index name {name!r} is longer than 63 bytes")
        return name


WARM_LAYOUTS: dict[str, WarmLayout] = {
    "PriceSnapshot": WarmLayout(
        order=("tokenId", "recordedAt"), brin=("tokenId", "recordedAt"),
        replaces=("tokenId_recordedAt_source_key",), sample_key="tokenId"),
    "PortfolioSnapshot": WarmLayout(
        order=("walletId", "capturedAt"), brin=("walletId", "capturedAt"),
        replaces=("walletId_capturedAt_idx",), sample_key="walletId"),
    "PositionSnapshot": WarmLayout(
        order=("walletId", "capturedAt"), brin=("walletId", "capturedAt"),
        replaces=("walletId_idx",), sample_key="walletId"),
}

# The archive's sort: the warm order (a key's history sits in one or two row groups), then a
# tie-breaker where the warm order has ties. Not a total order on purpose: measured, each
# further sort key costs the export's ORDER BY ~10% more, and nothing needs a byte-identical
# file (the content hash does not depend on row order).
EXPORT_ORDER: dict[str, tuple[str, ...]] = {
    "PriceSnapshot": ("tokenId", "recordedAt", "source"),
    "PortfolioSnapshot": ("walletId", "capturedAt"),
    "PositionSnapshot": ("walletId", "capturedAt", "tokenId"),
}

# Columns that identify a row in error messages.
ROW_KEY: dict[str, tuple[str, ...]] = {
    "PriceSnapshot": ("id", "recordedAt"),
    "PortfolioSnapshot": ("id", "capturedAt", "walletId"),
    "PositionSnapshot": ("id", "capturedAt"),
}


def group_tables(table: p.RangeTable | str) -> list[p.RangeTable]:
    """The tables archived and restored with `table`, in a fixed order (locks are taken in it)."""
    group = p.range_table(table).group if isinstance(table, str) else table.group
    return [t for t in p.RANGE_TABLES if t.group == group]


def groups() -> list[str]:
    return list(dict.fromkeys(t.group for t in p.RANGE_TABLES))


# -- what the daily schedule asks for -----------------------------------------------------------

@dataclass(frozen=True)
class MonthState:
    """What the catalog says about one table's month (see tiering.state)."""

    table: str
    month: date
    attached: bool = False
    warm: bool = False
    frozen: bool = False  # detached or late-row table left by an unfinished archive run
    status: str | None = None  # archive metadata: 'archived', 'restored' or None
    late_rows: int = 0  # rows for the month waiting in the default partition
    newest: datetime | None = None  # only needed when bounds_decide is None
    has_rows: bool = True


@dataclass
class DueMonths:
    warm: list[date] = field(default_factory=list)
    cold: list[date] = field(default_factory=list)
    reasons: dict[tuple[str, date], str] = field(default_factory=dict)


def month_tier(state: MonthState, now: datetime, ages: TierAges) -> Tier:
    decided = bounds_decide(state.month, now, ages)
    if decided is not None:
        return decided
    return classify(state.month, state.newest if state.has_rows else None, now, ages).tier


def due_months(states: list[MonthState], now: datetime, ages_for: dict[str, TierAges]) -> DueMonths:
    """Months whose warm conversion or cold archive is due.

    Warm: an attached month in the warm tier not converted yet. Cold: an attached cold
    month, an unfinished archive (frozen tables), or late rows waiting for an archived
    month. A restored month stays restored until someone archives it again by hand.
    """
    due = DueMonths()
    for state in sorted(states, key=lambda s: (s.month, s.table)):
        key = (state.table, state.month)
        if state.frozen:
            due.cold.append(state.month)
            due.reasons[key] = "an archive run stopped half-way: resume it"
            continue
        if state.status == "archived":
            if state.late_rows:
                due.cold.append(state.month)
                due.reasons[key] = f"{state.late_rows} late row(s) wait in the default partition"
            continue
        if not state.attached or state.status == "restored":
            continue
        tier = month_tier(state, now, ages_for[state.table])
        if tier is Tier.COLD:
            due.cold.append(state.month)
            due.reasons[key] = "cold"
        elif tier is Tier.WARM and not state.warm:
            due.warm.append(state.month)
            due.reasons[key] = "warm, not converted yet"
    due.warm = sorted(set(due.warm))
    due.cold = sorted(set(due.cold))
    return due
