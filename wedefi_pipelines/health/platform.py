"""What only this project knows about its own health: months provisioned ahead, rows waiting
in default partitions, months past their tier still in PostgreSQL, archived months, and
the age of the cache's values. Read from the month catalog (one decision: `tiering.policy`)
and from Redis; served by the metrics endpoint and judged by the platform check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Iterable

import psycopg

from wedefi_pipelines import catalog
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.health.probes import DEFAULT_TIMEOUT_MS, bounded
from wedefi_pipelines.settings import Settings
from wedefi_pipelines.tiering.policy import Action, decide, decide_group, needs_newest


@dataclass(frozen=True)
class PartitionFigures:
    table: str
    months: int  # monthly children attached
    current_month: bool  # this month's child exists
    months_ahead: int  # consecutive months after this one that already have their child
    default_partition: str | None
    default_rows: int | None  # rows of some month waiting in the default partition
    waiting_completion: int = 0  # rows there with no partition key yet (complete_positions places them)
    overdue_warm: tuple[str, ...] = ()  # months past their tier still in PostgreSQL ('YYYY-MM')
    overdue_cold: tuple[str, ...] = ()


def months_ahead(months: Iterable[date], today: date) -> int:
    have = set(months)
    current, ahead = p.month_of(today), 0
    while p.add_months(current, ahead + 1) in have:
        ahead += 1
    return ahead


def partition_figures(conn: psycopg.Connection, settings: Settings, now: datetime | None = None,
                      timeout_ms: int = DEFAULT_TIMEOUT_MS) -> list[PartitionFigures]:
    """Per range table, from the month catalog: children, the horizon ahead, rows waiting in
    the default partition, and the months whose warm conversion or archive is due and
    scheduled but has not happened (`tiering.policy.decide`, as the daily schedule asks)."""
    now = now or datetime.now(timezone.utc)
    figures = []
    with bounded(conn, timeout_ms):
        tables = catalog.read_catalog(conn, newest=needs_newest(now, settings))
    groups: dict[tuple[str, date], list[catalog.MonthState]] = {}
    for table in tables.values():
        for month, state in table.months.items():
            groups.setdefault((table.table.group, month), []).append(state)
    cold_groups = {key for key, states in groups.items()
                   if (d := decide_group(states, now, settings)).action is Action.ARCHIVE and d.scheduled}
    for name, table in tables.items():
        warm = [p.month_year(m) for m, s in table.months.items()
                if (d := decide(s, now, settings)).action is Action.WARM and d.scheduled]
        cold = [p.month_year(m) for m in table.months if (table.table.group, m) in cold_groups]
        attached = table.attached
        waiting = sum(n or 0 for n in table.default_rows.values())
        figures.append(PartitionFigures(
            name, len(attached), p.month_of(now) in attached, months_ahead(attached, now.date()),
            p.default_name(table.table) if table.has_default else None, waiting if table.has_default else None,
            table.null_key_rows or 0, tuple(warm), tuple(cold)))
    return figures


@dataclass(frozen=True)
class ArchiveFigures:
    table: str
    months: dict[str, int] = field(default_factory=dict)  # by status: archived, restored
    rows: int = 0
    bytes: int = 0
    last_archived_at: datetime | None = None


def archive_figures(conn: psycopg.Connection, timeout_ms: int = DEFAULT_TIMEOUT_MS) -> list[ArchiveFigures]:
    """Archived and restored months per table, their rows and their objects' bytes. The
    metadata records verified months only: a failed verification writes nothing there (it
    fails the cold_archive run, which the run-outcome metrics count)."""
    figures = []
    with bounded(conn, timeout_ms):
        tables = catalog.read_catalog(conn, default_rows="skip")
    for name, table in tables.items():
        states = [s for s in table.months.values() if s.archive_status]
        months: dict[str, int] = {}
        for s in states:
            months[s.archive_status] = months.get(s.archive_status, 0) + 1
        last = max((s.archived_at for s in states if s.archived_at), default=None)
        figures.append(ArchiveFigures(
            name, months, sum(s.archived_rows for s in states), sum(o.size_bytes for s in states for o in s.objects),
            last.replace(tzinfo=timezone.utc) if last else None))
    return figures


@dataclass(frozen=True)
class CacheFigures:
    family: str
    keys: int
    oldest_age_s: float | None  # since the oldest value was computed (or confirmed unchanged)
    unreadable: int  # keys without an expiry: written outside the contract, their age unknown


def cache_figures(client, settings: Settings, batch: int = 1000) -> list[CacheFigures]:
    """Keys per cache family and the age of the oldest one. Every writer stores a value with
    an expiry of computedAt + TTL (cache/contract.py), so its age is TTL - PTTL: read with
    pipelined PTTLs, never the values."""
    from wedefi_pipelines.cache.contract import FAMILIES

    figures = []
    for name, family in FAMILIES.items():
        ttl_ms = family.ttl(settings.cache) * 1000
        count, unreadable, oldest_ms = 0, 0, None
        pending: list[bytes] = []

        def flush() -> None:
            nonlocal unreadable, oldest_ms
            pipe = client.pipeline(transaction=False)
            for key in pending:
                pipe.pttl(key)
            for remaining in pipe.execute():
                if remaining is None or remaining < 0:  # -1: no expiry; -2: gone meanwhile
                    unreadable += 1 if remaining == -1 else 0
                    continue
                age = max(0, ttl_ms - remaining)
                oldest_ms = age if oldest_ms is None or age > oldest_ms else oldest_ms
            pending.clear()

        for key in client.scan_iter(match=family.pattern, count=batch):
            count += 1
            pending.append(key)
            if len(pending) >= batch:
                flush()
        if pending:
            flush()
        figures.append(CacheFigures(name, count, oldest_ms / 1000 if oldest_ms is not None else None, unreadable))
    return figures
