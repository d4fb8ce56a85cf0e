"""Bring an archived month back from S3 into a fresh child, proven identical.

One transaction per archive group: for each table, a bare child named like the month's
(month_ops.staged_month) is loaded from the month's recorded objects (each checked
against its recorded size, SHA-256 and CRC64NVME as it downloads), PostgreSQL then
re-hashes the loaded rows and must find the metadata's record_count and content_hash;
the month's late rows still waiting in the default partition join it; the child gets
its indexes and is attached; the metadata turns 'restored'. Any failure rolls all of it
back, so the month stays archived and nothing half-loaded is ever visible.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import psycopg
import pyarrow.parquet as pq
from psycopg import sql

from wedefi_pipelines import month_ops
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.resources.archive import ArchiveStore
from wedefi_pipelines.resources.database import Database
from wedefi_pipelines.settings import Settings
from wedefi_pipelines.tiering import state
from wedefi_pipelines.tiering.arrow_io import copy_in_csv
from wedefi_pipelines.tiering.columns import archive_columns, hash_kinds
from wedefi_pipelines.tiering.content_hash import ContentHash, row_hash_sql
from wedefi_pipelines.tiering.locks import hold_provisioning_locks, month_lock, set_lock_timeout, with_lock_retries
from wedefi_pipelines.tiering.policy import group_tables

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
    seconds: float = 0.0

    def metadata(self) -> dict:
        return {"group": self.group, "month": p.month_year(self.month), "action": self.action, "reason": self.reason,
                "rows": self.rows, "late_rows_joined": self.late_rows, "seconds": round(self.seconds, 3)}


def pg_content_hash(conn: psycopg.Connection, relation: str, table: str) -> ContentHash:
    """PostgreSQL's count and content hash of a relation, as the archive computes them."""
    kinds = hash_kinds(archive_columns(conn, table))
    count, total = conn.execute(sql.SQL("SELECT count(*), coalesce(sum({h}::numeric), 0) FROM {rel}").format(
        h=row_hash_sql(kinds), rel=sql.Identifier(relation))).fetchone()
    return ContentHash(int(count), int(total))


def _load_object(conn: psycopg.Connection, store: ArchiveStore, relation: str, row: tuple, workdir: Path) -> int:
    key, size, sha256, crc = row
    local = workdir / Path(key).name
    got = store.download(key, local)
    if (got.size, got.sha256, got.crc64nvme) != (size, sha256, crc):
        raise RestoreError(f"{store.uri(key)}: downloaded {got.size} B sha256 {got.sha256} crc {got.crc64nvme}, "
                           f"recorded {size} B sha256 {sha256} crc {crc}")
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
                  settings: Settings | None = None, logger: logging.Logger | None = None) -> RestoreOutcome:
    """Restore the month of `table`'s archive group (PortfolioSnapshot brings PositionSnapshot)."""
    settings = settings or db.settings
    logger = logger or log
    members = group_tables(table)
    group, month_year = members[0].group, p.month_year(p.month_of(month))
    month = p.month_of(month)
    started = time.monotonic()
    with month_lock(db, group, month, settings.tiers.lock_wait_s, logger):
        with db.connect("primary") as conn:
            statuses = {m.name: state.metadata_status(conn, m).get(month) for m in members}
            frozen = {m.name: state.frozen_relations(conn, m, month) for m in members}
            attached = [m.name for m in members if month_ops.is_attached(conn, m, month)]
        if any(frozen.values()):
            raise RestoreError(f"{group} {month_year}: an archive run of this month did not finish "
                               f"({sorted(sum(frozen.values(), []))} are frozen): run cold_archive for it first")
        missing = [name for name, s in statuses.items() if s is None]
        if missing:
            raise RestoreError(f"{group} {month_year} is not archived: no row for {month_year} in "
                               + ", ".join(f'"{n}_archive_metadata"' for n in missing))
        if all(s == "restored" for s in statuses.values()) and len(attached) == len(members):
            return RestoreOutcome(group, month, "skipped", "already restored: the month is attached again")
        if attached:
            raise RestoreError(f"{group} {month_year}: metadata says archived but {attached} have an attached child")

        outcome = RestoreOutcome(group, month, "restored", "restored from S3")

        def attempt() -> None:
            with tempfile.TemporaryDirectory(prefix="wedefi-restore-") as tmp, db.connect("primary") as conn:
                set_lock_timeout(conn, settings)
                hold_provisioning_locks(conn, members)
                for member in members:
                    meta = conn.execute(sql.SQL("SELECT record_count, content_hash FROM {} WHERE month_year = %s").format(
                        sql.Identifier(f"{member.name}_archive_metadata")), (month_year,)).fetchone()
                    objects = conn.execute(sql.SQL(
                        "SELECT object_key, size_bytes, sha256, crc64nvme FROM {} WHERE month_year = %s ORDER BY part"
                    ).format(sql.Identifier(f"{member.name}_archive_objects")), (month_year,)).fetchall()
                    with month_ops.staged_month(conn, member, month) as child:
                        loaded = sum(_load_object(conn, store, child, row, Path(tmp)) for row in objects)
                        found = pg_content_hash(conn, child, member.name)
                        if found != ContentHash(int(meta[0]), int(meta[1])):
                            raise RestoreError(
                                f'{member.name} {month_year}: PostgreSQL counts {found.count} rows with content hash '
                                f"{found.total} after loading {loaded}, the archive recorded {meta[0]} rows, hash {meta[1]}")
                        late = conn.execute(sql.SQL(
                            "WITH moved AS (DELETE FROM {d} WHERE {w} RETURNING *) INSERT INTO {c} SELECT * FROM moved"
                        ).format(d=sql.Identifier(p.default_name(member)), w=p.time_window_sql(member, month),
                                 c=sql.Identifier(child))).rowcount
                    conn.execute(sql.SQL(
                        "UPDATE {} SET status = 'restored', restored_at = CURRENT_TIMESTAMP WHERE month_year = %s"
                    ).format(sql.Identifier(f"{member.name}_archive_metadata")), (month_year,))
                    outcome.rows[member.name] = found.count
                    outcome.late_rows[member.name] = late
                    logger.info("%s %s: restored %d rows (+%d late rows from the default partition)",
                                member.name, month_year, found.count, late)

        with_lock_retries(settings, f"restoring {group} {month_year}", attempt, logger)
        outcome.seconds = time.monotonic() - started
        return outcome
