"""A WeDefiDaily database as the app's Prisma schema builds it, months of history in it, an
app-shaped writer and reader to run beside `adopt`, and the checks that nothing was lost.

The DDL is fixtures/prisma/db_push.sql, generated offline by Prisma's own schema engine
(fixtures/prisma/generate.mjs). `run_against_adopted_database` runs any callable (the app's
Prisma suite, once it is wired in) against a freshly adopted database.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterator

import psycopg
import pytest
from psycopg import sql

from wedefi_pipelines import migrations
from wedefi_pipelines.adoption import layout as L
from wedefi_pipelines_tests.conftest import TestDatabase

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "prisma"
PRISMA_DDL = FIXTURES / "db_push.sql"
REPO = Path(__file__).resolve().parent.parent
TABLES = ("PriceSnapshot", "TokenBalance", "PortfolioSnapshot", "PositionSnapshot")


def now() -> datetime:
    """UTC, to the millisecond, as the app's timestamp(3) columns hold it."""
    moment = datetime.now(timezone.utc).replace(tzinfo=None)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


@dataclass(frozen=True)
class History:
    """How much app-shaped history the fixture holds."""

    days: int = 120
    tokens: int = 20
    wallets: int = 30
    price_every_hours: int = 2
    portfolio_every_days: int = 2
    positions_per_wallet: int = 3


def create_prisma_database(url_for: Callable[[str], str], admin_url: str, name: str, history: History = History()) -> str:
    """CREATE DATABASE `name`, apply Prisma's DDL, fill it with `history`; returns its URL."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = url_for(name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(PRISMA_DDL.read_text())
        fill_history(conn, history)
    return url


def fill_history(conn: psycopg.Connection, h: History) -> None:
    """Reference rows, then prices, portfolio ticks (one all-wallets row, walletId NULL, per
    tick), their positions and current balances, as the app writes them (explicit ids)."""
    conn.execute("""INSERT INTO "Chain" (id, name, "updatedAt") VALUES (8453, 'Base', now())""")
    conn.execute("""INSERT INTO "Protocol" (id, slug, name, "chainId", "updatedAt")
                    VALUES ('proto-aero', 'aerodrome', 'Aerodrome', 8453, now())""")
    conn.execute("""INSERT INTO "Token" (id, "chainId", address, symbol, name, decimals, "updatedAt")
                    SELECT 'tok-' || i, 8453, '0x' || lpad(i::text, 40, '0'), 'T' || i, 'Token ' || i, 18, now()
                      FROM generate_series(1, %s) i""", (h.tokens,))
    conn.execute("""INSERT INTO "Wallet" (id, address, "chainId", label, "updatedAt")
                    SELECT 'w-' || i, '0x' || lpad(to_hex(i), 40, '0'), 8453, 'wallet ' || i, now()
                      FROM generate_series(1, %s) i""", (h.wallets,))
    start = now() - timedelta(days=h.days)
    conn.execute("""
        INSERT INTO "PriceSnapshot" (id, "tokenId", "priceUsd", source, "recordedAt", "createdAt")
        SELECT gen_random_uuid()::text, 'tok-' || t, round((1 + random() * 1000)::numeric, 8), 'coingecko',
               %(start)s + make_interval(hours => s * %(every)s), %(start)s + make_interval(hours => s * %(every)s)
          FROM generate_series(1, %(tokens)s) t, generate_series(0, %(steps)s) s
    """, {"start": start, "every": h.price_every_hours, "tokens": h.tokens, "steps": h.days * 24 // h.price_every_hours})
    conn.execute("""
        INSERT INTO "PortfolioSnapshot" (id, "walletId", "totalUsdValue", "tokensTracked", "averageApr", metadata, "capturedAt")
        SELECT gen_random_uuid()::text, CASE WHEN w = 0 THEN NULL ELSE 'w-' || w END, round((random() * 1e6)::numeric, 6),
               3, NULL, jsonb_build_object('tick', s), %(start)s + make_interval(days => s * %(every)s)
          FROM generate_series(0, %(wallets)s) w, generate_series(0, %(steps)s) s
    """, {"start": start, "every": h.portfolio_every_days, "wallets": h.wallets, "steps": h.days // h.portfolio_every_days})
    conn.execute("""
        INSERT INTO "PositionSnapshot" (id, "portfolioSnapshotId", "tokenId", "walletId", quantity, "usdValue", "priceUsd",
                                        "positionType", "protocolId")
        SELECT gen_random_uuid()::text, p.id, 'tok-' || (1 + (k + abs(hashtext(p.id))) %% %(tokens)s), p."walletId",
               k + 1, round((random() * 1000)::numeric, 6), 1.5, 'liquid', CASE WHEN k = 0 THEN 'proto-aero' END
          FROM "PortfolioSnapshot" p, generate_series(0, %(per)s - 1) k WHERE p."walletId" IS NOT NULL
    """, {"tokens": h.tokens, "per": h.positions_per_wallet})
    conn.execute("""
        INSERT INTO "TokenBalance" (id, "walletId", "tokenId", "rawBalance", quantity, "usdValue", "updatedAt")
        SELECT gen_random_uuid()::text, 'w-' || w, 'tok-' || t, (w * 1000 + t)::text, w + t, w * t, now()
          FROM generate_series(1, %(wallets)s) w, generate_series(1, %(tokens)s) t WHERE (w + t) %% 3 <> 0
    """, {"wallets": h.wallets, "tokens": h.tokens})
    conn.execute('ANALYZE "PriceSnapshot", "PortfolioSnapshot", "PositionSnapshot", "TokenBalance"')


# -- what the database holds ---------------------------------------------------------------

def row_digests(conn: psycopg.Connection, table: str) -> dict[str, str]:
    """id -> md5 of the row's app columns (the old table's), over the table and the rows set aside."""
    columns = [r[0] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped "
        "ORDER BY attnum", (sql.Identifier(table).as_string(conn),))]
    if table == "PositionSnapshot" and "capturedAt" in columns:
        columns.remove("capturedAt")  # the column adoption adds: checked separately
    row = sql.SQL("md5(ROW({})::text)").format(sql.SQL(", ").join(sql.SQL("r.{}").format(sql.Identifier(c)) for c in columns))
    found: dict[str, str] = {}
    duplicates: list[str] = []
    for rid, digest in conn.execute(sql.SQL("SELECT r.id, {} FROM {} r").format(row, sql.Identifier(table))):
        if rid in found:
            duplicates.append(rid)
        found[rid] = digest
    if conn.execute("SELECT to_regclass(%s) IS NOT NULL", (L.UNPLACED,)).fetchone()[0]:
        old_type = sql.Identifier(table)
        aside = sql.SQL("SELECT r.id, {} FROM (SELECT (jsonb_populate_record(NULL::{}, u.\"row\")).* FROM {} u "
                        "WHERE u.tbl = %s) r").format(row, old_type, sql.Identifier(L.UNPLACED))
        for rid, digest in conn.execute(aside, (table,)):
            if rid in found:
                duplicates.append(rid)
            found[rid] = digest
    assert not duplicates, f"{table}: ids present more than once: {duplicates[:5]}"
    return found


def snapshot(url: str) -> dict[str, dict[str, str]]:
    with psycopg.connect(url) as conn:
        return {t: row_digests(conn, t) for t in TABLES}


# -- the app, writing and reading while adoption runs ----------------------------------------

@dataclass
class Stall:
    seconds: float = 0.0
    what: str = ""
    at: str = ""

    def note(self, seconds: float, what: str) -> None:
        if seconds > self.seconds:
            self.seconds, self.what, self.at = seconds, what, datetime.now().strftime("%H:%M:%S.%f")[:-3]


@dataclass(eq=False)
class AppWriter(threading.Thread):
    """Writes as the app does, through every phase of adoption: new ticks, late and backfill
    prices for old months, portfolio ticks with their positions, balance upserts, price
    updates, and deletes (positions with their portfolio). Records what the end state must be."""

    url: str
    days: int = 120
    tokens: int = 20
    wallets: int = 30
    pause_s: float = 0.01
    stop: threading.Event = field(default_factory=threading.Event)
    inserted: dict[str, set[str]] = field(default_factory=lambda: {t: set() for t in TABLES})
    deleted: dict[str, set[str]] = field(default_factory=lambda: {t: set() for t in TABLES})
    price_updates: dict[str, str] = field(default_factory=dict)  # id -> priceUsd text
    balances: dict[tuple[str, str], str] = field(default_factory=dict)  # (wallet, token) -> quantity text
    errors: list[str] = field(default_factory=list)
    stall: Stall = field(default_factory=Stall)
    operations: int = 0
    positions_needing_time: int = 0  # positions written with "capturedAt" because the column was NOT NULL

    def __post_init__(self) -> None:
        threading.Thread.__init__(self, name="app-writer", daemon=True)
        self.rng = random.Random(13)

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True, application_name="wedefi-app-writer") as conn:
            known_prices = [r[0] for r in conn.execute('SELECT id FROM "PriceSnapshot" ORDER BY id LIMIT 2000')]
            while not self.stop.is_set():
                step = self.operations % 6
                try:
                    started = time.monotonic()
                    what = self._one(conn, step, known_prices)
                    self.stall.note(time.monotonic() - started, what)
                except Exception as exc:  # every failure is a finding
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                self.operations += 1
                time.sleep(self.pause_s)

    def _one(self, conn: psycopg.Connection, step: int, known_prices: list[str]) -> str:
        rng = self.rng
        token = f"tok-{rng.randint(1, self.tokens)}"
        if step == 0:  # a new tick
            rid = str(uuid.uuid4())
            conn.execute('INSERT INTO "PriceSnapshot" (id, "tokenId", "priceUsd", source, "recordedAt") '
                         "VALUES (%s, %s, %s, 'coingecko', %s)", (rid, token, "12.5", now()))
            self.inserted["PriceSnapshot"].add(rid)
            return "insert a price"
        if step == 1:  # a late / backfill tick for an old month
            rid = str(uuid.uuid4())
            moment = now() - timedelta(days=rng.uniform(1, self.days), seconds=rng.randint(0, 3600))
            conn.execute('INSERT INTO "PriceSnapshot" (id, "tokenId", "priceUsd", source, "recordedAt") '
                         "VALUES (%s, %s, %s, 'backfill', %s)", (rid, token, "7.25", moment))
            self.inserted["PriceSnapshot"].add(rid)
            return "backfill a price"
        if step == 2:  # a portfolio tick: the portfolio row and its positions, one transaction
            wallet = f"w-{rng.randint(1, self.wallets)}"
            pid = str(uuid.uuid4())
            captured = now() - timedelta(days=rng.choice([0, 0, 0, rng.uniform(1, self.days)]))
            positions = [str(uuid.uuid4()) for _ in range(2)]
            with conn.transaction():
                conn.execute('INSERT INTO "PortfolioSnapshot" (id, "walletId", "totalUsdValue", "tokensTracked", '
                             '"capturedAt") VALUES (%s, %s, 100, 2, %s)', (pid, wallet, captured))
                needs_time = conn.execute(
                    "SELECT attnotnull FROM pg_attribute WHERE attrelid = '\"PositionSnapshot\"'::regclass "
                    "AND attname = 'capturedAt' AND NOT attisdropped").fetchone()
                for position in positions:
                    if needs_time and needs_time[0]:  # this branch has no nullable "capturedAt" (issue 12)
                        self.positions_needing_time += 1
                        conn.execute('INSERT INTO "PositionSnapshot" (id, "portfolioSnapshotId", "tokenId", "walletId", '
                                     'quantity, "usdValue", "priceUsd", "positionType", "capturedAt") '
                                     "VALUES (%s, %s, %s, %s, 1, 2, 3, 'liquid', %s)",
                                     (position, pid, token, wallet, captured))
                    else:
                        conn.execute('INSERT INTO "PositionSnapshot" (id, "portfolioSnapshotId", "tokenId", "walletId", '
                                     'quantity, "usdValue", "priceUsd", "positionType") '
                                     "VALUES (%s, %s, %s, %s, 1, 2, 3, 'liquid')", (position, pid, token, wallet))
            self.inserted["PortfolioSnapshot"].add(pid)
            self.inserted["PositionSnapshot"].update(positions)
            return "portfolio tick"
        if step == 3:  # balance sync: an upsert on the app's unique key
            wallet = f"w-{rng.randint(1, self.wallets)}"
            quantity = f"{rng.randint(1, 10**6)}.5"
            rid = str(uuid.uuid4())
            row = conn.execute(
                'INSERT INTO "TokenBalance" (id, "walletId", "tokenId", "rawBalance", quantity, "updatedAt") '
                "VALUES (%s, %s, %s, '1', %s, now()) ON CONFLICT (\"walletId\", \"tokenId\") DO UPDATE SET "
                'quantity = EXCLUDED.quantity, "updatedAt" = EXCLUDED."updatedAt" RETURNING id',
                (rid, wallet, token, quantity)).fetchone()
            if row[0] == rid:  # inserted, not updated
                self.inserted["TokenBalance"].add(row[0])
            self.balances[(wallet, token)] = quantity
            return "upsert a balance"
        if step == 4:  # a correction of an existing price
            rid = rng.choice(known_prices)
            if rid not in self.deleted["PriceSnapshot"]:
                value = f"{rng.randint(1, 9999)}.125"
                conn.execute('UPDATE "PriceSnapshot" SET "priceUsd" = %s WHERE id = %s', (value, rid))
                self.price_updates[rid] = value
            return "update a price"
        # step 5: deletes, by id (the app's retention, without ctid tricks)
        if self.operations % 12 == 5:
            rid = known_prices.pop(rng.randrange(len(known_prices)))
            conn.execute('DELETE FROM "PriceSnapshot" WHERE id = %s', (rid,))
            self.deleted["PriceSnapshot"].add(rid)
            self.price_updates.pop(rid, None)
            return "delete a price"
        row = conn.execute('SELECT id FROM "PortfolioSnapshot" WHERE "walletId" = %s AND "capturedAt" < %s '
                           'ORDER BY "capturedAt" LIMIT 1', (f"w-{rng.randint(1, self.wallets)}",
                                                             now() - timedelta(days=self.days // 2))).fetchone()
        if row:
            with conn.transaction():
                gone = [r[0] for r in conn.execute(
                    'DELETE FROM "PositionSnapshot" WHERE "portfolioSnapshotId" = %s RETURNING id', (row[0],))]
                conn.execute('DELETE FROM "PortfolioSnapshot" WHERE id = %s', (row[0],))
            self.deleted["PortfolioSnapshot"].add(row[0])
            self.deleted["PositionSnapshot"].update(gone)
        return "delete a portfolio with its positions"


@dataclass(eq=False)
class AppReader(threading.Thread):
    """Reads as the app's dashboard does, and notes the longest wait."""

    url: str
    tokens: int = 20
    wallets: int = 30
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)
    stall: Stall = field(default_factory=Stall)
    queries: int = 0

    def __post_init__(self) -> None:
        threading.Thread.__init__(self, name="app-reader", daemon=True)

    def run(self) -> None:
        rng = random.Random(7)
        with psycopg.connect(self.url, autocommit=True, application_name="wedefi-app-reader") as conn:
            while not self.stop.is_set():
                token, wallet = f"tok-{rng.randint(1, self.tokens)}", f"w-{rng.randint(1, self.wallets)}"
                started = time.monotonic()
                try:
                    conn.execute('SELECT "priceUsd" FROM "PriceSnapshot" WHERE "tokenId" = %s AND "recordedAt" > %s '
                                 'ORDER BY "recordedAt" DESC LIMIT 1', (token, now() - timedelta(days=2))).fetchall()
                    conn.execute('SELECT p.id, count(s.id) FROM "PortfolioSnapshot" p LEFT JOIN "PositionSnapshot" s '
                                 'ON s."portfolioSnapshotId" = p.id WHERE p."walletId" = %s GROUP BY p.id, p."capturedAt" '
                                 'ORDER BY p."capturedAt" DESC LIMIT 1', (wallet,)).fetchall()
                    conn.execute('SELECT sum(quantity) FROM "TokenBalance" WHERE "walletId" = %s', (wallet,)).fetchall()
                    self.stall.note(time.monotonic() - started, "dashboard reads")
                except Exception as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                self.queries += 1
                time.sleep(0.01)


@contextmanager
def app_running(url: str, days: int = 120) -> Iterator[tuple[AppWriter, AppReader]]:
    writer, reader = AppWriter(url, days=days), AppReader(url)
    writer.start()
    reader.start()
    try:
        yield writer, reader
    finally:
        writer.stop.set()
        reader.stop.set()
        writer.join(30)
        reader.join(30)


# -- the checks -----------------------------------------------------------------------------

def assert_adopted(url: str, before: dict[str, dict[str, str]], writer: AppWriter | None = None) -> dict[str, int]:
    """The end state an uninterrupted adoption must leave: the four tables partitioned with
    every row of the starting snapshot and every row the app wrote exactly once (deleted
    ones gone, updates kept), positions carrying their portfolio's time, sql/ recorded, no
    staging schema, no INVALID index. Returns the rows set aside per table."""
    with psycopg.connect(url, autocommit=True) as conn:
        kinds = dict(conn.execute("SELECT relname, relkind::text FROM pg_class WHERE relnamespace = 'public'::regnamespace"
                                  " AND relname = ANY(%s)", (list(TABLES),)).fetchall())
        assert kinds == {t: "p" for t in TABLES}, kinds
        schemas = [r[0] for r in conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'wedefi_adopt%'")]
        assert schemas == [], f"leftover schemas {schemas}"
        invalid = [r[0] for r in conn.execute("SELECT indexrelid::regclass::text FROM pg_index WHERE NOT indisvalid")]
        assert invalid == [], f"INVALID indexes {invalid}"
        leftovers = [r[0] for r in conn.execute(
            "SELECT relname FROM pg_class WHERE relname LIKE 'adopt_%' OR relname LIKE 'wedefi_adopt_model%'")]
        assert leftovers == [], leftovers
        recorded = {r[0] for r in conn.execute("SELECT filename FROM wedefi_schema_migrations")}
        assert recorded == {m.path.name for m in migrations.discover()}
        capture = conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE %s",
                               (L.CAPTURE_TRIGGER_PREFIX + "%",)).fetchone()[0]
        assert capture == 0
        after = {t: row_digests(conn, t) for t in TABLES}
        for table in TABLES:
            expected_ids = (set(before[table]) - (writer.deleted[table] if writer else set())) | (
                writer.inserted[table] if writer else set())
            missing = expected_ids - set(after[table])
            extra = set(after[table]) - expected_ids
            assert not missing, f"{table}: {len(missing)} row(s) lost, e.g. {sorted(missing)[:3]}"
            assert not extra, f"{table}: {len(extra)} row(s) that should not be there, e.g. {sorted(extra)[:3]}"
            touched = set(writer.price_updates) if writer and table == "PriceSnapshot" else set()
            if writer and table == "TokenBalance" and writer.balances:
                wallets, tokens = zip(*writer.balances)
                touched = {r[0] for r in conn.execute(
                    'SELECT b.id FROM "TokenBalance" b JOIN unnest(%s::text[], %s::text[]) AS u(w, t) '
                    'ON b."walletId" = u.w AND b."tokenId" = u.t', (list(wallets), list(tokens)))}
            changed = [i for i in (set(before[table]) & set(after[table])) - touched
                       if before[table][i] != after[table][i]]
            assert not changed, f"{table}: {len(changed)} row(s) changed, e.g. {changed[:3]}"
        if writer:
            for rid, value in writer.price_updates.items():
                got = conn.execute('SELECT "priceUsd"::text FROM "PriceSnapshot" WHERE id = %s', (rid,)).fetchone()
                assert got and float(got[0]) == float(value), (rid, got, value)
            for (wallet, token), quantity in writer.balances.items():
                got = conn.execute('SELECT quantity::text FROM "TokenBalance" WHERE "walletId" = %s AND "tokenId" = %s',
                                   (wallet, token)).fetchone()
                assert got and float(got[0]) == float(quantity), (wallet, token, got, quantity)
        # NULL is allowed only where the layout allows it (issue 12: the app's own position writes
        # after the swap carry none until complete_positions fills them); a time must be the portfolio's
        mismatched = conn.execute('SELECT count(*) FROM "PositionSnapshot" s JOIN "PortfolioSnapshot" p '
                                  'ON p.id = s."portfolioSnapshotId" WHERE s."capturedAt" <> p."capturedAt"'
                                  ).fetchone()[0]
        assert mismatched == 0, f"{mismatched} position(s) do not carry their portfolio's capturedAt"
        if writer is None:  # every position adoption placed has its portfolio's time
            untimed = conn.execute('SELECT count(*) FROM "PositionSnapshot" s JOIN "PortfolioSnapshot" p '
                                   'ON p.id = s."portfolioSnapshotId" WHERE s."capturedAt" IS NULL').fetchone()[0]
            assert untimed == 0, f"{untimed} position(s) with a portfolio row have no capturedAt"
        aside = dict(conn.execute("SELECT tbl, count(*) FROM wedefi_adopt_unplaced GROUP BY 1").fetchall()) if \
            conn.execute("SELECT to_regclass('wedefi_adopt_unplaced') IS NOT NULL").fetchone()[0] else {}
    return aside


# `wedefi-pipelines adopt` with a hook at adoption's named points: argv[1] is "<point>:kill"
# (SIGKILL there) or "<point>:sleep=<s>" (stall there), the rest the command's arguments.
FAULTY_ADOPT = """
import os, signal, sys, time
from wedefi_pipelines.adoption import session
from wedefi_pipelines.cli import main
point, _, how = sys.argv[1].partition(":")

def hook(name):
    if name != point:
        return
    if how.startswith("sleep="):
        time.sleep(float(how[len("sleep="):]))
    else:
        os.kill(os.getpid(), signal.SIGKILL)

session.ON_POINT.set(hook)
sys.exit(main(["adopt", *sys.argv[2:]]))
"""


def fault_hook(fault: str) -> Callable[[str], None]:
    """The in-process form of a fault ("<point>:sleep=<s>"), for `adopt(on_point=...)`."""
    point, _, how = fault.partition(":")

    def hook(name: str) -> None:
        if name == point and how.startswith("sleep="):
            time.sleep(float(how[len("sleep="):]))
    return hook


def run_adopt(env: dict[str, str], *args: str, fault: str | None = None, timeout: float = 600
              ) -> subprocess.CompletedProcess:
    """`wedefi-pipelines adopt` as its own process (so a fault can kill -9 it)."""
    full_env = {**os.environ, **env}
    command = ([sys.executable, "-c", FAULTY_ADOPT, fault, *args] if fault
               else [sys.executable, "-m", "wedefi_pipelines", "adopt", *args])
    return subprocess.run(command, env=full_env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def run_against_adopted_database(make_database: Callable[[], str], check: Callable[[str], None]) -> None:
    """The hook for the app's own test suites: build a Prisma-built database (`make_database`
    returns its URL), adopt it, then call `check(url)` against the result. The app's Prisma
    suite plugs in here as a `check` that runs `npm test` with DATABASE_URL set to `url`."""
    from wedefi_pipelines.adoption.run import adopt

    url = make_database()
    adopt(url, say=lambda line: None)
    check(url)


# -- fixtures (imported by the adoption test modules) -----------------------------------------

@pytest.fixture(scope="session")
def prisma_template(stack) -> str:
    """A Prisma-built database with four months of history, cloned by `prisma_db`."""
    name = "prisma_template"
    with psycopg.connect(stack.primary.url("postgres"), autocommit=True) as conn:
        exists = conn.execute("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = %s)", (name,)).fetchone()[0]
    if not exists:  # another test module of the session built it already
        create_prisma_database(stack.primary.url, stack.primary.url("postgres"), name)
    return name


@pytest.fixture
def prisma_db(stack, prisma_template) -> Iterator[TestDatabase]:
    name = "a_" + uuid.uuid4().hex[:12]
    stack.create_database(name, template=prisma_template)
    try:
        yield TestDatabase(name=name, stack=stack)
    finally:
        with psycopg.connect(stack.primary.url("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def adopt_env(prisma_db, tmp_path) -> dict[str, str]:
    """The database's variables, and small copy ranges (so a kill can land mid-copy)."""
    path = tmp_path / "settings.yaml"
    path.write_text("adoption:\n  copy_chunk_pages: 32\n  replay_batch: 500\n  run_lock_wait_s: 30\n")
    return {**prisma_db.env, "WEDEFI_SETTINGS": str(path)}
