"""The cold tier: a month leaves PostgreSQL for verified Parquet on S3, and nothing is lost.

One run archives one month of one archive group ("PriceSnapshot", or "PortfolioSnapshot"
with "PositionSnapshot"), under the month's advisory lock, in steps that can each crash:

  frozen     one transaction DETACHes the group's children (plain DETACH under lock_timeout
             with retries: CONCURRENTLY is refused while a default partition exists) and
             moves the month's late rows out of the default partition into "<child>_late".
             No row can reach a frozen table; new rows for the month go to the default.
  exported   each frozen table is streamed into zstd Parquet with exact types, PostgreSQL
             hashing every row in the same query (export.py). The analytics replica serves
             it once it has replayed the freeze, else the primary.
  uploaded   each file goes to s3://BUCKET/PREFIX/<Table>/year=YYYY/month=MM/part-NNNNN.parquet
             with a CRC64NVME full-object checksum and our SHA-256 in its metadata.
  verified   the object is proven to hold exactly the exported rows (verify.py).
  recorded   one transaction checks the frozen tables still hold the exported row counts,
             writes "<Table>_archive_objects" and "<Table>_archive_metadata",
  registered adds the new objects to the table's Apache Iceberg table (iceberg.py: the
             catalog lives in this database, so its metadata_location swap is part of
             the same transaction),
  dropped    and DROPs the frozen tables: metadata, registration and drop commit together
             or not at all.

After the month's own work (or alone, for a month archived earlier): its objects in the
format-1 Parquet layout are rewritten, verified and swapped in (upgrade.py), and any
object not in the Iceberg table yet is registered.

Whether a month is due is the catalog's state and `policy.decide_group`'s answer. A
re-run resumes from whatever is left: frozen tables are exported again (they are the
only copy until the commit) over the same deterministic keys, so a crash never leaves a
duplicate object or row; objects under the month's prefix that no metadata row records
are leftovers of an interrupted run and are deleted. A recorded object is never
overwritten. Rows arriving late for an archived month wait in the default partition
until the month is run again: they become its next part. Once rollups are in use, a
month whose rollups are behind its raw rows is skipped (rollups/gate.py). `on_step(step, parts)` is
called after each step (tests crash the run there).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Callable

import psycopg
from psycopg import sql

from wedefi_pipelines import catalog, locks, month_ops
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.catalog import ARCHIVE_FORMAT, MonthState
from wedefi_pipelines.procstats import peak_rss_mb, reset_peak_rss
from wedefi_pipelines.resources.archive import ArchiveStore, ArchiveStoreError, file_digest
from wedefi_pipelines.resources.database import Database
from wedefi_pipelines.rollups import gate as rollups_gate
from wedefi_pipelines.settings import Settings
from wedefi_pipelines.tiering.arrow_io import UnrepresentableValue  # noqa: F401 (raised by export; re-exported)
from wedefi_pipelines.tiering.columns import ArchiveColumn, archive_columns
from wedefi_pipelines.tiering.copy_out import CopyOutError
from wedefi_pipelines.tiering.export import HASH_FORMAT, ArchiveError, Part, export_relation, parquet_writer
from wedefi_pipelines.tiering.policy import NO_CHILD, Action, Tier, decide_group, group_tables, needs_newest
from wedefi_pipelines.tiering.records import ArchiveOutcome, record_parts
from wedefi_pipelines.tiering.upgrade import FORMAT_METADATA, upgrade_object
from wedefi_pipelines.tiering.verify import VerificationError, read_back, verify_part  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

STEPS = ("frozen", "exported", "uploaded", "verified", "recorded", "registered", "dropped")
UPGRADE_STEPS = ("staged", "swapped", "upgraded")
EXPORT_APPLICATION = "wedefi-pipelines:archive-export"


def skip_reason(decision) -> str | None:
    """None when the group's month must be (or keep being) archived, else why it is skipped."""
    if decision.action is Action.ARCHIVE:
        return None
    if decision.tier in (Tier.HOT, Tier.WARM):
        return f"not cold yet: {decision.why}"
    if decision.reason == NO_CHILD:
        return f"not cold yet: {decision.why}"
    return decision.reason


class Archiver:
    """Archives, verifies and resumes months of one database into one archive store."""

    def __init__(self, db: Database, store: ArchiveStore, settings: Settings | None = None,
                 logger: logging.Logger | None = None, on_step: Callable[[str, list[Part]], None] | None = None,
                 workdir: str | os.PathLike | None = None) -> None:
        self.db = db
        self.store = store
        self.settings = settings or db.settings
        self.policy = locks.tier_policy(self.settings.tiers)
        self.log = logger or log
        self.on_step = on_step
        self.workdir = workdir or os.environ.get("WEDEFI_ARCHIVE_TMP") or None  # where exports are staged
        from wedefi_pipelines.tiering.iceberg import ArchiveTables  # pyiceberg takes ~1 s to import: runs only

        self.tables = ArchiveTables(db, store, self.settings, self.log)

    def _step(self, name: str, parts: list[Part]) -> None:
        if self.on_step is not None:
            self.on_step(name, parts)

    def _columns(self, table: p.RangeTable) -> list[ArchiveColumn]:
        with self.db.connect("primary") as conn:
            return archive_columns(conn, table.name)

    # -- steps ----------------------------------------------------------------------------
    def sweep(self, members: list[p.RangeTable], month: date) -> list[str]:
        """Delete objects under the month's prefixes that no metadata row records (left by an
        interrupted run, or superseded by the re-archive of a restored month: old Iceberg
        snapshots that still reference those are expired first), and staged replacements
        whose upgrade was recorded."""
        removed: list[str] = []
        for member in members:
            with self.db.connect("primary") as conn:
                state = catalog.month_state(conn, member, month, default_rows="skip")
            recorded = {o.key for o in state.objects}
            stray = [k for k in self.store.list_keys(self.store.month_prefix(member.name, month)) if k not in recorded]
            if stray:
                self.log.warning("%s %s: removing %d object(s) no metadata records (left by an interrupted run, or "
                                 "superseded): %s", member.name, p.month_year(month), len(stray), stray)
                self._forget(member, stray)
                self.store.delete(stray)
                removed.extend(stray)
            staged = self.store.list_keys(self.store.staging_key(self.store.month_prefix(member.name, month)))
            in_progress = {self.store.staging_key(o.key) for o in state.objects if o.legacy}  # may be the only copy
            leftover = [k for k in staged if k not in in_progress]
            if leftover:
                self.store.delete(leftover)
                removed.extend(leftover)
        return removed

    def _forget(self, member: p.RangeTable, keys: list[str]) -> None:
        """Expire the Iceberg snapshots that reference objects about to be deleted."""
        def body(conn: psycopg.Connection) -> None:
            if self.tables.table_in(conn, member) is not None:
                expired = self.tables.forget(conn, member, keys)
                if expired:
                    self.log.info("%s: expired Iceberg snapshot(s) %s, which referenced the objects about to be "
                                  "deleted", member.name, expired)

        month_ops.locked_transaction(self.db, [], self.policy, f"expiring {member.name} snapshots", body, self.log)

    def _freeze(self, members: list[p.RangeTable], month: date) -> None:
        def body(conn: psycopg.Connection) -> None:
            for member in members:
                if catalog.is_attached(conn, member, month):
                    month_ops.detach_child(conn, member, month)
            for member in members:
                if not catalog.months_with_default_rows(conn, member, month, p.add_months(month, 1)):
                    continue
                late = month_ops.create_late_table(conn, member, month)
                moved = month_ops.move_from_default(conn, member, month, late)
                self.log.info("%s %s: %d late row(s) moved from %s into %s", member.name, p.month_year(month),
                              moved, p.default_name(member), late)

        month_ops.locked_transaction(self.db, members, self.policy, f"freezing {members[0].group} {p.month_year(month)}",
                                     body, self.log)

    def _plan_parts(self, members: list[p.RangeTable], month: date) -> list[Part]:
        parts: list[Part] = []
        for member in members:
            with self.db.connect("primary") as conn:
                state = catalog.month_state(conn, member, month, default_rows="skip")
            relations: list[str | None] = list(state.frozen_relations)
            if not relations and state.archive_status is None:
                relations = [None]  # nothing at all for the month: record it with 0 rows
            for offset, relation in enumerate(relations):
                number = state.next_part + offset
                parts.append(Part(member, month, number, self.store.object_key(member.name, month, number), relation))
        return parts

    def _export(self, parts: list[Part], workdir: Path) -> str:
        source, url, label = self.db.connect_caught_up("analytics", self.settings.archive.replica_catchup_s,
                                                       EXPORT_APPLICATION)
        try:
            for part in parts:
                columns = self._columns(part.table)
                part.path = workdir / f"{part.table.name}-{part.part:05d}.parquet"
                if part.relation is None:
                    parquet_writer(part.path, part.table, part.month, columns, self.settings).close()
                    continue
                try:
                    part.rows, part.pg_hash, span = export_relation(
                        source, url, part.table, part.month, part.relation, columns, part.path, self.settings)
                except CopyOutError as exc:
                    if label == "primary":
                        raise
                    self.log.warning("export from the %s failed (%s): retrying on the primary", label, exc)
                    source.close()
                    source, url, label = self.db.connect_caught_up("primary", 0, EXPORT_APPLICATION)
                    part.rows, part.pg_hash, span = export_relation(
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
                "wedefi-hash-format": HASH_FORMAT, FORMAT_METADATA: str(ARCHIVE_FORMAT),
            })
            self.log.info("uploaded %s (%d bytes)", self.store.uri(part.key), part.digest.size)

    def verify_part(self, part: Part, workdir: Path) -> None:
        """Prove that the object at part.key holds exactly the rows PostgreSQL exported."""
        verify_part(self.store, part, self._columns(part.table), workdir)

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

    def _record_and_drop(self, members: list[p.RangeTable], month: date, parts: list[Part],
                         outcome_registered: dict[str, int], seconds: dict[str, float]) -> None:
        month_year = p.month_year(month)
        for member in members:
            self.tables.ensure(member)  # outside the transaction: an empty table is harmless

        def body(conn: psycopg.Connection) -> None:
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
                record_parts(conn, self.store, member, month, [x for x in parts if x.table.name == member.name])
            self._step("recorded", parts)  # inside the transaction: a crash here rolls the rows back
            mark = time.monotonic()
            outcome_registered.clear()
            for member in members:
                pending = catalog.month_state(conn, member, month, default_rows="skip").unregistered_objects
                if pending:
                    self.tables.register(conn, member, month, pending)
                    outcome_registered[member.name] = len(pending)
            seconds["register"] = time.monotonic() - mark
            self._step("registered", parts)  # still inside: a crash here rolls metadata and registration back
            for part in parts:
                if part.relation is not None:
                    month_ops.drop_relation(conn, part.relation)

        month_ops.locked_transaction(self.db, members, self.policy, f"recording {members[0].group} {month_year}",
                                     body, self.log)

    def upkeep(self, members: list[p.RangeTable], month: date, outcome: "ArchiveOutcome") -> None:
        """For an archived month: rewrite its format-1 objects (upgrade.py), then register
        every object the Iceberg tables do not hold yet (one transaction per table)."""
        with self.db.connect("primary") as conn:
            states = {m.name: catalog.month_state(conn, m, month, default_rows="skip") for m in members}
        if not any(s.legacy_objects or s.unregistered_objects for s in states.values()):
            return
        for member in members:
            self.tables.ensure(member)
        mark = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="wedefi-upgrade-", dir=self.workdir) as tmp:
            for member in members:
                columns = self._columns(member)
                for obj in states[member.name].legacy_objects:
                    outcome.upgraded.append(upgrade_object(
                        self.db, self.store, self.tables, member, month, obj, columns, self.settings, Path(tmp),
                        self.policy, self._step, self.log))
        if outcome.upgraded:
            outcome.seconds["upgrade"] = time.monotonic() - mark
        mark = time.monotonic()
        for member in members:
            def body(conn: psycopg.Connection, member: p.RangeTable = member) -> int:
                pending = catalog.month_state(conn, member, month, default_rows="skip").unregistered_objects
                if pending:
                    self.tables.register(conn, member, month, pending)
                    self._step("registered", [])
                return len(pending)

            added = month_ops.locked_transaction(self.db, [], self.policy,
                                                 f"registering {member.name} {p.month_year(month)}", body, self.log)
            if added:
                outcome.registered[member.name] = outcome.registered.get(member.name, 0) + added
        outcome.seconds["register"] = outcome.seconds.get("register", 0.0) + time.monotonic() - mark

    # -- entry point ----------------------------------------------------------------------
    def archive_month(self, table: p.RangeTable | str, month: date, now: datetime | None = None) -> ArchiveOutcome:
        """Archive (or resume archiving) the month of `table`'s archive group, if it is due."""
        try:
            return self._archive_month(table, month, now)
        finally:
            self.tables.close()  # the catalog's SQLAlchemy engine: no pooled connection outlives the run

    def _archive_month(self, table: p.RangeTable | str, month: date, now: datetime | None) -> ArchiveOutcome:
        members = group_tables(table)
        group = members[0].group
        month = p.month_of(month)
        now = now or datetime.now(timezone.utc)
        with locks.tier_month_lock(self.db, group, p.month_year(month), self.policy, self.log):
            with self.db.connect("primary") as conn:
                states = catalog.group_states(conn, group, month, newest=needs_newest(now, self.settings))
            decision = decide_group(states, now, self.settings)
            skip = skip_reason(decision)
            if skip is not None:
                swept = self.sweep(members, month) if skip.startswith("already archived") else []
                return ArchiveOutcome(group, month, "skipped", skip, swept=swept)
            if all(_only_upkeep(s) for s in states):
                outcome = ArchiveOutcome(group, month, "upgraded", decision.reason)
                started = time.monotonic()
                self.upkeep(members, month, outcome)
                outcome.swept = self.sweep(members, month)
                outcome.seconds["total"] = time.monotonic() - started
                outcome.action = "upgraded" if outcome.upgraded else "registered"
                return outcome
            with self.db.connect("primary") as conn:
                blocker = rollups_gate.archive_blocker(conn, group, month)
            if blocker is not None:
                self.log.warning("%s %s skipped: %s", group, p.month_year(month), blocker)
                return ArchiveOutcome(group, month, "skipped", blocker)
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
            registered: dict[str, int] = {}
            self._record_and_drop(members, month, parts, registered, seconds)
            seconds["record_and_drop"] = time.monotonic() - mark
            self._step("dropped", parts)
            late_only = all(x.relation and x.relation.endswith("_late") for x in parts)
            reason = "late rows of an archived month" if late_only else "cold"
            outcome = ArchiveOutcome(group, month, "archived", reason, parts, source, seconds, peak, swept, registered)
            self.upkeep(members, month, outcome)  # format-1 objects of the month, if any
            outcome.swept += self.sweep(members, month)
            seconds["total"] = time.monotonic() - started
            self.log.info("%s %s archived: %d rows in %d object(s), %d bytes, %.1fs", group, p.month_year(month),
                          sum(x.rows for x in parts), len(parts), sum(x.digest.size for x in parts), seconds["total"])
            return outcome


def _only_upkeep(state: MonthState) -> bool:
    """The month is archived and nothing of it waits in PostgreSQL: only its objects need work."""
    return state.archived and not state.attached and not state.frozen and not state.has_default_rows


def archive_month(db: Database, store: ArchiveStore, table: p.RangeTable | str, month: date,
                  now: datetime | None = None, **kwargs) -> ArchiveOutcome:
    return Archiver(db, store, **kwargs).archive_month(table, month, now)
