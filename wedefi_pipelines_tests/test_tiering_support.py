"""Shared helpers for the tiering tests (no tests here): data in the three range tables
with values that stress exactness, the S3 store on a per-test prefix, row snapshots,
and a TCP proxy in front of the S3 server that can cut a transfer in the middle."""

from __future__ import annotations

import socket
import threading
from datetime import date, datetime, timedelta, timezone

import psycopg
from psycopg import sql

from wedefi_pipelines import month_ops
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.resources.archive import ArchiveStore
from wedefi_pipelines.settings import Settings

TOKENS = ("tok-1", "tok-2", "tok-3")
WALLETS = ("w-1", "w-2")


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def months_ago(count: int) -> date:
    return p.add_months(p.month_of(now_utc()), -count)


def seed_reference(conn: psycopg.Connection) -> None:
    conn.execute("""INSERT INTO "Chain" (id, name, "updatedAt") VALUES (1, 'Ethereum', now()) ON CONFLICT DO NOTHING""")
    for token in TOKENS:
        conn.execute("""INSERT INTO "Token" (id, "chainId", address, symbol, name, decimals, "updatedAt")
                        VALUES (%s, 1, %s, upper(%s), %s, 18, now()) ON CONFLICT DO NOTHING""",
                     (token, "0x" + token, token, token))
    for i, wallet in enumerate(WALLETS):
        conn.execute("""INSERT INTO "Wallet" (id, address, "chainId", "updatedAt") VALUES (%s, %s, 1, now())
                        ON CONFLICT DO NOTHING""", (wallet, f"0x{i:040x}"))
    conn.execute("""INSERT INTO "Protocol" (id, slug, name, "chainId", "updatedAt") VALUES ('proto-1', 'aave', 'Aave', 1, now())
                    ON CONFLICT DO NOTHING""")


PRICE_ROWS = sql.SQL("""
INSERT INTO {rel} (id, "tokenId", "priceUsd", source, "recordedAt", "createdAt")
SELECT md5(t || g::text || {start} || {salt})::uuid::text, t,
       CASE WHEN g % 97 = 0 THEN 0.000000000000000001
            WHEN g % 89 = 0 THEN 123456789012345678.123456789012345678
            WHEN g % 83 = 0 THEN 0
            ELSE round((1000 + 900 * sin(g / 7.0 + length(t)))::numeric, 12) END,
       CASE WHEN g % 5 = 0 THEN '' ELSE 'synthetic' END,
       {start}::timestamp + g * {step}::interval,
       {start}::timestamp + g * {step}::interval + interval '1.234 seconds'
  FROM generate_series(0, {n} - 1) g, unnest({tokens}::text[]) t
""")


def load_prices(conn: psycopg.Connection, month: date, step: str = "6 hours", tokens=TOKENS, salt: str = "") -> int:
    """One attached month of prices: `step` ticks per token, with extreme and empty values."""
    start, end = p.month_bounds(month)
    ticks = int((end - start) / _interval(step))
    with month_ops.staged_month(conn, p.PRICE_SNAPSHOT, month) as child:
        conn.execute(PRICE_ROWS.format(rel=sql.Identifier(child), salt=sql.Literal(salt), start=sql.Literal(start),
                                       step=sql.Literal(step), n=sql.Literal(ticks), tokens=sql.Literal(list(tokens))))
    conn.commit()
    return ticks * len(tokens)


def insert_prices(conn: psycopg.Connection, moments: list[datetime], token: str = "tok-1") -> None:
    """Rows through the parent (they land in a child or in the default partition)."""
    for i, moment in enumerate(moments):
        conn.execute("""INSERT INTO "PriceSnapshot" ("tokenId", "priceUsd", source, "recordedAt")
                        VALUES (%s, %s, 'late', %s)""", (token, 1 + i / 1000, moment))
    conn.commit()


def _interval(text: str) -> timedelta:
    number, unit = text.split()
    return timedelta(**{unit if unit.endswith("s") else unit + "s": int(number)})


def load_portfolio(conn: psycopg.Connection, month: date, every: str = "1 day") -> tuple[int, int]:
    """A month of PortfolioSnapshot (per wallet and all-wallets rows) and its PositionSnapshots."""
    start, end = p.month_bounds(month)
    ticks = int((end - start) / _interval(every))
    with month_ops.staged_month(conn, p.PORTFOLIO_SNAPSHOT, month) as child:
        conn.execute(sql.SQL("""
            INSERT INTO {rel} (id, "walletId", "totalUsdValue", "totalUsdValueChange24h", "tokensTracked",
                               "averageApr", metadata, "capturedAt")
            SELECT 'pf-' || coalesce(w, 'all') || '-' || g, w, 1000.5 + g, CASE WHEN g % 2 = 0 THEN NULL ELSE -1.25 END,
                   3, 0.000000000000000001, jsonb_build_object('tick', g, 'note', 'é "q"'),
                   {start}::timestamp + g * {step}::interval
              FROM generate_series(0, {n} - 1) g, unnest(ARRAY['w-1', 'w-2', NULL]::text[]) w""").format(
            rel=sql.Identifier(child), start=sql.Literal(start), step=sql.Literal(every), n=sql.Literal(ticks)))
    with month_ops.staged_month(conn, p.POSITION_SNAPSHOT, month) as child:
        conn.execute(sql.SQL("""
            INSERT INTO {rel} ("portfolioSnapshotId", "tokenId", "walletId", quantity, "usdValue", "priceUsd",
                               "positionType", "protocolId", "capturedAt")
            SELECT ps.id, t, ps."walletId", 2.5, 2501.25, 1000.5, 'wallet', CASE WHEN t = 'tok-1' THEN 'proto-1' END,
                   ps."capturedAt"
              FROM "PortfolioSnapshot" ps, unnest({tokens}::text[]) t
             WHERE ps."walletId" IS NOT NULL AND ps."capturedAt" >= {a} AND ps."capturedAt" < {b}""").format(
            rel=sql.Identifier(child), tokens=sql.Literal(list(TOKENS)), a=sql.Literal(start), b=sql.Literal(end)))
    conn.commit()
    return ticks * 3, ticks * 2 * len(TOKENS)


def rows_of(conn: psycopg.Connection, table: str, month: date | None = None) -> list[tuple]:
    """Every column of every row (as PostgreSQL's text, so equality is exact), sorted."""
    where = sql.SQL("")
    if month is not None:
        where = sql.SQL(" WHERE ") + p.time_window_sql(p.range_table(table), month)
    query = sql.SQL("SELECT t::text FROM {} t{} ORDER BY 1").format(sql.Identifier(table), where)
    return [r[0] for r in conn.execute(query)]


def store_for(db, settings: Settings | None = None, endpoint: str | None = None) -> ArchiveStore:
    env = dict(db.env)
    env["ARCHIVE_PREFIX"] = f"t/{db.name}"
    if endpoint:
        env["AWS_ENDPOINT_URL_S3"] = endpoint
    return ArchiveStore.from_env(env, settings=settings)


def metadata_rows(conn: psycopg.Connection, table: str) -> list[tuple]:
    return conn.execute(sql.SQL(
        "SELECT month_year, record_count, status, file_path, compressed_size FROM {} ORDER BY 1").format(
        sql.Identifier(f"{table}_archive_metadata"))).fetchall()


def object_rows(conn: psycopg.Connection, table: str) -> list[tuple]:
    return conn.execute(sql.SQL(
        "SELECT object_key, month_year, part, record_count, size_bytes FROM {} ORDER BY 1").format(
        sql.Identifier(f"{table}_archive_objects"))).fetchall()


class CuttingProxy:
    """A TCP proxy to the S3 server that can drop every connection once `cut_after` bytes
    went upstream, and refuse new ones: S3 becoming unreachable in the middle of an upload."""

    def __init__(self, target_port: int, cut_after: int | None = None) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.sent = 0
        self.cut = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.cut.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut.is_set():
                client.close()
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, dest: socket.socket, upstream: bool) -> None:
        try:
            while chunk := source.recv(4096):
                if upstream:
                    self.sent += len(chunk)
                    if self.cut_after is not None and self.sent > self.cut_after:
                        self.stop()
                        return
                dest.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (source, dest):
                try:
                    s.close()
                except OSError:
                    pass

    def stop(self) -> None:
        """Refuse new connections and drop the open ones."""
        self.cut.set()
        try:
            self.listener.close()
        except OSError:
            pass
        with self._lock:
            for s in self._sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass


def month_content(conn: psycopg.Connection, table: str, month: date):
    """Count and content hash of the month's rows still in PostgreSQL: attached child and
    default partition (through the parent), plus any table frozen by an archive run."""
    from wedefi_pipelines import catalog
    from wedefi_pipelines.tiering.columns import archive_columns, hash_kinds
    from wedefi_pipelines.tiering.content_hash import ContentHash, row_hash_sql

    rt = p.range_table(table)
    expr = row_hash_sql(hash_kinds(archive_columns(conn, table)))
    total = ContentHash()
    sources = [(table, p.time_window_sql(rt, month))]
    sources += [(name, sql.SQL("true")) for name in catalog.month_state(conn, rt, month).frozen_relations]
    for relation, where in sources:
        count, value = conn.execute(sql.SQL("SELECT count(*), coalesce(sum({h}::numeric), 0) FROM {r} WHERE {w}").format(
            h=expr, r=sql.Identifier(relation), w=where)).fetchone()
        total = total + ContentHash(int(count), int(value))
    return total


def archived_content(conn: psycopg.Connection, store: ArchiveStore, table: str, month: date, workdir):
    """Count and content hash of the month's recorded objects, re-read from S3; each object
    must still have its recorded SHA-256."""
    from pathlib import Path

    from wedefi_pipelines.tiering.archive import read_back
    from wedefi_pipelines.tiering.columns import archive_columns
    from wedefi_pipelines.tiering.content_hash import ContentHash

    columns = archive_columns(conn, table)
    total = ContentHash()
    for key, sha256 in conn.execute(sql.SQL("SELECT object_key, sha256 FROM {} WHERE month_year = %s").format(
            sql.Identifier(f"{table}_archive_objects")), (p.month_year(month),)):
        local = Path(workdir) / Path(key).name
        assert store.download(key, local).sha256 == sha256
        total = total + read_back(local, p.range_table(table), columns)[1]
    return total


def assert_nothing_lost(db, store: ArchiveStore, table: str, month: date, original, workdir) -> None:
    """Every original row is either in PostgreSQL or in a recorded, verified S3 object, and
    none is in both: the sums of row hashes (which duplicates would inflate) add up exactly."""
    with psycopg.connect(db.url, autocommit=True) as conn:
        in_pg = month_content(conn, table, month)
        in_s3 = archived_content(conn, store, table, month, workdir)
    assert in_pg + in_s3 == original, f"PostgreSQL {in_pg} + S3 {in_s3} != original {original}"
