"""Adoption of a live, Prisma-built "PriceSnapshot" against pg_partman 4.7's two documented methods.

    WEDEFI_STACK_DIR=/var/tmp/wedefi-bench python benchmarks/adopt.py    # 10,000,000 rows: 200 days x 50,000
    python benchmarks/adopt.py --days 30 --rows-per-day 20000              # quick run

PostgreSQL 15 (the machine's /usr/lib/postgresql/15 binaries, which load extensions from
/usr/share/postgresql/15/extension); Debian's `postgresql-15-partman` (pg_partman 4.7) is
installed with apt-get when missing. One template database is built as the app's Prisma
schema builds it (fixtures/prisma/db_push.sql) with an app-shaped "PriceSnapshot" of
`--days` x `--rows-per-day` rows (500 tokens, random UUID ids), and every method runs on a
clone of it:

  adopt               `wedefi-pipelines adopt`, with an app writer inserting a price every
                      `--writer-ms` ms and an app reader asking a token's latest price, running
                      throughout. Total time, each one's longest stall, extra disk at the peak.
  pg_partman offline  its "Offline Partitioning" (app stopped): rename the table, create the
                      partitioned parent with the same keys, create_parent (monthly),
                      partition_data_proc(p_source_table) month by month, VACUUM ANALYZE.
  pg_partman online   its "Online Partitioning", with the same writer and reader: parent and
                      template (PK on id), create_parent starting after the data, then one
                      transaction renaming the tables and attaching the old table as the
                      DEFAULT partition, then partition_data_proc out of the default. Longest
                      stalls, and whether it completed.

Prints the ratios: adopt's time / pg_partman offline's (goal <= 1.0x), adopt's longest
stalls against pg_partman online's (goal <= 1 s and lower).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wedefi_pipelines import devstack  # noqa: E402
from wedefi_pipelines.adoption.run import adopt  # noqa: E402
from wedefi_pipelines.settings import Settings  # noqa: E402

PG15 = "/usr/lib/postgresql/15/bin"
PARTMAN_CONTROL = Path("/usr/share/postgresql/15/extension/pg_partman.control")
DDL = Path(__file__).resolve().parent.parent / "wedefi_pipelines_tests" / "fixtures" / "prisma" / "db_push.sql"
TOKENS = 500
SERVER_SETTINGS = {"shared_buffers": "'1GB'", "maintenance_work_mem": "'512MB'", "work_mem": "'64MB'",
                   "max_wal_size": "'8GB'", "checkpoint_timeout": "'30min'"}


def ensure_partman() -> None:
    if PARTMAN_CONTROL.exists():
        return
    print("pg_partman for PostgreSQL 15 is missing: apt-get install postgresql-15-partman", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(["apt-get", "install", "-y", "-q", "postgresql-15-partman"], env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "postgresql-15-partman"], env=env, check=True)


def now() -> datetime:
    moment = datetime.now(timezone.utc).replace(tzinfo=None)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def build_template(stack: devstack.LocalStack, name: str, days: int, per_day: int) -> int:
    """The app's database as Prisma builds it, "PriceSnapshot" filled (keys built after the load,
    then named as Prisma names them), a few portfolios, positions and balances."""
    stack.create_database(name)
    rows = days * per_day
    with psycopg.connect(stack.primary.url(name), autocommit=True) as conn:
        conn.execute(DDL.read_text())
        conn.execute("""INSERT INTO "Chain" (id, name, "updatedAt") VALUES (8453, 'Base', now())""")
        conn.execute("""INSERT INTO "Token" (id, "chainId", address, symbol, name, decimals, "updatedAt")
                        SELECT 'tok-' || i, 8453, '0x' || lpad(i::text, 40, '0'), 'T' || i, 'Token ' || i, 18, now()
                          FROM generate_series(1, %s) i""", (TOKENS,))
        conn.execute("""INSERT INTO "Wallet" (id, address, "chainId", "updatedAt")
                        SELECT 'w-' || i, '0x' || lpad(to_hex(i), 40, '0'), 8453, now() FROM generate_series(1, 100) i""")
        conn.execute('ALTER TABLE "PriceSnapshot" DROP CONSTRAINT "PriceSnapshot_tokenId_fkey", '
                     'DROP CONSTRAINT "PriceSnapshot_pkey"')
        conn.execute("DROP INDEX price_snapshot_token_recorded_idx")
        start = now() - timedelta(days=days)
        step_s = 86400 * TOKENS / per_day  # each token ticks every step_s seconds
        ticks = rows // TOKENS
        for first in range(0, ticks, 2000):
            conn.execute("""
                INSERT INTO "PriceSnapshot" (id, "tokenId", "priceUsd", source, "recordedAt", "createdAt")
                SELECT gen_random_uuid()::text, 'tok-' || t, round((1 + random() * 5000)::numeric, 8), 'coingecko',
                       %(start)s + make_interval(secs => s * %(step)s), %(start)s + make_interval(secs => s * %(step)s)
                  FROM generate_series(%(first)s::int, %(last)s::int) s, generate_series(1, %(tokens)s::int) t""",
                         {"start": start, "step": step_s, "first": first, "last": min(ticks, first + 2000) - 1,
                          "tokens": TOKENS})
        conn.execute('ALTER TABLE "PriceSnapshot" ADD CONSTRAINT "PriceSnapshot_pkey" PRIMARY KEY ("id")')
        conn.execute('CREATE INDEX "price_snapshot_token_recorded_idx" ON "PriceSnapshot"("tokenId", "recordedAt")')
        conn.execute('ALTER TABLE "PriceSnapshot" ADD CONSTRAINT "PriceSnapshot_tokenId_fkey" FOREIGN KEY ("tokenId") '
                     'REFERENCES "Token"("id") ON DELETE CASCADE ON UPDATE CASCADE')
        conn.execute("""INSERT INTO "PortfolioSnapshot" (id, "walletId", "totalUsdValue", "tokensTracked", "capturedAt")
                        SELECT gen_random_uuid()::text, 'w-' || w, 1000, 3, %s + make_interval(days => d)
                          FROM generate_series(1, 100) w, generate_series(0, %s) d""", (start, days - 1))
        conn.execute("""INSERT INTO "PositionSnapshot" (id, "portfolioSnapshotId", "tokenId", "walletId", quantity,
                                                        "usdValue", "priceUsd", "positionType")
                        SELECT gen_random_uuid()::text, p.id, 'tok-' || (1 + k), p."walletId", 1, 2, 3, 'liquid'
                          FROM "PortfolioSnapshot" p, generate_series(0, 2) k""")
        conn.execute("""INSERT INTO "TokenBalance" (id, "walletId", "tokenId", "rawBalance", quantity, "updatedAt")
                        SELECT gen_random_uuid()::text, 'w-' || w, 'tok-' || t, '1', 1, now()
                          FROM generate_series(1, 100) w, generate_series(1, 50) t""")
        conn.execute("VACUUM ANALYZE")
    return rows


def clone(stack: devstack.LocalStack, template: str, name: str) -> str:
    with psycopg.connect(stack.primary.url("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY = FILE_COPY").format(
            sql.Identifier(name), sql.Identifier(template)))
        conn.execute("CHECKPOINT")
    return stack.primary.url(name)


def drop(stack: devstack.LocalStack, name: str) -> None:
    with psycopg.connect(stack.primary.url("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@dataclass(eq=False)
class App(threading.Thread):
    """The app while a method runs: a writer inserting a tick every `interval` s and a reader
    asking a token's latest price; each notes its longest operation."""

    url: str
    role: str
    interval: float
    stop: threading.Event = field(default_factory=threading.Event)
    longest: float = 0.0
    longest_at: float = 0.0
    operations: int = 0
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        threading.Thread.__init__(self, name=f"app-{self.role}", daemon=True)

    def run(self) -> None:
        rng = random.Random(self.role)
        started = time.monotonic()
        with psycopg.connect(self.url, autocommit=True, application_name=f"bench-app-{self.role}") as conn:
            while not self.stop.is_set():
                token = f"tok-{rng.randint(1, TOKENS)}"
                t0 = time.monotonic()
                try:
                    if self.role == "writer":
                        conn.execute('INSERT INTO "PriceSnapshot" (id, "tokenId", "priceUsd", source, "recordedAt") '
                                     "VALUES (%s, %s, 1.25, 'coingecko', %s)", (str(uuid.uuid4()), token, now()))
                    else:
                        conn.execute('SELECT "priceUsd" FROM "PriceSnapshot" WHERE "tokenId" = %s AND "recordedAt" > %s '
                                     'ORDER BY "recordedAt" DESC LIMIT 1', (token, now() - timedelta(days=2))).fetchall()
                except psycopg.Error as exc:
                    if len(self.errors) < 20:
                        self.errors.append(f"{type(exc).__name__}: {str(exc).strip()[:160]}")
                took = time.monotonic() - t0
                if took > self.longest:
                    self.longest, self.longest_at = took, t0 - started
                self.operations += 1
                time.sleep(max(0.0, self.interval - took))


class DiskPeak(threading.Thread):
    """Samples the database's size plus the cluster's WAL every 0.25 s."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop, self.base, self.peak = url, threading.Event(), 0, 0

    def sample(self, conn: psycopg.Connection) -> int:
        return conn.execute("SELECT pg_database_size(current_database()) + (SELECT coalesce(sum(size), 0) "
                            "FROM pg_ls_waldir())").fetchone()[0]

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            self.base = self.peak = self.sample(conn)
            while not self.stop.wait(0.25):
                self.peak = max(self.peak, self.sample(conn))

    @property
    def extra(self) -> int:
        return self.peak - self.base


def with_app(url: str, writer_ms: float, work) -> tuple[object, App, App, DiskPeak]:
    writer, reader, disk = App(url, "writer", writer_ms / 1000), App(url, "reader", writer_ms / 1000), DiskPeak(url)
    disk.start()
    time.sleep(0.5)
    writer.start()
    reader.start()
    time.sleep(2)
    try:
        result = work()
    finally:
        time.sleep(1)
        for thread in (writer, reader, disk):
            thread.stop.set()
        for thread in (writer, reader, disk):
            thread.join(60)
    return result, writer, reader, disk


def run_adopt(url: str, writer_ms: float) -> dict:
    settings = Settings()

    def work():
        t0 = time.monotonic()
        report = adopt(url, settings=settings, say=lambda line: print(f"    {line}", flush=True))
        return time.monotonic() - t0, report

    (elapsed, report), writer, reader, disk = with_app(url, writer_ms, work)
    with psycopg.connect(url) as conn:
        rows = conn.execute('SELECT count(*) FROM "PriceSnapshot"').fetchone()[0]
        kind = conn.execute("SELECT relkind::text FROM pg_class WHERE oid = '\"PriceSnapshot\"'::regclass").fetchone()[0]
    return {"elapsed": elapsed, "writer": writer, "reader": reader, "disk": disk.extra, "rows": rows, "kind": kind,
            "swap": report.swaps.get("PriceSnapshot", {}), "swaps": report.swaps, "locks": report.locks}


PARTMAN_PARENT = """
CREATE TABLE "PriceSnapshot" (
    "id" TEXT NOT NULL, "tokenId" TEXT NOT NULL, "priceUsd" DECIMAL(36,18) NOT NULL, "source" VARCHAR(32) NOT NULL,
    "recordedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP, "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP
) PARTITION BY RANGE ("recordedAt")
"""


def run_partman_offline(url: str) -> dict:
    """pg_partman's "Offline Partitioning" (docs/pg_partman_howto_native.md), the app stopped."""
    t0 = time.monotonic()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA partman; CREATE EXTENSION pg_partman SCHEMA partman")
        first = conn.execute('SELECT date_trunc(\'month\', min("recordedAt")) FROM "PriceSnapshot"').fetchone()[0]
        conn.execute('ALTER TABLE "PriceSnapshot" RENAME TO "PriceSnapshot_old"')
        conn.execute(PARTMAN_PARENT)
        conn.execute('ALTER TABLE "PriceSnapshot" ADD PRIMARY KEY (id, "recordedAt")')
        conn.execute('CREATE INDEX ON "PriceSnapshot" ("tokenId", "recordedAt")')
        conn.execute('ALTER TABLE "PriceSnapshot" ADD FOREIGN KEY ("tokenId") REFERENCES "Token"(id) '
                     "ON DELETE CASCADE ON UPDATE CASCADE")
        conn.execute("SELECT partman.create_parent('public.PriceSnapshot', 'recordedAt', 'native', 'monthly', "
                     "p_premake := 6, p_start_partition := %s, p_jobmon := false)", (first.isoformat(),))
        conn.execute("CALL partman.partition_data_proc('public.PriceSnapshot', p_batch := 1000, p_wait := 0, "
                     "p_source_table := 'public.PriceSnapshot_old', p_quiet := true)")
        conn.execute('VACUUM ANALYZE "PriceSnapshot"')
        rows = conn.execute('SELECT count(*) FROM "PriceSnapshot"').fetchone()[0]
        left = conn.execute('SELECT count(*) FROM "PriceSnapshot_old"').fetchone()[0]
    return {"elapsed": time.monotonic() - t0, "rows": rows, "left": left}


def run_partman_online(url: str, writer_ms: float, timeout_s: float) -> dict:
    """pg_partman's "Online Partitioning": the old table becomes the new parent's DEFAULT
    partition in one transaction, then partition_data_proc moves its rows out, month by month."""
    outcome: dict = {}

    def work():
        t0 = time.monotonic()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SELECT set_config('statement_timeout', %s, false)", (f"{int(timeout_s)}s",))
            conn.execute("CREATE SCHEMA partman; CREATE EXTENSION pg_partman SCHEMA partman")
            conn.execute(PARTMAN_PARENT.replace('"PriceSnapshot"', '"PriceSnapshot_new"'))
            conn.execute('CREATE INDEX ON "PriceSnapshot_new" ("tokenId", "recordedAt")')
            conn.execute('ALTER TABLE "PriceSnapshot_new" ADD FOREIGN KEY ("tokenId") REFERENCES "Token"(id) '
                         "ON DELETE CASCADE ON UPDATE CASCADE")
            conn.execute('CREATE TABLE "PriceSnapshot_template" (LIKE "PriceSnapshot_new")')
            conn.execute('ALTER TABLE "PriceSnapshot_template" ADD PRIMARY KEY (id)')
            start = (datetime.now(timezone.utc) + timedelta(days=40)).replace(day=1).date()
            conn.execute("SELECT partman.create_parent('public.PriceSnapshot_new', 'recordedAt', 'native', 'monthly', "
                         "p_template_table := 'public.PriceSnapshot_template', p_premake := 1, "
                         "p_start_partition := %s, p_jobmon := false)", (start.isoformat(),))
            conn.execute('DROP TABLE "PriceSnapshot_new_default"')
            conn.execute("UPDATE partman.part_config SET parent_table = 'public.PriceSnapshot', premake = 6 "
                         "WHERE parent_table = 'public.PriceSnapshot_new'")
            children = [r[0] for r in conn.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = '\"PriceSnapshot_new\"'::regclass")]
            t_swap = time.monotonic()
            with conn.transaction():
                conn.execute('LOCK TABLE "PriceSnapshot" IN ACCESS EXCLUSIVE MODE')
                conn.execute('LOCK TABLE "PriceSnapshot_new" IN ACCESS EXCLUSIVE MODE')
                conn.execute('ALTER TABLE "PriceSnapshot" RENAME TO "PriceSnapshot_default"')
                conn.execute('ALTER TABLE "PriceSnapshot_new" RENAME TO "PriceSnapshot"')
                for child in children:
                    conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(
                        sql.Identifier(child), sql.Identifier(child.replace("PriceSnapshot_new", "PriceSnapshot"))))
                conn.execute('ALTER TABLE "PriceSnapshot" ATTACH PARTITION "PriceSnapshot_default" DEFAULT')
            outcome["swap_s"] = time.monotonic() - t_swap
            try:
                conn.execute("CALL partman.partition_data_proc('public.PriceSnapshot', p_batch := 1000, p_wait := 0, "
                             "p_quiet := true)")
                conn.execute('VACUUM ANALYZE "PriceSnapshot"')
                outcome["completed"] = True
            except psycopg.Error as exc:
                outcome["completed"] = False
                outcome["error"] = str(exc).strip().splitlines()[0]
            outcome["left_in_default"] = conn.execute('SELECT count(*) FROM "PriceSnapshot_default"').fetchone()[0]
        return time.monotonic() - t0

    elapsed, writer, reader, disk = with_app(url, writer_ms, work)
    return {"elapsed": elapsed, "writer": writer, "reader": reader, "disk": disk.extra, **outcome}


def gb(n: float) -> str:
    return f"{n / 1024**3:.2f} GB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=200)
    parser.add_argument("--rows-per-day", type=int, default=50_000)
    parser.add_argument("--writer-ms", type=float, default=20.0, help="the app writer's (and reader's) pace")
    parser.add_argument("--online-timeout-s", type=float, default=1800, help="give pg_partman's online run this long")
    parser.add_argument("--skip-online", action="store_true")
    args = parser.parse_args()
    if not Path(PG15, "postgres").exists():
        parser.error(f"PostgreSQL 15 binaries not found in {PG15} (Debian package postgresql-15)")
    ensure_partman()
    root = os.environ.get("WEDEFI_STACK_DIR")
    if not root:
        os.environ["WEDEFI_STACK_DIR"] = root = "/var/tmp/wedefi-bench-adopt"
    print(f"stack data under {root} ({shutil.disk_usage(Path(root).parent).free / 1024**3:.0f} GB free)", flush=True)
    with devstack.LocalStack(pg_bin=PG15, replicas=(), with_s3=False, with_redis=False,
                             extra_pg_settings=SERVER_SETTINGS) as stack:
        with psycopg.connect(stack.primary.url("postgres"), autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
        t0 = time.monotonic()
        rows = build_template(stack, "bench_template", args.days, args.rows_per_day)
        print(f"PostgreSQL {version}; template: {rows:,} app-shaped PriceSnapshot rows ({args.days} days x "
              f"{args.rows_per_day:,}), built in {time.monotonic() - t0:.0f}s", flush=True)

        print("adopt (app writing every %g ms and reading throughout):" % args.writer_ms, flush=True)
        ours = run_adopt(clone(stack, "bench_template", "bench_adopt"), args.writer_ms)
        drop(stack, "bench_adopt")
        print(f"  {ours['elapsed']:.1f}s; {ours['rows']:,} rows, table kind {ours['kind']}; writer longest "
              f"{ours['writer'].longest * 1000:.0f} ms ({ours['writer'].operations} inserts, errors "
              f"{ours['writer'].errors or 'none'}), reader longest {ours['reader'].longest * 1000:.0f} ms; swap "
              f"{ours['swap']}; extra disk at the peak {gb(ours['disk'])}", flush=True)
        for group, detail in ours["swaps"].items():
            print(f"    swap {group}: lock wait {detail['lock_wait_ms']} ms, held {detail['held_ms']} ms, "
                  f"{detail['replayed_under_lock']} change(s) replayed under it, attempt(s) {detail['attempts']}")
        for what, attempts, ms in sorted(ours["locks"], key=lambda x: -x[2]):
            print(f"    strong-lock step {ms:7.1f} ms ({attempts} attempt(s)): {what}")

        print("pg_partman offline (app stopped):", flush=True)
        offline = run_partman_offline(clone(stack, "bench_template", "bench_offline"))
        drop(stack, "bench_offline")
        print(f"  {offline['elapsed']:.1f}s; {offline['rows']:,} rows moved, {offline['left']} left behind", flush=True)

        online = None
        if not args.skip_online:
            print("pg_partman online (app writing and reading throughout):", flush=True)
            online = run_partman_online(clone(stack, "bench_template", "bench_online"), args.writer_ms,
                                        args.online_timeout_s)
            drop(stack, "bench_online")
            print(f"  {online['elapsed']:.1f}s; swap transaction {online.get('swap_s', float('nan')):.2f}s; completed: "
                  f"{'yes' if online.get('completed') else 'no'}{' (' + online['error'] + ')' if online.get('error') else ''};"
                  f" rows left in its default partition {online.get('left_in_default')}; writer longest "
                  f"{online['writer'].longest * 1000:.0f} ms (errors {online['writer'].errors or 'none'}), reader longest "
                  f"{online['reader'].longest * 1000:.0f} ms; extra disk at the peak {gb(online['disk'])}", flush=True)

    print()
    print(f"adopt time / pg_partman offline time: {ours['elapsed']:.1f}s / {offline['elapsed']:.1f}s = "
          f"{ours['elapsed'] / offline['elapsed']:.2f}x (goal <= 1.0x)")
    if online is not None:
        print(f"longest writer stall: adopt {ours['writer'].longest * 1000:.0f} ms vs pg_partman online "
              f"{online['writer'].longest * 1000:.0f} ms (goal <= 1000 ms and lower)")
        print(f"longest reader stall: adopt {ours['reader'].longest * 1000:.0f} ms vs pg_partman online "
              f"{online['reader'].longest * 1000:.0f} ms (goal <= 1000 ms and lower)")
        print(f"pg_partman online completed: {'yes' if online.get('completed') else 'no: ' + str(online.get('error'))}")
    print(f"extra disk at the peak: adopt {gb(ours['disk'])}"
          + (f", pg_partman online {gb(online['disk'])}" if online is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
