"""What the partition safety sensor decides: does `partition_horizon` have work to do now?

`partition_horizon` runs on its schedules (monthly, and daily as a safety net). Between
them a month can go missing (a child detached by hand, a restore, a horizon shortened
in settings) or rows can land in a default partition (late or early data, an outage of
the schedules). The sensor notices within a minute and requests the same job the
schedules run. It asks only what the job itself would do, through
`plan_horizon`, so it never requests a run that would change nothing (rows
the horizon deliberately leaves in a default partition, such as late rows of an archived
month, do not trigger it).

Plain Python over psycopg: no Dagster here, so the decision is unit-tested directly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime

import psycopg

from wedefi_pipelines import catalog
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.provisioning.horizon import HorizonPlan, plan_horizon

RUN_KEY_PREFIX = "partition_safety"


@dataclass(frozen=True)
class TableWork:
    """What a `partition_horizon` run would do to one range table."""

    table: str
    create: tuple[date, ...]  # months it would create: the horizon, gaps, months with default rows
    drain: tuple[date, ...]  # months whose default-partition rows it would move into their child

    @property
    def pending(self) -> bool:
        return bool(self.create or self.drain)

    def describe(self) -> str:
        parts = []
        if self.create:
            parts.append(f"create {_months(self.create)}")
        if self.drain:
            parts.append(f"drain the default partition of {_months(self.drain)}")
        return f"{self.table}: {', '.join(parts) or 'nothing to do'}"


def _months(months: Sequence[date]) -> str:
    names = [p.month_year(m) for m in months]
    return ", ".join(names) if len(names) <= 3 else f"{names[0]}..{names[-1]} ({len(names)} months)"


def table_work(table: str, plan: HorizonPlan, default_months: Iterable[date]) -> TableWork:
    """The horizon's plan for one table, reduced to what it would change."""
    drain = sorted(set(default_months) - set(plan.left_in_default))
    return TableWork(table, tuple(plan.ensure), tuple(drain))


def run_key(day: date, work: Sequence[TableWork]) -> str | None:
    """None when nothing is pending; else a key naming the day and the work.

    Dagster launches a run key once: the same unfinished work is requested at most once a
    day (a run that failed is not retried in a loop: its failure raises an alert, and the
    next day, or new work, requests again), while different work gets its own run.
    """
    pending = [w for w in work if w.pending]
    if not pending:
        return None
    payload = json.dumps([[w.table, [m.isoformat() for m in w.create], [m.isoformat() for m in w.drain]]
                          for w in sorted(pending, key=lambda w: w.table)])
    return f"{RUN_KEY_PREFIX}:{day.isoformat()}:{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def summary(work: Sequence[TableWork]) -> str:
    pending = [w.describe() for w in work if w.pending]
    if not pending:
        return "every month of the horizon exists and no default partition holds rows to drain"
    return "; ".join(pending)


def pending_work(
    conn: psycopg.Connection, today: date | datetime, months_ahead: int, earliest: date
) -> list[TableWork]:
    """Reads the catalog, the archive metadata and which months have default-partition rows
    (a loose index scan: one probe per month found, however many rows wait there)."""
    work = []
    for table in p.RANGE_TABLES:
        state = catalog.read_table(conn, table, default_rows="probe")
        waiting = state.where(lambda s: s.has_default_rows)
        plan = plan_horizon(today, months_ahead, state.attached, catalog.archived_months(conn, table), waiting,
                            earliest)
        work.append(table_work(table.name, plan, waiting))
    return work
