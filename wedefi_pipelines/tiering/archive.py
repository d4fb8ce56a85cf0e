"""The cold tier: a month leaves PostgreSQL for verified Parquet on S3, and nothing is lost.

One run archives one month of one archive group ("PriceSnapshot", or "PortfolioSnapshot"
with "PositionSnapshot"), under the month's advisory lock, in steps that can each crash:

  frozen     one transaction DETACHes the group's children (plain DETACH under lock_timeout
             with retries: CONCURRENTLY is refused while a default partition exists) and
             moves the month's late rows out of the default partition into "<child>_late".
             No row can reach a frozen table; new rows for the month go to the default.
  exported   each frozen table is streamed with COPY (ORDER BY in the query, so memory
             stays bounded) into zstd Parquet with exact types, while PostgreSQL computes
             every row's 64-bit hash in the same query (tiering/content_hash.py). The
             analytics replica serves it once it has replayed the freeze, else the primary.
  uploaded   each file goes to s3://BUCKET/PREFIX/<Table>/year=YYYY/month=MM/part-NNNNN.parquet
             with a CRC64NVME full-object checksum and our SHA-256 in its metadata.
  verified   S3's size and CRC64NVME (head_object ChecksumMode=ENABLED) and the metadata
             SHA-256 match the file we wrote; the object is downloaded again, its footer
             row count and schema checked, every row re-hashed: count, content hash and
             min/max time must equal what PostgreSQL computed.
  recorded   one transaction checks the frozen tables still hold the exported row counts,
             writes "<Table>_archive_objects" and "<Table>_archive_metadata", and DROPs the
             frozen tables: the metadata and the drop commit together or not at all.

A re-run resumes from whatever is left: frozen tables are exported again (they are the
only copy until the commit) over the same deterministic keys, so a crash never leaves a
duplicate object or row; objects under the month's prefix that no metadata row records
are leftovers of an interrupted run and are deleted. A recorded object is never
overwritten. Rows arriving late for an archived month wait in the default partition
until the month is run again: they become its next part.

Fault injection (tests): $WEDEFI_ARCHIVE_FAULT names a step after which the run raises
(`uploaded`), kills its own process (`uploaded:kill`) or sleeps (`frozen:sleep=3`);
`on_step` is called after each step with the run's parts.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Callable

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from psycopg import sql

from wedefi_pipelines import month_ops
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.resources.archive import ArchiveStore, ArchiveStoreError, FileDigest, file_digest
from wedefi_pipelines.resources.database import Database
from wedefi_pipelines.settings import Settings
from wedefi_pipelines.tiering.arrow_io import (ROW_HASH, UUID_COLUMNS, ExportConversionError, UnrepresentableValue,
                                               copy_batches_apart, find_unrepresentable, select_sql, uuid_type,
                                               uuids_from_text)
from wedefi_pipelines.tiering.copy_out import CopyOutError
from wedefi_pipelines.tiering.columns import ArchiveColumn, archive_columns, hash_kinds
from wedefi_pipelines.tiering.content_hash import ContentHash, row_hash_sql, row_hashes
from wedefi_pipelines.tiering.locks import hold_provisioning_locks, month_lock, set_lock_timeout, with_lock_retries
from wedefi_pipelines.tiering.policy import EXPORT_ORDER, ROW_KEY, Tier, bounds_decide, classify, group_tables
from wedefi_pipelines.tiering import state

log = logging.getLogger(__name__)

FAULT_ENV = "WEDEFI_ARCHIVE_FAULT"
STEPS = ("frozen", "exported", "uploaded", "verified", "recorded", "dropped")
HASH_FORMAT = "wedefi-rowhash-1"


class ArchiveError(RuntimeError):
    """The archive of a month cannot go on; its rows are still in PostgreSQL."""


class VerificationError(ArchiveError):
    """An uploaded object does not prove the rows it should hold; the message says what differs."""


class InjectedFault(RuntimeError):
    """Raised after a step named in $WEDEFI_ARCHIVE_FAULT (tests only)."""


@dataclass
class Part:
    """One object of the run: a frozen table (or an empty month) exported to one file."""

    table: p.RangeTable
    month: date
    part: int
    key: str
    relation: str | None  # None: the table had nothing for the month (recorded with 0 rows)
    path: Path | None = None
    rows: int = 0
    pg_hash: ContentHash = field(default_factory=ContentHash)
    min_time: datetime | None = None
    max_time: datetime | None = None
    digest: FileDigest | None = None
    uuid_columns: tuple[str, ...] = ()


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
        if self.swept:
            meta["removed_leftover_objects"] = self.swept
        return meta


# -- peak memory ---------------------------------------------------------------------------------

def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark of this process (Linux), so the next reading is this run's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# -- one table to one Parquet file ---------------------------------------------------------------

def _time_range(batch: pa.RecordBatch, column: str) -> tuple[datetime | None, datetime | None]:
    if batch.num_rows == 0:
        return None, None
    bounds = pc.min_max(batch.column(column).cast(pa.timestamp(batch.schema.field(column).type.unit)))
    return bounds["min"].as_py(), bounds["max"].as_py()


def _widen(current: tuple, new: tuple) -> tuple:
    lows = [x for x in (current[0], new[0]) if x is not None]
    highs = [x for x in (current[1], new[1]) if x is not None]
    return (min(lows) if lows else None), (max(highs) if highs else None)


def parquet_writer(path: Path, table: p.RangeTable, month: date, columns: list[ArchiveColumn],
                   settings: Settings, uuid_columns: tuple[str, ...] = ()) -> pq.ParquetWriter:
    """zstd Parquet, its sort order declared in the footer. Encodings chosen for these tables:
    dictionaries for repeated values (token, wallet, source...), delta encoding for the
    timestamps (sorted by key then time, consecutive values differ by one tick), plain for
    the unique id and the decimals (a dictionary would only be tried and dropped)."""
    schema = file_schema(columns, uuid_columns).with_metadata({
        "wedefi.table": table.name, "wedefi.month": p.month_year(month), "wedefi.uuid_columns": ",".join(uuid_columns)})
    order = EXPORT_ORDER[table.name]
    names = [c.name for c in columns]
    return pq.ParquetWriter(
        path, schema, compression="zstd", compression_level=settings.archive.zstd_level,
        write_statistics=True, write_page_index=True,
        use_dictionary=[c.name for c in columns if c.kind not in ("numeric", "timestamp") and c.name not in UUID_COLUMNS],
        column_encoding={c.name: "DELTA_BINARY_PACKED" for c in columns if c.kind == "timestamp"},
        sorting_columns=[pq.SortingColumn(names.index(c)) for c in order],
    )


def file_schema(columns: list[ArchiveColumn], uuid_columns: tuple[str, ...] = ()) -> pa.Schema:
    """The Parquet file's Arrow schema: the columns' exact types, UUID where chosen."""
    fields = [pa.field(c.name, uuid_type(), nullable=c.nullable) if c.name in uuid_columns else c.field
              for c in columns]
    return pa.schema(fields)


class _NotUuidAfterAll(Exception):
    """A later batch holds an id that is not a canonical UUID: export the file again as text."""


def export_relation(conn: psycopg.Connection, url: str, table: p.RangeTable, month: date, relation: str,
                    columns: list[ArchiveColumn], path: Path, settings: Settings,
                    try_uuid: bool = True) -> tuple[int, ContentHash, tuple, tuple[str, ...]]:
    """Stream `relation` (read by a helper process on `url`; `conn` is a connection to the
    same server) into a zstd Parquet file sorted by EXPORT_ORDER, in row groups of
    `archive.row_group_rows`. Returns (rows, PostgreSQL's content hash, (min, max) time,
    the columns stored as UUID)."""
    query = select_sql(relation, columns, EXPORT_ORDER[table.name], row_hash_sql(hash_kinds(columns)))
    prelude = [sql.SQL("SET work_mem = {}").format(sql.Literal(f"{settings.archive.export_work_mem_mb}MB"))]
    target_rows = settings.archive.row_group_rows
    candidates = [c.name for c in columns if c.name in UUID_COLUMNS and c.kind == "text"] if try_uuid else []
    total = ContentHash()
    span: tuple = (None, None)
    writer = None
    uuid_columns: tuple[str, ...] = ()
    try:
        pending: list[pa.Table] = []
        pending_rows = 0
        for batch in copy_batches_apart(url, conn, query, columns, prelude, with_row_hash=True):
            total = total + ContentHash.of(batch.column(ROW_HASH).to_numpy())
            data = pa.Table.from_batches([batch.drop_columns([ROW_HASH])])
            span = _widen(span, _time_range(batch, table.time_column))
            if writer is None:
                uuid_columns = tuple(c for c in candidates if uuids_from_text(data.column(c).slice(0, 1000)) is not None)
                writer = parquet_writer(path, table, month, columns, settings, uuid_columns)
            for name in uuid_columns:
                converted = uuids_from_text(data.column(name))
                if converted is None:
                    raise _NotUuidAfterAll(name)
                data = data.set_column(data.schema.get_field_index(name), pa.field(name, uuid_type(), nullable=False),
                                       converted)
            pending.append(data)
            pending_rows += data.num_rows
            while pending_rows >= target_rows:
                merged = pa.concat_tables(pending).combine_chunks()
                writer.write_table(merged.slice(0, target_rows), row_group_size=target_rows)
                rest = merged.slice(target_rows)
                pending, pending_rows = [rest], rest.num_rows
        if writer is None:
            writer = parquet_writer(path, table, month, columns, settings)
        if pending_rows:
            writer.write_table(pa.concat_tables(pending), row_group_size=target_rows)
        writer.add_key_value_metadata({"wedefi.rows": str(total.count), "wedefi.content_hash": str(total.total),
                                       "wedefi.hash_format": HASH_FORMAT})
        writer.close()
    except _NotUuidAfterAll:
        writer.close()
        return export_relation(conn, url, table, month, relation, columns, path, settings, try_uuid=False)
    except (ExportConversionError, CopyOutError) as exc:
        if writer is not None:
            writer.close()
        if isinstance(exc, CopyOutError) and not (exc.sqlstate or "").startswith("22"):
            raise  # not about a value (a lost connection, a recovery conflict...): the caller decides
        with conn.transaction():
            culprit = find_unrepresentable(conn, relation, columns, ROW_KEY[table.name])
        if culprit:
            raise UnrepresentableValue(culprit) from exc
        raise
    return total.count, total, span, uuid_columns


def _row_group_digest(path: Path, index: int, table: p.RangeTable, kinds: dict[str, str]) -> tuple[ContentHash, tuple]:
    group = pq.ParquetFile(path).read_row_group(index)
    return ContentHash.of(row_hashes(group, kinds)), _time_range(group, table.time_column)


def read_back(path: Path, table: p.RangeTable, columns: list[ArchiveColumn], threads: int = 2
              ) -> tuple[int, ContentHash, tuple]:
    """Re-hash a Parquet file row by row, a row group at a time on `threads` threads (numpy
    and Arrow release the GIL): (rows, content hash, (min, max) time)."""
    kinds = hash_kinds(columns)
    groups = pq.ParquetFile(path).metadata.num_row_groups
    total, span = ContentHash(), (None, None)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for content, group_span in pool.map(lambda i: _row_group_digest(path, i, table, kinds), range(groups)):
            total = total + content
            span = _widen(span, group_span)
    return total.count, total, span


def _naive(value: datetime | None) -> datetime | None:
    return p.to_utc_naive(value) if value is not None else None


# -- the run -------------------------------------------------------------------------------------

class Archiver:
    """Archives, verifies and resumes months of one database into one archive store."""

    def __init__(self, db: Database, store: ArchiveStore, settings: Settings | None = None,
                 logger: logging.Logger | None = None, on_step: Callable[[str, list[Part]], None] | None = None,
                 workdir: str | os.PathLike | None = None) -> None:
        self.db = db
        self.store = store
        self.settings = settings or db.settings
        self.log = logger or log
        self.on_step = on_step
        self.workdir = workdir or os.environ.get("WEDEFI_ARCHIVE_TMP") or None

    # -- plumbing -------------------------------------------------------------------------
    def _step(self, name: str, parts: list[Part]) -> None:
        if self.on_step is not None:
            self.on_step(name, parts)
        fault = os.environ.get(FAULT_ENV, "")
        step, _, how = fault.partition(":")
        if step == name:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if how.startswith("sleep="):  # hold the month lock a while, so runs surely overlap
                time.sleep(float(how[len("sleep="):]))
                return
            raise InjectedFault(f"injected fault after step '{name}' ({FAULT_ENV}={fault})")

    def _columns(self, table: p.RangeTable) -> list[ArchiveColumn]:
        with self.db.connect("primary") as conn:
            return archive_columns(conn, table.name)

    # -- decisions ------------------------------------------------------------------------
    def _plan(self, conn: psycopg.Connection, members: list[p.RangeTable], month: date, now: datetime) -> str | None:
        """None when the month must be (or keep being) archived, else why it is skipped."""
        frozen = {m.name: state.frozen_relations(conn, m, month) for m in members}
        if any(frozen.values()):
            return None
        statuses = {m.name: state.metadata_status(conn, m).get(month) for m in members}
        attached = [m for m in members if month_ops.is_attached(conn, m, month)]
        start, end = p.month_bounds(month)
        late = {m.name: conn.execute(sql.SQL("SELECT count(*), max({col}) FROM {d} WHERE {w}").format(
            col=sql.Identifier(m.time_column), d=sql.Identifier(p.default_name(m)), w=p.time_window_sql(m, month))
        ).fetchone() for m in members if not month_ops.is_attached(conn, m, month)}
        ages = self.settings.tiers.for_table(members[0].name)
        if attached:
            decided = bounds_decide(month, now, ages)
            if decided is None:
                newest, _ = state.group_newest(conn, month, members[0])
                decision = classify(month, newest, now, ages)
                decided, why = decision.tier, decision.reason
            else:
                why = f"the whole month is {decided.value} (its bounds decide)"
            return None if decided is Tier.COLD else f"not cold yet: {why}"
        if any(n for n, _ in late.values()):
            if all(s == "archived" for s in statuses.values()):
                return None  # late rows of an archived month: its next part
            newest = max(t for n, t in late.values() if n)
            decision = classify(month, newest, now, ages)
            return None if decision.tier is Tier.COLD else f"not cold yet: rows in the default partition; {decision.reason}"
        if all(s == "archived" for s in statuses.values()):
            return "already archived: nothing left in PostgreSQL for this month"
        decision = classify(month, None, now, ages)
        return None if decision.tier is Tier.COLD else f"not cold yet: {decision.reason}"

    # -- steps ----------------------------------------------------------------------------
    def sweep(self, members: list[p.RangeTable], month: date) -> list[str]:
        """Delete objects under the month's prefixes that no metadata row records."""
        removed: list[str] = []
        for member in members:
            with self.db.connect("primary") as conn:
                recorded = {r[0] for r in conn.execute(sql.SQL("SELECT object_key FROM {} WHERE month_year = %s").format(
                    sql.Identifier(f"{member.name}_archive_objects")), (p.month_year(month),))}
            stray = [k for k in self.store.list_keys(self.store.month_prefix(member.name, month)) if k not in recorded]
            if stray:
                self.log.warning("%s %s: removing %d object(s) no metadata records (left by an interrupted run): %s",
                                 member.name, p.month_year(month), len(stray), stray)
                self.store.delete(stray)
                removed.extend(stray)
        return removed

    def _freeze(self, members: list[p.RangeTable], month: date) -> None:
        def attempt() -> None:
            with self.db.connect("primary") as conn:
                set_lock_timeout(conn, self.settings)
                hold_provisioning_locks(conn, members)
                for member in members:
                    if month_ops.is_attached(conn, member, month):
                        conn.execute(p.detach_child_sql(member, month))
                for member in members:
                    window = p.time_window_sql(member, month)
                    default = sql.Identifier(p.default_name(member))
                    if not conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE {})").format(default, window)).fetchone()[0]:
                        continue
                    late = sql.Identifier(state.late_name(member, month))
                    conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS)").format(
                        late, sql.Identifier(member.name)))
                    moved = conn.execute(sql.SQL(
                        "WITH moved AS (DELETE FROM {d} WHERE {w} RETURNING *) INSERT INTO {late} SELECT * FROM moved"
                    ).format(d=default, w=window, late=late)).rowcount
                    self.log.info("%s %s: %d late row(s) moved from %s into %s", member.name, p.month_year(month),
                                  moved, p.default_name(member), state.late_name(member, month))

        with_lock_retries(self.settings, f"freezing {members[0].group} {p.month_year(month)}", attempt, self.log)

    def _next_parts(self, member: p.RangeTable, month: date) -> tuple[int, str | None]:
        with self.db.connect("primary") as conn:
            row = conn.execute(sql.SQL("SELECT max(part) FROM {} WHERE month_year = %s").format(
                sql.Identifier(f"{member.name}_archive_objects")), (p.month_year(month),)).fetchone()
            status = state.metadata_status(conn, member).get(month)
        return (0 if row[0] is None else row[0] + 1), status

    def _plan_parts(self, members: list[p.RangeTable], month: date) -> list[Part]:
        parts: list[Part] = []
        for member in members:
            with self.db.connect("primary") as conn:
                relations = state.frozen_relations(conn, member, month)
            part, status = self._next_parts(member, month)
            if not relations and status is None:
                relations = [None]  # nothing at all for the month: record it with 0 rows
            for offset, relation in enumerate(relations):
                number = part + offset
                parts.append(Part(member, month, number, self.store.object_key(member.name, month, number), relation))
        return parts

    def _open_export_source(self) -> tuple[psycopg.Connection, str, str]:
        """The analytics replica once it has replayed the freeze, else the primary:
        (a connection, its URL, a label)."""
        urls = self.db.urls
        if urls.get("analytics"):
            with psycopg.connect(urls["primary"], autocommit=True) as primary:
                lsn = primary.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
            try:
                replica = psycopg.connect(urls["analytics"], autocommit=True, connect_timeout=5,
                                          application_name="wedefi-pipelines:archive-export")
            except psycopg.OperationalError as exc:
                self.log.warning("analytics replica unreachable (%s): exporting from the primary", exc)
            else:
                deadline = time.monotonic() + self.settings.archive.replica_catchup_s
                while True:
                    if replica.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()[0]:
                        return replica, urls["analytics"], "analytics replica"
                    if time.monotonic() > deadline:
                        self.log.warning("analytics replica has not replayed the freeze (%s) within %.0fs: "
                                         "exporting from the primary", lsn, self.settings.archive.replica_catchup_s)
                        replica.close()
                        break
                    time.sleep(0.05)
        return (psycopg.connect(urls["primary"], autocommit=True, application_name="wedefi-pipelines:archive-export"),
                urls["primary"], "primary")

    def _export(self, parts: list[Part], workdir: Path) -> str:
        source, url, label = self._open_export_source()
        try:
            for part in parts:
                columns = self._columns(part.table)
                part.path = workdir / f"{part.table.name}-{part.part:05d}.parquet"
                if part.relation is None:
                    parquet_writer(part.path, part.table, part.month, columns, self.settings).close()
                    continue
                try:
                    part.rows, part.pg_hash, span, part.uuid_columns = export_relation(
                        source, url, part.table, part.month, part.relation, columns, part.path, self.settings)
                except CopyOutError as exc:
                    if label == "primary":
                        raise
                    self.log.warning("export from the analytics replica failed (%s): retrying on the primary", exc)
                    source.close()
                    source = psycopg.connect(self.db.urls["primary"], autocommit=True)
                    url, label = self.db.urls["primary"], "primary"
                    part.rows, part.pg_hash, span, part.uuid_columns = export_relation(
                        source, url, part.table, part.month, part.relation, columns, part.path, self.settings)
                part.min_time, part.max_time = span
                self.log.info("%s %s: exported %d rows of %s to %s", part.table.name, p.month_year(part.month),
                              part.rows, part.relation, part.path.name)
        finally:
            source.close()
        return label

    def _upload(self, parts: list[Part]) -> None:
        for part in parts:
            part.digest = file_digest(part.path)
            self.store.upload(part.path, part.key, part.digest, {
                "wedefi-table": part.table.name, "wedefi-month": p.month_year(part.month),
                "wedefi-rows": str(part.rows), "wedefi-content-hash": str(part.pg_hash.total),
                "wedefi-hash-format": HASH_FORMAT,
            })
            self.log.info("uploaded %s (%d bytes)", self.store.uri(part.key), part.digest.size)

    def verify_part(self, part: Part, workdir: Path) -> None:
        """Prove that the object at part.key holds exactly the rows PostgreSQL exported."""
        uri = self.store.uri(part.key)
        head = self.store.head(part.key)
        if head is None:
            raise VerificationError(f"{uri} is missing after its upload")
        expected = part.digest
        problems = []
        if head.size != expected.size:
            problems.append(f"size {head.size} B on S3, {expected.size} B uploaded (truncated or replaced?)")
        if head.crc64nvme != expected.crc64nvme:
            problems.append(f"CRC64NVME {head.crc64nvme} on S3, {expected.crc64nvme} for the uploaded file "
                            "(checksum mismatch: corrupted or replaced after the upload)")
        if head.checksum_type not in (None, "FULL_OBJECT"):
            problems.append(f"checksum type {head.checksum_type}, expected FULL_OBJECT")
        if head.metadata.get("sha256") != expected.sha256:
            problems.append(f"SHA-256 in the object metadata is {head.metadata.get('sha256')}, ours {expected.sha256}")
        if problems:
            raise VerificationError(f"{uri}: " + "; ".join(problems))
        downloaded = workdir / f"verify-{part.table.name}-{part.part:05d}.parquet"
        got = self.store.download(part.key, downloaded)
        if got != expected:
            raise VerificationError(f"{uri}: downloaded {got.size} B sha256 {got.sha256} crc {got.crc64nvme}, "
                                    f"uploaded {expected.size} B sha256 {expected.sha256} crc {expected.crc64nvme}")
        try:
            columns = self._columns(part.table)
            footer = pq.ParquetFile(downloaded)
            if footer.metadata.num_rows != part.rows:
                raise VerificationError(f"{uri}: the footer counts {footer.metadata.num_rows} rows, "
                                        f"PostgreSQL exported {part.rows}")
            expected_schema = file_schema(columns, part.uuid_columns)
            if not footer.schema_arrow.equals(expected_schema, check_metadata=False):
                raise VerificationError(f"{uri}: schema {footer.schema_arrow} differs from {expected_schema}")
            rows, content, span = read_back(downloaded, part.table, columns)
        except (pa.ArrowException, OSError) as exc:
            raise VerificationError(f"{uri}: not a readable Parquet file: {exc}") from exc
        finally:
            downloaded.unlink(missing_ok=True)
        if rows != part.rows or content != part.pg_hash:
            raise VerificationError(f"{uri}: content hash {content.total} over {rows} rows read back, PostgreSQL "
                                    f"computed {part.pg_hash.total} over {part.rows} rows")
        if (_naive(span[0]), _naive(span[1])) != (_naive(part.min_time), _naive(part.max_time)):
            raise VerificationError(f"{uri}: time range {span} read back, {part.min_time}..{part.max_time} exported")
        start, end = p.month_bounds(part.month)
        if rows and not (start <= _naive(span[0]) and _naive(span[1]) < end):
            raise VerificationError(f"{uri}: rows from {span[0]} to {span[1]} fall outside {p.month_year(part.month)}")

    def _verify(self, parts: list[Part], workdir: Path) -> None:
        for part in parts:
            try:
                self.verify_part(part, workdir)
            except VerificationError:
                try:
                    self.store.delete([part.key])
                except ArchiveStoreError as exc:
                    self.log.warning("could not delete the unverified object %s: %s", part.key, exc)
                raise

    def _record_and_drop(self, members: list[p.RangeTable], month: date, parts: list[Part]) -> None:
        month_year = p.month_year(month)

        def attempt() -> None:
            with self.db.connect("primary") as conn:
                set_lock_timeout(conn, self.settings)
                hold_provisioning_locks(conn, members)
                for part in parts:
                    if part.relation is None:
                        continue
                    rel = sql.Identifier(part.relation)
                    conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(rel))
                    now_rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(rel)).fetchone()[0]
                    if now_rows != part.rows:
                        raise ArchiveError(f'"{part.relation}" holds {now_rows} rows, {part.rows} were exported: it '
                                           "changed after the freeze; nothing was dropped, re-run the archive")
                for member in members:
                    objects = sql.Identifier(f"{member.name}_archive_objects")
                    meta = sql.Identifier(f"{member.name}_archive_metadata")
                    if state.metadata_status(conn, member).get(month) == "restored":
                        # the restored child held every row: its export supersedes the old objects
                        conn.execute(sql.SQL("DELETE FROM {} WHERE month_year = %s").format(objects), (month_year,))
                    for part in (x for x in parts if x.table.name == member.name):
                        conn.execute(sql.SQL(
                            """INSERT INTO {} (object_key, month_year, part, record_count, size_bytes, sha256,
                                               crc64nvme, content_hash, min_time, max_time)
                               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""").format(objects),
                            (part.key, month_year, part.part, part.rows, part.digest.size, part.digest.sha256,
                             part.digest.crc64nvme, part.pg_hash.total, _naive(part.min_time), _naive(part.max_time)))
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
                        {"m": month_year, "path": self.store.uri(self.store.month_prefix(member.name, month))})
                self._step("recorded", parts)  # inside the transaction: a crash here rolls the rows back
                for part in parts:
                    if part.relation is not None:
                        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(part.relation)))

        with_lock_retries(self.settings, f"recording {members[0].group} {month_year}", attempt, self.log)

    # -- entry point ----------------------------------------------------------------------
    def archive_month(self, table: p.RangeTable | str, month: date, now: datetime | None = None) -> ArchiveOutcome:
        """Archive (or resume archiving) the month of `table`'s archive group, if it is cold."""
        members = group_tables(table)
        group = members[0].group
        month = p.month_of(month)
        now = now or datetime.now(timezone.utc)
        with month_lock(self.db, group, month, self.settings.tiers.lock_wait_s, self.log):
            with self.db.connect("primary") as conn:
                skip = self._plan(conn, members, month, now)
            if skip is not None:
                swept = self.sweep(members, month) if skip.startswith("already archived") else []
                return ArchiveOutcome(group, month, "skipped", skip, swept=swept)
            started = time.monotonic()
            seconds: dict[str, float] = {}
            swept = self.sweep(members, month)
            self._freeze(members, month)
            seconds["freeze"] = time.monotonic() - started
            self._step("frozen", [])
            parts = self._plan_parts(members, month)
            reset_peak_rss()
            with tempfile.TemporaryDirectory(prefix="wedefi-archive-", dir=self.workdir) as tmp:
                workdir = Path(tmp)
                mark = time.monotonic()
                source = self._export(parts, workdir)
                seconds["export"] = time.monotonic() - mark
                self._step("exported", parts)
                mark = time.monotonic()
                self._upload(parts)
                seconds["upload"] = time.monotonic() - mark
                self._step("uploaded", parts)
                mark = time.monotonic()
                self._verify(parts, workdir)
                seconds["verify"] = time.monotonic() - mark
                self._step("verified", parts)
                peak = peak_rss_mb()
            mark = time.monotonic()
            self._record_and_drop(members, month, parts)
            seconds["record_and_drop"] = time.monotonic() - mark
            self._step("dropped", parts)
            swept += self.sweep(members, month)
            seconds["total"] = time.monotonic() - started
            late_only = all(x.relation and x.relation.endswith("_late") for x in parts)
            reason = "late rows of an archived month" if late_only else "cold"
            self.log.info("%s %s archived: %d rows in %d object(s), %d bytes, %.1fs", group, p.month_year(month),
                          sum(x.rows for x in parts), len(parts), sum(x.digest.size for x in parts), seconds["total"])
            return ArchiveOutcome(group, month, "archived", reason, parts, source, seconds, peak, swept)


def archive_month(db: Database, store: ArchiveStore, table: p.RangeTable | str, month: date,
                  now: datetime | None = None, **kwargs) -> ArchiveOutcome:
    return Archiver(db, store, **kwargs).archive_month(table, month, now)

