"""Bring an archived month back from S3 into a fresh child, proven identical.

One transaction per archive group (month_ops.locked_transaction): for each table, a bare
child named like the month's (month_ops.staged_month) is loaded from the month's recorded objects (each checked
against its recorded size, SHA-256 and CRC64NVME as it downloads), PostgreSQL then
re-hashes the loaded rows and must find the metadata's record_count and content_hash;
the month's late rows still waiting in the default partition join it; the child gets
its indexes and is attached; the metadata turns 'restored'; the month's files leave the
table's Iceberg table (iceberg.py: the catalog is in this database, so the swap of the
table's metadata_location, a compare-and-set, commits in this same transaction). Any
failure rolls all of it back, so the month stays archived, its Iceberg table unchanged,
and nothing half-loaded is ever visible: a reader of PostgreSQL or of the Iceberg table
sees the month's rows exactly once, before and after. `on_step(step)` is called after
"loaded" (each table's rows checked) and "unregistered" (its Iceberg files removed),
inside the transaction (tests crash the restore there).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import psycopg
import pyarrow.parquet as pq
from psycopg import sql

from wedefi_pipelines import catalog, locks, month_ops
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.resources.archive import ArchiveStore
from wedefi_pipelines.resources.database import Database
from wedefi_pipelines.settings import Settings
from wedefi_pipelines.tiering.arrow_io import copy_in_csv
from wedefi_pipelines.tiering.columns import archive_columns, hash_kinds
from wedefi_pipelines.tiering.content_hash import ContentHash, row_hash_sql
from wedefi_pipelines.tiering.policy import group_tables

if TYPE_CHECKING:
    from wedefi_pipelines.tiering.iceberg import ArchiveTables

log = logging.getLogger(__name__)


class RestoreError(RuntimeError):
    """The month cannot be restored (not archived, an archive in progress, a mismatch)."""


@dataclass
class RestoreOutcome:
    group: str
    month: date
    action: str  # restored | skipped
    reason: str
    rows: dict[str, int] = field(default_factory=dict)
    late_rows: dict[str, int] = field(default_factory=dict)
    left_iceberg: dict[str, int] = field(default_factory=dict)  # rows removed from each Iceberg table
    seconds: float = 0.0

    def metadata(self) -> dict:
        return {"group": self.group, "month": p.month_year(self.month), "action": self.action, "reason": self.reason,
                "rows": self.rows, "late_rows_joined": self.late_rows, "removed_from_iceberg": self.left_iceberg,
                "seconds": round(self.seconds, 3)}


def pg_content_hash(conn: psycopg.Connection, relation: str, table: str) -> ContentHash:
    """PostgreSQL's count and content hash of a relation, as the archive computes them."""
    kinds = hash_kinds(archive_columns(conn, table))
    count, total = conn.execute(sql.SQL("SELECT count(*), coalesce(sum({h}::numeric), 0) FROM {rel}").format(
        h=row_hash_sql(kinds), rel=sql.Identifier(relation))).fetchone()
    return ContentHash(int(count), int(total))


def load_object(conn: psycopg.Connection, store: ArchiveStore, relation: str, obj: catalog.ArchiveObject,
                 workdir: Path) -> int:
    key = obj.key
    local = workdir / Path(key).name
    got = store.download(key, local)
    if (got.size, got.sha256, got.crc64nvme) != (obj.size_bytes, obj.sha256, obj.crc64nvme):
        raise RestoreError(f"{store.uri(key)}: downloaded {got.size} B sha256 {got.sha256} crc {got.crc64nvme}, "
                           f"recorded {obj.size_bytes} B sha256 {obj.sha256} crc {obj.crc64nvme}")
    parquet = pq.ParquetFile(local)
    columns = sql.SQL(", ").join(sql.Identifier(n) for n in parquet.schema_arrow.names)
    loaded = 0
    with conn.cursor().copy(sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT csv)").format(
            sql.Identifier(relation), columns)) as copy:
        for batch in parquet.iter_batches(batch_size=65_536):
            copy.write(copy_in_csv(batch))
            loaded += batch.num_rows
    local.unlink()
    return loaded


def restore_month(db: Database, store: ArchiveStore, table: p.RangeTable | str, month: date,
                  settings: Settings | None = None, logger: logging.Logger | None = None,
                  on_step: Callable[[str], None] | None = None) -> RestoreOutcome:
    """Restore the month of `table`'s archive group (PortfolioSnapshot brings PositionSnapshot)."""
    settings = settings or db.settings
    logger = logger or log
    step = on_step or (lambda name: None)
    from wedefi_pipelines.tiering.iceberg import ArchiveTables  # pyiceberg takes ~1 s to import: runs only

    with ArchiveTables(db, store, settings, logger) as tables:
        return _restore(db, store, tables, table, month, settings, logger, step)


def _restore(db: Database, store: ArchiveStore, tables: ArchiveTables, table: p.RangeTable | str, month: date,
             settings: Settings, logger: logging.Logger, step: Callable[[str], None]) -> RestoreOutcome:
    members = group_tables(table)
    group, month_year = members[0].group, p.month_year(p.month_of(month))
    month = p.month_of(month)
    started = time.monotonic()
    policy = locks.tier_policy(settings.tiers)
    with locks.tier_month_lock(db, group, month_year, policy, logger):
        with db.connect("primary") as conn:
            states = {m.name: catalog.month_state(conn, m, month, default_rows="skip") for m in members}
        frozen = sorted(n for s in states.values() for n in s.frozen_relations)
        if frozen:
            raise RestoreError(f"{group} {month_year}: an archive run of this month did not finish "
                               f"({frozen} are frozen): run cold_archive for it first")
        missing = [name for name, s in states.items() if s.archive_status is None]
        if missing:
            raise RestoreError(f"{group} {month_year} is not archived: no row for {month_year} in "
                               + ", ".join(f'"{p.archive_metadata_name(n)}"' for n in missing))
        attached = [name for name, s in states.items() if s.attached]
        if all(s.restored for s in states.values()) and len(attached) == len(members):
            return RestoreOutcome(group, month, "skipped", "already restored: the month is attached again")
        if attached:
            raise RestoreError(f"{group} {month_year}: metadata says archived but {attached} have an attached child")

        outcome = RestoreOutcome(group, month, "restored", "restored from S3")

        def body(conn: psycopg.Connection) -> None:
            with tempfile.TemporaryDirectory(prefix="wedefi-restore-") as tmp:
                for member in members:
                    meta = catalog.month_state(conn, member, month, default_rows="skip")
                    with month_ops.staged_month(conn, member, month) as child:
                        loaded = sum(load_object(conn, store, child, obj, Path(tmp)) for obj in meta.objects)
                        found = pg_content_hash(conn, child, member.name)
                        if found != ContentHash(meta.archived_rows, meta.archived_hash):
                            raise RestoreError(
                                f'{member.name} {month_year}: PostgreSQL counts {found.count} rows with content hash '
                                f"{found.total} after loading {loaded}, the archive recorded {meta.archived_rows} rows, "
                                f"hash {meta.archived_hash}")
                        late = month_ops.move_from_default(conn, member, month, child)
                    step("loaded")
                    conn.execute(sql.SQL(
                        "UPDATE {} SET status = 'restored', restored_at = CURRENT_TIMESTAMP WHERE month_year = %s"
                    ).format(sql.Identifier(p.archive_metadata_name(member))), (month_year,))
                    outcome.left_iceberg[member.name] = _leave_iceberg(conn, tables, member, month, meta)
                    step("unregistered")
                    outcome.rows[member.name] = found.count
                    outcome.late_rows[member.name] = late
                    logger.info("%s %s: restored %d rows (+%d late rows from the default partition)",
                                member.name, month_year, found.count, late)

        month_ops.locked_transaction(db, members, policy, f"restoring {group} {month_year}", body, logger)
        outcome.seconds = time.monotonic() - started
        return outcome


def _leave_iceberg(conn: psycopg.Connection, tables: ArchiveTables, member: p.RangeTable, month: date,
                   meta: catalog.MonthState) -> int:
    """Remove the month's files from the member's Iceberg table in the restore's transaction;
    they must be exactly the rows the archive registered."""
    from wedefi_pipelines.tiering.iceberg import current_location

    if current_location(conn, tables.identifier(member)) is None:
        return 0  # archived before the Iceberg tables existed: nothing registered
    removed = tables.unregister(conn, member, month)
    registered = sum(o.rows for o in meta.objects if o.registered)
    if removed != registered:
        raise RestoreError(f"{member.name} {p.month_year(month)}: the Iceberg table held {removed} rows for the month, "
                           f"the archive registered {registered}; nothing was restored (run the "
                           "iceberg_tables_match_archive check)")
    return removed
