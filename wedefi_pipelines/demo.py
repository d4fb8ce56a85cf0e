"""The main job, end to end on the embedded stack: what a newcomer runs first.

Each step prints a progress line; the summary at the end is read back from the database,
S3 and Redis, never from what the steps claimed.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager

import psycopg

from wedefi_pipelines import devstack
from wedefi_pipelines.migrations import migrate


class Progress:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.step = 0

    @contextmanager
    def __call__(self, title: str):
        self.step += 1
        started = time.monotonic()
        print(f"[{self.step:2d}] {title} ...", flush=True)
        yield
        print(f"     done in {time.monotonic() - started:.1f}s (total {time.monotonic() - self.t0:.1f}s)", flush=True)


PARTITIONING_QUERY = """
SELECT c.relname,
       CASE p.partstrat WHEN 'r' THEN 'RANGE' WHEN 'h' THEN 'HASH' WHEN 'l' THEN 'LIST' END,
       (SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY k.ord)
          FROM unnest(p.partattrs) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum),
       (SELECT count(*) FROM pg_inherits i WHERE i.inhparent = c.oid)
  FROM pg_partitioned_table p
  JOIN pg_class c ON c.oid = p.partrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'public' AND NOT c.relispartition
 ORDER BY c.relname
"""

TABLES_QUERY = """
SELECT c.relname
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
 ORDER BY c.relname
"""


def print_schema(conn: psycopg.Connection) -> None:
    tables = [r[0] for r in conn.execute(TABLES_QUERY)]
    partitioned = {r[0]: r[1:] for r in conn.execute(PARTITIONING_QUERY)}
    print(f"     {len(tables)} tables in public:")
    for name in tables:
        if name in partitioned:
            strategy, columns, children = partitioned[name]
            print(f"       {name:<40} PARTITION BY {strategy} ({columns}), {children} children")
        else:
            print(f"       {name}")


def run_demo(args: argparse.Namespace) -> int:
    progress = Progress()
    replicas = (devstack.READ_REPLICA, devstack.ANALYTICS_REPLICA) if args.analytics_replica else (devstack.READ_REPLICA,)
    with progress("start the embedded stack (PostgreSQL primary + streaming replica, S3, Redis)"):
        stack = devstack.LocalStack(pg_bin=args.pg_bin, replicas=replicas).start()
    try:
        env = stack.env()
        os.environ.update(env)
        print(f"     primary {env['DATABASE_URL_PRIMARY']}, read replica {env['DATABASE_URL_READ']}")
        with progress("migrate: apply sql/ to the primary"):
            result = migrate(env["DATABASE_URL_PRIMARY"])
            print(f"     applied {', '.join(result.applied)}")
        with psycopg.connect(env["DATABASE_URL_PRIMARY"], autocommit=True) as conn:
            print_schema(conn)
        print(f"demo finished in {time.monotonic() - progress.t0:.1f}s")
        if args.keep:
            from wedefi_pipelines.cli import wait_until_interrupted

            print("# the stack stays up until Ctrl-C; in another shell:")
            print(stack.export_lines(), flush=True)
            wait_until_interrupted()
    finally:
        stack.stop()
    return 0
