"""Tier decisions as pure functions (no I/O, no Dagster): one `decide` for every caller.

A month's tier follows the age of its newest row (DESIGN.md section 4): hot under
`hot_days`, cold past `cold_days`, warm between; an empty month ages from its upper bound.
The month's bounds often decide without looking at the data (a month that ended more than
a year ago is cold whatever it holds); only a month straddling a threshold needs its real
newest row, which `bounds_decide` says and `needs_newest` tells the catalog.

`decide(state, now, settings)` turns a catalog `MonthState` into the tier, the action due
(none, warm, archive) and the reason in words; `decide_group` does it for an archive group
(PortfolioSnapshot and PositionSnapshot archive and restore together). The daily
schedule, `warm_tier`, `cold_archive`, the checks and the demo's tier report all ask them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from enum import Enum
from typing import Iterable, Sequence

from wedefi_pipelines import partitioning as p
from wedefi_pipelines.catalog import MonthState, NewestWanted
from wedefi_pipelines.settings import Settings, TierAges

# Layouts and archive orders are table definitions (partitioning.RangeTable); named here too.
WarmLayout = p.WarmLayout
WARM_LAYOUTS: dict[str, p.WarmLayout] = {t.name: t.warm for t in p.TIERED_TABLES}
EXPORT_ORDER: dict[str, tuple[str, ...]] = {t.name: t.export_order for t in p.TIERED_TABLES}
ROW_KEY: dict[str, tuple[str, ...]] = {t.name: t.row_key for t in p.TIERED_TABLES}


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


def needs_newest(now: datetime, settings: Settings) -> NewestWanted:
    """For the catalog: read a child's newest row only where the month's bounds do not decide."""
    return lambda table, month: bounds_decide(month, now, settings.tiers.for_table(table.name)) is None


# -- the decision ------------------------------------------------------------------------------

NO_CHILD = "no child for this month"


class Action(str, Enum):
    NONE = "none"
    WARM = "warm"  # convert to the warm layout (or finish a conversion)
    ARCHIVE = "archive"  # archive to the cold tier (or resume, or take late rows)


@dataclass(frozen=True)
class Decision:
    """What is due for one table's (or one archive group's) month, and why.

    `tier` is the month's tier in PostgreSQL (None when nothing of it is attached);
    `why` the evidence for that tier; `scheduled` False when the daily schedule leaves the
    action to a manual run (a restored month stays restored until someone archives it).
    """

    table: str
    month: date
    tier: Tier | None
    action: Action
    reason: str
    why: str = ""
    scheduled: bool = True


def _tier(month: date, newest: datetime | None, newest_read: bool, now: datetime, ages: TierAges,
          table: str) -> tuple[Tier, str]:
    decided = bounds_decide(month, now, ages)
    if decided is not None:
        return decided, f"the whole month is {decided.value} (its bounds decide)"
    if not newest_read:
        raise ValueError(f"{table} {p.month_year(month)}: straddles a tier threshold and the catalog did not read "
                         "its newest row (read it with newest=needs_newest(now, settings))")
    decision = classify(month, newest, now, ages)
    return decision.tier, decision.reason


def decide(state: MonthState, now: datetime, settings: Settings) -> Decision:
    """The tier of one table's month, the action due and why (pure)."""
    ages = settings.tiers.for_table(state.table)
    month, name = state.month, state.table

    def made(tier: Tier | None, action: Action, reason: str, why: str = "") -> Decision:
        return Decision(name, month, tier, action, reason, why, scheduled=not state.restored)

    if state.frozen:
        return made(None, Action.ARCHIVE, "an archive run stopped half-way: resume it")
    if state.attached:
        tier, why = _tier(month, state.newest, state.newest_read, now, ages, name)
        if tier is Tier.COLD:
            return made(tier, Action.ARCHIVE, f"cold: {why}", why)
        if tier is Tier.HOT:
            return made(tier, Action.NONE, f"not warm yet: {why}", why)
        if state.vacuumed:
            return made(tier, Action.NONE, "already warm: rewritten, BRIN-indexed and frozen", why)
        if state.rewritten:
            return made(tier, Action.WARM, "warm; the rewrite was done, the VACUUM (FREEZE) was not", why)
        return made(tier, Action.WARM, f"warm, not converted yet: {why}", why)
    if state.archived:
        if state.has_default_rows:
            count = "some" if state.default_rows is None else str(state.default_rows)
            return made(None, Action.ARCHIVE, f"{count} late row(s) of an archived month wait in the default partition")
        if state.legacy_objects:
            return made(None, Action.ARCHIVE, f"{len(state.legacy_objects)} archived object(s) in the format-1 Parquet "
                                              "layout: rewrite them and register them in the Iceberg table")
        if state.unregistered_objects:
            return made(None, Action.ARCHIVE, f"{len(state.unregistered_objects)} archived object(s) not in the "
                                              "Iceberg table yet: register them")
        return made(None, Action.NONE, "already archived: nothing left in PostgreSQL for this month")
    if state.has_default_rows:
        decision = classify(month, state.default_newest, now, ages)
        if decision.tier is Tier.COLD:
            return made(None, Action.ARCHIVE, f"cold rows wait in the default partition: {decision.reason}",
                        decision.reason)
        return made(None, Action.NONE, f"not cold yet: rows in the default partition; {decision.reason}",
                    decision.reason)
    decision = classify(month, None, now, ages)
    if decision.tier is Tier.COLD and not state.restored:
        return made(None, Action.ARCHIVE, "nothing in PostgreSQL for a cold month: recorded as archived with 0 rows",
                    decision.reason)
    return made(None, Action.NONE, NO_CHILD, decision.reason)


def group_state(states: Sequence[MonthState]) -> MonthState:
    """An archive group's month as one state: attached if any member is, archived only
    if every member is, its newest row the newest of the members'."""
    first = states[0]
    attached = [s for s in states if s.attached]
    counted = [s.default_rows for s in states]
    statuses = {s.archive_status for s in states}
    return MonthState(
        table=p.range_table(first.table).group, month=first.month,
        child="attached" if attached else ("detached" if any(s.child == "detached" for s in states) else "absent"),
        late_table=any(s.late_table for s in states),
        rewritten=bool(attached) and all(s.rewritten for s in attached),
        vacuumed=bool(attached) and all(s.vacuumed for s in attached),
        archive_status=("archived" if statuses == {"archived"} else "restored" if "restored" in statuses else None),
        archived_rows=sum(s.archived_rows for s in states),
        objects=tuple(o for s in states for o in s.objects),
        default_rows=None if None in counted else sum(counted),
        default_newest=max((s.default_newest for s in states if s.default_newest), default=None),
        newest=max((s.newest for s in attached if s.newest), default=None),
        newest_read=all(s.newest_read for s in attached) if attached else False,
    )


def decide_group(states: Sequence[MonthState], now: datetime, settings: Settings) -> Decision:
    """`decide` for an archive group's month (the members' states, any order)."""
    return decide(group_state(states), now, settings)


# -- groups ---------------------------------------------------------------------------------

def group_tables(table: p.RangeTable | str) -> list[p.RangeTable]:
    """The tables archived and restored with `table`, in a fixed order (locks are taken in it)."""
    group = p.range_table(table).group
    return [t for t in p.TIERED_TABLES if t.group == group]


def groups() -> list[str]:
    return list(dict.fromkeys(t.group for t in p.TIERED_TABLES))


# -- what the daily schedule asks for -----------------------------------------------------------

@dataclass
class DueMonths:
    warm: list[date] = field(default_factory=list)
    cold: list[date] = field(default_factory=list)
    reasons: dict[tuple[str, date], str] = field(default_factory=dict)


def due_months(states: Iterable[MonthState], now: datetime, settings: Settings) -> DueMonths:
    """Months whose warm conversion (per table) or cold archive (per archive group) is due
    and scheduled, from the catalog's states."""
    states = sorted(states, key=lambda s: (s.month, s.table))
    due = DueMonths()
    by_group: dict[tuple[str, date], list[MonthState]] = {}
    for state in states:
        by_group.setdefault((p.range_table(state.table).group, state.month), []).append(state)
        decision = decide(state, now, settings)
        if decision.action is Action.WARM and decision.scheduled:
            due.warm.append(state.month)
            due.reasons[(state.table, state.month)] = decision.reason
    for (group, month), members in sorted(by_group.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        decision = decide_group(members, now, settings)
        if decision.action is Action.ARCHIVE and decision.scheduled:
            due.cold.append(month)
            due.reasons[(group, month)] = decision.reason
    due.warm = sorted(set(due.warm))
    due.cold = sorted(set(due.cold))
    return due
