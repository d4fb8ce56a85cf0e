"""The platform figures that are cheap to read today, for the metrics endpoint: months
provisioned ahead and rows waiting in each default partition (from the partition catalog),
archived months (from the archive metadata tables) and cache key ages (from Redis).

Plain catalog reads of their own, so a scrape never takes a lock the partition or tier
code takes; the month catalog may replace them later.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Iterable

import psycopg
from psycopg import sql

from wedefi_pipelines.health.probes import DEFAULT_TIMEOUT_MS, bounded

_LOWER_BOUND = re.compile(r"FOR VALUES FROM \('(\d{4})-(\d{2})-01")


def _next_month(month: date, n: int = 1) -> date:
    index = month.year * 12 + month.month - 1 + n
    return date(index // 12, index % 12 + 1, 1)


@dataclass(frozen=True)
class PartitionFigures:
    table: str
    months: int  # monthly children attached
    current_month: bool  # this month's child exists
    months_ahead: int  # consecutive months after this one that already have their child
    default_partition: str | None
    default_rows: int | None


def months_ahead(months: Iterable[date], today: date) -> int:
    have = set(months)
    current, ahead = date(today.year, today.month, 1), 0
    while _next_month(current, ahead + 1) in have:
        ahead += 1
    return ahead


def partition_figures(conn: psycopg.Connection, tables: Iterable[str], today: date | None = None,
                      timeout_ms: int = DEFAULT_TIMEOUT_MS) -> list[PartitionFigures]:
    """Per range-partitioned table: its monthly children (by their bounds, whatever their
    names) and the rows sitting in its default partition (which should be none)."""
    today = today or datetime.now(timezone.utc).date()
    figures = []
    with bounded(conn, timeout_ms):
        for table in tables:
            rows = conn.execute(
                """SELECT c.relname, pg_get_expr(c.relpartbound, c.oid)
                     FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                    WHERE i.inhparent = to_regclass(%s)""",
                (sql.Identifier(table).as_string(conn),),
            ).fetchall()
            months, default = [], None
            for name, bound in rows:
                if bound == "DEFAULT":
                    default = name
                elif (match := _LOWER_BOUND.search(bound or "")) is not None:
                    months.append(date(int(match.group(1)), int(match.group(2)), 1))
            default_rows = None
            if default is not None:
                default_rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(default))).fetchone()[0]
            current = date(today.year, today.month, 1)
            figures.append(PartitionFigures(table, len(months), current in months, months_ahead(months, today),
                                            default, default_rows))
    return figures


@dataclass(frozen=True)
class ArchiveFigures:
    table: str
    months: dict[str, int] = field(default_factory=dict)  # by status: archived, restored
    rows: int = 0
    bytes: int = 0
    last_archived_at: datetime | None = None


def archive_figures(conn: psycopg.Connection, tables: Iterable[str],
                    timeout_ms: int = DEFAULT_TIMEOUT_MS) -> list[ArchiveFigures]:
    """Archived months per table and status, their rows and bytes, from "<Table>_archive_metadata"
    (a table without its metadata table is left out). The metadata records verified months
    only: a failed verification writes nothing there (it fails the cold_archive run)."""
    figures = []
    with bounded(conn, timeout_ms):
        for table in tables:
            meta = f"{table}_archive_metadata"
            if conn.execute("SELECT to_regclass(%s)", (sql.Identifier(meta).as_string(conn),)).fetchone()[0] is None:
                continue
            rows = conn.execute(sql.SQL(
                """SELECT status, count(*), coalesce(sum(record_count), 0)::bigint,
                          coalesce(sum(compressed_size), 0)::bigint, max(archived_at)
                     FROM {} GROUP BY status""").format(sql.Identifier(meta))).fetchall()
            last = max((r[4] for r in rows if r[4] is not None), default=None)
            figures.append(ArchiveFigures(
                table, {status: n for status, n, *_ in rows}, sum(r[2] for r in rows), sum(r[3] for r in rows),
                last.replace(tzinfo=timezone.utc) if last else None))
    return figures


@dataclass(frozen=True)
class CacheFigures:
    family: str
    keys: int
    oldest_age_s: float | None  # since the oldest key's computedAt (its value was computed or confirmed)
    unreadable: int  # keys whose computedAt could not be read (not this contract's envelope)


_COMPUTED_AT = re.compile(rb'"computedAt":"([^"]+)"')
_HEAD = 127  # the envelope's fixed prefix (cache/store.py reads the same range)


def cache_figures(client, now: datetime | None = None, batch: int = 1000) -> list[CacheFigures]:
    """Keys per cache family and the age of the oldest one, from the `computedAt` at the head
    of each value (GETRANGE of its first bytes, pipelined: never the whole value)."""
    from wedefi_pipelines.cache.contract import FAMILIES, parse_iso_utc

    now = now or datetime.now(timezone.utc)
    figures = []
    for name, family in FAMILIES.items():
        count, unreadable, oldest = 0, 0, None
        pending: list[bytes] = []

        def flush():
            nonlocal unreadable, oldest
            pipe = client.pipeline(transaction=False)
            for key in pending:
                pipe.getrange(key, 0, _HEAD)
            for head in pipe.execute():
                match = _COMPUTED_AT.search(head or b"")
                try:
                    at = parse_iso_utc(match.group(1).decode()) if match else None
                except ValueError:
                    at = None
                if at is None:
                    unreadable += 1 if head else 0
                    continue
                oldest = at if oldest is None or at < oldest else oldest
            pending.clear()

        for key in client.scan_iter(match=family.pattern, count=batch):
            count += 1
            pending.append(key)
            if len(pending) >= batch:
                flush()
        if pending:
            flush()
        figures.append(CacheFigures(name, count, (now - oldest).total_seconds() if oldest else None, unreadable))
    return figures
