"""Creates the deployment's S3 buckets, idempotently (compose's one-shot `s3-init` service).

- $ARCHIVE_BUCKET (the cold tier): versioning on, so an overwritten or deleted archive
  object can still be recovered; nothing expires.
- $DAGSTER_LOGS_BUCKET (Dagster compute logs): objects under `compute-logs/` expire after
  $DAGSTER_LOG_RETENTION_DAYS days (default 30), which is their retention.

The endpoint and credentials are boto3's own (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID...).
Safe to re-run: existing buckets are kept and their settings re-applied.
"""

from __future__ import annotations

import os
import sys

import boto3
from botocore.exceptions import ClientError

COMPUTE_LOGS_PREFIX = "compute-logs/"


def ensure_bucket(s3, name: str) -> bool:
    """Create `name` unless it exists; True if it was created."""
    try:
        s3.head_bucket(Bucket=name)
        return False
    except ClientError as error:
        if error.response["Error"]["Code"] not in ("404", "NoSuchBucket"):
            raise
    try:
        s3.create_bucket(Bucket=name)
    except ClientError as error:  # another s3-init won the race
        if error.response["Error"]["Code"] != "BucketAlreadyOwnedByYou":
            raise
    return True


def main(env: dict[str, str] | None = None) -> int:
    env = dict(os.environ if env is None else env)
    missing = [v for v in ("ARCHIVE_BUCKET", "DAGSTER_LOGS_BUCKET") if not env.get(v)]
    if missing:
        print(f"create_buckets: set {', '.join(missing)}", file=sys.stderr)
        return 64
    days = int(env.get("DAGSTER_LOG_RETENTION_DAYS") or 30)
    if days < 1:
        print(f"create_buckets: DAGSTER_LOG_RETENTION_DAYS must be at least 1, got {days}", file=sys.stderr)
        return 64
    s3 = boto3.client("s3")

    archive, logs = env["ARCHIVE_BUCKET"], env["DAGSTER_LOGS_BUCKET"]
    created = [name for name in (archive, logs) if ensure_bucket(s3, name)]
    s3.put_bucket_versioning(Bucket=archive, VersioningConfiguration={"Status": "Enabled"})
    s3.put_bucket_lifecycle_configuration(
        Bucket=logs,
        LifecycleConfiguration={"Rules": [{
            "ID": "expire-dagster-compute-logs",
            "Filter": {"Prefix": COMPUTE_LOGS_PREFIX},
            "Status": "Enabled",
            "Expiration": {"Days": days},
        }]},
    )
    print(f"create_buckets: created {created or 'nothing'}; {archive} versioned; "
          f"{logs}/{COMPUTE_LOGS_PREFIX} expires after {days} days")
    return 0


if __name__ == "__main__":
    sys.exit(main())
