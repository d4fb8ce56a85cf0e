"""What adoption converts, where it keeps its work, and the lock keys it takes (pure: no I/O).

The target layout itself is not here: it comes from `sql/` (replayed into the staging
schema, `model.py`) and from `partitioning` (months, child names, per-child indexes).
This module only says which of the app's tables are converted, which travel together,
and how a column the app does not have ("PositionSnapshot"."capturedAt") is filled.
"""

from __future__ import annotations

from dataclasses import dataclass

from wedefi_pipelines import locks
from wedefi_pipelines import partitioning as p

STAGE = "wedefi_adopt"  # shadow trees, the pipeline's own tables while adopting, bookkeeping
OLD = "wedefi_adopt_old"  # the app's old tables between their swap and their drop
MODEL = "wedefi_adopt_model"  # a rolled-back replay of sql/ for the shape check and the plan
APP_SCHEMA = "public"
APPLICATION_NAME = "wedefi-pipelines:adopt"  # health probes leave these sessions alone
UNPLACED = "wedefi_adopt_unplaced"  # in public, kept: rows the new layout cannot hold
LOG = "adopt_log"  # in STAGE: ids of old-table rows the app changed since capture began
STATE = "adopt_state"  # in STAGE: one row per finished step
PROGRESS = "adopt_progress"  # in STAGE: per table, the copy's next and last heap block
CAPTURE_FUNCTION = "adopt_capture"
CAPTURE_TRIGGER_PREFIX = "wedefi_adopt_capture_"
ROW_MOVE_SETTING = "wedefi.row_move"  # set by the pipeline's own row moves (cascade triggers skip them)

# The twelve app tables this project manages (DESIGN.md section 2); the app's other 21 are
# never touched. The four converted ones must exist as Prisma built them; the others must
# exist with sql/'s columns (the converted tables' foreign keys and the pipeline use them).
MANAGED_TABLES = ("Chain", "Wallet", "Protocol", "Token", "GovernanceLock", "AssetCorrelation", "Alert",
                  "AlertDelivery", "TokenBalance", "PriceSnapshot", "PortfolioSnapshot", "PositionSnapshot")


@dataclass(frozen=True)
class DerivedColumn:
    """A column of the new layout the app's table lacks, copied from a row it references."""

    column: str
    source_table: str
    via: str  # our column holding the source row's id
    source_column: str


@dataclass(frozen=True)
class Converted:
    """One app table the adoption converts."""

    name: str
    range: p.RangeTable | None = None
    hash: p.HashTable | None = None
    derived: DerivedColumn | None = None

    @property
    def time_column(self) -> str | None:
        return self.range.time_column if self.range else None

    @property
    def loader(self) -> str:
        return f"adopt_loader_{self.name}"

    @property
    def loader_default(self) -> str:
        return f"adopt_loader_{self.name}_default"


PRICE = Converted("PriceSnapshot", range=p.PRICE_SNAPSHOT)
BALANCE = Converted("TokenBalance", hash=p.TOKEN_BALANCE)
PORTFOLIO = Converted("PortfolioSnapshot", range=p.PORTFOLIO_SNAPSHOT)
POSITION = Converted("PositionSnapshot", range=p.POSITION_SNAPSHOT,
                     derived=DerivedColumn("capturedAt", "PortfolioSnapshot", "portfolioSnapshotId", "capturedAt"))
CONVERTED: tuple[Converted, ...] = (PRICE, BALANCE, PORTFOLIO, POSITION)
BY_NAME = {c.name: c for c in CONVERTED}

# Tables swapped in one transaction. The app's PositionSnapshot -> PortfolioSnapshot foreign
# key ties those two: swapped apart, new positions would reference a frozen portfolio table.
# Within a group, the order is the app's own lock order (a portfolio before its positions).
GROUPS: tuple[tuple[str, ...], ...] = (("PriceSnapshot",), ("TokenBalance",), ("PortfolioSnapshot", "PositionSnapshot"))


def group_of(table: str) -> tuple[str, ...]:
    for group in GROUPS:
        if table in group:
            return group
    raise ValueError(f"{table!r} is not converted by adoption; expected one of {sorted(BY_NAME)}")


def group_label(group: tuple[str, ...]) -> str:
    return "+".join(group)


def adopt_lock_key() -> int:
    """Session-level advisory lock held by the one running `adopt` (a second one waits, then
    refuses): the lock registry's `adoption`."""
    return locks.advisory_key("adoption")[0]


LOCK_KEYS = {"adoption run (session)": adopt_lock_key()}
