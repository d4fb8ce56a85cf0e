"""COPY helpers and small shared SQL pieces for the load paths."""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, Sequence, TypeVar

import psycopg
import pyarrow as pa
from psycopg import sql

from wedefi_pipelines.ingest.validation import csv_block

T = TypeVar("T")


def copy_csv(conn: psycopg.Connection, relation: str | sql.Composable, columns: Sequence[str], data: bytes) -> None:
    """COPY pre-formatted CSV into `relation` (a name, or a composed identifier)."""
    target = sql.Identifier(relation) if isinstance(relation, str) else relation
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(
        target, sql.SQL(", ").join(sql.Identifier(c) for c in columns))
    with conn.cursor().copy(statement) as copy:
        view = memoryview(data)
        for offset in range(0, len(view), 1 << 20):
            copy.write(view[offset:offset + (1 << 20)])


def copy_table(conn: psycopg.Connection, relation: str | sql.Composable, table: pa.Table) -> int:
    """COPY an Arrow table (its column names are the target's) into `relation`; returns rows."""
    if table.num_rows:
        copy_csv(conn, relation, table.column_names, csv_block(table))
    return table.num_rows


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate `items` in a background thread, `depth` ahead of the consumer.

    The load paths use it so generating, validating and formatting the next block (numpy
    and Arrow release the GIL) overlaps with the server ingesting the current one. An
    exception in the producer is raised in the consumer, at the item where it happened.
    """
    done = object()
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as exc:  # handed to the consumer
            put((done, exc))

    thread = threading.Thread(target=produce, name="wedefi-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = buffer.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
