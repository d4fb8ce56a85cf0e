"""The horizon: the current month and the next N exist for every range table, the default
partitions are drained, gaps are filled, "TokenBalance"'s hash partitions are verified.

Where pg_partman's users get hurt, and what this does instead: data stuck in the default
partition is moved into its month's new child (ensure.py, one transaction per month);
after an outage every missing month between the oldest child and the newest month needed
is filled (archived months count as covered), and no child is created far outside the
data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Iterable, Sequence

import psycopg

from wedefi_pipelines import catalog
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.provisioning.ensure import DEFAULT_POLICY, LockPolicy, MonthOutcome, ensure_months, run_lock
from wedefi_pipelines.provisioning.hash_tables import HashReport, verify_hash_partitions

MIN_MONTHS_AHEAD = 1
MAX_MONTHS_AHEAD = 60


@dataclass(frozen=True)
class HorizonPlan:
    horizon: tuple[date, ...]
    ensure: tuple[date, ...]
    left_in_default: dict[date, str]


def validate_months_ahead(months_ahead: object) -> int:
    if isinstance(months_ahead, bool) or not isinstance(months_ahead, int) or not (
        MIN_MONTHS_AHEAD <= months_ahead <= MAX_MONTHS_AHEAD
    ):
        raise ValueError(
            f"months_ahead must be an integer from {MIN_MONTHS_AHEAD} to {MAX_MONTHS_AHEAD}, got {months_ahead!r}"
        )
    return months_ahead


def plan_horizon(
    today: date | datetime,
    months_ahead: int,
    attached: Iterable[date],
    archived: Iterable[date],
    default_months: Iterable[date],
    earliest: date,
) -> HorizonPlan:
    """Which months the horizon must ensure, and which default rows it must leave alone.

    Ensured: the current month and the next `months_ahead`; every month holding rows in
    the default partition, unless archived (the cold archive takes late rows) or outside
    [min(earliest, oldest child), current + MAX_MONTHS_AHEAD] (a bad timestamp must not
    conjure decades of children); and every missing month between the oldest and the
    newest of all these, so no gap remains. Archived months count as covered.
    """
    months_ahead = validate_months_ahead(months_ahead)
    horizon = p.horizon_months(today, months_ahead)
    attached, archived = set(attached), set(archived)
    covered = attached | archived
    lowest = min([p.month_of(earliest), *covered])
    highest = p.add_months(horizon[0], MAX_MONTHS_AHEAD)
    drain: set[date] = set()
    left: dict[date, str] = {}
    for month in default_months:
        if month in archived:
            left[month] = "archived month: its late rows wait for the cold archive job"
        elif month < lowest:
            left[month] = (f"older than partitions.start ({p.month_year(earliest)}) and every child: "
                           "set partitions.start earlier to drain them, or correct the rows")
        elif month > highest:
            left[month] = (f"more than {MAX_MONTHS_AHEAD} months ahead: most likely a bad timestamp; "
                           "correct the rows (they are kept in the default partition)")
        else:
            drain.add(month)
    span = covered | set(horizon) | drain
    every = set(p.months_between(min(span), max(span)))
    ensure = (every - covered) | (drain & attached)
    return HorizonPlan(tuple(horizon), tuple(sorted(ensure)), left)


@dataclass
class TableReport:
    table: str
    outcomes: list[MonthOutcome] = field(default_factory=list)
    oldest: date | None = None
    newest: date | None = None
    left_in_default: dict[date, tuple[int, str]] = field(default_factory=dict)

    @property
    def created(self) -> list[date]:
        return [o.month for o in self.outcomes if o.action == "created"]

    @property
    def moved(self) -> dict[date, int]:
        return {o.month: o.moved for o in self.outcomes if o.moved}

    @property
    def failed(self) -> list[MonthOutcome]:
        return [o for o in self.outcomes if o.action == "failed"]

    @property
    def skipped(self) -> list[MonthOutcome]:
        return [o for o in self.outcomes if o.action in ("archived", "detached")]

    def summary(self) -> dict:
        return {
            "oldest": p.month_year(self.oldest) if self.oldest else None,
            "newest": p.month_year(self.newest) if self.newest else None,
            "created": [p.month_year(m) for m in self.created],
            "rows_moved_from_default": {p.month_year(m): n for m, n in self.moved.items()},
            "rows_left_in_default": {p.month_year(m): {"rows": n, "reason": why}
                                     for m, (n, why) in self.left_in_default.items()},
            "skipped": {p.month_year(o.month): o.detail for o in self.skipped},
            "failed": {p.month_year(o.month): o.detail for o in self.failed},
        }


@dataclass
class HorizonReport:
    horizon: tuple[date, ...]
    tables: dict[str, TableReport]
    token_balance: HashReport

    @property
    def problems(self) -> list[str]:
        # a failed unit's details name its table and months; a unit of several months fails once
        found = list(dict.fromkeys(o.detail for t in self.tables.values() for o in t.failed))
        return found + list(self.token_balance.problems)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def created_count(self) -> int:
        return sum(len(t.created) for t in self.tables.values())

    @property
    def moved_count(self) -> int:
        return sum(sum(t.moved.values()) for t in self.tables.values())

    @property
    def left_count(self) -> int:
        return sum(n for t in self.tables.values() for n, _ in t.left_in_default.values())

    def rows(self) -> list[tuple[str, str, str, str, int, int]]:
        """Per table: name, oldest child, newest child, months created, rows moved, rows left."""
        return [
            (name, p.month_year(t.oldest) if t.oldest else "-", p.month_year(t.newest) if t.newest else "-",
             ", ".join(p.month_year(m) for m in t.created) or "-", sum(t.moved.values()),
             sum(n for n, _ in t.left_in_default.values()))
            for name, t in self.tables.items()
        ]

    def as_text(self) -> str:
        """A plain-text table of what the run left, for the CLI and the demo."""
        header = ("table", "oldest", "newest", "created", "rows moved", "rows left in default")
        rows = [header, *[tuple(str(v) for v in r) for r in self.rows()]]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        tb = self.token_balance
        lines.append(f"{tb.table}: {len(tb.present)}/{tb.modulus} hash partitions"
                     + (f", recreated {list(tb.created)}" if tb.created else "")
                     + (f"; problems: {'; '.join(tb.problems)}" if tb.problems else ""))
        return "\n".join(lines)


def run_horizon(
    conn: psycopg.Connection,
    months_ahead: int,
    *,
    earliest: date,
    today: date | datetime | None = None,
    policy: LockPolicy = DEFAULT_POLICY,
) -> HorizonReport:
    """Ensure current + `months_ahead` months for every range table, drain the default
    partitions, fill gaps, verify TokenBalance's hash partitions.

    Needs an autocommit connection (session lock; one transaction per unit of work).
    Failures of single months do not stop the others; they are in the report's
    `problems`, and the caller decides to fail.
    """
    months_ahead = validate_months_ahead(months_ahead)
    today = today or datetime.now(timezone.utc)
    tables: dict[str, TableReport] = {}
    horizon: tuple[date, ...] = ()
    with run_lock(conn, policy):
        for table in p.RANGE_TABLES:
            with conn.transaction():
                attached = catalog.attached_months(conn, table)
                archived = catalog.archived_months(conn, table)
                waiting = catalog.default_rows_by_month(conn, table)
            plan = plan_horizon(today, months_ahead, attached, archived, waiting, earliest)
            horizon = plan.horizon
            report = TableReport(table.name)
            report.outcomes = ensure_months(conn, table, plan.ensure, policy=policy, raise_on_failure=False)
            with conn.transaction():
                after = catalog.attached_months(conn, table)
                remaining = catalog.default_rows_by_month(conn, table)
            report.oldest, report.newest = (after[0], after[-1]) if after else (None, None)
            failed = {o.month: o.detail for o in report.failed}
            for month, count in remaining.items():
                reason = plan.left_in_default.get(month) or failed.get(month) or "arrived during the run"
                report.left_in_default[month] = (count, reason)
            tables[table.name] = report
        token_balance = verify_hash_partitions(conn, p.TOKEN_BALANCE, policy=policy)
    return HorizonReport(horizon, tables, token_balance)


def provision_months(
    conn: psycopg.Connection,
    months: Iterable[date],
    *,
    tables: Sequence[p.RangeTable] = p.RANGE_TABLES,
    policy: LockPolicy = DEFAULT_POLICY,
) -> dict[str, list[MonthOutcome]]:
    """Ensure the given months for every range table under the run lock (the backfill
    path of `table_partitions`); failures are reported as outcomes, not raised."""
    months = sorted({p.month_of(m) for m in months})
    with run_lock(conn, policy):
        return {t.name: ensure_months(conn, t, months, policy=policy, raise_on_failure=False) for t in tables}
