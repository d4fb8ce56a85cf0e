"""`wedefi-pipelines history --token ID --start T --end T [--resolution raw|1h|1d]`: a token's
price history from any tier, or its chart from the rollups.

Kept apart from tiering.history so the CLI starts without importing Dagster and pyarrow
until this command runs.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone


def _moment(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date or time: {text!r} (use 2025-01-31 or 2025-01-31T12:00:00Z)")
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment


def add_history_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "history", help="a token's price history over any range, from PostgreSQL and the Parquet archive on S3",
        description="Print a token's PriceSnapshot rows with start <= recordedAt < end as CSV; archived months "
                    "are read from S3. Times are UTC (a date means its midnight). Needs DATABASE_URL_PRIMARY "
                    "(DATABASE_URL_READ optional), ARCHIVE_BUCKET, ARCHIVE_PREFIX and, off AWS, AWS_ENDPOINT_URL_S3.")
    parser.add_argument("--token", required=True, help='the "Token".id')
    parser.add_argument("--start", required=True, type=_moment, help="inclusive start (UTC)")
    parser.add_argument("--end", required=True, type=_moment, help="exclusive end (UTC)")
    parser.add_argument("--resolution", choices=("raw", "1h", "1d"), default="raw",
                        help="raw: every PriceSnapshot row (default); 1h or 1d: one row per UTC hour or day with "
                             "bucketStart in [start, end) from the rollups alone (PriceRollupHourly/Daily, archived "
                             "months included, no S3 read): open, high, low, close, average, samples")
    parser.set_defaults(func=cmd_history)


def cmd_chart(args: argparse.Namespace) -> int:
    from wedefi_pipelines import partitioning as p
    from wedefi_pipelines.resources.database import ConfigurationError, Database
    from wedefi_pipelines.rollups.reads import CHART_COLUMNS, price_chart

    from wedefi_pipelines.resources.archive import ArchiveStore

    try:
        try:  # only an hourly chart over the hourly rollup's archived months reads S3
            store = ArchiveStore.from_env()
        except ConfigurationError:
            store = None
        with Database.from_env() as db:
            chart = price_chart(db, args.token, args.start, args.end, args.resolution, store)
    except (ConfigurationError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(",".join(CHART_COLUMNS))
    for bucket, *values in chart.rows:
        print(",".join([bucket.strftime("%Y-%m-%dT%H:%M:%SZ"), *(str(v) for v in values)]))
    archived = ", ".join(p.month_year(m) for m in chart.archived_months)
    print(f"{len(chart.rows)} {args.resolution} bucket(s) from the rollups ({chart.server}"
          f"{'; archived hourly months ' + archived + ' from S3' if archived else ''})", file=sys.stderr)
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    if args.resolution != "raw":
        return cmd_chart(args)
    from wedefi_pipelines import partitioning as p
    from wedefi_pipelines.resources.archive import ArchiveStore
    from wedefi_pipelines.resources.database import ConfigurationError, Database
    from wedefi_pipelines.tiering.history import price_history

    try:
        with Database.from_env() as db:
            result = price_history(db, ArchiveStore.from_env(), args.token, args.start, args.end)
    except (ConfigurationError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = result.rows
    print("recordedAt,priceUsd,source,id")
    columns = (rows.column(c).to_pylist() for c in ("recordedAt", "priceUsd", "source", "id"))
    for recorded, price, source, row_id in zip(*columns):
        print(f"{recorded.strftime('%Y-%m-%dT%H:%M:%S.%f')[:-3]}Z,{price},{source},{row_id}")
    months = ", ".join(p.month_year(m) for m in result.archived_months) or "none"
    print(f"{rows.num_rows} rows: {result.from_postgres} from PostgreSQL ({result.server}), "
          f"{result.from_archive} from the S3 archive (archived months: {months})", file=sys.stderr)
    return 0
