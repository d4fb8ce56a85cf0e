"""`wedefi-pipelines adopt` on a database built as the app's Prisma schema builds it: the
layout it leaves, what it keeps, what it refuses, the plan, the job, and two runs at once."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import date

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from wedefi_pipelines import partitioning as p
from wedefi_pipelines import provisioning
from wedefi_pipelines.adoption import layout as L
from wedefi_pipelines.adoption.run import abort, adopt
from wedefi_pipelines.adoption.session import AdoptionError
from wedefi_pipelines.adoption.shape import AdoptionRefused
from wedefi_pipelines.definitions import defs
from wedefi_pipelines_tests.test_app_compat import app_client  # noqa: F401 (fixture)
from wedefi_pipelines_tests.adoption_support import (  # noqa: F401 (fixtures)
    TABLES,
    adopt_env,
    assert_adopted,
    create_prisma_database,
    prisma_db,
    prisma_template,
    run_adopt,
    run_against_adopted_database,
    snapshot,
)

OTHER_TABLES_FINGERPRINT = """
SELECT c.relname, c.relkind::text, coalesce(c.relacl::text, ''), coalesce(c.reloptions::text, ''),
       (SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || ' ' || a.attnotnull, ', ' ORDER BY a.attnum)
          FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
       (SELECT string_agg(k.conname || ' ' || pg_get_constraintdef(k.oid), '; ' ORDER BY k.conname)
          FROM pg_constraint k WHERE k.conrelid = c.oid),
       (SELECT string_agg(pg_get_indexdef(x.indexrelid), '; ' ORDER BY 1) FROM pg_index x WHERE x.indrelid = c.oid),
       (SELECT string_agg(g.tgname, ', ' ORDER BY g.tgname) FROM pg_trigger g WHERE g.tgrelid = c.oid AND NOT g.tgisinternal)
  FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p') AND NOT c.relispartition
   AND c.relname <> ALL(%s) ORDER BY 1
"""


def _fingerprint(conn: psycopg.Connection) -> list[tuple]:
    """Every app table adoption does not convert: its catalog entries and a hash of its rows."""
    rows = []
    for entry in conn.execute(OTHER_TABLES_FINGERPRINT, (list(TABLES),)).fetchall():
        content = conn.execute(sql.SQL("SELECT count(*), coalesce(sum(hashtext(t::text)::bigint), 0) FROM {} t").format(
            sql.Identifier(entry[0]))).fetchone()
        rows.append((*entry, *content))
    return rows


def _catalog_summary(conn: psycopg.Connection) -> tuple:
    return (conn.execute("SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace").fetchone()[0],
            conn.execute("SELECT array_agg(nspname ORDER BY nspname) FROM pg_namespace").fetchone()[0],
            conn.execute("SELECT count(*) FROM pg_trigger").fetchone()[0])


def test_plan_reports_each_table_and_changes_nothing(prisma_db, adopt_env):
    with prisma_db.connect() as conn:
        before = _catalog_summary(conn)
    result = run_adopt(adopt_env, "--plan")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "shape: WeDefiDaily's, as Prisma builds it" in out and "21 other table(s) will not be touched" in out
    with prisma_db.connect() as conn:
        counts = {t: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(t))).fetchone()[0] for t in TABLES}
        assert _catalog_summary(conn) == before
    for table, count in counts.items():
        assert any(line.startswith(f'"{table}"') and f"{count:,}" in line for line in out.splitlines()), (table, out)
    assert 'HASH ("walletId") x 8' in out and 'RANGE ("recordedAt") monthly' in out
    assert "disk headroom needed: about" in out
    assert "ACCESS EXCLUSIVE on the old \"PriceSnapshot\"" in out and "SHARE ROW EXCLUSIVE on \"Token\"" in out
    assert '"PositionSnapshot_portfolioSnapshotId_fkey"' in out  # the FK the layout cannot keep is named
    assert out.rstrip().endswith("nothing was changed.")


def test_adopt_converts_the_four_tables_and_keeps_what_they_carry(prisma_db):
    role, owner = "app_ro_" + uuid.uuid4().hex[:8], "app_owner_" + uuid.uuid4().hex[:8]
    with prisma_db.connect() as conn:
        conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(owner)))
        conn.execute(sql.SQL('ALTER TABLE "PriceSnapshot" OWNER TO {}').format(sql.Identifier(owner)))
        conn.execute(sql.SQL("""
            GRANT SELECT, INSERT ON "PriceSnapshot" TO {role};
            GRANT SELECT ("walletId", quantity) ON "TokenBalance" TO {role};
            COMMENT ON TABLE "PriceSnapshot" IS 'token prices, one row per tick';
            COMMENT ON COLUMN "PortfolioSnapshot"."walletId" IS 'NULL: all wallets';
            CREATE TABLE price_audit (id TEXT, at TIMESTAMPTZ DEFAULT now());
            CREATE FUNCTION audit_price() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN INSERT INTO price_audit (id) VALUES (NEW.id); RETURN NULL; END $$;
            CREATE TRIGGER price_audited AFTER INSERT ON "PriceSnapshot" FOR EACH ROW EXECUTE FUNCTION audit_price();
            ALTER TABLE "TokenBalance" ENABLE ROW LEVEL SECURITY;
            CREATE POLICY own_wallets ON "TokenBalance" FOR SELECT TO {role} USING ("walletId" LIKE 'w-%');
            CREATE PUBLICATION app_pub FOR TABLE "PriceSnapshot";
            ALTER TABLE "PortfolioSnapshot" REPLICA IDENTITY FULL;
        """).format(role=sql.Identifier(role)))
        others_before = _fingerprint(conn)
        fks_before = dict(conn.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE contype = 'f' AND conrelid::regclass::text"
            " = ANY(%s)", ([f'"{t}"' for t in TABLES],)).fetchall())
    before = snapshot(prisma_db.url)
    try:
        report = adopt(prisma_db.url, say=lambda line: None)
        assert report.outcome == "adopted" and all(v.ok for v in report.verified)
        assert assert_adopted(prisma_db.url, before) == {}
        with prisma_db.connect() as conn:
            names = {entry[0] for entry in others_before}  # sql/ adds the pipeline's own tables next to them
            assert [e for e in _fingerprint(conn) if e[0] in names] == others_before  # the app's other tables untouched
            assert conn.execute(sql.SQL("SELECT has_table_privilege({}, '\"PriceSnapshot\"', 'INSERT'), "
                                        "has_column_privilege({}, '\"TokenBalance\"', 'quantity', 'SELECT'), "
                                        "has_column_privilege({}, '\"TokenBalance\"', 'rawBalance', 'SELECT')").format(
                sql.Literal(role), sql.Literal(role), sql.Literal(role))).fetchone() == (True, True, False)
            assert conn.execute("SELECT obj_description('\"PriceSnapshot\"'::regclass, 'pg_class'), "
                                "col_description('\"PortfolioSnapshot\"'::regclass, 2)").fetchone() == (
                "token prices, one row per tick", "NULL: all wallets")
            conn.execute('INSERT INTO "PriceSnapshot" (id, "tokenId", "priceUsd", source) VALUES (\'new-1\', \'tok-1\', 1, \'x\')')
            assert conn.execute("SELECT count(*) FROM price_audit WHERE id = 'new-1'").fetchone()[0] == 1
            assert conn.execute("SELECT relrowsecurity FROM pg_class WHERE oid = '\"TokenBalance\"'::regclass").fetchone()[0]
            assert conn.execute("SELECT polname FROM pg_policy WHERE polrelid = '\"TokenBalance\"'::regclass").fetchall() == [
                ("own_wallets",)]
            assert conn.execute("SELECT count(*) FROM pg_publication_rel WHERE prrelid = '\"PriceSnapshot\"'::regclass"
                                ).fetchone()[0] == 1
            assert conn.execute("SELECT relreplident::text FROM pg_class WHERE oid = '\"PortfolioSnapshot\"'::regclass"
                                ).fetchone()[0] == "f"
            fks_after = dict(conn.execute(
                "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE contype = 'f' AND conparentid = 0"
                " AND conrelid::regclass::text = ANY(%s)", ([f'"{t}"' for t in TABLES],)).fetchall())
            assert fks_after == {k: v for k, v in fks_before.items() if k != "PositionSnapshot_portfolioSnapshotId_fkey"}
            keys = dict(conn.execute("SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = ANY("
                                     "%s::regclass[]) AND contype IN ('p', 'u')", ([f'"{t}"' for t in TABLES],)).fetchall())
            assert keys["PriceSnapshot_pkey"] == 'PRIMARY KEY (id, "recordedAt")'
            assert keys["TokenBalance_pkey"] == 'PRIMARY KEY (id, "walletId")'
            assert conn.execute("SELECT pg_get_indexdef('token_balance_wallet_token_unique'::regclass)").fetchone()[0] == (
                'CREATE UNIQUE INDEX token_balance_wallet_token_unique ON ONLY public."TokenBalance" USING btree ("walletId", '
                '"tokenId")')
            assert keys.get("PositionSnapshot_pkey") == 'PRIMARY KEY (id, "capturedAt")' or any(  # or issue 12's UNIQUE
                d == 'UNIQUE NULLS NOT DISTINCT (id, "capturedAt")' for k, d in keys.items()
                if k.startswith("PositionSnapshot"))
            assert conn.execute("SELECT count(*) FROM pg_stats WHERE tablename = 'PriceSnapshot' AND inherited"
                                ).fetchone()[0] > 0  # ANALYZEd through the parent
            owners = {r[0] for r in conn.execute(
                "SELECT DISTINCT relowner::regrole::text FROM pg_partition_tree('\"PriceSnapshot\"') t"
                " JOIN pg_class c ON c.oid = t.relid")}
            assert owners == {owner}  # every relation of the new tree, months included
        result = run_adopt(prisma_db.env)
        assert result.returncode == 0 and "already adopted" in result.stdout
        from wedefi_pipelines.migrations import migrate
        assert migrate(prisma_db.url).applied == []
    finally:
        with prisma_db.connect() as conn:
            conn.execute("DROP PUBLICATION IF EXISTS app_pub")
            for name in (role, owner):
                conn.execute(sql.SQL("DROP OWNED BY {}; DROP ROLE {}").format(sql.Identifier(name), sql.Identifier(name)))


def _structure(conn: psycopg.Connection, table: str, month: date) -> dict:
    """What sql/ plus provisioning define for a table and one of its months, names normalised."""
    child = p.child_name(table, month)
    norm = lambda text: (text or "").replace(child, "<child>")  # noqa: E731
    rels = [r[0] for r in conn.execute("SELECT relid::regclass::text FROM pg_partition_tree(%s::regclass)",
                                       (sql.Identifier(table).as_string(conn),))]
    wanted = [r for r in rels if r.strip('"') in (table, p.default_name(table), child) or
              r.strip('"').startswith(child + "_part_") or r.strip('"').startswith(f"{table}_part_")]
    out = {}
    for rel in wanted:
        out[norm(rel)] = {
            "columns": conn.execute("SELECT attname, format_type(atttypid, atttypmod), attnotnull FROM pg_attribute "
                                    "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                                    (rel,)).fetchall(),
            "constraints": sorted((norm(n), norm(d)) for n, d in conn.execute(
                "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %s::regclass "
                "AND contype <> 'n'", (rel,))),
            "indexes": sorted(norm(d) for (d,) in conn.execute(
                "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = %s::regclass", (rel,))),
            "triggers": sorted(n for (n,) in conn.execute(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal", (rel,))),
        }
    return out


def test_adopted_layout_is_the_one_sql_and_provisioning_build(prisma_db, db):
    adopt(prisma_db.url, say=lambda line: None)
    month = date.today().replace(day=1)
    with db.connect() as conn:  # a database migrated from sql/, its month provisioned as usual
        for table in p.RANGE_TABLES:
            provisioning.ensure_month(conn, table, month)
        migrated = {t: _structure(conn, t, month) for t in TABLES}
    with prisma_db.connect() as conn:
        adopted = {t: _structure(conn, t, month) for t in TABLES}
    assert adopted == migrated


@pytest.mark.parametrize("damage, named", [
    ('DROP TABLE "AlertDelivery"', 'missing table "AlertDelivery"'),
    ('ALTER TABLE "PriceSnapshot" ALTER COLUMN "priceUsd" TYPE numeric(20,8)',
     'column "PriceSnapshot"."priceUsd" is numeric(20,8), expected numeric(36,18)'),
    ('ALTER TABLE "TokenBalance" ADD COLUMN note text',
     'column "TokenBalance"."note" (text) is not in the partitioned layout'),
    ('CREATE VIEW recent_prices AS SELECT * FROM "PriceSnapshot"', 'view public.recent_prices depends on "PriceSnapshot"'),
    ('ALTER TABLE "PriceSnapshot" DROP CONSTRAINT "PriceSnapshot_tokenId_fkey"',
     '"PriceSnapshot" has no foreign key (tokenId) -> "Token"'),
])
def test_a_database_not_in_shape_is_refused_naming_what_differs(prisma_db, damage, named):
    with prisma_db.connect() as conn:
        conn.execute(damage)
        before = _catalog_summary(conn)
    with pytest.raises(AdoptionRefused, match="nothing was changed") as refused:
        adopt(prisma_db.url, say=lambda line: None)
    assert named in str(refused.value)
    with prisma_db.connect() as conn:
        assert _catalog_summary(conn) == before
    plan = run_adopt(prisma_db.env, "--plan")
    assert plan.returncode == 0 and "REFUSED" in plan.stdout and named in plan.stdout
    result = run_adopt(prisma_db.env)
    assert result.returncode == 2 and named in result.stderr


def test_migrate_on_a_prisma_built_database_points_at_adopt(prisma_db):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "wedefi_pipelines", "migrate", "--database-url", prisma_db.url],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "Run `wedefi-pipelines adopt --plan`" in result.stderr and '"TokenBalance"' in result.stderr
    with prisma_db.connect() as conn:
        assert conn.execute("SELECT to_regclass('wedefi_schema_migrations')").fetchone()[0] is None


def test_rows_the_layout_cannot_hold_are_kept_counted_and_reported(prisma_db):
    with prisma_db.connect() as conn:
        # a duplicate tick (the layout's per-month unique key), positions whose portfolio row is gone
        dup = conn.execute('INSERT INTO "PriceSnapshot" (id, "tokenId", "priceUsd", source, "recordedAt") '
                           'SELECT \'dup-\' || id, "tokenId", "priceUsd" + 1, source, "recordedAt" FROM "PriceSnapshot" '
                           'ORDER BY "recordedAt" LIMIT 3 RETURNING id').fetchall()
        conn.execute('ALTER TABLE "PositionSnapshot" DROP CONSTRAINT "PositionSnapshot_portfolioSnapshotId_fkey"')
        conn.execute('INSERT INTO "PositionSnapshot" (id, "portfolioSnapshotId", "tokenId", "walletId", quantity, '
                     '"usdValue", "priceUsd", "positionType") VALUES (\'orphan-1\', \'gone\', \'tok-1\', \'w-1\', 1, 1, 1, '
                     "'liquid'), ('orphan-2', 'gone', 'tok-2', 'w-2', 1, 1, 1, 'staked')")
    plan = run_adopt(prisma_db.env, "--plan").stdout
    assert "3 duplicate(s) of the new unique key" in plan
    before = snapshot(prisma_db.url)
    report = adopt(prisma_db.url, say=lambda line: None)
    aside = assert_adopted(prisma_db.url, before)
    assert aside.get("PriceSnapshot") == 3 and sum(report.unplaced["PriceSnapshot"].values()) == 3
    with prisma_db.connect() as conn:
        nullable = not conn.execute("SELECT attnotnull FROM pg_attribute WHERE attrelid = '\"PositionSnapshot\"'::regclass"
                                    " AND attname = 'capturedAt'").fetchone()[0]
        kept = conn.execute("SELECT tbl, id, reason FROM wedefi_adopt_unplaced ORDER BY 1, 2").fetchall()
        pairs = [(r[0][len("dup-"):], r[0]) for r in dup]
        both = [i for pair in pairs for i in pair]
        placed = {r[0] for r in conn.execute('SELECT id FROM "PriceSnapshot" WHERE id = ANY(%s)', (both,))}
        assert placed == {min(pair) for pair in pairs}  # the smallest id of each group stays in place
        if nullable:  # issue 12's layout: kept in the default partition, "capturedAt" NULL until filled
            assert conn.execute('SELECT id FROM "PositionSnapshot_default" WHERE "capturedAt" IS NULL ORDER BY 1'
                                ).fetchall() == [("orphan-1",), ("orphan-2",)]
        else:
            assert [(t, i) for t, i, _ in kept if t == "PositionSnapshot"] == [
                ("PositionSnapshot", "orphan-1"), ("PositionSnapshot", "orphan-2")]
            assert all('"PortfolioSnapshot" row is missing' in r for t, _, r in kept if t == "PositionSnapshot")
        assert all("duplicate" in r for t, _, r in kept if t == "PriceSnapshot")
        restored = conn.execute('SELECT (jsonb_populate_record(NULL::"PriceSnapshot", "row")).id FROM '
                                "wedefi_adopt_unplaced WHERE tbl = 'PriceSnapshot' ORDER BY 1").fetchall()
        assert sorted(r[0] for r in restored) == sorted(max(pair) for pair in pairs)


def test_a_second_adopt_waits_then_refuses_naming_the_first(prisma_db, adopt_env, tmp_path):
    first = threading.Thread(target=lambda: holder.append(run_adopt(adopt_env, fault="after_capture:sleep=6")))
    holder: list = []
    first.start()
    try:
        with prisma_db.connect() as conn:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()",
                    (L.APPLICATION_NAME,)).fetchone()[0]:
                time.sleep(0.05)
            time.sleep(0.5)
        impatient = tmp_path / "impatient.yaml"
        impatient.write_text("adoption:\n  run_lock_wait_s: 1\n")
        second = run_adopt({**adopt_env, "WEDEFI_SETTINGS": str(impatient)})
        assert second.returncode == 2
        assert "another `wedefi-pipelines adopt` is running on this database: pid" in second.stderr
        assert L.APPLICATION_NAME in second.stderr and "waiting for the adoption already running" in second.stdout
    finally:
        first.join(120)
    assert holder and holder[0].returncode == 0, holder[0].stderr if holder else "no result"


def test_abort_before_any_swap_leaves_the_app_tables_as_they_were(prisma_db, adopt_env):
    with prisma_db.connect() as conn:
        before = _catalog_summary(conn)
    killed = run_adopt(adopt_env, fault="after_copy:kill")
    assert killed.returncode == -9
    with prisma_db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'wedefi_adopt_capture_%'").fetchone()[0] > 0
    assert abort(prisma_db.url, say=lambda line: None) is True
    with prisma_db.connect() as conn:
        assert _catalog_summary(conn) == before
    assert abort(prisma_db.url, say=lambda line: None) is False


def test_abort_after_a_swap_is_refused(prisma_db, adopt_env):
    killed = run_adopt(adopt_env, fault="after_swap:kill")
    assert killed.returncode == -9
    with pytest.raises(AdoptionError, match="PriceSnapshot already swapped"):
        abort(prisma_db.url, say=lambda line: None)
    assert run_adopt(adopt_env).returncode == 0


def test_the_adopt_database_job_plans_then_adopts(prisma_db, monkeypatch):
    for key, value in prisma_db.env.items():
        monkeypatch.setenv(key, value)
    job = defs.get_job_def("adopt_database")
    planned = job.execute_in_process(run_config={"ops": {"adopt_app_database": {"config": {"plan_only": True}}}},
                                     instance=dg.DagsterInstance.ephemeral())
    assert planned.success and "nothing was changed." in planned.output_for_node("adopt_app_database")["plan"]
    before = snapshot(prisma_db.url)
    adopted = job.execute_in_process(instance=dg.DagsterInstance.ephemeral())
    assert adopted.success
    summary = adopted.output_for_node("adopt_app_database")
    assert summary["outcome"] == "adopted" and set(summary["swaps"]) == {L.group_label(g) for g in L.GROUPS}
    assert_adopted(prisma_db.url, before)


def test_the_hook_runs_a_check_against_an_adopted_database(stack):
    name = "hook_" + uuid.uuid4().hex[:8]
    seen: list[str] = []

    def app_queries(url: str) -> None:  # stands in for the app's Prisma suite
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute('INSERT INTO "PortfolioSnapshot" (id, "walletId", "totalUsdValue", "tokensTracked") '
                         "VALUES ('pf-new', NULL, 5, 0)")
            row = conn.execute('SELECT "walletId", "totalUsdValue"::text FROM "PortfolioSnapshot" WHERE id = '
                               "'pf-new'").fetchone()
            assert row == (None, "5.000000000000000000")
            seen.append(url)

    try:
        run_against_adopted_database(
            lambda: create_prisma_database(stack.primary.url, stack.primary.url("postgres"), name), app_queries)
        assert seen == [stack.primary.url(name)]
    finally:
        with psycopg.connect(stack.primary.url("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_a_cascade_from_the_apps_other_tables_during_adoption_reaches_the_new_tables(prisma_db, adopt_env):
    """The app deletes a token mid-adoption: its foreign keys' cascade deletes the token's rows
    from the old tables, the capture triggers log them, and the new tables end without them."""
    killed = run_adopt(adopt_env, fault="after_copy:kill")
    assert killed.returncode == -9
    with prisma_db.connect() as conn:
        gone = {t: conn.execute(sql.SQL('SELECT count(*) FROM {} WHERE "tokenId" = %s').format(sql.Identifier(t)),
                                ("tok-3",)).fetchone()[0] for t in ("PriceSnapshot", "TokenBalance", "PositionSnapshot")}
        assert all(gone.values())
        conn.execute('DELETE FROM "Token" WHERE id = %s', ("tok-3",))
    before = snapshot(prisma_db.url)
    assert run_adopt(adopt_env).returncode == 0
    assert_adopted(prisma_db.url, before)
    with prisma_db.connect() as conn:
        for table in gone:
            assert conn.execute(sql.SQL('SELECT count(*) FROM {} WHERE "tokenId" = %s').format(sql.Identifier(table)),
                                ("tok-3",)).fetchone()[0] == 0


def test_a_truncate_by_the_app_during_adoption_empties_the_new_table(prisma_db, adopt_env):
    killed = run_adopt(adopt_env, fault="after_attach:kill")
    assert killed.returncode == -9
    with prisma_db.connect() as conn:
        conn.execute('TRUNCATE "TokenBalance"')
        conn.execute('INSERT INTO "TokenBalance" (id, "walletId", "tokenId", "rawBalance", quantity, "updatedAt") '
                     "VALUES ('after-truncate', 'w-1', 'tok-1', '1', 1, now())")
    before = snapshot(prisma_db.url)
    assert run_adopt(adopt_env).returncode == 0
    assert_adopted(prisma_db.url, before)
    with prisma_db.connect() as conn:
        assert conn.execute('SELECT id FROM "TokenBalance"').fetchall() == [("after-truncate",)]


def test_the_portfolio_to_positions_cascade_after_adoption_is_what_sql_defines(prisma_db):
    """The app's FK (ON DELETE CASCADE) cannot exist on the layout; sql/ replaces it with a
    trigger (issue 12's 0007). With it, deleting a portfolio deletes its positions on the
    adopted database too (its function moved out of the staging schema with the table);
    without it, they stay, as --plan says."""
    adopt(prisma_db.url, say=lambda line: None)
    with prisma_db.connect() as conn:
        triggers = conn.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = '\"PortfolioSnapshot\"'::regclass "
                                "AND NOT tgisinternal").fetchone()[0]
        portfolio = conn.execute('SELECT "portfolioSnapshotId" FROM "PositionSnapshot" LIMIT 1').fetchone()[0]
        positions = conn.execute('SELECT count(*) FROM "PositionSnapshot" WHERE "portfolioSnapshotId" = %s',
                                 (portfolio,)).fetchone()[0]
        assert positions > 0
        conn.execute('DELETE FROM "PortfolioSnapshot" WHERE id = %s', (portfolio,))
        left = conn.execute('SELECT count(*) FROM "PositionSnapshot" WHERE "portfolioSnapshotId" = %s',
                            (portfolio,)).fetchone()[0]
        assert left == (0 if triggers else positions)
        assert conn.execute("SELECT count(*) FROM pg_proc WHERE pronamespace::regnamespace::text LIKE 'wedefi_adopt%'"
                            ).fetchone()[0] == 0


def test_the_apps_prisma_suite_passes_on_the_adopted_database(prisma_db, app_client):
    """The app's own client is the judge after adoption too: its Prisma 7 suite (issue 12's
    Works and Breaks calls) against the database `adopt` converted. The suite expects an
    empty database, as the app's own test setup leaves one: the app's rows are truncated
    first, the adopted layout (partitions, keys, triggers) stays."""
    import psycopg
    from psycopg import sql

    from wedefi_pipelines_tests.adoption_support import run_against_adopted_database
    from wedefi_pipelines_tests.test_app_compat import APP_TZ, run

    def check(url: str) -> None:
        assert url == prisma_db.url
        with psycopg.connect(url, autocommit=True) as conn:
            tables = [r[0] for r in conn.execute(
                """SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                    WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
                      AND c.relname NOT LIKE 'wedefi%'""")]
            assert conn.execute("""SELECT relkind FROM pg_class WHERE oid = '"PriceSnapshot"'::regclass"""
                                ).fetchone()[0] == "p"  # adopted: partitioned
            conn.execute(sql.SQL("TRUNCATE {} CASCADE").format(sql.SQL(", ").join(map(sql.Identifier, tables))))
        writes = run(app_client, "prisma", prisma_db.env | {"TZ": APP_TZ})
        assert all(r["result"] in ("works", "documented difference") for r in writes["results"]), writes["results"]

    run_against_adopted_database(lambda: prisma_db.url, check)
