"""Prove that an uploaded object holds exactly the rows PostgreSQL exported.

S3's size and CRC64NVME (head_object, ChecksumMode=ENABLED) and the SHA-256 in the
object's metadata must match the file we wrote; the object is downloaded again, its
footer row count and schema checked, and every row re-hashed (a row group at a time, on
threads: numpy and Arrow release the GIL): count, content hash and min/max time must
equal what PostgreSQL computed, and every row must fall in the month.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from wedefi_pipelines import partitioning as p
from wedefi_pipelines.resources.archive import ArchiveStore
from wedefi_pipelines.tiering.columns import ArchiveColumn, hash_kinds
from wedefi_pipelines.tiering.content_hash import ContentHash, row_hashes
from wedefi_pipelines.tiering.export import ArchiveError, Part, time_range, widen, file_schema


class VerificationError(ArchiveError):
    """An uploaded object does not prove the rows it should hold; the message says what differs."""


def _row_group_digest(path: Path, index: int, table: p.RangeTable, kinds: dict[str, str]) -> tuple[ContentHash, tuple]:
    group = pq.ParquetFile(path).read_row_group(index)
    return ContentHash.of(row_hashes(group, kinds)), time_range(group, table.time_column)


def read_back(path: Path, table: p.RangeTable, columns: list[ArchiveColumn], threads: int = 2
              ) -> tuple[int, ContentHash, tuple]:
    """Re-hash a Parquet file row by row, a row group at a time on `threads` threads (numpy
    and Arrow release the GIL): (rows, content hash, (min, max) time)."""
    kinds = hash_kinds(columns)
    groups = pq.ParquetFile(path).metadata.num_row_groups
    total, span = ContentHash(), (None, None)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for content, group_span in pool.map(lambda i: _row_group_digest(path, i, table, kinds), range(groups)):
            total = total + content
            span = widen(span, group_span)
    return total.count, total, span


def _naive(value: datetime | None) -> datetime | None:
    return p.to_utc_naive(value) if value is not None else None


def verify_part(store: ArchiveStore, part: Part, columns: list[ArchiveColumn], workdir: Path) -> None:
    """Prove that the object at part.key holds exactly the rows PostgreSQL exported."""
    uri = store.uri(part.key)
    head = store.head(part.key)
    if head is None:
        raise VerificationError(f"{uri} is missing after its upload")
    expected = part.digest
    problems = []
    if head.size != expected.size:
        problems.append(f"size {head.size} B on S3, {expected.size} B uploaded (truncated or replaced?)")
    if head.crc64nvme != expected.crc64nvme:
        problems.append(f"CRC64NVME {head.crc64nvme} on S3, {expected.crc64nvme} for the uploaded file "
                        "(checksum mismatch: corrupted or replaced after the upload)")
    if head.checksum_type not in (None, "FULL_OBJECT"):
        problems.append(f"checksum type {head.checksum_type}, expected FULL_OBJECT")
    if head.metadata.get("sha256") != expected.sha256:
        problems.append(f"SHA-256 in the object metadata is {head.metadata.get('sha256')}, ours {expected.sha256}")
    if problems:
        raise VerificationError(f"{uri}: " + "; ".join(problems))
    downloaded = workdir / f"verify-{part.table.name}-{part.part:05d}.parquet"
    got = store.download(part.key, downloaded)
    if got != expected:
        raise VerificationError(f"{uri}: downloaded {got.size} B sha256 {got.sha256} crc {got.crc64nvme}, "
                                f"uploaded {expected.size} B sha256 {expected.sha256} crc {expected.crc64nvme}")
    try:
        footer = pq.ParquetFile(downloaded)
        if footer.metadata.num_rows != part.rows:
            raise VerificationError(f"{uri}: the footer counts {footer.metadata.num_rows} rows, "
                                    f"PostgreSQL exported {part.rows}")
        expected_schema = file_schema(columns)
        if not footer.schema_arrow.equals(expected_schema, check_metadata=False):
            raise VerificationError(f"{uri}: schema {footer.schema_arrow} differs from {expected_schema}")
        rows, content, span = read_back(downloaded, part.table, columns)
    except (pa.ArrowException, OSError) as exc:
        raise VerificationError(f"{uri}: not a readable Parquet file: {exc}") from exc
    finally:
        downloaded.unlink(missing_ok=True)
    if rows != part.rows or content != part.pg_hash:
        raise VerificationError(f"{uri}: content hash {content.total} over {rows} rows read back, PostgreSQL "
                                f"computed {part.pg_hash.total} over {part.rows} rows")
    if (_naive(span[0]), _naive(span[1])) != (_naive(part.min_time), _naive(part.max_time)):
        raise VerificationError(f"{uri}: time range {span} read back, {part.min_time}..{part.max_time} exported")
    start, end = p.month_bounds(part.month)
    if rows and not (start <= _naive(span[0]) and _naive(span[1]) < end):
        raise VerificationError(f"{uri}: rows from {span[0]} to {span[1]} fall outside {p.month_year(part.month)}")
