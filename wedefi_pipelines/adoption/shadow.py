"""The shadow tables (from sql/, in the staging schema) and the capture of the app's changes.

`stage` replays sql/ into the staging schema in one transaction and keeps what belongs to
the new layout: the four converted tables with their partitions, keys and triggers, and
the pipeline's own tables (archive metadata, rejects, ...) that provisioning reads while
months are built. The model copies of tables the app already has ("Token", "Wallet",
...) are dropped and the foreign keys that pointed at them are re-created against the
app's tables (`repoint`, a short transaction under `lock_timeout`: adding a foreign key
takes SHARE ROW EXCLUSIVE on the referenced table).

`capture` installs statement-level triggers with transition tables on the old tables:
they append the ids of the rows the app inserts, updates or deletes to the change log
and never touch the shadow tables, so no app write can fail because of them.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from wedefi_pipelines.adoption import layout as L
from wedefi_pipelines.adoption import model, state
from wedefi_pipelines.adoption.session import (
    catalog_path,
    old,
    stage,
    with_lock_retries,
)
from wedefi_pipelines.settings import AdoptionSettings

_FKS_TO = """
SELECT t.relname, k.conname, pg_get_constraintdef(k.oid)
  FROM pg_constraint k JOIN pg_class t ON t.oid = k.conrelid JOIN pg_class r ON r.oid = k.confrelid
 WHERE k.contype = 'f' AND k.conparentid = 0 AND t.relnamespace = %(s)s::regnamespace
   AND r.relnamespace = %(s)s::regnamespace AND r.relname = ANY(%(copies)s) AND NOT t.relname = ANY(%(copies)s)
 ORDER BY 1, 2
"""


def stage_tables(conn: psycopg.Connection, files: list) -> dict:
    """Replay sql/ into the staging schema, drop the model copies of the app's tables, and
    create the bookkeeping; one transaction, recorded as the step 'staged'."""
    with conn.transaction():
        model.replay(conn, L.STAGE, files)
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(L.OLD)))
        app = {r[0] for r in conn.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = %s::regnamespace AND relkind IN ('r', 'p')"
            " AND NOT relispartition", (L.APP_SCHEMA,))}
        staged = {r[0] for r in conn.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = %s::regnamespace AND relkind IN ('r', 'p')"
            " AND NOT relispartition", (L.STAGE,))}
        copies = sorted((staged & app) - set(L.BY_NAME))
        with catalog_path(conn):
            repoint = [list(r) for r in conn.execute(_FKS_TO, {"s": L.STAGE, "copies": copies})]
        if copies:
            conn.execute(sql.SQL("DROP TABLE {} CASCADE").format(
                sql.SQL(", ").join(stage(name) for name in copies)))
        for (extension,) in conn.execute("SELECT extname FROM pg_extension WHERE extnamespace = %s::regnamespace",
                                         (L.STAGE,)).fetchall():
            conn.execute(sql.SQL("DROP EXTENSION {}").format(sql.Identifier(extension)))  # `migrate` makes it in public
        state.create_bookkeeping(conn)
        detail = {"files": [[m.path.name, m.checksum] for m in files], "repoint": repoint, "dropped_copies": copies}
        state.mark(conn, "staged", detail)
    return detail


def _repointed(definition: str) -> str:
    """A foreign key's definition, printed with search_path = pg_catalog, aimed at the app's table."""
    before = f"REFERENCES {L.STAGE}."
    if definition.count(before) != 1:
        raise ValueError(f"unexpected foreign key definition {definition!r}")
    return definition.replace(before, f"REFERENCES {L.APP_SCHEMA}.")


def repoint(conn: psycopg.Connection, settings: AdoptionSettings) -> None:
    """Re-create the shadow tables' foreign keys against the app's tables (they are empty:
    nothing to validate). Locks: SHARE ROW EXCLUSIVE on each referenced table, for ms."""
    fks = (state.detail(conn, "staged") or {}).get("repoint", [])
    referenced = sorted({d.split("REFERENCES ", 1)[1].split("(", 1)[0] for _, _, d in fks})

    def work() -> None:
        if referenced:  # every lock at once: the waits cannot add up while the first ones are held
            lock_up_front(conn, [sql.SQL(r.replace(f"{L.STAGE}.", f"{L.APP_SCHEMA}.")) for r in referenced],
                          "SHARE ROW EXCLUSIVE", settings)
        for table, name, definition in fks:
            conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} ").format(stage(table), sql.Identifier(name))
                         + sql.SQL(_repointed(definition)))
        state.mark(conn, "repointed", {"foreign_keys": [f"{t}.{n}" for t, n, _ in fks]})

    with_lock_retries(conn, settings, "re-creating the new tables' foreign keys", work,
                      [r.replace(f"{L.STAGE}.", f"{L.APP_SCHEMA}.") for r in referenced])


def _capture_function() -> sql.Composed:
    log = sql.Identifier(L.STAGE, L.LOG)
    return sql.SQL("""
CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO {log} (tbl, id) SELECT TG_ARGV[0], n.id FROM new_rows n;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO {log} (tbl, id) SELECT TG_ARGV[0], n.id FROM new_rows n
        UNION ALL SELECT TG_ARGV[0], o.id FROM old_rows o WHERE NOT EXISTS (SELECT 1 FROM new_rows n WHERE n.id = o.id);
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO {log} (tbl, id) SELECT TG_ARGV[0], o.id FROM old_rows o;
    ELSE  -- TRUNCATE: a NULL id makes the replay reconcile the whole table
        INSERT INTO {log} (tbl, id) VALUES (TG_ARGV[0], NULL);
    END IF;
    RETURN NULL;
END
$f$;
REVOKE ALL ON FUNCTION {function}() FROM PUBLIC;
""").format(function=sql.Identifier(L.STAGE, L.CAPTURE_FUNCTION), log=log)


def _derived_function(table: L.Converted) -> sql.Composed:
    """When a row our derived column copies from changes that column (a portfolio's
    "capturedAt"), the rows that copied it (its positions) are logged too."""
    d = table.derived
    return sql.SQL("""
CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
BEGIN
    INSERT INTO {log} (tbl, id)
    SELECT {name}, c.id FROM new_rows n JOIN old_rows o ON o.id = n.id JOIN {child} c ON c.{via} = n.id
     WHERE n.{source} IS DISTINCT FROM o.{source};
    RETURN NULL;
END
$f$;
REVOKE ALL ON FUNCTION {function}() FROM PUBLIC;
""").format(function=sql.Identifier(L.STAGE, f"{L.CAPTURE_FUNCTION}_{table.name}"), log=sql.Identifier(L.STAGE, L.LOG),
            name=sql.Literal(table.name), child=old(table.name), via=sql.Identifier(d.via),
            source=sql.Identifier(d.source_column))


def _triggers(table: L.Converted) -> list[sql.Composed]:
    fn = sql.Identifier(L.STAGE, L.CAPTURE_FUNCTION)
    out = []
    for event, refs in (("INSERT", "NEW TABLE AS new_rows"), ("UPDATE", "OLD TABLE AS old_rows NEW TABLE AS new_rows"),
                        ("DELETE", "OLD TABLE AS old_rows")):
        out.append(sql.SQL("CREATE TRIGGER {name} AFTER {event} ON {table} REFERENCING {refs} FOR EACH STATEMENT "
                           "EXECUTE FUNCTION {fn}({arg})").format(
            name=sql.Identifier(f"{L.CAPTURE_TRIGGER_PREFIX}{event.lower()}"), event=sql.SQL(event),
            table=old(table.name), refs=sql.SQL(refs), fn=fn, arg=sql.Literal(table.name)))
    out.append(sql.SQL("CREATE TRIGGER {name} AFTER TRUNCATE ON {table} FOR EACH STATEMENT EXECUTE FUNCTION {fn}({arg})")
               .format(name=sql.Identifier(f"{L.CAPTURE_TRIGGER_PREFIX}truncate"), table=old(table.name), fn=fn,
                       arg=sql.Literal(table.name)))
    return out


def capture(conn: psycopg.Connection, settings: AdoptionSettings) -> None:
    """Install the capture triggers on the four old tables in one transaction, and record
    each table's heap size at that moment: rows written later are all logged, rows written
    before all lie below that block, so copy + replay together see every row."""
    sources = [c for c in L.CONVERTED if c.derived is not None]

    def work() -> None:
        lock_up_front(conn, [old(c.name) for c in L.CONVERTED], "SHARE ROW EXCLUSIVE", settings)
        conn.execute(_capture_function())
        for table in L.CONVERTED:
            for statement in _triggers(table):
                conn.execute(statement)
        for child in sources:
            conn.execute(_derived_function(child))
            conn.execute(sql.SQL(
                "CREATE TRIGGER {name} AFTER UPDATE ON {table} REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "
                "FOR EACH STATEMENT EXECUTE FUNCTION {fn}()").format(
                name=sql.Identifier(f"{L.CAPTURE_TRIGGER_PREFIX}{child.name}"), table=old(child.derived.source_table),
                fn=sql.Identifier(L.STAGE, f"{L.CAPTURE_FUNCTION}_{child.name}")))
        for table in L.CONVERTED:
            conn.execute(sql.SQL(
                "INSERT INTO {} (tbl, next_block, end_block) "
                "SELECT %s, 0, pg_relation_size(%s::regclass) / current_setting('block_size')::bigint").format(
                sql.Identifier(L.STAGE, L.PROGRESS)), (table.name, old(table.name).as_string(conn)))
        state.mark(conn, "captured")

    with_lock_retries(conn, settings, "installing the capture triggers on the app's tables", work,
                      [old(c.name).as_string(conn) for c in L.CONVERTED])


def lock_up_front(conn: psycopg.Connection, relations: list[sql.Identifier], mode: str,
                  settings: AdoptionSettings) -> None:
    """Take every lock of a step in one statement whose total wait is bounded by
    `lock_timeout_ms` (a per-lock timeout alone would let the waits add up while the first
    locks are already held)."""
    previous = conn.execute(sql.SQL("SELECT current_setting('statement_timeout'), set_config('statement_timeout', {}, true)"
                                     ).format(sql.Literal(f"{settings.lock_timeout_ms}ms"))).fetchone()[0]
    conn.execute(sql.SQL("LOCK TABLE ONLY {} IN {} MODE").format(sql.SQL(", ").join(relations), sql.SQL(mode)))
    conn.execute("SELECT set_config('statement_timeout', %s, true)", (previous,))
