"""What an archive run records: its outcome, and its verified objects and month in
"<Table>_archive_objects" and "<Table>_archive_metadata" (in the transaction that drops
the frozen tables, so the rows are in PostgreSQL or recorded on S3, never both or neither)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime

import psycopg
from psycopg import sql

from wedefi_pipelines import catalog
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.catalog import ARCHIVE_FORMAT
from wedefi_pipelines.resources.archive import ArchiveStore
from wedefi_pipelines.tiering.export import Part
from wedefi_pipelines.tiering.upgrade import Upgrade


@dataclass
class ArchiveOutcome:
    group: str
    month: date
    action: str  # archived | skipped
    reason: str
    parts: list[Part] = field(default_factory=list)
    exported_from: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float | None = None
    swept: list[str] = field(default_factory=list)
    registered: dict[str, int] = field(default_factory=dict)  # table -> objects added to its Iceberg table
    upgraded: list[Upgrade] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(part.rows for part in self.parts)

    @property
    def bytes(self) -> int:
        return sum(part.digest.size for part in self.parts if part.digest)

    def metadata(self, store: ArchiveStore) -> dict:
        meta: dict = {"group": self.group, "month": p.month_year(self.month), "action": self.action, "reason": self.reason}
        if self.action == "archived":
            meta.update({
                "rows": self.rows, "bytes": self.bytes, "exported_from": self.exported_from,
                "objects": [f"{store.uri(x.key)} ({x.table.name}: {x.rows} rows, {x.digest.size if x.digest else 0} B)"
                            for x in self.parts],
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            })
            if self.rows and self.seconds.get("total"):
                meta["rows_per_s"] = round(self.rows / self.seconds["total"])
            if self.peak_rss_mb is not None:
                meta["peak_rss_mb"] = round(self.peak_rss_mb, 1)
        if self.registered:
            meta["registered_in_iceberg"] = self.registered
        if self.upgraded:
            meta["upgraded_objects"] = [f"{store.uri(u.key)} ({u.rows} rows, {u.bytes_before} -> {u.bytes_after} B)"
                                        for u in self.upgraded]
            meta["seconds"] = {k: round(v, 3) for k, v in self.seconds.items()}
        if self.swept:
            meta["removed_leftover_objects"] = self.swept
        return meta


def _naive(value: datetime | None) -> datetime | None:
    return p.to_utc_naive(value) if value is not None else None


def record_parts(conn: psycopg.Connection, store: ArchiveStore, member: p.RangeTable, month: date,
                 parts: list[Part]) -> None:
    """Insert the member's parts into its objects table and (re)write the month's metadata
    row from all of the month's objects, in the caller's transaction. A month that was
    restored is recorded afresh: its restored child held every row, so this export
    supersedes the old objects."""
    month_year = p.month_year(month)
    objects = sql.Identifier(p.archive_objects_name(member))
    meta = sql.Identifier(p.archive_metadata_name(member))
    if catalog.month_state(conn, member, month, default_rows="skip").restored:
        # the restored child held every row: its export supersedes the old objects
        conn.execute(sql.SQL("DELETE FROM {} WHERE month_year = %s").format(objects), (month_year,))
    for part in parts:
        conn.execute(sql.SQL(
            """INSERT INTO {} (object_key, month_year, part, record_count, size_bytes, sha256,
                               crc64nvme, content_hash, min_time, max_time, format_version)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""").format(objects),
            (part.key, month_year, part.part, part.rows, part.digest.size, part.digest.sha256,
             part.digest.crc64nvme, part.pg_hash.total, _naive(part.min_time), _naive(part.max_time),
             ARCHIVE_FORMAT))
    conn.execute(sql.SQL(
        """INSERT INTO {meta} AS m (month_year, record_count, file_path, compressed_size, archived_at,
                                    sha256, min_time, max_time, content_hash, status, restored_at)
           SELECT %(m)s::varchar, sum(record_count), %(path)s::text, sum(size_bytes), CURRENT_TIMESTAMP,
                  encode(sha256(convert_to(string_agg(object_key || ' ' || sha256, E'\\n'
                                           ORDER BY object_key), 'UTF8')), 'hex'),
                  min(min_time), max(max_time), sum(content_hash), 'archived', NULL
             FROM {objects} WHERE month_year = %(m)s
           ON CONFLICT (month_year) DO UPDATE SET
               record_count = EXCLUDED.record_count, file_path = EXCLUDED.file_path,
               compressed_size = EXCLUDED.compressed_size, sha256 = EXCLUDED.sha256,
               min_time = EXCLUDED.min_time, max_time = EXCLUDED.max_time,
               content_hash = EXCLUDED.content_hash, status = 'archived', restored_at = NULL,
               archived_at = CASE WHEN m.status = 'restored' THEN EXCLUDED.archived_at
                                  ELSE m.archived_at END""").format(meta=meta, objects=objects),
        {"m": month_year, "path": store.uri(store.month_prefix(member.name, month))})
