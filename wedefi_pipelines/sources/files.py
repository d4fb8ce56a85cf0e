"""A file source for importing price history: CSV or Parquet with columns tokenId,
priceUsd, source, recordedAt (ISO-8601, UTC).

Read in record batches, so a file larger than memory streams through. CSV columns are read
as text (no type inference), so a rejected row keeps exactly what the file said and a
price keeps its digits; Parquet columns keep their types (double, decimal, timestamp or
text), which validation understands. Extra columns are ignored; a missing one fails
before anything is loaded, naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from wedefi_pipelines.ingest.validation import COLUMNS


class FileSourceError(ValueError):
    """The file cannot be read as price rows; the message names the file and the problem."""


CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2")
PARQUET_SUFFIXES = (".parquet", ".pq")


def file_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(CSV_SUFFIXES):
        return "csv"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    raise FileSourceError(f"{path}: unknown format; name it *.csv (optionally .gz/.bz2) or *.parquet")


def _check_columns(path: Path, names: list[str]) -> None:
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise FileSourceError(f"{path}: missing column(s) {missing}; a price file needs {list(COLUMNS)} "
                              f"(found {names})")


def read_price_file(path: str | Path, batch_rows: int = 500_000) -> Iterator[pa.Table]:
    """The file's rows, in batches, with the four price columns only. The file's existence,
    format and columns are checked now, before anything is read or loaded."""
    path = Path(path)
    if not path.is_file():
        raise FileSourceError(f"{path}: no such file")
    if file_format(path) == "parquet":
        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise FileSourceError(f"{path}: not a readable Parquet file: {exc}") from None
        _check_columns(path, parquet.schema_arrow.names)
        return _parquet_batches(parquet, batch_rows)
    try:
        header = pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=1 << 16)).schema.names
    except (pa.ArrowInvalid, OSError) as exc:
        raise FileSourceError(f"{path}: not a readable CSV file: {exc}") from None
    _check_columns(path, header)
    return _csv_batches(path, header)


def _parquet_batches(parquet: pq.ParquetFile, batch_rows: int) -> Iterator[pa.Table]:
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=list(COLUMNS)):
        yield pa.Table.from_batches([batch])


def _csv_batches(path: Path, header: list[str]) -> Iterator[pa.Table]:
    convert = pcsv.ConvertOptions(
        column_types={name: pa.string() for name in header},
        include_columns=list(COLUMNS),
        strings_can_be_null=False,  # an empty field stays '' (rejected as what it was)
    )
    reader = pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=64 << 20), convert_options=convert)
    try:
        for batch in reader:
            if batch.num_rows:
                yield pa.Table.from_batches([batch])
    except pa.ArrowInvalid as exc:
        raise FileSourceError(f"{path}: malformed CSV: {exc}") from None
