"""The "PriceSnapshot" load path: validate, COPY, never duplicate, never lose a valid row.

A load is a sequence of chunks (a day of the synthetic market, one `/simple/price` fetch,
a file over the run's window), each in its own transaction under a transaction-level
advisory lock per UTC day it covers, so two loads of the same day serialize and a crash
rolls back one chunk only (the re-run skips what committed).

The idempotency key is ("tokenId", source, "recordedAt"). Hot children enforce it with
their per-child UNIQUE index, but warm children lose that index (issue 5), so the load
itself must be correct without it:

- direct path: a chunk whose source promises unique keys and whose (source, tokens, day)
  holds no row yet (one index probe per token) is COPYed straight into the parent: the
  speed of raw COPY. Under the day lock nothing of ours can arrive in between.
- staged path (re-runs, live ticks, files): COPY into a temporary table, then one
  `INSERT ... SELECT` of the rows whose key is absent, first occurrence in the input wins;
  later duplicates in the input are rejected with that reason. A live run that sees only
  current prices therefore adds its new ticks and never deletes earlier ones.

Rejected rows go to "PriceSnapshot_rejects" with their raw values, the reason, the origin
and the chunk's window; a re-run of the same input adds no second copy (row hash), it
bumps "seenCount".
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Iterable, Iterator, Sequence

import numpy as np
import psycopg
import pyarrow as pa
from psycopg import sql

from wedefi_pipelines import catalog, locks, month_ops, provisioning
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.ingest import validation as v
from wedefi_pipelines.ingest.pgcopy import copy_csv, copy_table, prefetch

log = logging.getLogger(__name__)

TABLE = p.PRICE_SNAPSHOT
REJECTS_TABLE = "PriceSnapshot_rejects"
_EPOCH = date(1970, 1, 1)
_STAGE = "wedefi_price_stage"
_REJECT_STAGE = "wedefi_price_reject_stage"
_REJECT_COLUMNS = ("tokenId", "priceUsd", "source", "recordedAt", "reason")


@dataclass
class PriceChunk:
    """One transaction's worth of raw price rows, all expected inside [start, end).

    `source`, `tokens` and `unique_keys` are promises a source may make (the synthetic
    market does): every row has this source and one of these tokens, and no key repeats
    within the chunk. They allow the direct path when the window holds none of the rows yet.
    """

    start: datetime
    end: datetime
    batches: Iterable[pa.Table]
    source: str | None = None
    tokens: Sequence[str] | None = None
    unique_keys: bool = False

    @property
    def may_go_direct(self) -> bool:
        return self.unique_keys and self.source is not None and self.tokens is not None


@dataclass
class PriceLoadResult:
    window: tuple[datetime, datetime]
    origin: str
    received: int = 0
    inserted: int = 0
    already_present: int = 0
    rejected: int = 0
    rejects_by_reason: Counter = field(default_factory=Counter)
    inserted_by_month: Counter = field(default_factory=Counter)
    direct_chunks: int = 0
    staged_chunks: int = 0
    default_rows: int = 0  # rows of the window that sit in the default partition afterwards
    notes: list[str] = field(default_factory=list)

    @property
    def reject_ratio(self) -> float:
        return self.rejected / self.received if self.received else 0.0

    def metadata(self) -> dict:
        return {
            "window": f"[{self.window[0]:%Y-%m-%d %H:%M}, {self.window[1]:%Y-%m-%d %H:%M})",
            "origin": self.origin,
            "received": self.received,
            "inserted": self.inserted,
            "already_present": self.already_present,
            "rejected": self.rejected,
            "reject_ratio": round(self.reject_ratio, 6),
            "rejects_by_reason": dict(self.rejects_by_reason),
            "inserted_by_child": {p.child_name(TABLE, p.parse_month(m)): n
                                  for m, n in sorted(self.inserted_by_month.items())},
            "direct_chunks": self.direct_chunks,
            "staged_chunks": self.staged_chunks,
            "default_partition_rows": self.default_rows,
            "notes": self.notes,
        }


@dataclass
class _Prepared:
    csv: bytes
    rows: int
    months: Counter
    rejects: pa.Table


def day_numbers(start: datetime, end: datetime) -> list[int]:
    """Days since 1970-01-01 of every UTC day overlapping [start, end): the lock keys."""
    first = start.date()
    last = (end - timedelta(microseconds=1)).date()
    return list(range((first - _EPOCH).days, (last - _EPOCH).days + 1))


def lock_days(conn: psycopg.Connection, start: datetime, end: datetime) -> None:
    """Take the transaction-level lock of every UTC day in [start, end), in order (no deadlock)."""
    for day in day_numbers(start, end):
        locks.xact_lock(conn, "ingest.price_day", day)


def _months(valid: pa.Table) -> Counter:
    if valid.num_rows == 0:
        return Counter()
    months, counts = np.unique(valid["recordedAt"].to_numpy().astype("datetime64[M]"), return_counts=True)
    return Counter({str(m): int(c) for m, c in zip(months, counts)})


def _prepare(chunks: Iterable[PriceChunk], known: pa.Array, now: datetime) -> Iterator[tuple[str, object]]:
    """The chunks as a flat stream of events, each batch validated and formatted for COPY."""
    for chunk in chunks:
        yield "chunk", chunk
        for batch in chunk.batches:
            checked = v.validate_prices(batch, known, (chunk.start, chunk.end), now)
            rows = checked.valid.add_column(0, "id", v.random_uuids(checked.valid.num_rows))
            yield "batch", _Prepared(v.csv_block(rows) if rows.num_rows else b"", rows.num_rows,
                                     _months(rows), checked.rejects)
        yield "end", chunk


def known_token_ids(conn: psycopg.Connection) -> pa.Array:
    return pa.array([r[0] for r in conn.execute('SELECT id FROM "Token"')], pa.string())


def _window_has_rows(conn: psycopg.Connection, chunk: PriceChunk) -> bool:
    return conn.execute(
        'SELECT EXISTS (SELECT 1 FROM "PriceSnapshot" WHERE "tokenId" = ANY(%s) AND source = %s '
        'AND "recordedAt" >= %s AND "recordedAt" < %s)',
        (list(chunk.tokens), chunk.source, chunk.start, chunk.end),
    ).fetchone()[0]


def _create_stages(conn: psycopg.Connection, staged: bool) -> None:
    conn.execute(sql.SQL(
        "CREATE TEMP TABLE {} (\"tokenId\" text, \"priceUsd\" text, source text, \"recordedAt\" text, reason text) "
        "ON COMMIT DROP").format(sql.Identifier(_REJECT_STAGE)))
    if staged:
        conn.execute(sql.SQL(
            "CREATE TEMP TABLE {} (ord bigserial, id text NOT NULL, \"tokenId\" text NOT NULL, \"priceUsd\" numeric(36,18) NOT NULL, "
            "source varchar(32) NOT NULL, \"recordedAt\" timestamp(3) NOT NULL) ON COMMIT DROP"
        ).format(sql.Identifier(_STAGE)))


_DUPLICATES = """
INSERT INTO {reject_stage} ("tokenId", "priceUsd", source, "recordedAt", reason)
SELECT "tokenId", "priceUsd"::text, source, to_char("recordedAt", 'YYYY-MM-DD"T"HH24:MI:SS.MS'), {reason}
  FROM (SELECT *, row_number() OVER (PARTITION BY "tokenId", source, "recordedAt" ORDER BY ord) AS rn
          FROM {stage}) ranked
 WHERE rn > 1
"""

_INSERT_STAGED = """
WITH fresh AS (
    SELECT DISTINCT ON ("tokenId", source, "recordedAt") id, "tokenId", "priceUsd", source, "recordedAt"
      FROM {stage}
     ORDER BY "tokenId", source, "recordedAt", ord
), inserted AS (
    INSERT INTO "PriceSnapshot" (id, "tokenId", "priceUsd", source, "recordedAt")
    SELECT f.id, f."tokenId", f."priceUsd", f.source, f."recordedAt"
      FROM fresh f
     WHERE NOT EXISTS (
           SELECT 1 FROM "PriceSnapshot" p
            WHERE p."tokenId" = f."tokenId" AND p.source = f.source AND p."recordedAt" = f."recordedAt"
              AND p."recordedAt" >= {start} AND p."recordedAt" < {end})
     ORDER BY f."recordedAt", f."tokenId"
    ON CONFLICT DO NOTHING
    RETURNING "recordedAt"
)
SELECT to_char("recordedAt", 'YYYY-MM'), count(*) FROM inserted GROUP BY 1
"""

_WRITE_REJECTS = """
INSERT INTO "PriceSnapshot_rejects" AS r
       ("tokenId", "priceUsd", source, "recordedAt", reason, origin, "loadWindow", "runId", "rowHash", "seenCount")
SELECT s."tokenId", s."priceUsd", s.source, s."recordedAt", s.reason, %(origin)s, %(window)s, %(run_id)s,
       md5(jsonb_build_array(%(origin)s::text, %(window)s::text, s."tokenId", s."priceUsd", s.source,
                             s."recordedAt", s.reason)::text),
       count(*)
  FROM {reject_stage} s
 GROUP BY s."tokenId", s."priceUsd", s.source, s."recordedAt", s.reason
ON CONFLICT ("rowHash") DO UPDATE
   SET "seenCount" = r."seenCount" + excluded."seenCount", "lastSeenAt" = CURRENT_TIMESTAMP, "runId" = excluded."runId"
"""


def _window_text(start: datetime, end: datetime) -> str:
    return f"[{start:%Y-%m-%d %H:%M:%S}, {end:%Y-%m-%d %H:%M:%S})"


def load_prices(
    conn: psycopg.Connection,
    chunks: Iterable[PriceChunk],
    *,
    window: tuple[datetime, datetime],
    origin: str,
    now: datetime,
    run_id: str | None = None,
    known_tokens: pa.Array | None = None,
    provision: bool = True,
    logger: logging.Logger | None = None,
) -> PriceLoadResult:
    """Load every chunk (each in its own transaction) on an autocommit connection."""
    if not conn.autocommit:
        raise ValueError("load_prices needs an autocommit connection: it commits chunk by chunk")
    logger = logger or log
    window = (p.to_utc_naive(window[0]), p.to_utc_naive(window[1]))
    now = p.to_utc_naive(now)
    result = PriceLoadResult(window=window, origin=origin)
    if provision:
        for outcome in provisioning.ensure_months(
                conn, TABLE, p.months_between(window[0], window[1] - timedelta(microseconds=1))):
            if outcome.action not in ("created", "exists"):
                result.notes.append(f"{p.child_name(TABLE, outcome.month)}: {outcome.action} {outcome.detail}".strip())
    known = known_tokens if known_tokens is not None else known_token_ids(conn)

    events = prefetch(_prepare(chunks, known, now))
    try:
        for kind, chunk in events:
            assert kind == "chunk", kind
            with conn.transaction():
                _load_chunk(conn, chunk, events, result, origin, run_id)
    finally:
        events.close()

    result.default_rows = conn.execute(
        'SELECT count(*) FROM "PriceSnapshot_default" WHERE "recordedAt" >= %s AND "recordedAt" < %s', window
    ).fetchone()[0]
    if result.default_rows:
        result.notes.append(
            f"{result.default_rows} rows of the window are in \"PriceSnapshot_default\" (no monthly child: "
            "archived month or not provisioned); provisioning drains them when the child is created")
    logger.info("prices %s: received %d, inserted %d, already present %d, rejected %d",
                _window_text(*window), result.received, result.inserted, result.already_present, result.rejected)
    return result


def _load_chunk(conn, chunk: PriceChunk, events, result: PriceLoadResult, origin: str, run_id: str | None,
                into: str | None = None) -> None:
    """Load one chunk inside the caller's transaction; `into` names a bare table to COPY
    into directly (the whole-month path), else the direct or staged path is chosen."""
    lock_days(conn, chunk.start, chunk.end)
    direct = into is not None or (chunk.may_go_direct and not _window_has_rows(conn, chunk))
    target = into or "PriceSnapshot"
    _create_stages(conn, staged=not direct)
    staged_rows = 0
    columns = ["id", *v.COLUMNS]
    for kind, prepared in events:
        if kind == "end":
            break
        result.received += prepared.rows + prepared.rejects.num_rows
        if prepared.rejects.num_rows:
            copy_table(conn, _REJECT_STAGE, prepared.rejects)
        if not prepared.rows:
            continue
        if direct:
            copy_csv(conn, target, columns, prepared.csv)
            result.inserted += prepared.rows
            result.inserted_by_month.update(prepared.months)
        else:
            copy_csv(conn, _STAGE, columns, prepared.csv)
            staged_rows += prepared.rows
    if direct:
        result.direct_chunks += 1
    else:
        result.staged_chunks += 1
        if staged_rows:
            _insert_staged(conn, chunk, staged_rows, result)
    _write_rejects(conn, chunk, result, origin, run_id)


class MonthNotStageable(RuntimeError):
    """The whole-month path does not apply to this month; the message says why."""


def month_blocker(conn: psycopg.Connection, month: date) -> str | None:
    """Why `month` cannot be loaded as a bare table then attached, or None if it can."""
    child = p.child_name(TABLE, month)
    if catalog.relation_exists(conn, child):
        return f"{child} already exists"
    if month in catalog.archived_months(conn, TABLE):
        return f"{p.month_year(month)} is archived (restore it to load into it)"
    if catalog.months_with_default_rows(conn, TABLE, month, p.add_months(month, 1)):
        return f"\"PriceSnapshot_default\" holds rows of {p.month_year(month)} (provisioning drains them)"
    return None


def load_whole_month(
    conn: psycopg.Connection,
    month: date,
    batches: Iterable[pa.Table],
    *,
    origin: str,
    now: datetime,
    run_id: str | None = None,
    known_tokens: pa.Array | None = None,
    logger: logging.Logger | None = None,
) -> PriceLoadResult:
    """A month that has no child yet, loaded in one transaction: COPY into a bare table
    named like the child, then its indexes, a bounds CHECK and ATTACH (month_ops.staged_month).

    Index maintenance is what bounds a load into an indexed child; building the indexes
    once afterwards is about twice as fast. Either the whole month appears, or nothing.
    """
    if not conn.autocommit:
        raise ValueError("load_whole_month needs an autocommit connection: it manages its own transaction")
    month = p.month_of(month)
    start, end = p.month_bounds(month)
    result = PriceLoadResult(window=(start, end), origin=origin)
    known = known_tokens if known_tokens is not None else known_token_ids(conn)
    events = prefetch(_prepare([PriceChunk(start, end, batches)], known, p.to_utc_naive(now)))
    try:
        with conn.transaction():
            lock_days(conn, start, end)  # before the check: a concurrent load of the month waits here
            blocker = month_blocker(conn, month)
            if blocker:
                raise MonthNotStageable(blocker)
            kind, chunk = next(events)
            with month_ops.staged_month(conn, TABLE, month) as child:
                _load_chunk(conn, chunk, events, result, origin, run_id, into=child)
    finally:
        events.close()
    (logger or log).info("prices %s: whole month loaded and attached, %d rows", p.month_year(month), result.inserted)
    return result


def _insert_staged(conn, chunk: PriceChunk, staged_rows: int, result: PriceLoadResult) -> None:
    if staged_rows > 10_000:
        conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(_STAGE)))
    duplicates = conn.execute(sql.SQL(_DUPLICATES).format(
        reject_stage=sql.Identifier(_REJECT_STAGE), stage=sql.Identifier(_STAGE),
        reason=sql.Literal(v.DUPLICATE_IN_INPUT))).rowcount
    inserted = 0
    for month, count in conn.execute(sql.SQL(_INSERT_STAGED).format(
            stage=sql.Identifier(_STAGE), start=sql.Literal(chunk.start), end=sql.Literal(chunk.end))):
        result.inserted_by_month[month] += count
        inserted += count
    result.inserted += inserted
    result.already_present += staged_rows - duplicates - inserted  # duplicates count as rejects


def _write_rejects(conn, chunk: PriceChunk, result: PriceLoadResult, origin: str, run_id: str | None) -> None:
    counts = conn.execute(sql.SQL("SELECT reason, count(*) FROM {} GROUP BY reason").format(
        sql.Identifier(_REJECT_STAGE))).fetchall()
    if not counts:
        return
    for reason, count in counts:
        result.rejects_by_reason[reason] += count
        result.rejected += count
    conn.execute(sql.SQL(_WRITE_REJECTS).format(reject_stage=sql.Identifier(_REJECT_STAGE)),
                 {"origin": origin, "window": _window_text(chunk.start, chunk.end), "run_id": run_id})


def rejects_for(conn: psycopg.Connection, origin: str | None = None) -> list[dict]:
    """The rejects table's rows (optionally for one origin), oldest first: for tests and the demo."""
    query = 'SELECT "tokenId", "priceUsd", source, "recordedAt", reason, origin, "loadWindow", "seenCount" ' \
            'FROM "PriceSnapshot_rejects"'
    params: tuple = ()
    if origin is not None:
        query += " WHERE origin = %s"
        params = (origin,)
    cur = conn.execute(query + " ORDER BY id", params)
    names = [c.name for c in cur.description]
    return [dict(zip(names, row)) for row in cur]
