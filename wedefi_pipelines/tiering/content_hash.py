"""The archive's content hash: one 64-bit hash per row, summed, with the row count.

A sum of per-row hashes is order-independent (PostgreSQL and the Parquet file need not
agree on row order) and, unlike an XOR, a duplicated row adds its hash twice instead of
cancelling out. The per-row hash must be computed identically by PostgreSQL (over the
rows it holds) and by numpy (over the rows read back from the downloaded Parquet file).

PostgreSQL's fast built-in hashes are the `*extended` hash-opclass functions, all built on
Bob Jenkins' lookup3 as PostgreSQL implements it (src/common/hashfn.c,
`hash_bytes_extended` / `hash_bytes_uint32_extended`). They are frozen in practice (hash
partitioning stores their results) and are several times faster than `md5()`
(docs/tiering.md, "Measured choices"). This module reimplements them vectorised over Arrow buffers.

The row hash chains the columns in table order, each column hashed with the previous
result as its seed, so a value moved between columns or rows changes the hash:

    h0 = CHAIN_SEED
    hk = H_type(coalesce(vk, zero), h(k-1) XOR (NULL_MARK if vk is NULL else 0))

H_type is `hashtextextended` over the value's text (text, varchar, jsonb, and numeric
printed as PostgreSQL prints it, scale digits included), `hashint4extended` (int2, int4,
bool), `hashint8extended` (int8) and `timestamp_hash_extended` (timestamp). The result
assumes a little-endian server, as every supported platform is; on any other the
verification fails loudly, it never passes wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from psycopg import sql

from wedefi_pipelines.pghash import GOLDEN as _GOLDEN
from wedefi_pipelines.pghash import hash_bytes_extended as _scalar_hash_bytes

CHAIN_SEED = 0x77656465666931  # 'wedefi1'; also the hash format's version
NULL_MARK = 0x4E554C4C4E554C4C  # 'NULLNULL'
PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 in microseconds since 1970-01-01
_VECTOR_MAX_BLOCKS = 85  # values over ~1 kB take the scalar path (rare: big jsonb)

TEXT_KINDS = ("text", "numeric", "jsonb")
INT4_KINDS = ("int2", "int4", "bool")


@dataclass(frozen=True)
class ContentHash:
    """Row count and the exact (unbounded) sum of the rows' signed 64-bit hashes."""

    count: int = 0
    total: int = 0

    def __add__(self, other: "ContentHash") -> "ContentHash":
        return ContentHash(self.count + other.count, self.total + other.total)

    @classmethod
    def of(cls, hashes: np.ndarray) -> "ContentHash":
        """Exact sum of int64 hashes: halves summed separately so nothing overflows."""
        hashes = np.asarray(hashes, dtype=np.int64)
        high = int(np.sum(hashes >> 32, dtype=np.int64))
        low = int(np.sum(hashes & 0xFFFFFFFF, dtype=np.int64))
        return cls(len(hashes), (high << 32) + low)


# -- lookup3, vectorised over uint32 arrays ----------------------------------------------------

def _rot(x: np.ndarray, k: int) -> np.ndarray:
    return (x << np.uint32(k)) | (x >> np.uint32(32 - k))


def _mix(a, b, c):
    a = a - c; a ^= _rot(c, 4); c = c + b  # noqa: E702  (lookup3's own layout)
    b = b - a; b ^= _rot(a, 6); a = a + c  # noqa: E702
    c = c - b; c ^= _rot(b, 8); b = b + a  # noqa: E702
    a = a - c; a ^= _rot(c, 16); c = c + b  # noqa: E702
    b = b - a; b ^= _rot(a, 19); a = a + c  # noqa: E702
    c = c - b; c ^= _rot(b, 4); b = b + a  # noqa: E702
    return a, b, c


def _final(a, b, c):
    c = c ^ b; c = c - _rot(b, 14)  # noqa: E702
    a = a ^ c; a = a - _rot(c, 11)  # noqa: E702
    b = b ^ a; b = b - _rot(a, 25)  # noqa: E702
    c = c ^ b; c = c - _rot(b, 16)  # noqa: E702
    a = a ^ c; a = a - _rot(c, 4)  # noqa: E702
    b = b ^ a; b = b - _rot(a, 14)  # noqa: E702
    c = c ^ b; c = c - _rot(b, 24)  # noqa: E702
    return a, b, c


def _start(lengths: np.ndarray, seeds: np.ndarray):
    """Initial state, perturbed by the seed where it is non-zero (as PostgreSQL does)."""
    init = (lengths.astype(np.uint32) + np.uint32(_GOLDEN & 0xFFFFFFFF)).astype(np.uint32)
    a, b, c = init.copy(), init.copy(), init.copy()
    seeds = seeds.astype(np.uint64)
    ma, mb, mc = _mix(a + (seeds >> np.uint64(32)).astype(np.uint32), b + seeds.astype(np.uint32), c)
    seeded = seeds != 0
    return np.where(seeded, ma, a), np.where(seeded, mb, b), np.where(seeded, mc, c)


def _result(b: np.ndarray, c: np.ndarray) -> np.ndarray:
    return ((b.astype(np.uint64) << np.uint64(32)) | c.astype(np.uint64)).view(np.int64)


def hash_uint32_extended(values: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """PostgreSQL's hash_bytes_uint32_extended(k, seed), as int64."""
    with np.errstate(over="ignore"):
        a, b, c = _start(np.full(len(values), 4, dtype=np.uint32), seeds)
        a = a + values.astype(np.uint32)
        a, b, c = _final(a, b, c)
    return _result(b, c)


def hash_int8_extended(values: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """hashint8extended: fold the high half into the low one (sign-aware), then hash it."""
    values = values.astype(np.int64)
    low = (values & 0xFFFFFFFF).astype(np.uint32)
    high = ((values >> 32) & 0xFFFFFFFF).astype(np.uint32)
    low ^= np.where(values >= 0, high, ~high)
    return hash_uint32_extended(low, seeds)


def _hash_blocks(words: np.ndarray, blocks: int, lengths: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """hash_bytes_extended for rows of `blocks` full 12-byte blocks plus a tail, given as
    little-endian words zero-padded to 3 * (blocks + 1) per row."""
    with np.errstate(over="ignore"):
        a, b, c = _start(lengths, seeds)
        for j in range(blocks):
            a, b, c = _mix(a + words[:, 3 * j], b + words[:, 3 * j + 1], c + words[:, 3 * j + 2])
        a = a + words[:, 3 * blocks]
        b = b + words[:, 3 * blocks + 1]
        c = c + (words[:, 3 * blocks + 2] << np.uint32(8))  # the lowest byte of c: the length
        a, b, c = _final(a, b, c)
    return _result(b, c)


def _padded_rows(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """The rows' bytes, zero-padded to `width`, as an (n, width) uint8 matrix."""
    n = len(starts)
    out = np.zeros((n, width), dtype=np.uint8)
    if n == 0:
        return out
    length = int(lengths[0])
    if (lengths == length).all() and (starts == starts[0] + length * np.arange(n)).all():
        out[:, :length] = data[starts[0]:starts[0] + n * length].reshape(n, length)  # contiguous: no gather
        return out
    cols = np.arange(width)
    index = np.minimum(starts[:, None] + cols[None, :], max(len(data) - 1, 0))
    if len(data):
        out[:] = data[index]
    out *= cols[None, :] < lengths[:, None]
    return out


def _hash_ascii(values: pa.Array, lengths: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Short ASCII values (ids, numbers, codes): zero-padded by Arrow to one width, so the
    matrix is a reshape of one buffer; rows with fewer blocks keep their state past them."""
    blocks = lengths // 12
    most = int(blocks.max(initial=0))
    width = 12 * (most + 1)
    padded = pc.ascii_rpad(values, width=width, padding="\0").cast(pa.large_binary())
    data = np.frombuffer(padded.buffers()[2], dtype=np.uint8)
    first = int(np.frombuffer(padded.buffers()[1], dtype=np.int64)[padded.offset])
    words = data[first:first + width * len(values)].reshape(len(values), width).view("<u4")
    with np.errstate(over="ignore"):
        a, b, c = _start(lengths, seeds)
        for j in range(most):
            ma, mb, mc = _mix(a + words[:, 3 * j], b + words[:, 3 * j + 1], c + words[:, 3 * j + 2])
            active = blocks > j
            a, b, c = np.where(active, ma, a), np.where(active, mb, b), np.where(active, mc, c)
        tail = np.take_along_axis(words, (3 * blocks)[:, None] + np.arange(3)[None, :], axis=1)
        a = a + tail[:, 0]
        b = b + tail[:, 1]
        c = c + (tail[:, 2] << np.uint32(8))  # the lowest byte of c: the length
        a, b, c = _final(a, b, c)
    return _result(b, c)


def hash_text_extended(values: pa.Array, seeds: np.ndarray) -> np.ndarray:
    """hashtextextended(value, seed) for every value of a string array (nulls hash as '').

    Short ASCII columns take one padded matrix; anything else is grouped by its number of
    12-byte blocks, so each group is one fixed-width matrix and lookup3's loop runs once
    per block over the whole group. Values over ~1 kB are hashed one by one.
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    values = pc.fill_null(values.cast(pa.large_string()), "")
    lengths = pc.binary_length(values).to_numpy(zero_copy_only=False).astype(np.int64)
    blocks = lengths // 12
    uneven = len(values) and lengths.min() != lengths.max()
    if uneven and blocks.max() <= 8 and pc.all(pc.string_is_ascii(values)).as_py():
        return _hash_ascii(values, lengths, seeds)
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int64)[values.offset:values.offset + len(values) + 1]
    data_buffer = values.buffers()[2]
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    starts = offsets[:-1]
    out = np.empty(len(values), dtype=np.int64)
    for count in np.unique(blocks):
        rows = np.flatnonzero(blocks == count)
        if count > _VECTOR_MAX_BLOCKS:
            for i in rows:
                out[i] = _scalar_hash_bytes(data[starts[i]:starts[i] + lengths[i]].tobytes(), int(seeds[i]))
            continue
        width = 12 * (int(count) + 1)
        matrix = _padded_rows(data, starts[rows], lengths[rows], width)
        out[rows] = _hash_blocks(matrix.view("<u4"), int(count), lengths[rows], seeds[rows])
    return out


# -- values as PostgreSQL hashes them ---------------------------------------------------------

def numeric_text(values: pa.Array) -> pa.Array:
    """A decimal array printed as PostgreSQL prints numeric(p,s): every scale digit, no exponent.

    Arrow prints values under 1e-6 in scientific notation ("0E-18"); those are rebuilt from
    the unscaled integer, which then fits in 64 bits.
    """
    scale = values.type.scale
    text = pc.cast(values, pa.string())
    scientific = pc.fill_null(pc.match_substring(text, "E"), False)
    if not pc.any(scientific).as_py():
        return text
    words = np.frombuffer(values.buffers()[1], dtype="<i8").reshape(-1, 2)[values.offset:values.offset + len(values)]
    unscaled = words[:, 0]
    digits = pc.utf8_lpad(pa.array(np.abs(unscaled)).cast(pa.string()), width=scale, padding="0")
    fixed = pc.binary_join_element_wise(pc.if_else(pa.array(unscaled < 0), "-0.", "0."), digits, "")
    return pc.if_else(scientific, fixed, text)


def timestamp_micros(values: pa.Array) -> np.ndarray:
    """A timestamp array as PostgreSQL stores it: microseconds since 2000-01-01 (nulls as 0)."""
    unit = values.type.unit
    factor = {"s": 1_000_000, "ms": 1000, "us": 1, "ns": None}[unit]
    if factor is None:
        raise ValueError("nanosecond timestamps cannot come from PostgreSQL")
    raw = pc.fill_null(values.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
    return np.where(pc.is_null(values).to_numpy(zero_copy_only=False), 0, raw * factor - PG_EPOCH_US)


def row_hashes(batch: pa.RecordBatch | pa.Table, kinds: dict[str, str]) -> np.ndarray:
    """The per-row hashes of `batch`, columns chained in the order of `kinds` (name -> kind)."""
    from wedefi_pipelines.tiering.arrow_io import is_uuid, uuids_to_text

    n = batch.num_rows
    h = np.full(n, CHAIN_SEED, dtype=np.int64)
    for name, kind in kinds.items():
        column = batch.column(name)
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        nulls = pc.is_null(column).to_numpy(zero_copy_only=False)
        seeds = np.where(nulls, h ^ np.int64(NULL_MARK), h)
        if kind == "text":
            if is_uuid(column.type):  # stored as Parquet UUID: hashed as the text PostgreSQL holds
                column = uuids_to_text(column)
            h = hash_text_extended(column, seeds)
        elif kind == "numeric":
            h = hash_text_extended(numeric_text(column), seeds)
        elif kind == "jsonb":
            h = hash_text_extended(column, seeds)
        elif kind in INT4_KINDS:
            ints = pc.fill_null(column.cast(pa.int32()), 0).to_numpy(zero_copy_only=False)
            h = hash_uint32_extended(ints.astype(np.int32).view(np.uint32), seeds)
        elif kind == "int8":
            h = hash_int8_extended(pc.fill_null(column, 0).to_numpy(zero_copy_only=False), seeds)
        elif kind == "timestamp":
            h = hash_int8_extended(timestamp_micros(column), seeds)
        else:
            raise ValueError(f"column {name!r}: no content hash for kind {kind!r}")
    return h


def row_hash_sql(kinds: dict[str, str]) -> sql.Composable:
    """The same chain as a PostgreSQL expression (bigint) over the columns named in `kinds`."""
    expr: sql.Composable = sql.SQL("{}::bigint").format(sql.Literal(CHAIN_SEED))
    for name, kind in kinds.items():
        col = sql.Identifier(name)
        seed = sql.SQL("({prev} # CASE WHEN {col} IS NULL THEN {mark}::bigint ELSE 0 END)").format(
            prev=expr, col=col, mark=sql.Literal(NULL_MARK))
        if kind in TEXT_KINDS:
            expr = sql.SQL("hashtextextended(coalesce({col}::text, ''), {seed})").format(col=col, seed=seed)
        elif kind in INT4_KINDS:
            expr = sql.SQL("hashint4extended(coalesce({col}::int4, 0), {seed})").format(col=col, seed=seed)
        elif kind == "int8":
            expr = sql.SQL("hashint8extended(coalesce({col}, 0), {seed})").format(col=col, seed=seed)
        elif kind == "timestamp":
            expr = sql.SQL("timestamp_hash_extended(coalesce({col}, '2000-01-01'::timestamp), {seed})").format(
                col=col, seed=seed)
        else:
            raise ValueError(f"column {name!r}: no content hash for kind {kind!r}")
    return expr
