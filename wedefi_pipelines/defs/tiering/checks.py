"""Checks on the cold tier: the archive metadata matches its objects, and nothing waits.

Evaluated by every cold_archive run, after its month's work, over the whole archive
(declared as the asset's check_specs: a check cannot be partitioned like its asset).
Non-blocking (the archive run stays green; the check shows red): ERROR when a recorded
count, size or hash disagrees, an object is missing on S3, an archived month still has a
child, or an archive run stopped half-way; WARN when late rows wait in a default
partition for an archived month (re-running that month's cold_archive takes them).
"""

import dagster as dg
from psycopg import sql

from wedefi_pipelines import month_ops
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.provisioning import default_rows_by_month
from wedefi_pipelines.resources.archive import ArchiveStore
from wedefi_pipelines.resources.database import Database
from wedefi_pipelines.tiering import state

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
]


def archive_metadata_consistent(db: Database, store: ArchiveStore) -> dg.AssetCheckResult:
    problems, archived_rows, objects_checked = [], 0, 0
    with db.connect("primary") as conn:
        for table in p.RANGE_TABLES:
            meta, objects = sql.Identifier(f"{table.name}_archive_metadata"), sql.Identifier(f"{table.name}_archive_objects")
            for row in conn.execute(sql.SQL(_MISMATCHES).format(meta=meta, objects=objects)):
                problems.append(f"{table.name} {row[0]}: metadata says {row[1]} rows / {row[3]} B / hash {row[5]}, "
                                f"its objects {row[2]} rows / {row[4]} B / hash {row[6]}")
            statuses = state.metadata_status(conn, table)
            attached = set(month_ops.attached_months(conn, table))
            for month, status in statuses.items():
                if status == "archived" and month in attached:
                    problems.append(f"{table.name} {p.month_year(month)} is archived but its child is attached")
            for month, names in state.all_frozen(conn, table).items():
                problems.append(f"{table.name} {p.month_year(month)}: {names} frozen by an unfinished archive run "
                                "(re-run its cold_archive partition)")
            archived_rows += conn.execute(sql.SQL("SELECT coalesce(sum(record_count), 0) FROM {} WHERE status = 'archived'"
                                                  ).format(meta)).fetchone()[0]
            recorded = conn.execute(sql.SQL("SELECT object_key, size_bytes, crc64nvme FROM {}").format(objects)).fetchall()
            for key, size, crc in recorded:
                head = store.head(key)
                objects_checked += 1
                if head is None:
                    problems.append(f"{store.uri(key)} is recorded but missing on S3")
                elif (head.size, head.crc64nvme) != (size, crc):
                    problems.append(f"{store.uri(key)}: {head.size} B crc {head.crc64nvme} on S3, recorded {size} B crc {crc}")
    return dg.AssetCheckResult(
        check_name="archive_metadata_consistent", passed=not problems, severity=dg.AssetCheckSeverity.ERROR,
        metadata={"problems": dg.MetadataValue.json(problems[:50]), "problem_count": len(problems),
                  "archived_rows": int(archived_rows), "objects_checked": objects_checked})


def archived_months_have_no_late_rows(db: Database) -> dg.AssetCheckResult:
    waiting = {}
    with db.connect("primary") as conn:
        for table in p.RANGE_TABLES:
            archived = {m for m, s in state.metadata_status(conn, table).items() if s == "archived"}
            for month, rows in default_rows_by_month(conn, table).items():
                if month in archived:
                    waiting[f"{table.name} {p.month_year(month)}"] = rows
    return dg.AssetCheckResult(
        check_name="archived_months_have_no_late_rows", passed=not waiting, severity=dg.AssetCheckSeverity.WARN,
        metadata={"late_rows": dg.MetadataValue.json(waiting),
                  "action": "re-run cold_archive for these months" if waiting else "none"})



def evaluate(db: Database, store: ArchiveStore) -> list[dg.AssetCheckResult]:
    """Both checks; a check that cannot be evaluated (S3 or PostgreSQL down) fails with why."""
    results = []
    for name, run in (("archive_metadata_consistent", lambda: archive_metadata_consistent(db, store)),
                      ("archived_months_have_no_late_rows", lambda: archived_months_have_no_late_rows(db))):
        try:
            results.append(run())
        except Exception as exc:  # the check reports it; the archive's own outcome stands
            results.append(dg.AssetCheckResult(check_name=name, passed=False, severity=dg.AssetCheckSeverity.ERROR,
                                               metadata={"error": str(exc)}))
    return results
