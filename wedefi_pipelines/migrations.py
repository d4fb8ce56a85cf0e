"""Applies sql/ in order: each file once, in its own transaction, recorded with a checksum.

Safe to run twice and from two processes at once (a session advisory lock serialises
runners; the second finds everything applied). A file edited after it was applied is
refused, naming the file: schema changes go in a new file, never into history.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from wedefi_pipelines import locks

log = logging.getLogger(__name__)

MIGRATIONS_TABLE = "wedefi_schema_migrations"
ADVISORY_LOCK_KEY = locks.advisory_key("migrations")[0]
_FILENAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class MigrationError(RuntimeError):
    """A migration cannot be applied; the message names the file."""


@dataclass(frozen=True)
class Migration:
    version: str
    path: Path

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def default_sql_dir() -> Path:
    """$WEDEFI_SQL_DIR, else the repository's sql/ next to the package."""
    configured = os.environ.get("WEDEFI_SQL_DIR")
    return Path(configured) if configured else Path(__file__).resolve().parent.parent / "sql"


def discover(sql_dir: Path | None = None) -> list[Migration]:
    sql_dir = sql_dir or default_sql_dir()
    if not sql_dir.is_dir():
        raise MigrationError(f"no sql/ directory at {sql_dir} (set WEDEFI_SQL_DIR)")
    migrations = []
    for path in sorted(sql_dir.glob("*.sql")):
        match = _FILENAME.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named NNNN_lowercase_words.sql")
        migrations.append(Migration(version=match.group(1), path=path))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version number in {sql_dir}: {versions}")
    return migrations


@dataclass
class MigrationResult:
    applied: list[str]
    already_applied: list[str]


def _refuse_prisma_built(conn: psycopg.Connection) -> None:
    """sql/ partitions the app's time-series tables; where the app's Prisma schema already built
    them as plain tables, that takes an online conversion (`adopt`), not a migration."""
    from wedefi_pipelines import partitioning as p

    names = [t.name for t in p.RANGE_TABLES] + [p.TOKEN_BALANCE.name]
    plain = [r[0] for r in conn.execute(
        "SELECT relname FROM pg_class WHERE relnamespace = current_schema()::regnamespace AND relkind = 'r'"
        " AND relname = ANY(%s) ORDER BY relname", (names,))]
    if plain:
        raise MigrationError(
            "this database holds WeDefiDaily's tables as the app's Prisma schema built them ("
            + ", ".join(f'"{n}"' for n in plain) + " are plain tables, sql/ partitions them): that is an online "
            "conversion, not a migration. Run `wedefi-pipelines adopt --plan` to review it, then "
            "`wedefi-pipelines adopt` (docs/adoption.md). Nothing was applied")


def migrate(conninfo: str, sql_dir: Path | None = None) -> MigrationResult:
    """Apply every pending file of `sql_dir` to the database at `conninfo`."""
    migrations = discover(sql_dir)
    result = MigrationResult(applied=[], already_applied=[])
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))  # waits: runners take turns
        try:
            _refuse_prisma_built(conn)
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (version TEXT PRIMARY KEY, filename TEXT NOT NULL, "
                    "checksum TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                ).format(sql.Identifier(MIGRATIONS_TABLE))
            )
            recorded = {
                version: (filename, checksum)
                for version, filename, checksum in conn.execute(
                    sql.SQL("SELECT version, filename, checksum FROM {}").format(sql.Identifier(MIGRATIONS_TABLE))
                )
            }
            for migration in migrations:
                if migration.version in recorded:
                    filename, checksum = recorded[migration.version]
                    if checksum != migration.checksum:
                        raise MigrationError(
                            f"{migration.path.name} was changed after it was applied (as {filename}, "
                            f"sha256 {checksum[:12]}..., now {migration.checksum[:12]}...): restore it and "
                            "put the change in a new migration file"
                        )
                    result.already_applied.append(migration.path.name)
                    continue
                with conn.transaction():
                    try:
                        conn.execute(migration.path.read_text())
                    except psycopg.Error as exc:
                        raise MigrationError(f"{migration.path.name} failed: {exc}") from exc
                    conn.execute(
                        sql.SQL("INSERT INTO {} (version, filename, checksum) VALUES (%s, %s, %s)").format(
                            sql.Identifier(MIGRATIONS_TABLE)
                        ),
                        (migration.version, migration.path.name, migration.checksum),
                    )
                log.info("applied %s", migration.path.name)
                result.applied.append(migration.path.name)
        finally:
            locks.session_unlock(conn, "migrations")
    return result
