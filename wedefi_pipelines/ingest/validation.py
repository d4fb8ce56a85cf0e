"""Price row validation and COPY formatting: pure, vectorized (pyarrow), no I/O.

A source hands over raw rows (tokenId, priceUsd, source, recordedAt) in whatever types it
has: text from CSV and HTTP, doubles or decimals and timestamps from Parquet and the
synthetic market. Every row either comes out typed and ready for COPY, or is rejected
with its raw values (as text) and one reason, the first check it fails. Nothing valid is
dropped and nothing is silently coerced:

- priceUsd keeps the digits it arrived with (text is checked against a strict decimal
  grammar, doubles are printed shortest-round-trip), and must be finite, > 0 and fit
  numeric(36,18);
- recordedAt is ISO-8601; an offset is converted to UTC, a naive time is taken as UTC,
  and it is truncated to the column's millisecond precision;
- the token must be known, the time inside the load's window and not in the future.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from wedefi_pipelines.partitioning import to_utc_naive

COLUMNS = ("tokenId", "priceUsd", "source", "recordedAt")
SOURCE_MAX_LENGTH = 32  # "PriceSnapshot".source is varchar(32)
PRICE_LIMIT = 1e18  # numeric(36,18) holds 18 integer digits
_DECIMAL = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
_ISO8601 = re.compile(r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?(Z|[+-]\d{2}(:?\d{2})?)?$")

# Reasons, as stored in "PriceSnapshot_rejects".reason and counted in the metadata.
MISSING_TOKEN = "tokenId is missing"
UNKNOWN_TOKEN = "unknown token (no such \"Token\".id)"
PRICE_MISSING = "priceUsd is missing"
PRICE_NOT_A_NUMBER = "priceUsd is not a number"
PRICE_NAN = "priceUsd is NaN"
PRICE_INFINITE = "priceUsd is infinite"
PRICE_NOT_POSITIVE = "priceUsd is not > 0"
PRICE_TOO_LARGE = "priceUsd does not fit numeric(36,18)"
SOURCE_MISSING = "source is missing"
SOURCE_TOO_LONG = f"source is longer than {SOURCE_MAX_LENGTH} characters"
TIME_MISSING = "recordedAt is missing"
TIME_NOT_ISO = "recordedAt is not an ISO-8601 time"
TIME_IN_FUTURE = "recordedAt is in the future"
DUPLICATE_IN_INPUT = "duplicate (tokenId, source, recordedAt) in the input; the first one was loaded"


def outside_window_reason(start: datetime, end: datetime) -> str:
    return f"recordedAt is outside the partition window [{start:%Y-%m-%d %H:%M}, {end:%Y-%m-%d %H:%M})"


class InputShapeError(ValueError):
    """The input lacks a required column: nothing can be validated row by row."""


@dataclass
class Validated:
    """Rows ready for COPY (tokenId, priceUsd as exact text, source, recordedAt ms) and
    rejects (the four raw columns as text, plus reason)."""

    valid: pa.Table
    rejects: pa.Table

    @property
    def received(self) -> int:
        return self.valid.num_rows + self.rejects.num_rows


def _raw_text(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A column as text for the rejects table, nulls kept (NUL bytes would break COPY)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        column = pc.cast(column, pa.string())
    return pc.replace_substring(pc.cast(column, pa.string()), "\x00", "\ufffd")


def _price_text(column) -> tuple[pa.Array, np.ndarray, list[tuple[np.ndarray, str]]]:
    """(exact value to load: text, or a double, float values, [(mask, reason)...]) for priceUsd."""
    n = len(column)
    failures: list[tuple[np.ndarray, str]] = []
    missing = np.asarray(pc.is_null(column).to_numpy(zero_copy_only=False), dtype=bool)
    failures.append((missing, PRICE_MISSING))
    if pa.types.is_floating(column.type) or pa.types.is_integer(column.type) or pa.types.is_decimal(column.type):
        values = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
        # doubles stay doubles: the CSV writer prints them shortest-round-trip, as a cast would
        text = column if pa.types.is_floating(column.type) else pc.cast(column, pa.string())
        nan = ~missing & np.isnan(values)
        failures.append((nan, PRICE_NAN))
    elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        stripped = pc.utf8_trim_whitespace(column)
        missing |= np.asarray(pc.fill_null(pc.equal(stripped, ""), False).to_numpy(zero_copy_only=False), dtype=bool)
        failures[0] = (missing, PRICE_MISSING)
        lowered = pc.utf8_lower(stripped)
        is_nan = pc.fill_null(pc.is_in(lowered, value_set=pa.array(["nan", "+nan", "-nan"])), False)
        is_inf = pc.fill_null(pc.is_in(lowered, value_set=pa.array(["inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"])), False)
        is_decimal = pc.fill_null(pc.match_substring_regex(stripped, _DECIMAL), False)
        nan = np.asarray(is_nan.to_numpy(zero_copy_only=False), dtype=bool)
        inf_text = np.asarray(is_inf.to_numpy(zero_copy_only=False), dtype=bool)
        decimal = np.asarray(is_decimal.to_numpy(zero_copy_only=False), dtype=bool)
        failures.append((nan, PRICE_NAN))
        failures.append((inf_text, PRICE_INFINITE))
        failures.append((~missing & ~nan & ~inf_text & ~decimal, PRICE_NOT_A_NUMBER))
        safe = pc.if_else(is_decimal, stripped, pa.scalar("0"))
        values = pc.cast(safe, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
        values[~decimal] = np.nan
        text = stripped
    else:
        values = np.full(n, np.nan)
        text = pa.nulls(n, pa.string())
        failures.append((~missing, PRICE_NOT_A_NUMBER))
    with np.errstate(invalid="ignore"):
        inf = np.isinf(values)
        failures.append((inf, PRICE_INFINITE))
        failures.append((np.isfinite(values) & (values <= 0), PRICE_NOT_POSITIVE))
        failures.append((np.isfinite(values) & (values >= PRICE_LIMIT), PRICE_TOO_LARGE))
    return text, values, failures


def _times(column) -> tuple[np.ndarray, list[tuple[np.ndarray, str]]]:
    """(datetime64[ms] UTC values, [(mask, reason)...]) for recordedAt."""
    missing = np.asarray(pc.is_null(column).to_numpy(zero_copy_only=False), dtype=bool)
    failures = [(missing, TIME_MISSING)]
    if pa.types.is_timestamp(column.type):
        if column.type.tz is not None:
            column = pc.cast(column, pa.timestamp(column.type.unit, tz="UTC"))
        values = pc.cast(pc.floor_temporal(column, unit="millisecond"), pa.timestamp("ms", tz=column.type.tz))
        ms = np.asarray(pc.cast(values, pa.int64()).to_numpy(zero_copy_only=False), dtype="float64")
        bad = np.zeros(len(ms), dtype=bool)
    elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        text = pc.utf8_trim_whitespace(column)
        iso = np.asarray(pc.fill_null(pc.match_substring_regex(text, _ISO8601.pattern), False)
                         .to_numpy(zero_copy_only=False), dtype=bool)
        series = pd.Series(text.to_numpy(zero_copy_only=False), dtype=object).where(iso, None)
        parsed = pd.to_datetime(series, utc=True, format="ISO8601", errors="coerce")
        bad = ~missing & parsed.isna().to_numpy()
        ms = np.where(bad | missing, np.nan,
                      parsed.dt.tz_localize(None).dt.floor("ms").to_numpy(dtype="datetime64[ms]", na_value=np.datetime64("NaT"))
                      .astype("int64").astype("float64"))
    else:
        ms = np.full(len(column), np.nan)
        bad = ~missing
    failures.append((bad, TIME_NOT_ISO))
    return ms, failures


def require_columns(table: pa.Table, columns: Iterable[str], what: str) -> None:
    """InputShapeError naming the columns `table` lacks, before any row is looked at."""
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise InputShapeError(f"{what} need columns {list(columns)}; missing {missing}")


def validate_prices(
    table: pa.Table,
    known_tokens: pa.Array | Iterable[str],
    window: tuple[datetime, datetime],
    now: datetime,
) -> Validated:
    """Split `table` into rows ready to load and rejects with a reason each."""
    require_columns(table, COLUMNS, "price rows")
    start, end = (to_utc_naive(w) for w in window)
    now = to_utc_naive(now)
    n = table.num_rows
    known = known_tokens if isinstance(known_tokens, pa.Array) else pa.array(list(known_tokens), pa.string())

    token = pc.cast(table["tokenId"], pa.string()).combine_chunks()
    source = pc.cast(table["source"], pa.string()).combine_chunks()
    price_col = table["priceUsd"].combine_chunks()
    time_col = table["recordedAt"].combine_chunks()

    code = np.zeros(n, dtype=np.int16)  # 0: valid so far; k: reasons[k - 1], the first check failed
    reasons: list[str] = []

    def fail(mask: np.ndarray, why: str) -> None:
        target = mask & (code == 0)
        if target.any():
            if why not in reasons:
                reasons.append(why)
            code[target] = reasons.index(why) + 1

    token_missing = np.asarray(pc.fill_null(pc.equal(pc.utf8_length(token), 0), True)
                               .to_numpy(zero_copy_only=False), dtype=bool)
    fail(token_missing, MISSING_TOKEN)
    fail(~np.asarray(pc.fill_null(pc.is_in(token, value_set=known), False).to_numpy(zero_copy_only=False), dtype=bool),
         UNKNOWN_TOKEN)

    price_text, _values, price_failures = _price_text(price_col)
    for mask, why in price_failures:
        fail(mask, why)

    source_len = pc.fill_null(pc.utf8_length(source), 0).to_numpy(zero_copy_only=False)
    fail(source_len == 0, SOURCE_MISSING)
    fail(source_len > SOURCE_MAX_LENGTH, SOURCE_TOO_LONG)

    ms, time_failures = _times(time_col)
    for mask, why in time_failures:
        fail(mask, why)
    with np.errstate(invalid="ignore"):
        start_ms = float(np.datetime64(start, "ms").astype("int64"))
        end_ms = float(np.datetime64(end, "ms").astype("int64"))
        now_ms = float(np.datetime64(now, "ms").astype("int64"))
        fail(ms > now_ms, TIME_IN_FUTURE)
        fail((ms < start_ms) | (ms >= end_ms), outside_window_reason(start, end))

    ok = code == 0
    ok_mask = pa.array(ok)
    valid = pa.table({
        "tokenId": token.filter(ok_mask),
        "priceUsd": price_text.filter(ok_mask),
        "source": source.filter(ok_mask),
        "recordedAt": pa.array(ms[ok].astype("int64"), pa.int64()).cast(pa.timestamp("ms")),
    })
    bad_mask = pa.array(~ok)
    rejects = pa.table({
        "tokenId": _raw_text(table["tokenId"].filter(bad_mask)),
        "priceUsd": _raw_text(table["priceUsd"].filter(bad_mask)),
        "source": _raw_text(table["source"].filter(bad_mask)),
        "recordedAt": _raw_text(table["recordedAt"].filter(bad_mask)),
        "reason": pa.array(reasons, pa.string()).take(pa.array(code[~ok] - 1)),
    })
    return Validated(valid=valid, rejects=rejects)


def count_reasons(rejects: pa.Table) -> dict[str, int]:
    if rejects.num_rows == 0:
        return {}
    counts = pc.value_counts(rejects["reason"].combine_chunks())
    return {item["values"].as_py(): item["counts"].as_py() for item in counts}


def csv_block(table: pa.Table) -> bytes:
    """The table as CSV without a header, for `COPY ... FROM STDIN (FORMAT csv)`: nulls are
    empty unquoted fields, text is quoted, timestamps are 'YYYY-MM-DD HH:MM:SS.mmm'."""
    sink = io.BytesIO()
    pcsv.write_csv(table, sink, pcsv.WriteOptions(include_header=False))
    return sink.getvalue()


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_UUID_GROUPS = ((0, 0, 8), (9, 8, 4), (14, 12, 4), (19, 16, 4), (24, 20, 12))


def random_uuids(n: int) -> pa.Array:
    """`n` random version-4 UUIDs as text, vectorized.

    The ids are made here rather than by the column default: gen_random_uuid() costs
    ~13 us a row on the embedded PostgreSQL build (more than the rest of the COPY).
    """
    raw = np.frombuffer(os.urandom(16 * n), dtype=np.uint8).reshape(n, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40  # version 4
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    nibbles = np.empty((n, 32), dtype=np.uint8)
    nibbles[:, 0::2] = _HEX[raw >> 4]
    nibbles[:, 1::2] = _HEX[raw & 0x0F]
    text = np.full((n, 36), ord("-"), dtype=np.uint8)
    for dst, src, width in _UUID_GROUPS:
        text[:, dst:dst + width] = nibbles[:, src:src + width]
    offsets = np.arange(0, 36 * (n + 1), 36, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(text))
