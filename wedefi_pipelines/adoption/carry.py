"""What an app table carries besides its rows, read from the old table and given to the new one.

Kept: owner (every relation of the new tree), grants (table and column, on the parent:
queries through the parent need nothing more), comments (table and columns), the app's
own triggers, row-level security (policies, ENABLE/FORCE), publication membership (with
its column list and row filter), replica identity FULL/NOTHING. Triggers, RLS
enablement and publications are given at the swap, not before: a trigger on the new
table during the copy would fire for rows the app already wrote once, and FORCE'd RLS
would filter the copy. What cannot be carried is listed (`not_carried`) for the plan.

Expressions are printed with `search_path = pg_catalog`, so every name in them is
qualified and means the same thing when the statement runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from wedefi_pipelines.adoption import layout as L
from wedefi_pipelines.adoption.session import catalog_path

_CMD = {"r": "SELECT", "a": "INSERT", "w": "UPDATE", "d": "DELETE", "*": "ALL"}


@dataclass(frozen=True)
class Policy:
    name: str
    permissive: bool
    command: str
    roles: tuple[str | None, ...]  # None: PUBLIC
    using: str | None
    check: str | None


@dataclass
class Carried:
    table: str
    owner: str
    grants: list[tuple[str | None, str, bool]] = field(default_factory=list)  # grantee (None: PUBLIC), privilege, grantable
    column_grants: list[tuple[str, str | None, str, bool]] = field(default_factory=list)
    comment: str | None = None
    column_comments: list[tuple[str, str]] = field(default_factory=list)
    triggers: list[str] = field(default_factory=list)  # CREATE TRIGGER statements, as pg_get_triggerdef prints them
    trigger_names: list[str] = field(default_factory=list)
    policies: list[Policy] = field(default_factory=list)
    rls: bool = False
    force_rls: bool = False
    publications: list[tuple[str, tuple[str, ...] | None, str | None]] = field(default_factory=list)
    replica_identity: str = "d"
    not_carried: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"owner": self.owner, "grants": len(self.grants) + len(self.column_grants),
                "comments": int(self.comment is not None) + len(self.column_comments),
                "triggers": self.trigger_names, "policies": [x.name for x in self.policies],
                "rls": ("forced" if self.force_rls else "enabled") if self.rls else "off",
                "publications": [x[0] for x in self.publications],
                "replica_identity": {"d": "default", "f": "full", "n": "nothing", "i": "index"}[self.replica_identity]}


def _covered(columns: tuple[str, ...], keys: list[tuple[str, ...]]) -> bool:
    return any(key[:len(columns)] == columns for key in keys)


def read(conn: psycopg.Connection, schema: str, table: str, model_index_keys: list[tuple[str, ...]] | None = None,
         model_index_names: set[str] | None = None) -> Carried:
    """Everything `table` in `schema` carries. `model_index_keys` (the new parent's keys and
    indexes, as column lists) decide which of its indexes the new layout covers."""
    rel = sql.Identifier(schema, table).as_string(conn)
    with conn.transaction(), catalog_path(conn):
        owner, comment, rls, force, ident, reloptions = conn.execute(
            "SELECT r.rolname, obj_description(c.oid, 'pg_class'), c.relrowsecurity, c.relforcerowsecurity,"
            " c.relreplident::text, c.reloptions FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner"
            " WHERE c.oid = %s::regclass", (rel,)).fetchone()
        carried = Carried(table, owner, comment=comment, rls=rls, force_rls=force, replica_identity=ident)
        carried.grants = [(g, priv, grantable) for g, priv, grantable in conn.execute(
            "SELECT CASE WHEN (a).grantee = 0 THEN NULL ELSE (SELECT rolname FROM pg_roles WHERE oid = (a).grantee) END,"
            " (a).privilege_type, (a).is_grantable FROM (SELECT aclexplode(relacl) AS a FROM pg_class"
            " WHERE oid = %s::regclass) s", (rel,))]
        carried.column_grants = list(conn.execute(
            "SELECT attname, CASE WHEN (a).grantee = 0 THEN NULL ELSE (SELECT rolname FROM pg_roles"
            " WHERE oid = (a).grantee) END, (a).privilege_type, (a).is_grantable"
            " FROM (SELECT attname, aclexplode(attacl) AS a FROM pg_attribute WHERE attrelid = %s::regclass"
            " AND attnum > 0 AND NOT attisdropped AND attacl IS NOT NULL) s", (rel,)))
        carried.column_comments = [(c, d) for c, d in conn.execute(
            "SELECT attname, col_description(attrelid, attnum) FROM pg_attribute WHERE attrelid = %s::regclass"
            " AND attnum > 0 AND NOT attisdropped AND col_description(attrelid, attnum) IS NOT NULL ORDER BY attnum",
            (rel,))]
        for name, definition in conn.execute(
                "SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal"
                " AND tgname NOT LIKE %s ORDER BY tgname", (rel, L.CAPTURE_TRIGGER_PREFIX + "%")):
            carried.trigger_names.append(name)
            carried.triggers.append(definition)
        for name, permissive, cmd, roles, using, check in conn.execute(
                "SELECT polname, polpermissive, polcmd::text,"
                " array(SELECT CASE WHEN r = 0 THEN NULL ELSE (SELECT rolname FROM pg_roles WHERE oid = r) END"
                "       FROM unnest(polroles) r),"
                " pg_get_expr(polqual, polrelid), pg_get_expr(polwithcheck, polrelid)"
                " FROM pg_policy WHERE polrelid = %s::regclass ORDER BY polname", (rel,)):
            carried.policies.append(Policy(name, permissive, _CMD[cmd], tuple(roles), using, check))
        for pubname, columns, qual in conn.execute(
                "SELECT b.pubname, CASE WHEN r.prattrs IS NULL THEN NULL ELSE array(SELECT attname FROM pg_attribute"
                " WHERE attrelid = r.prrelid AND attnum = ANY(r.prattrs::int2[]) ORDER BY attnum) END,"
                " pg_get_expr(r.prqual, r.prrelid)"
                " FROM pg_publication_rel r JOIN pg_publication b ON b.oid = r.prpubid WHERE r.prrelid = %s::regclass"
                " ORDER BY 1", (rel,)):
            carried.publications.append((pubname, tuple(columns) if columns is not None else None, qual))
        for pubname, via_root in conn.execute(
                "SELECT b.pubname, b.pubviaroot FROM pg_publication b WHERE b.puballtables OR b.oid IN"
                " (SELECT pnpubid FROM pg_publication_namespace WHERE pnnspid = %s::regnamespace)"
                " OR b.oid IN (SELECT prpubid FROM pg_publication_rel WHERE prrelid = %s::regclass)",
                (L.APP_SCHEMA, rel)):
            if not via_root:
                carried.warnings.append(
                    f'publication "{pubname}" publishes "{table}" without publish_via_partition_root: once partitioned, '
                    "its changes are published under each partition's name (set publish_via_partition_root = true "
                    "if subscribers have one table)")
        if reloptions:
            carried.not_carried.append(f"storage parameters {reloptions} (a partitioned parent has none; set them "
                                       "per partition if still wanted)")
        if ident == "i":
            carried.not_carried.append("REPLICA IDENTITY USING INDEX (the new table uses its primary key or "
                                       "DEFAULT; choose an index of the new layout)")
        keys = model_index_keys or []
        names = model_index_names or set()
        for index, columns, expression in conn.execute(
                "SELECT i.relname, array(SELECT a.attname FROM unnest(x.indkey::int2[]) WITH ORDINALITY u(n, o)"
                " JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = u.n ORDER BY u.o),"
                " x.indexprs IS NOT NULL OR x.indpred IS NOT NULL"
                " FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid WHERE x.indrelid = %s::regclass ORDER BY 1",
                (rel,)):
            if index in names or (not expression and _covered(tuple(columns), keys)):
                continue
            carried.not_carried.append(f'index "{index}" ({", ".join(columns) or "an expression"}): no index of '
                                       "the new layout covers it; re-create it per partition if still needed")
    return carried


def _grantee(name: str | None) -> sql.Composable:
    return sql.SQL("PUBLIC") if name is None else sql.Identifier(name)


def build_statements(c: Carried, parent: sql.Identifier, tree: list[sql.Identifier]) -> list[sql.Composable]:
    """Owner (every relation of the tree), grants, comments and policies, for the new table
    before its swap; none of them changes what the app or the copy sees."""
    out: list[sql.Composable] = [
        sql.SQL("ALTER TABLE {} OWNER TO {}").format(rel, sql.Identifier(c.owner)) for rel in tree]
    for grantee, privilege, grantable in c.grants:
        out.append(sql.SQL("GRANT {} ON TABLE {} TO {}{}").format(
            sql.SQL(privilege), parent, _grantee(grantee), sql.SQL(" WITH GRANT OPTION" if grantable else "")))
    for column, grantee, privilege, grantable in c.column_grants:
        out.append(sql.SQL("GRANT {} ({}) ON TABLE {} TO {}{}").format(
            sql.SQL(privilege), sql.Identifier(column), parent, _grantee(grantee),
            sql.SQL(" WITH GRANT OPTION" if grantable else "")))
    if c.comment is not None:
        out.append(sql.SQL("COMMENT ON TABLE {} IS {}").format(parent, sql.Literal(c.comment)))
    for column, text in c.column_comments:
        out.append(sql.SQL("COMMENT ON COLUMN {}.{} IS {}").format(parent, sql.Identifier(column), sql.Literal(text)))
    for policy in c.policies:
        statement = sql.SQL("CREATE POLICY {} ON {} AS {} FOR {} TO {}").format(
            sql.Identifier(policy.name), parent, sql.SQL("PERMISSIVE" if policy.permissive else "RESTRICTIVE"),
            sql.SQL(policy.command), sql.SQL(", ").join(_grantee(r) for r in policy.roles))
        if policy.using is not None:
            statement += sql.SQL(" USING ({})").format(sql.SQL(policy.using))
        if policy.check is not None:
            statement += sql.SQL(" WITH CHECK ({})").format(sql.SQL(policy.check))
        out.append(statement)
    return out


def swap_statements(c: Carried, parent: sql.Identifier, leaves: list[sql.Identifier]) -> list[sql.Composable]:
    """What must appear with the swap itself: the app's triggers (their definitions name the
    table as public."X", which is the new table once the names are swapped), RLS enablement,
    replica identity and publication membership."""
    out: list[sql.Composable] = [sql.SQL(t) for t in c.triggers]
    if c.rls:
        out.append(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(parent))
    if c.force_rls:
        out.append(sql.SQL("ALTER TABLE {} FORCE ROW LEVEL SECURITY").format(parent))
    if c.replica_identity in ("f", "n"):
        mode = sql.SQL("FULL" if c.replica_identity == "f" else "NOTHING")
        out += [sql.SQL("ALTER TABLE {} REPLICA IDENTITY {}").format(rel, mode) for rel in [parent, *leaves]]
    for pubname, columns, qual in c.publications:
        statement = sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(sql.Identifier(pubname), parent)
        if columns is not None:
            statement += sql.SQL(" ({})").format(sql.SQL(", ").join(sql.Identifier(x) for x in columns))
        if qual is not None:
            statement += sql.SQL(" WHERE ({})").format(sql.SQL(qual))
        out.append(statement)
    return out


def model_keys(conn: psycopg.Connection, schema: str, table: L.Converted) -> tuple[list[tuple[str, ...]], set[str]]:
    """Column lists of the new table's keys and indexes (the parent's, and the per-month
    ones `partitioning` creates), and the parent's index names."""
    rel = sql.Identifier(schema, table.name).as_string(conn)
    keys, names = [], set()
    for name, columns in conn.execute(
            "SELECT i.relname, array(SELECT a.attname FROM unnest(x.indkey::int2[]) WITH ORDINALITY u(n, o)"
            " JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = u.n ORDER BY u.o)"
            " FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid WHERE x.indrelid = %s::regclass", (rel,)):
        keys.append(tuple(columns))
        names.add(name)
    if table.range is not None:
        keys += [index.columns for index in table.range.child_indexes]
    return keys, names


def tree_relations(conn: psycopg.Connection, schema: str, table: str) -> list[tuple[str, str, str]]:
    """(schema, name, relkind) of the table (in `schema`) and every partition below it, parent first."""
    rel = sql.Identifier(schema, table).as_string(conn)
    return [(n, r, k) for n, r, k in conn.execute(
        "SELECT c.relnamespace::regnamespace::text, c.relname, c.relkind::text FROM pg_partition_tree(%s::regclass) t"
        " JOIN pg_class c ON c.oid = t.relid ORDER BY t.level, c.relname", (rel,))]


def tree_identifiers(conn: psycopg.Connection, schema: str, table: str, kinds: str = "rp") -> list[sql.Identifier]:
    return [sql.Identifier(n, r) for n, r, k in tree_relations(conn, schema, table) if k in kinds]
