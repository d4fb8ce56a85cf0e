"""Benchmark the PortfolioSnapshot -> PositionSnapshot cascade of sql/0007_app_compat.sql on
a bulk delete (the app's retention-style `DELETE ... WHERE "capturedAt" < ...`), in one run.

    python benchmarks/cascade.py                       # 20,000 portfolio rows x 5 positions, 3 months
    python benchmarks/cascade.py --portfolios 2000     # quick run
    python benchmarks/cascade.py --pg-bin /usr/lib/postgresql/15/bin

Each variant deletes the same rows from a fresh copy of the same data (one month of
portfolio rows, and the positions of every one of them):
  * baseline: no trigger; the positions deleted by hand with a join on the doomed rows, then
    the portfolio rows (two statements, one transaction), as with an ideal FK cascade;
  * statement: 0007's statement-level trigger (transition table, one set-based delete);
  * row: the same cascade as a row-level trigger (one positions delete per portfolio row),
    created here only to compare.
Printed: seconds (median of --repeat), and each variant's ratio to the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date

import psycopg
from psycopg import sql

from wedefi_pipelines import devstack
from wedefi_pipelines import partitioning as p
from wedefi_pipelines.migrations import migrate

MONTHS = (date(2025, 1, 1), date(2025, 2, 1), date(2025, 3, 1))

SEED = """
INSERT INTO "Chain" (id, name, "updatedAt") VALUES (1, 'c', now());
INSERT INTO "Token" (id, "chainId", address, symbol, name, decimals, "updatedAt") VALUES ('t1', 1, '0x1', 'T', 'T', 18, now());
INSERT INTO "Wallet" (id, address, "chainId", "updatedAt")
     SELECT 'w' || w, '0x' || w, 1, now() FROM generate_series(1, 100) w;
INSERT INTO "PortfolioSnapshot" (id, "walletId", "totalUsdValue", "tokensTracked", "capturedAt")
     SELECT 'p' || m || '-' || i, 'w' || (1 + i % 100), 1, 5,
            make_timestamp(2025, m, 1, 0, 0, 0) + (i % 40000) * interval '1 minute'
       FROM generate_series(1, 3) m, generate_series(1, %(portfolios)s) i;
INSERT INTO "PositionSnapshot" ("portfolioSnapshotId", "tokenId", "walletId", quantity, "usdValue", "priceUsd",
                                "positionType", "capturedAt")
     SELECT s.id, 't1', s."walletId", 1, 1, 1, 'liquid', s."capturedAt"
       FROM "PortfolioSnapshot" s, generate_series(1, %(per)s) j;
ANALYZE;
"""

DOOMED = """"capturedAt" >= '2025-01-01' AND "capturedAt" < '2025-02-01'"""
DOOMED_S = DOOMED.replace('"capturedAt"', 's."capturedAt"')

ROW_TRIGGER = """
CREATE FUNCTION bench_row_cascade() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM "PortfolioSnapshot" s WHERE s.id = OLD.id) THEN
        DELETE FROM "PositionSnapshot" WHERE "portfolioSnapshotId" = OLD.id;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER bench_row_cascade AFTER DELETE ON "PortfolioSnapshot" FOR EACH ROW EXECUTE FUNCTION bench_row_cascade();
"""


def variant_sql(name: str) -> list[str]:
    if name == "baseline":
        return [f"""DELETE FROM "PositionSnapshot" pos USING "PortfolioSnapshot" s
                     WHERE pos."portfolioSnapshotId" = s.id AND {DOOMED_S}""",
                f"""DELETE FROM "PortfolioSnapshot" WHERE {DOOMED}"""]
    return [f"""DELETE FROM "PortfolioSnapshot" WHERE {DOOMED}"""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--portfolios", type=int, default=20_000, help="portfolio rows per month")
    parser.add_argument("--per", type=int, default=5, help="positions per portfolio row")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pg-bin", default=None)
    args = parser.parse_args(argv)
    print(f"cascade benchmark: {args.portfolios:,} portfolio rows x {args.per} positions per month, "
          f"{len(MONTHS)} months; deleting one month")
    timings: dict[str, list[float]] = {"baseline": [], "statement": [], "row": []}
    with devstack.LocalStack(pg_bin=args.pg_bin, replicas=(), with_s3=False, with_redis=False) as stack:
        stack.create_database("bench_template")
        template = stack.primary.url("bench_template")
        migrate(template)
        with psycopg.connect(template, autocommit=True) as conn:
            for table in (p.PORTFOLIO_SNAPSHOT, p.POSITION_SNAPSHOT):
                for month in MONTHS:
                    for statement in p.create_child_sql(table, month):
                        conn.execute(statement)
            conn.execute(SEED.replace("%(portfolios)s", str(args.portfolios)).replace("%(per)s", str(args.per)))
            expected = conn.execute(f"""SELECT count(*) FROM "PositionSnapshot" s WHERE {DOOMED_S}""").fetchone()[0]
        for round_ in range(args.repeat):
            for name in timings:
                db = f"bench_{name}_{round_}"
                stack.create_database(db, template="bench_template")
                with psycopg.connect(stack.primary.url(db)) as conn:
                    if name != "statement":  # the baseline has no cascade at all; "row" its own
                        conn.execute('DROP TRIGGER "PortfolioSnapshot_delete_positions" ON "PortfolioSnapshot"')
                        if name == "row":
                            conn.execute(ROW_TRIGGER)
                        conn.commit()
                    before = conn.execute('SELECT count(*) FROM "PositionSnapshot"').fetchone()[0]
                    t0 = time.perf_counter()
                    for statement in variant_sql(name):
                        conn.execute(statement)
                    conn.commit()
                    timings[name].append(time.perf_counter() - t0)
                    after = conn.execute('SELECT count(*) FROM "PositionSnapshot"').fetchone()[0]
                    assert before - after == expected, f"{name}: deleted {before - after} positions, expected {expected}"
                with psycopg.connect(stack.primary.url("postgres"), autocommit=True) as admin:
                    admin.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(db)))
    base = statistics.median(timings["baseline"])
    print(f"positions deleted per run: {expected:,}")
    for name, samples in timings.items():
        median = statistics.median(samples)
        print(f"  {name:<9} median {median:.3f}s  (runs {', '.join(f'{t:.3f}' for t in samples)})  "
              f"ratio to baseline {median / base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
