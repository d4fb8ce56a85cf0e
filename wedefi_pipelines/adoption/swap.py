"""The swap (one short transaction per group) and the finish (sql/ recorded, old tables dropped).

The swap is the only moment the app waits for adoption, and it is kept small:

    LOCK TABLE ONLY public.<old tables> IN ACCESS EXCLUSIVE MODE  -- total wait <= lock_timeout
    replay the last logged ids (at most swap_max_pending, checked first)
    ALTER TABLE public.<old> SET SCHEMA wedefi_adopt_old          -- catalog only
    ALTER TABLE wedefi_adopt.<new parent> SET SCHEMA public        -- its partitions moved earlier
    CREATE TRIGGER <the app's triggers>, ENABLE ROW LEVEL SECURITY, ALTER PUBLICATION ... ADD TABLE
    COMMIT

with `statement_timeout` on every statement. If the lock cannot be had in time, or the
log outgrew the threshold, it rolls back (the app goes on, unaffected), replays more,
and tries again with backoff. The app's statements that queued behind the lock resolve
the names again once it is released and find the new tables.
"""

from __future__ import annotations

import logging
import time

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from wedefi_pipelines import migrations, provisioning
from wedefi_pipelines.adoption import carry, state
from wedefi_pipelines.adoption import layout as L
from wedefi_pipelines.adoption.replay import Replayer
from wedefi_pipelines.adoption.session import (
    RETRYABLE,
    AdoptionError,
    LockContention,
    backoff,
    blockers,
    crash_point,
    old,
    set_local_lock_timeout,
    stage,
    with_lock_retries,
)
from wedefi_pipelines.adoption.shadow import lock_up_front
from wedefi_pipelines.settings import Settings

log = logging.getLogger(__name__)


class _NotReady(Exception):
    """More changes wait in the log than the swap may replay under its lock."""


def carry_before_swap(conn: psycopg.Connection, group: tuple[str, ...], settings: Settings) -> list[carry.Carried]:
    """Owner, grants, comments and policies onto the new trees (private to adoption still)."""
    step = f"carried:{L.group_label(group)}"
    carried = []
    for name in group:
        keys, names = carry.model_keys(conn, L.STAGE, L.BY_NAME[name])
        carried.append(carry.read(conn, L.APP_SCHEMA, name, keys, names))
    if state.done(conn, step):
        return carried
    with conn.transaction():
        for c in carried:
            tree = carry.tree_identifiers(conn, L.STAGE, c.table)
            for statement in carry.build_statements(c, stage(c.table), tree):
                conn.execute(statement)
        state.mark(conn, step, {c.table: c.summary() for c in carried})
    return carried


def move_partitions(conn: psycopg.Connection, table: L.Converted) -> None:
    """Move every partition of the new table (the parent stays) from the staging schema to
    public before the swap: their names are free there (the shape check made sure), nothing
    of the app's touches them yet, and the swap then renames nothing but the parent, however
    many months the table holds."""
    step = f"partitions:{table.name}"
    if state.done(conn, step):
        return
    with conn.transaction():
        moved = 0
        for schema, relation, _ in carry.tree_relations(conn, L.STAGE, table.name)[1:]:
            if schema == L.STAGE:
                conn.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(stage(relation),
                                                                            sql.Identifier(L.APP_SCHEMA)))
                moved += 1
        state.mark(conn, step, {"moved": moved})


def _move_functions_and_types(conn: psycopg.Connection, oids: list[int]) -> None:
    """Trigger functions and column types the new trees use that sql/'s replay created in the
    staging schema move with them (the staging schema is dropped at the end)."""
    functions = [r[0] for r in conn.execute(
        "SELECT DISTINCT f.oid::regprocedure::text FROM pg_trigger g JOIN pg_proc f ON f.oid = g.tgfoid"
        " WHERE g.tgrelid = ANY(%s::oid[]) AND f.pronamespace = %s::regnamespace", (oids, L.STAGE))]
    types = [r[0] for r in conn.execute(
        "SELECT DISTINCT t.oid::regtype::text FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid"
        " WHERE a.attrelid = ANY(%s::oid[]) AND t.typnamespace = %s::regnamespace", (oids, L.STAGE))]
    for function in functions:
        conn.execute(sql.SQL("ALTER FUNCTION {} SET SCHEMA {}").format(sql.SQL(function), sql.Identifier(L.APP_SCHEMA)))
    for type_ in types:
        conn.execute(sql.SQL("ALTER TYPE {} SET SCHEMA {}").format(sql.SQL(type_), sql.Identifier(L.APP_SCHEMA)))


def _swap(conn: psycopg.Connection, group: tuple[str, ...], settings: Settings, replayer: Replayer) -> dict:
    a = settings.adoption
    started = time.monotonic()
    conn.execute(sql.SQL("SELECT set_config('statement_timeout', {}, true), set_config({}, 'on', true)").format(
        sql.Literal(f"{a.swap_statement_timeout_ms}ms"), sql.Literal(L.ROW_MOVE_SETTING)))
    for name in sorted(group):  # provisioning's per-table lock: no month is created mid-swap
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (provisioning.table_lock_key(name),))
    lock_up_front(conn, [old(n) for n in group], "ACCESS EXCLUSIVE", a)
    locked = time.monotonic()
    waiting = state.pending(conn, list(group))
    if waiting > a.swap_max_pending:
        raise _NotReady(waiting)
    for name in group:
        while replayer.batch(L.BY_NAME[name], a.swap_max_pending):
            pass
    carried = [carry.read(conn, L.APP_SCHEMA, n) for n in group]
    for name in group:
        conn.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(old(name), sql.Identifier(L.OLD)))
    oids = []
    for name in group:  # the partitions are in public already (move_partitions): the parent alone moves
        for schema, relation, _ in carry.tree_relations(conn, L.STAGE, name):
            oids.append(conn.execute("SELECT %s::regclass::oid", (sql.Identifier(schema, relation).as_string(conn),)
                                     ).fetchone()[0])
        conn.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(stage(name), sql.Identifier(L.APP_SCHEMA)))
    _move_functions_and_types(conn, oids)
    for c in carried:
        leaves = carry.tree_identifiers(conn, L.APP_SCHEMA, c.table, kinds="r")
        for statement in carry.swap_statements(c, old(c.table), leaves):
            conn.execute(statement)
    crash_point("in_swap")
    detail = {"replayed_under_lock": waiting, "lock_wait_ms": round((locked - started) * 1000, 1),
              "held_ms": round((time.monotonic() - locked) * 1000, 1)}
    state.mark(conn, f"swapped:{L.group_label(group)}", detail)
    return detail


def swap_group(conn: psycopg.Connection, group: tuple[str, ...], settings: Settings, replayer: Replayer) -> dict:
    """Swap the group's new tables in for the old ones; retried until it fits its bounds."""
    step = f"swapped:{L.group_label(group)}"
    if state.done(conn, step):
        return state.detail(conn, step)
    a = settings.adoption
    for attempt in range(1, a.lock_attempts + 1):
        replayer.drain(a.replay_batch, until=a.swap_max_pending // 2)
        try:
            with conn.transaction():
                set_local_lock_timeout(conn, a.lock_timeout_ms)
                detail = _swap(conn, group, settings, replayer)
            detail["attempts"] = attempt
            return detail
        except _NotReady as exc:
            log.info("%s: %s changes arrived before the lock; replaying them first", L.group_label(group), exc)
        except RETRYABLE as exc:
            if attempt == a.lock_attempts:
                raise LockContention(
                    f"swapping {L.group_label(group)}: gave up after {attempt} attempts ({exc.diag.message_primary}); "
                    f"held by: {blockers(conn, [old(n).as_string(conn) for n in group])}. The app was never held "
                    "longer than one attempt; run `wedefi-pipelines adopt` again when the tables are quieter.") from exc
            pause = backoff(attempt)
            log.info("%s: swap attempt %d/%d did not get its locks in time (%s); retrying in %.1fs",
                     L.group_label(group), attempt, a.lock_attempts, exc.diag.message_primary, pause)
            time.sleep(pause)
    raise LockContention(f"swapping {L.group_label(group)}: the app writes faster than the log can be replayed")


# -- the finish ---------------------------------------------------------------------------

def record_sql(conn: psycopg.Connection, url: str, settings: Settings) -> None:
    """Apply sql/ to the app's schema as `migrate` does. Everything it creates for the four
    tables is already there (IF NOT EXISTS: nothing to do), the pipeline's own tables are
    created, and every file is recorded, so `migrate` works from now on. Its statements wait
    for locks at most `lock_timeout_ms` and the whole run is retried."""
    if state.done(conn, "migrated"):
        return
    a = settings.adoption
    # a file's statements lock one relation after another in one transaction: a third of the
    # bound each keeps the first lock's hold under it while later ones wait (sql/0002 takes
    # SHARE on "TokenBalance", then on the default partitions)
    conninfo = make_conninfo(url, application_name=L.APPLICATION_NAME,
                             options=f"-c lock_timeout={max(10, a.lock_timeout_ms // 3)}ms")
    for attempt in range(1, a.lock_attempts + 1):
        try:
            result = migrations.migrate(conninfo)
            break
        except migrations.MigrationError as exc:
            if not isinstance(exc.__cause__, RETRYABLE) or attempt == a.lock_attempts:
                raise AdoptionError(f"recording sql/ as applied failed: {exc}") from exc
            time.sleep(backoff(attempt))
    with conn.transaction():
        state.mark(conn, "migrated", {"applied": result.applied, "already_applied": result.already_applied})


def analyze(conn: psycopg.Connection) -> None:
    """Statistics for the planner on each new parent (and, through it, its partitions)."""
    for table in L.CONVERTED:
        conn.execute(sql.SQL("ANALYZE {}").format(old(table.name)))


def rebuild_invalid_indexes(conn: psycopg.Connection) -> list[str]:
    """An index a killed CREATE INDEX CONCURRENTLY left INVALID is dropped and built again.
    (Adoption itself builds indexes on private tables, in transactions, so it leaves none.)"""
    rebuilt = []
    for table in L.CONVERTED:
        rows = conn.execute(
            "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid), c.relkind::text"
            " FROM pg_partition_tree(%s::regclass) t JOIN pg_index i ON i.indrelid = t.relid"
            " JOIN pg_class c ON c.oid = i.indexrelid WHERE NOT i.indisvalid",
            (old(table.name).as_string(conn),)).fetchall()
        for name, definition, kind in rows:
            if kind == "I":
                raise AdoptionError(f"index {name} on {table.name} is INVALID: one of its partitions lacks it; "
                                    "build it there and ALTER INDEX ... ATTACH PARTITION")
            conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.SQL(name)))
            conn.execute(sql.SQL(definition.replace("CREATE INDEX ", "CREATE INDEX CONCURRENTLY ", 1)
                                 .replace("CREATE UNIQUE INDEX ", "CREATE UNIQUE INDEX CONCURRENTLY ", 1)))
            rebuilt.append(name)
    return rebuilt


def drop_old(conn: psycopg.Connection, settings: Settings) -> None:
    """Drop the old tables (positions before portfolios: their foreign key). Each foreign key
    to the app's "Token"/"Wallet"/"Protocol" goes first, on its own: removing its triggers
    takes ACCESS EXCLUSIVE on the referenced table, for a catalog update only (under
    lock_timeout, retried). The DROP TABLE itself, whose file removal grows with the table,
    then locks nothing the app uses."""
    order = ["PositionSnapshot", "PortfolioSnapshot", "PriceSnapshot", "TokenBalance"]
    for name in order:
        relation = sql.Identifier(L.OLD, name)
        if not conn.execute("SELECT to_regclass(%s) IS NOT NULL", (relation.as_string(conn),)).fetchone()[0]:
            continue
        fks = conn.execute(
            "SELECT conname, confrelid::regclass::text FROM pg_constraint WHERE conrelid = %s::regclass"
            " AND contype = 'f' AND confrelid::regclass::text NOT LIKE %s ORDER BY 1",
            (relation.as_string(conn), f"{L.OLD}.%")).fetchall()
        for constraint, referenced in fks:
            def drop_fk(constraint=constraint, referenced=referenced, relation=relation) -> None:
                lock_up_front(conn, [sql.SQL(referenced)], "ACCESS EXCLUSIVE", settings.adoption)
                conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(relation, sql.Identifier(constraint)))

            with_lock_retries(conn, settings.adoption, f"dropping the old {name}'s foreign key {constraint}", drop_fk,
                              [referenced])
        with conn.transaction():
            conn.execute(sql.SQL("DROP TABLE {}").format(relation))


def drop_staging(conn: psycopg.Connection) -> None:
    with conn.transaction():
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(L.STAGE)))
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {}").format(sql.Identifier(L.OLD)))
