"""Dagster instance storage on PostgreSQL from $DAGSTER_PG_URL, for the root dagster.yaml.

These are dagster-postgres' own run, event-log and schedule storages; the only thing
added is where the URL comes from. Dagster's CLI reads `dagster.yaml` from the current
directory whenever DAGSTER_HOME is unset, so with plain `postgres_url: {env:
DAGSTER_PG_URL}` even `dagster definitions validate` would need a database. Here:

- DAGSTER_PG_URL set: PostgreSQL, always (daemon, webserver, CI, `dagster dev`).
- unset, with DAGSTER_HOME or `dagster dev`: a clear error naming DAGSTER_PG_URL, since
  a persistent or multi-process instance must not silently lose its runs.
- unset otherwise (a one-shot CLI command such as `dagster definitions validate` or
  `dagster asset materialize`): a throwaway SQLite instance in a temporary folder, as
  Dagster itself uses when there is no dagster.yaml, with a warning saying so. The
  folder is passed to the command's step subprocesses through the environment.

Two things Dagster's instance config cannot say, kept here as well:

- Per-pool limits (`pool_limits:` under event_log_storage). Dagster 1.13's `concurrency:`
  section only has a default pool limit, and any `concurrency:` section conflicts with
  `run_coordinator.config.max_concurrent_runs`; a named pool's limit lives in the
  event-log storage (what `dagster instance concurrency set` writes). The storage sets
  the configured limits when it is created, so dagster.yaml stays the source of truth.
- Run retention (`purge_runs`). Dagster never deletes runs: their event logs grow with
  every sensor-triggered run. Old finished runs are deleted with their events and
  compute logs, except runs that materialized partitions, whose events are the
  partitions' status in the UI and for backfills.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import sqlalchemy.exc
from dagster import Field, Map
from dagster._core.storage.event_log import SqliteEventLogStorage
from dagster._core.storage.event_log.base import EventLogStorage
from dagster._core.storage.runs import SqliteRunStorage
from dagster._core.storage.schedules import SqliteScheduleStorage
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

ENV_URL = "DAGSTER_PG_URL"
ENV_THROWAWAY = "WEDEFI_THROWAWAY_DAGSTER_DIR"
# Tags Dagster puts on a run that targets one partition or a single-run range of them.
PARTITION_TAGS = ("dagster/partition", "dagster/asset_partition_range_start")
FINISHED = ("SUCCESS", "FAILURE", "CANCELED")
log = logging.getLogger("dagster")


class DagsterStorageConfigError(RuntimeError):
    pass


@contextmanager
def instance_environment(home: str | os.PathLike, pg_url: str) -> Iterator[None]:
    """DAGSTER_HOME and DAGSTER_PG_URL set for the block, then put back as they were: how
    a process (the demo, a test harness) opens an instance on this dagster.yaml."""
    saved = {key: os.environ.get(key) for key in ("DAGSTER_HOME", "DAGSTER_PG_URL")}
    os.environ.update({"DAGSTER_HOME": str(home), "DAGSTER_PG_URL": pg_url})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def instance_postgres_url() -> str | None:
    """DAGSTER_PG_URL, or None when a throwaway instance is acceptable; raises otherwise."""
    url = os.environ.get(ENV_URL)
    if url:
        return url
    if os.environ.get("DAGSTER_HOME") or os.environ.get("DAGSTER_IS_DEV_CLI"):
        raise DagsterStorageConfigError(
            f"{ENV_URL} is not set: this Dagster instance keeps its runs, events and schedules in "
            "PostgreSQL (dagster.yaml). Set it to a `dagster` database, e.g. the one "
            "`wedefi-pipelines stack` prints."
        )
    return None


def throwaway_dir(kind: str) -> str:
    """The one-shot command's SQLite folder, shared with its step subprocesses."""
    base = os.environ.get(ENV_THROWAWAY)
    if not base:
        base = tempfile.mkdtemp(prefix="wedefi-dagster-")
        os.environ[ENV_THROWAWAY] = base
        atexit.register(shutil.rmtree, base, True)
        log.warning("%s is not set: this command uses a throwaway SQLite Dagster instance in %s", ENV_URL, base)
    path = os.path.join(base, kind)
    os.makedirs(path, exist_ok=True)
    return path


def apply_pool_limits(storage: EventLogStorage, limits: Mapping[str, int]) -> dict[str, int]:
    """Set each named pool's limit in the storage where it differs; returns what was changed.

    Reads the current limits first, so the many processes that create an instance (run
    workers, step subprocesses) write nothing once the limits are in place.
    """
    if not limits:
        return {}
    if not storage.supports_global_concurrency_limits:
        log.warning("this Dagster storage has no concurrency tables (run `dagster instance migrate`): "
                    "pool limits %s are not applied", dict(limits))
        return {}
    changed = {}
    for pool, limit in sorted(limits.items()):
        # Processes starting together on a fresh database (webserver and daemon) race to
        # insert the same pool: the loser re-reads and retries once instead of dying.
        for attempt in range(3):
            current = {p.name: (p.limit, p.from_default) for p in storage.get_pool_limits()}
            if current.get(pool) == (limit, False):
                break
            try:
                storage.set_concurrency_slots(pool, limit)
            except sqlalchemy.exc.IntegrityError:
                if attempt == 2:
                    raise
                continue
            changed[pool] = limit
            break
    if changed:
        log.info("Dagster pool limits set from dagster.yaml: %s", changed)
    return changed


class EnvPostgresRunStorage(PostgresRunStorage):
    @classmethod
    def config_type(cls):
        return {}

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        url = instance_postgres_url()
        return cls(url, inst_data=inst_data) if url else SqliteRunStorage.from_local(throwaway_dir("runs"))


class EnvPostgresEventLogStorage(PostgresEventLogStorage):
    @classmethod
    def config_type(cls):
        return {
            "pool_limits": Field(
                Map(str, int), is_required=False,
                description="Concurrency limit per Dagster pool, set in the storage when the instance starts.",
            )
        }

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        url = instance_postgres_url()
        storage = cls(url, inst_data=inst_data) if url else SqliteEventLogStorage(throwaway_dir("event_logs"))
        apply_pool_limits(storage, config_value.get("pool_limits") or {})
        return storage


class EnvPostgresScheduleStorage(PostgresScheduleStorage):
    @classmethod
    def config_type(cls):
        return {}

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        url = instance_postgres_url()
        if url:
            return cls(url, inst_data=inst_data)
        return SqliteScheduleStorage.from_local(throwaway_dir("schedules"))


# -- run retention -------------------------------------------------------------------


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    status: str
    updated_at: datetime
    tags: Mapping[str, str]


def is_purgeable(run: RunInfo, cutoff: datetime) -> bool:
    """A finished run last updated before `cutoff` that materialized no partition.

    Partition runs are kept: a partition's materialized status (UI, backfills, sensors
    that request missing months) is read from its run's events, so deleting that run
    would make an archived month look never archived.
    """
    return (
        run.status in FINISHED
        and run.updated_at < cutoff
        and not any(tag in run.tags for tag in PARTITION_TAGS)
    )


@dataclass(frozen=True)
class PurgeResult:
    cutoff: datetime
    deleted: Sequence[str]
    kept_for_partitions: int


def purge_runs(instance, older_than_days: int, *, now: datetime | None = None,
               max_runs: int = 10_000, dry_run: bool = False) -> PurgeResult:
    """Delete finished runs older than `older_than_days`, with their event logs and compute logs.

    At most `max_runs` per call, oldest first, so a scheduled call works through a backlog
    without one long transaction. Re-running is safe: a deleted run is simply gone.
    """
    from dagster import DagsterRunStatus, RunsFilter

    if older_than_days < 1:
        raise ValueError(f"older_than_days must be at least 1, got {older_than_days}")
    cutoff = (now or datetime.now(timezone.utc)) - timedelta(days=older_than_days)
    candidates: list[str] = []
    kept = 0
    cursor = None
    # Collect first, delete after: the storage's cursor is a run id, which deleting would invalidate.
    while len(candidates) < max_runs:
        records = instance.get_run_records(
            filters=RunsFilter(statuses=[DagsterRunStatus(s) for s in FINISHED], updated_before=cutoff),
            limit=500, cursor=cursor, ascending=True,
        )
        if not records:
            break
        cursor = records[-1].dagster_run.run_id
        for record in records:
            run = RunInfo(record.dagster_run.run_id, record.dagster_run.status.value,
                          record.update_timestamp, record.dagster_run.tags)
            if is_purgeable(run, cutoff):
                candidates.append(run.run_id)
            else:
                kept += 1
    deleted = candidates[:max_runs]
    if not dry_run:
        for run_id in deleted:
            instance.delete_run(run_id)
            try:
                instance.compute_log_manager.delete_logs(prefix=[run_id])
            except NotImplementedError:
                pass
    return PurgeResult(cutoff=cutoff, deleted=deleted, kept_for_partitions=kept)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m wedefi_pipelines.instance purge-runs --older-than-days 90` against $DAGSTER_HOME."""
    from dagster import DagsterInstance

    parser = argparse.ArgumentParser(prog="python -m wedefi_pipelines.instance")
    sub = parser.add_subparsers(dest="command", required=True)
    purge = sub.add_parser("purge-runs", help="delete finished runs older than N days (not partition runs)")
    purge.add_argument("--older-than-days", type=int, required=True)
    purge.add_argument("--max-runs", type=int, default=10_000)
    purge.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    with DagsterInstance.get() as instance:
        result = purge_runs(instance, args.older_than_days, max_runs=args.max_runs, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {len(result.deleted)} run(s) last updated before {result.cutoff.isoformat()}; "
          f"kept {result.kept_for_partitions} partition run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
