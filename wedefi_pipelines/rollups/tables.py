"""The rollup tables (sql/0012_rollups.sql) and the raw tables they summarise.

A family is one raw table and the rollups computed from it: 'price' ("PriceSnapshot" ->
"PriceRollupHourly", then "PriceRollupDaily" from the hourly rows) and 'portfolio'
("PortfolioSnapshot" -> "PortfolioRollupDaily"). The rollup tables are RangeTables defined
in partitioning like their sources, so their monthly children are named and created as
every other child is. The refresh creates their months (provisioning does not); the hourly
one is in partitioning.TIERED_TABLES: warm, then cold like its source (docs/rollups.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Iterable

import psycopg

from wedefi_pipelines import catalog, month_ops
from wedefi_pipelines import partitioning as p


@dataclass(frozen=True)
class Family:
    name: str  # wedefi_rollup_watermark.family
    source: p.RangeTable
    tables: tuple[p.RangeTable, ...]  # in refresh order
    columns: tuple[str, ...]  # the raw columns the rollups read


PRICE = Family("price", p.PRICE_SNAPSHOT, (p.PRICE_ROLLUP_HOURLY, p.PRICE_ROLLUP_DAILY),
               ("tokenId", "priceUsd", "source", "recordedAt", "createdAt"))
PORTFOLIO = Family("portfolio", p.PORTFOLIO_SNAPSHOT, (p.PORTFOLIO_ROLLUP_DAILY,),
                   ("id", "walletId", "totalUsdValue", "capturedAt", "createdAt"))
FAMILIES = {f.name: f for f in (PRICE, PORTFOLIO)}
FAMILY_OF_GROUP = {PRICE.source.group: PRICE, PORTFOLIO.source.group: PORTFOLIO}
RESOLUTIONS = {"1h": p.PRICE_ROLLUP_HOURLY, "1d": p.PRICE_ROLLUP_DAILY}


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown rollup family {name!r}; expected one of {sorted(FAMILIES)}") from None


def ensure_months(conn: psycopg.Connection, fam: Family, months: Iterable[date]) -> None:
    """Create the rollup children of `months` that do not exist yet (a month that exists
    costs no lock on the parent: only the missing ones are created)."""
    months = sorted({p.month_of(m) for m in months})
    for table in fam.tables:
        existing = set(catalog.attached_months(conn, table))
        month_ops.create_months(conn, table, [m for m in months if m not in existing])
