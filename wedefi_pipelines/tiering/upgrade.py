"""Rewrite an archived object of an older Parquet layout in the current one: verified, then swapped in.

Objects archived before issue 14 (format 1: Parquet UUID ids, UTC-adjusted milliseconds)
are unreadable by Spark and read differently by other engines (columns.py, docs/tiering.md).
For one recorded object of an archived month, in steps that can each crash:

  staged     the object is downloaded (its recorded size, SHA-256 and CRC64NVME checked),
             converted a row group at a time to the current types (UUIDs printed back to
             their text, UTC-adjusted milliseconds to the same wall time in microseconds),
             written with the archive's own writer, uploaded under $ARCHIVE_PREFIX/_staging/
             (beside the table folders: no glob of a table's folder sees it) and verified
             like any new object (verify.verify_part: S3's checksums, the footer, the schema,
             every row re-hashed): count, content hash and min/max time must equal the ones
             recorded for the object.
  swapped    S3 copies the verified replacement over the original key. A PUT or COPY
             replaces an object atomically: a reader sees the old file or the new one,
             never both and never neither. S3 must then report the verified file's size,
             CRC64NVME and SHA-256 for the key.
  upgraded   one transaction records the object's new size and checksums and format 2,
             refreshes the month's metadata row, and adds the object to the Iceberg table.

Then the staged copy is deleted. Nothing is overwritten or deleted before its replacement
is verified, and the staged copy outlives the swap until the metadata says so. A re-run
resumes: a key whose S3 metadata already says format 2 (swapped, not yet recorded) is
re-verified from S3 and recorded; otherwise the replacement is built again from the
original, which is still in place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import psycopg
import pyarrow.parquet as pq
from psycopg import sql

from wedefi_pipelines import catalog, locks, month_ops
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.catalog import ARCHIVE_FORMAT, ArchiveObject
from wedefi_pipelines.resources.archive import ArchiveStore, FileDigest, file_digest
from wedefi_pipelines.resources.database import Database
from wedefi_pipelines.settings import Settings
from wedefi_pipelines.tiering.arrow_io import current_types
from wedefi_pipelines.tiering.columns import ArchiveColumn
from wedefi_pipelines.tiering.content_hash import ContentHash
from wedefi_pipelines.tiering.export import HASH_FORMAT, ArchiveError, Part, file_schema, parquet_writer
from wedefi_pipelines.tiering.verify import VerificationError, verify_part

if TYPE_CHECKING:
    from wedefi_pipelines.tiering.iceberg import ArchiveTables

log = logging.getLogger(__name__)
FORMAT_METADATA = "wedefi-format-version"  # S3 user metadata (lower case: S3 folds it)

_REFRESH_METADATA = """
UPDATE {meta} AS m SET compressed_size = o.size, sha256 = o.manifest
  FROM (SELECT sum(size_bytes) AS size,
               encode(sha256(convert_to(string_agg(object_key || ' ' || sha256, E'\\n' ORDER BY object_key), 'UTF8')),
                      'hex') AS manifest
          FROM {objects} WHERE month_year = %(m)s) AS o
 WHERE m.month_year = %(m)s
"""


class UpgradeError(ArchiveError):
    """An object cannot be upgraded; the original stays in place and recorded."""


@dataclass
class Upgrade:
    table: str
    key: str
    rows: int
    bytes_before: int
    bytes_after: int
    resumed: bool  # the key already held the verified replacement (a run stopped after the swap)


def object_part(member: p.RangeTable, month: date, obj: ArchiveObject, key: str, path: Path | None,
                digest: FileDigest | None) -> Part:
    """A Part that verify_part checks against what the archive recorded for `obj`."""
    return Part(member, month, obj.part, key, None, path=path, rows=obj.rows,
                pg_hash=ContentHash(obj.rows, obj.content_hash), min_time=obj.min_time, max_time=obj.max_time,
                digest=digest)


def convert(source: Path, target: Path, member: p.RangeTable, month: date, columns: list[ArchiveColumn],
            settings: Settings, obj: ArchiveObject) -> int:
    """Write `source` (any archive format) to `target` in the current one, a row group at a
    time (the same row groups, so the same order and bounded memory)."""
    parquet = pq.ParquetFile(source)
    schema = file_schema(columns)
    writer = parquet_writer(target, member, month, columns, settings)
    rows = 0
    try:
        for index in range(parquet.metadata.num_row_groups):
            group = current_types(parquet.read_row_group(index), schema)
            writer.write_table(group, row_group_size=group.num_rows)
            rows += group.num_rows
        writer.add_key_value_metadata({"wedefi.rows": str(obj.rows), "wedefi.content_hash": str(obj.content_hash),
                                       "wedefi.hash_format": HASH_FORMAT})
    finally:
        writer.close()
    return rows


def upgrade_object(db: Database, store: ArchiveStore, tables: ArchiveTables, member: p.RangeTable, month: date,
                   obj: ArchiveObject, columns: list[ArchiveColumn], settings: Settings, workdir: Path,
                   policy: locks.LockPolicy, on_step: Callable[[str, list[Part]], None],
                   logger: logging.Logger | None = None) -> Upgrade:
    """Rewrite one format-1 object of an archived month (the caller holds the month's lock)."""
    logger = logger or log
    uri = store.uri(obj.key)
    staging = store.staging_key(obj.key)
    head = store.head(obj.key)
    if head is None:
        raise UpgradeError(f"{uri} is recorded but missing on S3: restore it from a backup (nothing was changed)")
    resumed = head.metadata.get(FORMAT_METADATA) == str(ARCHIVE_FORMAT) and head.metadata.get("sha256") != obj.sha256
    if resumed:
        # an earlier run swapped the verified replacement in and stopped before recording it
        digest = FileDigest(head.size, head.metadata.get("sha256", ""), head.crc64nvme or "")
        part = object_part(member, month, obj, obj.key, None, digest)
        try:
            verify_part(store, part, columns, workdir)
        except VerificationError as exc:
            raise UpgradeError(f"{uri} holds a swapped-in replacement that no longer verifies ({exc}); the verified "
                               f"copy is at {store.uri(staging)} if it still exists") from exc
        logger.info("%s: the replacement swapped in by an earlier run verifies; recording it", uri)
    else:
        original = workdir / f"original-{member.name}-{obj.part:05d}.parquet"
        got = store.download(obj.key, original)
        if (got.size, got.sha256, got.crc64nvme) != (obj.size_bytes, obj.sha256, obj.crc64nvme):
            raise UpgradeError(f"{uri}: downloaded {got.size} B sha256 {got.sha256}, recorded {obj.size_bytes} B "
                               f"sha256 {obj.sha256}: the original is not what the archive recorded; nothing changed")
        replacement = workdir / f"upgraded-{member.name}-{obj.part:05d}.parquet"
        convert(original, replacement, member, month, columns, settings, obj)
        original.unlink()
        digest = file_digest(replacement)
        store.upload(replacement, staging, digest, {
            "wedefi-table": member.name, "wedefi-month": p.month_year(month), "wedefi-rows": str(obj.rows),
            "wedefi-content-hash": str(obj.content_hash), "wedefi-hash-format": HASH_FORMAT,
            FORMAT_METADATA: str(ARCHIVE_FORMAT), "wedefi-replaces-sha256": obj.sha256})
        part = object_part(member, month, obj, staging, replacement, digest)
        try:
            verify_part(store, part, columns, workdir)
        except VerificationError:
            store.delete([staging])  # only ever the staged copy: the original is untouched
            raise
        replacement.unlink()
        on_step("staged", [part])
        store.copy(staging, obj.key)
        swapped = store.head(obj.key)
        if swapped is None or (swapped.size, swapped.crc64nvme, swapped.metadata.get("sha256")) != (
                digest.size, digest.crc64nvme, digest.sha256):
            raise UpgradeError(f"{uri}: after the copy S3 reports {swapped and (swapped.size, swapped.crc64nvme)}, "
                               f"the verified replacement is {digest.size} B crc {digest.crc64nvme}; it stays at "
                               f"{store.uri(staging)}: re-run")
        part = object_part(member, month, obj, obj.key, None, digest)
        on_step("swapped", [part])
    _record(db, tables, member, month, obj, digest, policy, logger, on_step, part)
    store.delete([staging])  # the replacement is recorded: its staged copy has served
    logger.info("%s: rewritten in format %d (%d rows, %d -> %d B)%s", uri, ARCHIVE_FORMAT, obj.rows, obj.size_bytes,
                digest.size, " (resumed after the swap)" if resumed else "")
    return Upgrade(member.name, obj.key, obj.rows, obj.size_bytes, digest.size, resumed)


def _record(db: Database, tables: ArchiveTables, member: p.RangeTable, month: date, obj: ArchiveObject,
            digest: FileDigest, policy: locks.LockPolicy, logger: logging.Logger,
            on_step: Callable[[str, list[Part]], None], part: Part) -> None:
    month_year = p.month_year(month)

    def body(conn: psycopg.Connection) -> None:
        objects, meta = sql.Identifier(p.archive_objects_name(member)), sql.Identifier(p.archive_metadata_name(member))
        changed = conn.execute(sql.SQL(
            "UPDATE {} SET size_bytes = %s, sha256 = %s, crc64nvme = %s, format_version = %s"
            " WHERE object_key = %s AND sha256 = %s AND format_version < %s").format(objects),
            (digest.size, digest.sha256, digest.crc64nvme, ARCHIVE_FORMAT, obj.key, obj.sha256, ARCHIVE_FORMAT)).rowcount
        if changed != 1:
            raise UpgradeError(f"{obj.key}: its archive row changed while it was rewritten; re-run")
        conn.execute(sql.SQL(_REFRESH_METADATA).format(meta=meta, objects=objects), {"m": month_year})
        upgraded = catalog.month_state(conn, member, month, default_rows="skip")
        tables.register(conn, member, month, [o for o in upgraded.objects if o.key == obj.key])
        on_step("upgraded", [part])  # inside the transaction: a crash here rolls the record back

    month_ops.locked_transaction(db, [], policy, f"recording the upgrade of {obj.key}", body, logger)
