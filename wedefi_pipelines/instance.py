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
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile

from dagster._core.storage.event_log import SqliteEventLogStorage
from dagster._core.storage.runs import SqliteRunStorage
from dagster._core.storage.schedules import SqliteScheduleStorage
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

ENV_URL = "DAGSTER_PG_URL"
ENV_THROWAWAY = "WEDEFI_THROWAWAY_DAGSTER_DIR"
log = logging.getLogger("dagster")


class DagsterStorageConfigError(RuntimeError):
    pass


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
        return {}

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        url = instance_postgres_url()
        return cls(url, inst_data=inst_data) if url else SqliteEventLogStorage(throwaway_dir("event_logs"))


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
