"""Partition names, bounds and DDL as pure functions (no I/O, no Dagster).

Months are UTC calendar months, `[first day 00:00, next first day 00:00)`, matched to
`timestamp(3) without time zone` columns that hold UTC. Every name is built here, so the
provisioning, ingestion, tiering and restore code agree on them:

    "PriceSnapshot_2025_01"               monthly child
    "PortfolioSnapshot_2025_01_part_0"    hash sub-partition of a monthly child
    "PriceSnapshot_default"               default partition
    "PriceSnapshot_2025_01_late"          late rows frozen by an unfinished archive run
    "PriceSnapshot_archive_metadata"      the cold tier's month rows (and "_archive_objects")
    2025-01-01                            Dagster monthly partition key
    2025-01                               archive metadata month_year
    year=2025/month=01                    S3 key segment
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timezone

from psycopg import sql


@dataclass(frozen=True)
class ChildIndex:
    """A secondary index created on each monthly child by provisioning, not on the parent.

    The warm tier may replace it on an old child (DESIGN.md section 4), which is only
    possible for indexes that do not come from the parent.
    """

    suffix: str
    columns: tuple[str, ...]
    unique: bool = False
    method: str = "btree"


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

    def brin_name(self, table: "RangeTable", month: date) -> str:
        name = f"{child_name(table, month)}_{'_'.join(self.brin)}_brin"
        if len(name.encode()) > 63:
            raise ValueError(f"index name {name!r} is longer than 63 bytes")
        return name


# A warm child's table comment starts with WARM_COMMENT; it contains VACUUMED once the
# conversion's last step (VACUUM (FREEZE, ANALYZE)) finished.
WARM_COMMENT = "wedefi warm tier"
VACUUMED = "vacuumed"


@dataclass(frozen=True)
class RangeTable:
    """A table range-partitioned by month on `time_column`.

    `export_order` is the archive's sort: the warm order, then a tie-breaker where the
    warm order has ties (not a total order on purpose: nothing needs a byte-identical
    file, the content hash does not depend on row order). `row_key` identifies a row in
    error messages.
    """

    name: str
    time_column: str
    child_indexes: tuple[ChildIndex, ...]
    warm: WarmLayout
    export_order: tuple[str, ...]
    row_key: tuple[str, ...]
    hash_column: str | None = None
    hash_modulus: int = 0
    # tables archived and restored as one unit share an archive group
    archive_group: str = ""

    @property
    def group(self) -> str:
        return self.archive_group or self.name


@dataclass(frozen=True)
class HashTable:
    name: str
    hash_column: str
    modulus: int


PRICE_SNAPSHOT = RangeTable(
    name="PriceSnapshot",
    time_column="recordedAt",
    child_indexes=(
        # The app's price_snapshot_token_recorded_idx ("tokenId","recordedAt"), made unique
        # with "source" so a hot month can never hold a duplicate tick; its prefix serves
        # the app's lookups exactly as the app's own index does.
        ChildIndex("tokenId_recordedAt_source_key", ("tokenId", "recordedAt", "source"), unique=True),
    ),
    warm=WarmLayout(order=("tokenId", "recordedAt"), brin=("tokenId", "recordedAt"),
                    replaces=("tokenId_recordedAt_source_key",), sample_key="tokenId"),
    export_order=("tokenId", "recordedAt", "source"),
    row_key=("id", "recordedAt"),
)
PORTFOLIO_SNAPSHOT = RangeTable(
    name="PortfolioSnapshot",
    time_column="capturedAt",
    hash_column="walletId",
    hash_modulus=4,
    archive_group="PortfolioSnapshot",
    child_indexes=(
        ChildIndex("walletId_capturedAt_idx", ("walletId", "capturedAt")),
        ChildIndex("capturedAt_idx", ("capturedAt",)),
    ),
    warm=WarmLayout(order=("walletId", "capturedAt"), brin=("walletId", "capturedAt"),
                    replaces=("walletId_capturedAt_idx",), sample_key="walletId"),
    export_order=("walletId", "capturedAt"),
    row_key=("id", "capturedAt", "walletId"),
)
POSITION_SNAPSHOT = RangeTable(
    name="PositionSnapshot",
    time_column="capturedAt",
    archive_group="PortfolioSnapshot",
    child_indexes=(
        ChildIndex("portfolioSnapshotId_idx", ("portfolioSnapshotId",)),
        ChildIndex("tokenId_idx", ("tokenId",)),
        ChildIndex("walletId_idx", ("walletId",)),
    ),
    warm=WarmLayout(order=("walletId", "capturedAt"), brin=("walletId", "capturedAt"),
                    replaces=("walletId_idx",), sample_key="walletId"),
    export_order=("walletId", "capturedAt", "tokenId"),
    row_key=("id", "capturedAt"),
)
RANGE_TABLES: tuple[RangeTable, ...] = (PRICE_SNAPSHOT, PORTFOLIO_SNAPSHOT, POSITION_SNAPSHOT)


def _rollup(name: str, key: str) -> RangeTable:
    """A rollup table (sql/0012_rollups.sql): monthly on "bucketStart", no per-child index
    (its key is the parent's); warm, it is rewritten in (key, bucketStart) order with a BRIN."""
    return RangeTable(name=name, time_column="bucketStart", child_indexes=(),
                      warm=WarmLayout(order=(key, "bucketStart"), brin=(key, "bucketStart"), replaces=(),
                                      sample_key=key),
                      export_order=(key, "bucketStart"), row_key=(key, "bucketStart"))


PRICE_ROLLUP_HOURLY = _rollup("PriceRollupHourly", "tokenId")
PRICE_ROLLUP_DAILY = _rollup("PriceRollupDaily", "tokenId")
PORTFOLIO_ROLLUP_DAILY = _rollup("PortfolioRollupDaily", "walletId")
ROLLUP_TABLES: tuple[RangeTable, ...] = (PRICE_ROLLUP_HOURLY, PRICE_ROLLUP_DAILY, PORTFOLIO_ROLLUP_DAILY)
# What the hot/warm/cold tiers manage: the snapshot tables the app writes, and the hourly
# price rollup (about a quarter of "PriceSnapshot"'s rows). The daily rollups stay hot.
# Provisioning, adoption and ingestion manage RANGE_TABLES only: the rollups' months are
# created by their refresh.
TIERED_TABLES: tuple[RangeTable, ...] = (*RANGE_TABLES, PRICE_ROLLUP_HOURLY)
RANGE_TABLES_BY_NAME = {t.name: t for t in (*RANGE_TABLES, *ROLLUP_TABLES)}
TOKEN_BALANCE = HashTable(name="TokenBalance", hash_column="walletId", modulus=8)


def range_table(name: "str | RangeTable") -> RangeTable:
    if isinstance(name, RangeTable):
        return name
    try:
        return RANGE_TABLES_BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown range-partitioned table {name!r}; expected one of {sorted(RANGE_TABLES_BY_NAME)}") from None


# -- months ---------------------------------------------------------------------------------

def to_utc_naive(moment: datetime) -> datetime:
    """An aware datetime converted to UTC, a naive one taken as UTC already; tz dropped."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment


def month_of(moment: date | datetime) -> date:
    """The first day of the UTC month containing `moment`."""
    if isinstance(moment, datetime):
        moment = to_utc_naive(moment)
    return date(moment.year, moment.month, 1)


def add_months(month: date, count: int) -> date:
    index = month.year * 12 + (month.month - 1) + count
    return date(index // 12, index % 12 + 1, 1)


def month_bounds(month: date) -> tuple[datetime, datetime]:
    """`[start, next start)` of the month, as naive UTC datetimes."""
    month = month_of(month)
    start = datetime(month.year, month.month, 1)
    nxt = add_months(month, 1)
    return start, datetime(nxt.year, nxt.month, 1)


def months_between(first: date, last: date) -> list[date]:
    """Every month from `first`'s to `last`'s, inclusive (empty if last < first)."""
    first, last = month_of(first), month_of(last)
    months = []
    while first <= last:
        months.append(first)
        first = add_months(first, 1)
    return months


def parse_month(text: str) -> date:
    """'2025-01', '2025-01-01' (a Dagster key) or '2025_01' -> date(2025, 1, 1)."""
    cleaned = text.strip().replace("_", "-")
    parts = cleaned.split("-")
    try:
        if len(parts) == 2:
            year, month = int(parts[0]), int(parts[1])
            return date(year, month, 1)
        if len(parts) == 3:
            parsed = date(int(parts[0]), int(parts[1]), int(parts[2]))
            if parsed.day != 1:
                raise ValueError
            return parsed
    except ValueError:
        pass
    raise ValueError(f"not a month: {text!r} (expected YYYY-MM or a partition key YYYY-MM-01)")


def partition_key(month: date) -> str:
    """Dagster monthly partition key: '2025-01-01'."""
    return month_of(month).isoformat()


def month_year(month: date) -> str:
    """Archive metadata month_year: '2025-01'."""
    return month_of(month).strftime("%Y-%m")


def s3_month_path(month: date) -> str:
    """Hive-style key segment: 'year=2025/month=01'."""
    month = month_of(month)
    return f"year={month.year:04d}/month={month.month:02d}"


# -- names ----------------------------------------------------------------------------------

def child_name(table: RangeTable | str, month: date) -> str:
    name = table if isinstance(table, str) else table.name
    month = month_of(month)
    return f"{name}_{month.year:04d}_{month.month:02d}"


def subpartition_name(table: RangeTable | str, month: date, remainder: int) -> str:
    return f"{child_name(table, month)}_part_{remainder}"


def default_name(table: RangeTable | str) -> str:
    name = table if isinstance(table, str) else table.name
    return f"{name}_default"


def late_name(table: RangeTable | str, month: date) -> str:
    """Where an archive run freezes the month's late rows (moved out of the default partition)."""
    return f"{child_name(table, month)}_late"


def archive_metadata_name(table: RangeTable | str) -> str:
    """The seed's "<Table>_archive_metadata": one row per archived month."""
    return f"{table if isinstance(table, str) else table.name}_archive_metadata"


def archive_objects_name(table: RangeTable | str) -> str:
    """"<Table>_archive_objects": one row per verified Parquet object of a month."""
    return f"{table if isinstance(table, str) else table.name}_archive_objects"


def hash_partition_name(table: HashTable, remainder: int) -> str:
    return f"{table.name}_part_{remainder}"


def leaf_names(table: RangeTable, month: date) -> list[str]:
    """The tables that hold the month's rows: the child, or its hash sub-partitions."""
    if table.hash_column:
        return [subpartition_name(table, month, r) for r in range(table.hash_modulus)]
    return [child_name(table, month)]


def index_name(table: RangeTable, month: date, index: ChildIndex) -> str:
    name = f"{child_name(table, month)}_{index.suffix}"
    if len(name.encode()) > 63:  # PostgreSQL would silently truncate it
        raise ValueError(f"index name {name!r} is longer than 63 bytes")
    return name


def parse_child_name(table: RangeTable | str, relname: str) -> date | None:
    """The month of a monthly child's name, or None if `relname` is not one (default, sub-partition...)."""
    name = table if isinstance(table, str) else table.name
    prefix = name + "_"
    rest = relname[len(prefix):] if relname.startswith(prefix) else ""
    if len(rest) != 7 or rest[4] != "_" or not (rest[:4].isdigit() and rest[5:].isdigit()):
        return None
    month = int(rest[5:])
    if not 1 <= month <= 12:
        return None
    return date(int(rest[:4]), month, 1)


# -- DDL ------------------------------------------------------------------------------------

def _bound(moment: datetime) -> sql.Literal:
    return sql.Literal(moment.strftime("%Y-%m-%d %H:%M:%S"))


def hash_partition_sql(relation: str, parent: str, modulus: int, remainder: int) -> sql.Composed:
    """The one builder of a hash partition (a monthly child's sub-partition, or TokenBalance's)."""
    return sql.SQL("CREATE TABLE IF NOT EXISTS {sub} PARTITION OF {parent} FOR VALUES WITH (MODULUS {m}, REMAINDER {r})"
                   ).format(sub=sql.Identifier(relation), parent=sql.Identifier(parent),
                            m=sql.Literal(modulus), r=sql.Literal(remainder))


def subpartitions_sql(table: RangeTable, month: date) -> list[sql.Composed]:
    """The month's hash sub-partitions (none for a table without a hash column)."""
    return [hash_partition_sql(subpartition_name(table, month, r), child_name(table, month), table.hash_modulus, r)
            for r in range(table.hash_modulus if table.hash_column else 0)]


def _partition_by_hash(table: RangeTable) -> sql.Composable:
    return (sql.SQL(" PARTITION BY HASH ({})").format(sql.Identifier(table.hash_column)) if table.hash_column
            else sql.SQL(""))


def create_child_sql(table: RangeTable, month: date) -> list[sql.Composed]:
    """DDL that creates the month's child, its hash sub-partitions and its per-child indexes.

    Every statement is idempotent (IF NOT EXISTS), so a crashed provisioning re-runs cleanly.
    """
    start, end = month_bounds(month)
    create = sql.SQL("CREATE TABLE IF NOT EXISTS {child} PARTITION OF {parent} FOR VALUES FROM ({start}) TO ({end})").format(
        child=sql.Identifier(child_name(table, month)), parent=sql.Identifier(table.name),
        start=_bound(start), end=_bound(end)) + _partition_by_hash(table)
    return [create, *subpartitions_sql(table, month), *create_child_indexes_sql(table, month)]


def create_bare_child_sql(table: RangeTable, month: date) -> list[sql.Composed]:
    """A standalone table shaped like the parent and named like the month's child (hash
    sub-partitions included), with no index: loaded first, indexed and attached after.
    Not idempotent on purpose: a name already taken is an error."""
    create = sql.SQL("CREATE TABLE {child} (LIKE {parent} INCLUDING DEFAULTS)").format(
        child=sql.Identifier(child_name(table, month)), parent=sql.Identifier(table.name)) + _partition_by_hash(table)
    return [create, *subpartitions_sql(table, month)]


def create_like_sql(relation: str, table: RangeTable) -> sql.Composed:
    """A plain table shaped like the parent (a late-row freezer), if it does not exist."""
    return sql.SQL("CREATE TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS)").format(
        sql.Identifier(relation), sql.Identifier(table.name))


def create_child_indexes_sql(table: RangeTable, month: date, target: str | None = None) -> list[sql.Composed]:
    """CREATE INDEX IF NOT EXISTS for the hot tier's per-child indexes.

    `target` names the relation to index when it is not the attached child itself (a
    bare table being loaded before it is attached, say); the index names stay the child's.
    """
    relation = target or child_name(table, month)
    return [
        sql.SQL("CREATE {unique}INDEX IF NOT EXISTS {name} ON {rel} USING {method} ({cols})").format(
            unique=sql.SQL("UNIQUE " if index.unique else ""),
            name=sql.Identifier(index_name(table, month, index)),
            rel=sql.Identifier(relation),
            method=sql.SQL(index.method),
            cols=sql.SQL(", ").join(sql.Identifier(c) for c in index.columns),
        )
        for index in table.child_indexes
    ]


def bounds_check_name(relation: str) -> str:
    return f"{relation}_bounds"


def bounds_check_sql(table: RangeTable, month: date, relation: str) -> sql.Composed:
    """A CHECK matching the month's bounds on `relation`, so ATTACH PARTITION can skip its scan."""
    start, end = month_bounds(month)
    return sql.SQL(
        "ALTER TABLE {rel} ADD CONSTRAINT {name} CHECK ({col} IS NOT NULL AND {col} >= {start} AND {col} < {end})"
    ).format(
        rel=sql.Identifier(relation),
        name=sql.Identifier(bounds_check_name(relation)),
        col=sql.Identifier(table.time_column),
        start=_bound(start),
        end=_bound(end),
    )


def attach_child_sql(table: RangeTable, month: date, relation: str | None = None) -> sql.Composed:
    start, end = month_bounds(month)
    return sql.SQL("ALTER TABLE {parent} ATTACH PARTITION {child} FOR VALUES FROM ({start}) TO ({end})").format(
        parent=sql.Identifier(table.name),
        child=sql.Identifier(relation or child_name(table, month)),
        start=_bound(start),
        end=_bound(end),
    )


def detach_child_sql(table: RangeTable, month: date) -> sql.Composed:
    return sql.SQL("ALTER TABLE {parent} DETACH PARTITION {child}").format(
        parent=sql.Identifier(table.name), child=sql.Identifier(child_name(table, month))
    )


def drop_table_sql(relation: str) -> sql.Composed:
    return sql.SQL("DROP TABLE {}").format(sql.Identifier(relation))


def time_window_sql(table: RangeTable, month: date) -> sql.Composed:
    """`"col" >= start AND "col" < end` for the month, to filter a parent or the default."""
    start, end = month_bounds(month)
    return sql.SQL("{col} >= {start} AND {col} < {end}").format(
        col=sql.Identifier(table.time_column), start=_bound(start), end=_bound(end)
    )


def horizon_months(today: date | datetime, ahead: int) -> list[date]:
    """The current month and the next `ahead` months."""
    current = month_of(today)
    return [add_months(current, i) for i in range(ahead + 1)]

