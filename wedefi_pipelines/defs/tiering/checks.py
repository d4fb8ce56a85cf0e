"""Checks on the cold tier: the archive metadata matches its objects and its Iceberg tables, and nothing waits.

Evaluated by every cold_archive run, after its month's work, over the whole archive
(declared as the asset's check_specs: a check cannot be partitioned like its asset).
Non-blocking (the archive run stays green; the check shows red): ERROR when a recorded
count, size or hash disagrees, an object is missing on S3, an archived month still has a
child, or an archive run stopped half-way; WARN when late rows wait in a default
partition for an archived month (re-running that month's cold_archive takes them).
`iceberg_tables_match_archive` compares each Iceberg table, month by month, with the
archive metadata read in the same snapshot: ERROR when they disagree, WARN when the only
difference is objects still waiting for their upgrade or registration.
"""

import dagster as dg
from psycopg import sql

from wedefi_pipelines import catalog
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.resources.archive import ArchiveStore
from wedefi_pipelines.resources.database import Database

_MISMATCHES = """
SELECT m.month_year, m.record_count, coalesce(sum(o.record_count), 0), m.compressed_size,
       coalesce(sum(o.size_bytes), 0), m.content_hash, coalesce(sum(o.content_hash), 0)
  FROM {meta} m LEFT JOIN {objects} o USING (month_year)
 GROUP BY m.month_year, m.record_count, m.compressed_size, m.content_hash
HAVING m.record_count <> coalesce(sum(o.record_count), 0) OR m.compressed_size <> coalesce(sum(o.size_bytes), 0)
    OR m.content_hash <> coalesce(sum(o.content_hash), 0)
"""


CHECK_SPECS = [
    dg.AssetCheckSpec("archive_metadata_consistent", asset="cold_archive",
                      description="Archive metadata equals the sum of its verified objects; every object is on S3 "
                                  "with its recorded size and CRC64NVME; archived months have no child and no "
                                  "archive run is left half-way."),
    dg.AssetCheckSpec("archived_months_have_no_late_rows", asset="cold_archive",
                      description="No late rows wait in a default partition for an archived month."),
    dg.AssetCheckSpec("iceberg_tables_match_archive", asset="cold_archive",
                      description="Each archived table's Iceberg table holds, per month, the archive metadata's row "
                                  "count in exactly its recorded objects, and nothing for months not archived."),
]


def archive_metadata_consistent(db: Database, store: ArchiveStore) -> dg.AssetCheckResult:
    problems, archived_rows, objects_checked = [], 0, 0
    with db.connect("primary") as conn:
        for table in p.TIERED_TABLES:
            meta, objects = sql.Identifier(p.archive_metadata_name(table)), sql.Identifier(p.archive_objects_name(table))
            for row in conn.execute(sql.SQL(_MISMATCHES).format(meta=meta, objects=objects)):
                problems.append(f"{table.name} {row[0]}: metadata says {row[1]} rows / {row[3]} B / hash {row[5]}, "
                                f"its objects {row[2]} rows / {row[4]} B / hash {row[6]}")
            for month, state in catalog.read_table(conn, table, default_rows="skip").months.items():
                if state.archived and state.attached:
                    problems.append(f"{table.name} {p.month_year(month)} is archived but its child is attached")
                if state.frozen:
                    problems.append(f"{table.name} {p.month_year(month)}: {state.frozen_relations} frozen by an "
                                    "unfinished archive run (re-run its cold_archive partition)")
                if state.archived:
                    archived_rows += state.archived_rows
                for obj in state.objects:
                    head = store.head(obj.key)
                    objects_checked += 1
                    if head is None:
                        problems.append(f"{store.uri(obj.key)} is recorded but missing on S3")
                    elif (head.size, head.crc64nvme) != (obj.size_bytes, obj.crc64nvme):
                        problems.append(f"{store.uri(obj.key)}: {head.size} B crc {head.crc64nvme} on S3, "
                                        f"recorded {obj.size_bytes} B crc {obj.crc64nvme}")
    return dg.AssetCheckResult(
        check_name="archive_metadata_consistent", passed=not problems, severity=dg.AssetCheckSeverity.ERROR,
        metadata={"problems": dg.MetadataValue.json(problems[:50]), "problem_count": len(problems),
                  "archived_rows": int(archived_rows), "objects_checked": objects_checked})


def archived_months_have_no_late_rows(db: Database) -> dg.AssetCheckResult:
    waiting = {}
    with db.connect("primary") as conn:
        for table in catalog.read_catalog(conn, p.TIERED_TABLES).values():
            for month, state in table.months.items():
                if state.archived and state.has_default_rows:
                    waiting[f"{table.table.name} {p.month_year(month)}"] = state.default_rows
    return dg.AssetCheckResult(
        check_name="archived_months_have_no_late_rows", passed=not waiting, severity=dg.AssetCheckSeverity.WARN,
        metadata={"late_rows": dg.MetadataValue.json(waiting),
                  "action": "re-run cold_archive for these months" if waiting else "none"})


def iceberg_tables_match_archive(db: Database, store: ArchiveStore) -> dg.AssetCheckResult:
    from wedefi_pipelines.tiering.iceberg import ArchiveTables  # pyiceberg takes ~1 s to import: runs only

    problems, pending, per_month = [], [], {}
    with ArchiveTables(db, store) as tables, db.connect("primary") as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")  # metadata and catalog row: one snapshot
        for table in p.TIERED_TABLES:
            months = catalog.read_table(conn, table, default_rows="skip").months
            held = tables.month_files(tables.table_in(conn, table), table)
            for month in sorted(set(months) | set(held)):
                state = months.get(month) or catalog.MonthState(table.name, month)
                files = {f.path: f.rows for f in held.get(month, [])}
                label = f"{table.name} {p.month_year(month)}"
                if not state.archived:
                    if files:
                        problems.append(f"{label} is not archived ({state.archive_status or 'no metadata'}) but its "
                                        f"Iceberg table holds {sum(files.values())} rows in {sorted(files)}")
                    continue
                expected = {store.uri(o.key): o.rows for o in state.objects if o.registered}
                waiting = [o for o in state.objects if not o.registered and o.rows > 0]
                per_month[label] = {"metadata": state.archived_rows, "iceberg": sum(files.values())}
                if files != expected:
                    problems.append(f"{label}: the Iceberg table holds {files}, the archive registered {expected}")
                elif sum(files.values()) + sum(o.rows for o in waiting) != state.archived_rows:
                    problems.append(f"{label}: the Iceberg table counts {sum(files.values())} rows, the metadata "
                                    f"{state.archived_rows}")
                if waiting:
                    pending.append(f"{label}: {len(waiting)} object(s) ({sum(o.rows for o in waiting)} rows) not in "
                                   "the Iceberg table yet (format-1 upgrade or registration pending: re-run its "
                                   "cold_archive partition)")
    severity = dg.AssetCheckSeverity.ERROR if problems else dg.AssetCheckSeverity.WARN
    return dg.AssetCheckResult(
        check_name="iceberg_tables_match_archive", passed=not problems and not pending, severity=severity,
        metadata={"problems": dg.MetadataValue.json(problems[:50]), "pending": dg.MetadataValue.json(pending[:50]),
                  "rows_per_month": dg.MetadataValue.json(per_month)})


def evaluate(db: Database, store: ArchiveStore) -> list[dg.AssetCheckResult]:
    """Every check; a check that cannot be evaluated (S3 or PostgreSQL down) fails with why."""
    results = []
    for name, run in (("archive_metadata_consistent", lambda: archive_metadata_consistent(db, store)),
                      ("archived_months_have_no_late_rows", lambda: archived_months_have_no_late_rows(db)),
                      ("iceberg_tables_match_archive", lambda: iceberg_tables_match_archive(db, store))):
        try:
            results.append(run())
        except Exception as exc:  # the check reports it; the archive's own outcome stands
            results.append(dg.AssetCheckResult(check_name=name, passed=False, severity=dg.AssetCheckSeverity.ERROR,
                                               metadata={"error": str(exc)}))
    return results
