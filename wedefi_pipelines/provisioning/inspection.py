"""What the provisioning checks look at: coverage (attached or archived months), gaps, and
the rows waiting in default partitions, read from the month catalog."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Iterable

import psycopg

from wedefi_pipelines import catalog
from wedefi_pipelines import partitioning as p


@dataclass(frozen=True)
class TableInspection:
    table: str
    attached: tuple[date, ...]
    archived: frozenset[date]
    default_rows: dict[date, int]
    has_default: bool
    null_key_rows: int = 0  # rows waiting in the default with no partition key yet (complete_positions)

    @property
    def covered(self) -> set[date]:
        return set(self.attached) | set(self.archived)


def inspect_table(conn: psycopg.Connection, table: p.RangeTable | str) -> TableInspection:
    state = catalog.read_table(conn, table)
    return TableInspection(
        table=state.table.name,
        attached=tuple(state.attached),
        archived=frozenset(catalog.archived_months(conn, state.table)),
        default_rows={m: n for m, n in state.default_rows.items()},
        has_default=state.has_default,
        null_key_rows=state.null_key_rows or 0,
    )


def inspect_partitions(conn: psycopg.Connection) -> list[TableInspection]:
    return [inspect_table(conn, t) for t in p.RANGE_TABLES]


def missing_horizon_months(covered: Iterable[date], today: date | datetime, months_ahead: int) -> list[date]:
    """Months of [current, current + months_ahead] that are neither attached nor archived."""
    covered = set(covered)
    return [m for m in p.horizon_months(today, months_ahead) if m not in covered]


def gap_months(covered: Iterable[date]) -> list[date]:
    """Months missing between the oldest and the newest covered month."""
    covered = set(covered)
    if not covered:
        return []
    return [m for m in p.months_between(min(covered), max(covered)) if m not in covered]
